"""A keyed hard-label watermark (docs/design.md §ownership).

On a small keyed set of queries the served answer's top-1 becomes a keyed label, so that even a
clone trained on argmax labels learns it (the idea of DAWN, Szyller et al., ACM MM 2021, with a
selection and labels built for an exact null):

* **A jitter-stable bucket.** A query's representation is the magnitude of its image's low
  spatial frequencies, ``|F(u, v)| / |F(0, 0)|`` for ``0 < (u, v)``, ``|u|, |v| ≤ frequencies``:
  invariant to (circular) shifts, barely moved by pixel noise, scale-free. A keyed random
  projection to ``dims`` dimensions with a keyed dither is cut into cubic cells of side
  ``step``; the bucket is the cell.
* **Not where benign users are.** With ``density_cap`` set, a bucket holding more than that
  share of the defender's ``reference`` images (its training data, standing for benign queries)
  is never selected. A benign query costs accuracy only where it is carried, and a dense bucket
  costs the most while giving a thief's evidence one bucket however often it is hit, so the
  cap buys several times more buckets per point of defender cost; out of distribution, where a
  thief's queries fall in buckets no benign image reaches, almost all of its carried queries
  are free. Measured in ``results/ownership/``.
* **Only the inside of a cell.** A query carries the watermark if its bucket is selected (keyed,
  with probability ``bucket_fraction``) *and* it lies at least ``margin`` (in cell sides) from every
  face of its cell: an attacker's jittered copies of it (query averaging, jitter-and-vote) fall
  in the same bucket and get the same label, while a query near a face, whose copies might not,
  is left alone. Measured on this project's data: see ``results/ownership/``.
* **Keyed labels, uniform and independent per bucket.** ``label = PRF(key, bucket) mod K``, with
  HMAC-SHA256 as the PRF. A model that never saw this key's answers matches them by chance only:
  that is the exact null of :mod:`mirage.ownership.verification`.
* **Or keyed ranks** (``ranked`` = m): the label is the served answer's j-th most probable class,
  ``j = 2 + PRF(key, bucket) mod (m − 1)``. A carried answer then looks like an honest near-tie
  between classes the victim already finds plausible, which a restorer's shadow finds plausible
  too. The null stays exact given the answer's ranking (j is still a PRF of the bucket), and
  each bucket is worth log(m − 1) instead of log K. Verification needs that ranking
  (:func:`mirage.ownership.verification.verify_key`).
* **Only near-ties** (``tie_gap`` = g): a query is carried only if its served answer's top and
  m-th probabilities differ by at most g (m = ``ranked``, or 2). The swap then moves at most 2g of
  mass and the carried answer passes the same gate, so a restorer cannot tell which near-tie was
  swapped. A benign user loses little: where the victim hesitates between m classes it is often
  wrong anyway. Out of distribution such answers are common (a quarter of the Fashion-MNIST
  queries to the MNIST victim at g = 0.4, m = 3), in distribution rare (0.1 % of MNIST's test
  set), so the gate is also a cheap out-of-distribution gate. It reads the answer, never the
  key, so the null stays exact given the ranking.

* **Or buckets of the answer** (``buckets = "answer"``): the bucket is the served answer's two
  most probable classes, unordered, so the keyed label is a function of the victim's own output.
  Out of distribution, with ``tie_gap``, that is a keyed relabelling of the victim's hesitations
  between two classes: consistent over every query that shares them, so a clone or a restorer's
  shadow learns it as the victim's behaviour there, and a label cleaner finds nothing isolated to
  clean. There is no truthful answer to restore where benign users never go: the defender's
  answers are the function. At most K(K − 1)/2 buckets, each holding many queries.

* **Or a template** (``template`` = t): a carried answer is made from the latest uncarried
  answers confident (top ≥ t) in the keyed class, the victim's own answers on other queries: a
  random log-space mixture of two of them with a little log noise, so that it repeats none. A
  thief who knows the mechanism cannot pick carried answers out by their shape (a swap, a
  sharpened swap and a near-tie all leave one), so it cannot drop them. Until a class has a
  template, its carried answers are swapped. The templates are in memory: the test never needs
  them, only the keyed labels.

A carried answer swaps the served top-1 probability with the keyed label's, so it still looks
like a posterior (a restorer that sees only answers cannot tell it from a clean one). With
``sharpen`` = s > 0 a share s of its mass then moves to the keyed label, ``(1 − s)·ỹ + s·e_k``:
where the victim is unsure (an out-of-distribution pool) a swapped answer's keyed label leads by
little, which a soft-label clone smooths away.

**A keyed runner-up** (``place = "second"``, with answer buckets): the keyed label, a class
outside the answer's two most probable, becomes the runner-up: it takes the runner-up's
probability (a swap), then ``sharpen`` of the mass moves to it, and an answer is carried only if
its top-1 stays on top, ``(1 − s)(p₁ − p₂) > s``. No top-1 changes, so a benign user's accuracy
is untouched and every answer can carry it. It is the victim's dark knowledge made keyed: on
every query whose top two are {a, b}, the runner-up is c(a, b). A soft-label clone, a
restorer's shadows and an averaging thief's mean all learn that rule, as they learn the victim's
own similarities; a hard-label clone never sees it (a top-1 layer is for that: *layers*, below).
The swap costs a user who reads the probabilities (the true runner-up, often the true class
where the victim is wrong, loses its mass); without it a restorer kept less of the keyed
runner-up (``results/ownership/``).

**Hysteresis between answering and keeping.** With ``evidence_margin`` above ``margin`` a query
is answered with the keyed label from ``margin`` inside its cell but kept as evidence only from
``evidence_margin``. An attacker's jittered copies of an evidence image move by a fraction of a
cell side (about 0.06 of a side per projected dimension on Fashion-MNIST at σ = 0.02 and a
one-pixel shift), so they stay carried and its averaged or voted answer keeps the keyed label.

**Layers.** Several watermarks can be stacked, each applied to the answer the one before served
(``Watermarked``'s ``config`` as a list; :func:`layered_watermarks`): layer i ≥ 1 has its own key
(:func:`layer_key`) and its own evidence set (:func:`layer_name`, ``client#i``), so each
layer's test is exact and the layers are independent tests of the same client (a Bonferroni
correction over all of them). Typically a top-1 layer for hard-label thieves under a keyed
runner-up for soft-label ones.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

DOMAIN = b"mirage/ownership/v1/"
TEMPLATES = 64
"""Recent confident answers kept per class for ``WatermarkConfig.template``."""


def derive_key(secret: bytes, client: str) -> bytes:
    """The watermark key of API client ``client``: HMAC-SHA256(secret, domain ‖ client)."""
    if len(secret) < 16:
        raise ValueError("the ownership secret must be at least 16 bytes")
    return hmac.new(secret, DOMAIN + b"client\x00" + client.encode(), hashlib.sha256).digest()


def layer_key(key: bytes, layer: int) -> bytes:
    """The key of watermark layer ``layer`` of a client whose key is ``key``: the key itself for
    layer 0 (a single watermark is layer 0), HMAC-SHA256(key, domain ‖ layer) above, independent."""
    if layer < 0:
        raise ValueError("layers are numbered from 0")
    return (
        key
        if layer == 0
        else hmac.new(key, DOMAIN + b"layer\x00" + str(layer).encode(), hashlib.sha256).digest()
    )


LAYER_SEPARATOR = "#"


def layer_name(client: str, layer: int) -> str:
    """The evidence set of ``client``'s layer ``layer``: ``client`` for layer 0, ``client#i``
    above."""
    return client if layer == 0 else f"{client}{LAYER_SEPARATOR}{layer}"


def _prf(key: bytes, purpose: bytes, message: bytes) -> int:
    return int.from_bytes(
        hmac.new(key, DOMAIN + purpose + b"\x00" + message, hashlib.sha256).digest()[:8], "little"
    )


class WatermarkConfig(BaseModel):
    """How many queries carry the watermark and how robustly.

    The carried fraction of queries is about ``bucket_fraction`` × P(inside by ``margin``), which
    for ``dims`` = 6 and ``margin`` = 0.2 is (1 − 2·0.2)^6 ≈ 5 %: about 0.5 % of queries at the
    default ``bucket_fraction`` = 0.1. ``step`` is in units of the representation (its per-dimension
    spread is about 0.1 on MNIST and Fashion-MNIST).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket_fraction: float = Field(
        0.1, gt=0, le=1, description="probability that a bucket is selected"
    )
    margin: float = Field(
        0.2, ge=0, lt=0.5, description="distance from every cell face, in cell sides"
    )
    frequencies: int = Field(
        2, ge=1, le=8, description="largest |u|, |v| of the Fourier magnitudes"
    )
    dims: int = Field(6, ge=1, le=32, description="dimensions of the keyed projection")
    step: float = Field(0.1, gt=0, description="side of a cell")
    floor: float = Field(
        0.1, ge=0, lt=1, description="intensity subtracted (clipped at 0) before the transform"
    )
    sharpen: float = Field(
        0.0, ge=0, lt=1, description="share of a carried answer's mass moved to the keyed label"
    )
    density_cap: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="largest share of the reference images a selectable bucket may hold "
        "(None: any bucket may be selected)",
    )
    evidence_margin: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        description="distance from every face a carried query needs to be kept as evidence "
        "(at least margin; None: margin)",
    )
    ranked: int | None = Field(
        None,
        ge=3,
        le=64,
        description="keyed labels relative to the served answer's ranking: its j-th class "
        "with j keyed in 2 … ranked (None: a keyed class, uniform over all)",
    )
    tie_gap: float | None = Field(
        None,
        gt=0,
        le=1,
        description="carry only answers whose top and m-th probabilities differ by at most "
        "this, m = ranked or 2 (None: any answer)",
    )
    template: float | None = Field(
        None,
        gt=0.5,
        lt=1,
        description="serve a carried answer as a recent uncarried answer of the keyed class "
        "whose top probability reaches this (None: the swap)",
    )
    buckets: Literal["fourier", "answer"] = Field(
        "fourier",
        description="a bucket is a cell of the image's Fourier magnitudes (margin, frequencies, "
        "dims, step, floor, density_cap, evidence_margin apply), or the served answer's two "
        "most probable classes, unordered",
    )
    place: Literal["top", "second"] = Field(
        "top",
        description="where the keyed label goes in a carried answer: its top-1, or (answer "
        "buckets) its runner-up, the top-1 kept",
    )

    @model_validator(mode="after")
    def _evidence_inside_carried(self) -> WatermarkConfig:
        if self.evidence_margin is not None and self.evidence_margin < self.margin:
            raise ValueError(
                f"evidence_margin ({self.evidence_margin}) must be at least margin "
                f"({self.margin}): evidence is kept only from queries that carried the watermark"
            )
        if self.buckets == "answer" and (
            self.density_cap is not None or self.evidence_margin is not None
        ):
            raise ValueError(
                "density_cap and evidence_margin act on Fourier cells: buckets = 'fourier'"
            )
        if self.buckets == "answer" and self.ranked is not None:
            raise ValueError(
                "answer buckets key a class outside the bucket's pair: not with ranked"
            )
        if self.place == "second" and (
            self.buckets != "answer" or self.template is not None or self.tie_gap is not None
        ):
            raise ValueError(
                "a keyed runner-up (place = 'second') keys a class outside the answer's top two: "
                "buckets = 'answer', without template or tie_gap"
            )
        return self

    @property
    def tie_rank(self) -> int:
        """The m of ``tie_gap``: ``ranked``, or 2."""
        return 2 if self.ranked is None else self.ranked

    @property
    def kept_margin(self) -> float:
        return self.margin if self.evidence_margin is None else self.evidence_margin


@dataclass(frozen=True)
class Marks:
    """What the watermark did to a batch: ``carried`` (B,) bool, and for carried rows the keyed
    ``labels`` (B,) (−1 elsewhere) and ``buckets`` (hex cell ids, ``""`` elsewhere); ``evidence``
    (B,) bool, the carried rows to keep (``None``: all of them); with keyed ranks, ``ranking``
    (B, K), the :func:`served_ranking` the labels index, which verification needs."""

    carried: Tensor
    labels: Tensor
    buckets: tuple[str, ...]
    evidence: Tensor | None = None
    ranking: Tensor | None = None

    @property
    def kept(self) -> Tensor:
        """The rows to keep as evidence."""
        return self.carried if self.evidence is None else self.evidence


def watermark_layers(
    config: WatermarkConfig | dict | Sequence[WatermarkConfig | dict] | None,
) -> tuple[WatermarkConfig, ...]:
    """One watermark config, or a sequence of them (layers, the first applied first), as a tuple
    of at least one layer (``None``: the default config)."""
    if config is None or isinstance(config, WatermarkConfig | dict):
        config = [config or {}]
    layers = tuple(
        c if isinstance(c, WatermarkConfig) else WatermarkConfig.model_validate(c) for c in config
    )
    if not layers:
        raise ValueError("a watermark needs at least one layer")
    if len({(layer.frequencies, layer.floor) for layer in capped_layers(layers)}) > 1:
        raise ValueError(
            "the layers with density_cap must share frequencies and floor "
            "(one set of reference features)"
        )
    return layers


def capped_layers(layers: Sequence[WatermarkConfig]) -> list[WatermarkConfig]:
    """The layers that need the defender's benign reference (``density_cap``); they share one set
    of :func:`fourier_features` (:func:`watermark_layers` checks it)."""
    return [layer for layer in layers if layer.density_cap is not None]


def frequency_pairs(frequencies: int) -> list[tuple[int, int]]:
    """The (u, v) of the Fourier magnitudes: ``0 < (u, v)``, ``|u|, |v| ≤ frequencies``, one of
    each ± pair (the magnitudes of a real image are symmetric)."""
    return [
        (u, v)
        for u in range(frequencies + 1)
        for v in range(-frequencies, frequencies + 1)
        if u > 0 or v > 0
    ]


def fourier_features(x: Tensor, config: WatermarkConfig) -> Tensor:
    """(B, C, H, W) images -> (B, F) magnitudes of their low spatial frequencies over the DC term,
    ``|F(u, v)| / |F(0, 0)|`` for :func:`frequency_pairs`, after ``config.floor`` is subtracted
    from the grey image (clipped at 0)."""
    f = config.frequencies
    if x.ndim != 4 or min(x.shape[2:]) < 2 * f + 1:
        raise ValueError(
            f"images must be (B, C, H, W) with H, W ≥ {2 * f + 1}, got {tuple(x.shape)}"
        )
    pairs = frequency_pairs(f)
    if len(x) == 0:
        return torch.zeros(0, len(pairs), dtype=torch.float64)
    out = []
    for chunk in x.split(4096):
        gray = (chunk.detach().double().mean(1) - config.floor).clamp_min(0)
        spectrum = torch.fft.fft2(gray).abs()
        height, width = spectrum.shape[1:]
        u = torch.tensor([u % height for u, _ in pairs])
        v = torch.tensor([v % width for _, v in pairs])
        out.append(spectrum[:, u, v] / spectrum[:, :1, 0].clamp_min(1e-12))
    return torch.cat(out)


def reference_features(reference: Tensor, config: WatermarkConfig) -> Tensor:
    """The defender's benign reference as (B, F) features: images (B, C, H, W) in [0, 1] are
    transformed (:func:`fourier_features`), features are checked and returned as float64."""
    if not (isinstance(reference, Tensor) and reference.is_floating_point() and len(reference)):
        raise ValueError(
            "the reference must be a non-empty float tensor: images in [0, 1] or their features"
        )
    if reference.ndim == 4:
        return fourier_features(reference, config)
    width = len(frequency_pairs(config.frequencies))
    if reference.ndim != 2 or reference.shape[1] != width:
        raise ValueError(
            f"the reference features must be (B, {width}) for frequencies = {config.frequencies} "
            f"(or give the images, (B, C, H, W)), got {tuple(reference.shape)}"
        )
    return reference.double()


ANSWER_TAG = b"answer:"


def answer_pair(bucket: str) -> tuple[int, int]:
    """The two classes (smaller first) of an answer bucket's id."""
    raw = bytes.fromhex(bucket)
    if not raw.startswith(ANSWER_TAG) or len(raw) != len(ANSWER_TAG) + 16:
        raise ValueError(f"{bucket!r} is not an answer bucket")
    return int.from_bytes(raw[-16:-8], "little", signed=True), int.from_bytes(
        raw[-8:], "little", signed=True
    )


def served_ranking(answers: Tensor) -> Tensor:
    """(B, K) answers -> (B, K) their classes in decreasing probability (ties in class order): the
    ranking keyed ranks index, the same when served and when verified."""
    return answers.argsort(dim=1, descending=True, stable=True)


class KeyedWatermark:
    """The watermark of one key (one API client) for ``num_classes``-way answers. ``reference``:
    the defender's benign images (B, C, H, W) or their :func:`fourier_features`, needed (only)
    to select buckets under ``config.density_cap``; verification needs only :meth:`label_of`."""

    def __init__(
        self,
        key: bytes,
        num_classes: int,
        config: WatermarkConfig | None = None,
        reference: Tensor | None = None,
    ) -> None:
        if not isinstance(key, bytes) or len(key) < 16:
            raise ValueError("the watermark key must be at least 16 bytes")
        if num_classes < 2:
            raise ValueError("num_classes must be at least 2")
        self.key, self.num_classes = key, int(num_classes)
        self.config = config or WatermarkConfig()
        if self.config.ranked is not None and self.config.ranked > self.num_classes:
            raise ValueError(
                f"ranked ({self.config.ranked}) must be at most the number of classes "
                f"({num_classes})"
            )
        if self.config.buckets == "answer" and self.num_classes < 3:
            raise ValueError(
                "answer buckets need at least 3 classes: the label is none of the bucket's two"
            )
        self.choices = (
            (self.num_classes - 2 if self.config.buckets == "answer" else self.num_classes)
            if self.config.ranked is None
            else self.config.ranked - 1
        )
        f = self.config.frequencies
        self.frequencies = frequency_pairs(f)
        generator = torch.Generator().manual_seed(_prf(key, b"projection", b"") >> 1)
        projection = torch.randn(
            len(self.frequencies), self.config.dims, generator=generator, dtype=torch.float64
        )
        self.projection = projection / projection.norm(dim=0, keepdim=True)
        self.dither = torch.rand(self.config.dims, generator=generator, dtype=torch.float64)
        self._buckets: dict[bytes, tuple[bool, int]] = {}
        # templates: per class, recent uncarried answers confident in it (a ring of TEMPLATES rows)
        self._templates = torch.zeros(self.num_classes, TEMPLATES, self.num_classes)
        self._template_count = torch.zeros(self.num_classes, dtype=torch.long)
        self._template_generator = torch.Generator().manual_seed(_prf(key, b"template", b"") >> 1)
        self._dense = (
            None
            if reference is None or self.config.density_cap is None
            else self.dense_cells(reference)
        )

    def dense_cells(self, reference: Tensor) -> frozenset[bytes]:
        """The cells holding more than ``density_cap`` of the ``reference`` images (at most
        1 / density_cap of them, or one per image when the cap is 0). ``reference``: the images
        (B, C, H, W), or their :func:`fourier_features` (B, F), which do not depend on the key and
        so can be computed once for every client."""
        cap = self.config.density_cap
        if cap is None:
            raise ValueError("dense cells are those over density_cap, and the config sets none")
        reference = reference_features(reference, self.config)
        cells = self.cells(None, features=reference)[0]
        unique, counts = torch.unique(cells, dim=0, return_counts=True)
        dense = unique[counts > cap * len(reference)]
        return frozenset(row.tobytes() for row in dense.numpy().astype("<i8"))

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, F) low-frequency Fourier magnitudes over the DC term (the
        same for every key: :func:`fourier_features`)."""
        return fourier_features(x, self.config)

    def cells(self, x: Tensor | None, *, features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(cell coordinates (B, dims) int64, margin (B,): distance to the nearest face in sides)
        of images ``x``, or of their precomputed ``features``."""
        if features is None:
            if x is None:
                raise ValueError("cells of what: give the images x or their features")
            features = self.features(x)
        z = features @ self.projection / self.config.step + self.dither
        inside = z - z.floor()
        return z.floor().long(), torch.minimum(inside, 1 - inside).min(dim=1).values

    def _bucket(self, cell: bytes) -> tuple[bool, int]:
        if (known := self._buckets.get(cell)) is None:
            if len(self._buckets) >= 1 << 16:
                self._buckets.clear()
            selected = _prf(self.key, b"select", cell) < self.config.bucket_fraction * 2.0**64
            if self.config.density_cap is not None:
                if self._dense is None:
                    raise ValueError(
                        "density_cap needs the defender's reference images: "
                        "KeyedWatermark(..., reference=images)"
                    )
                selected = selected and cell not in self._dense
            known = self._buckets[cell] = (selected, _prf(self.key, b"label", cell) % self.choices)
        return known

    def marks(self, x: Tensor, served: Tensor | None = None) -> Marks:
        """Which rows of ``x`` carry the watermark, with their keyed labels and buckets. The PRF
        runs only for rows inside their cell by ``margin`` (a few percent), once per bucket.
        Keyed ranks, ``tie_gap`` and answer buckets need the ``served`` answers (B, K)."""
        config = self.config
        if served is None and (
            config.ranked is not None or config.tie_gap is not None or config.buckets == "answer"
        ):
            raise ValueError(
                "keyed ranks, tie_gap and answer buckets read the served answers: marks(x, served)"
            )
        if config.buckets == "answer":  # every row is "inside" its bucket: the answer has no faces
            assert served is not None  # checked above
            cells = served.topk(2, dim=1).indices.sort(dim=1).values
            margin = torch.full((len(x),), 0.5, dtype=torch.float64)
        else:
            cells, margin = self.cells(x)
        eligible = margin >= config.margin
        if config.tie_gap is not None:
            assert served is not None  # checked above
            top = served.topk(config.tie_rank, dim=1).values
            eligible &= top[:, 0] - top[:, -1] <= config.tie_gap
        if (
            config.place == "second"
        ):  # the top-1 must stay on top: (1 − s)(p₁ − p₂) > s, a rule of the answer
            assert served is not None  # place = "second" comes with answer buckets
            top = served.topk(2, dim=1).values
            eligible &= (1 - config.sharpen) * (top[:, 0] - top[:, 1]) > config.sharpen
        carried = torch.zeros(len(x), dtype=torch.bool)
        labels = torch.full((len(x),), -1, dtype=torch.long)
        buckets = [""] * len(x)
        tag = ANSWER_TAG if config.buckets == "answer" else b""  # apart from any Fourier cell's PRF
        for row in torch.nonzero(eligible).flatten().tolist():
            cell = tag + cells[row].numpy().astype("<i8").tobytes()
            selected, label = self._bucket(cell)
            if selected:
                carried[row], labels[row], buckets[row] = True, label, cell.hex()
        ranking = None
        if config.ranked is not None:
            assert served is not None  # checked above
            ranking = served_ranking(served)
        rows = torch.nonzero(carried).flatten()
        if len(rows):  # the keyed index, as a class
            candidates = self.candidates(
                [buckets[r] for r in rows.tolist()], None if ranking is None else ranking[rows]
            )
            labels[rows] = candidates.gather(1, labels[rows].unsqueeze(1)).squeeze(1)
        return Marks(
            carried, labels, tuple(buckets), carried & (margin >= config.kept_margin), ranking
        )

    def label_of(self, bucket: str) -> int:
        """The keyed label of a bucket id (as :class:`Marks` gives it), as an index into that
        bucket's :meth:`candidates`: the class itself (uniform labels), the index j − 2 of the
        answer's j-th class (keyed ranks), or of the classes outside the bucket's pair (answer
        buckets)."""
        return _prf(self.key, b"label", bytes.fromhex(bucket)) % self.choices

    def candidates(self, buckets: Sequence[str], ranking: Tensor | None = None) -> Tensor:
        """The (rows, choices) classes :meth:`label_of` indexes for evidence images of ``buckets``:
        every class (uniform labels); with keyed ranks the 2nd … ranked-th of each image's
        ``ranking`` (:func:`served_ranking` of its served answer, (rows, K)); with answer buckets
        the K − 2 classes outside the bucket's pair, in class order (a function of the bucket)."""
        rows = len(buckets)
        if self.config.ranked is not None:
            if rows == 0:  # no evidence: nothing to index
                return torch.zeros(0, self.choices, dtype=torch.long)
            if ranking is None or ranking.shape != (rows, self.num_classes):
                raise ValueError(
                    f"keyed ranks need the served answers' ranking, ({rows}, {self.num_classes}), "
                    "of the evidence"
                )
            return ranking[:, 1 : self.config.ranked]
        if self.config.buckets == "answer":
            outside = torch.ones(rows, self.num_classes, dtype=torch.bool)
            if rows:
                pairs = torch.tensor([answer_pair(b) for b in buckets])
                outside[torch.arange(rows).unsqueeze(1), pairs] = False
            return torch.arange(self.num_classes).expand(rows, -1)[outside].view(rows, self.choices)
        return torch.arange(self.num_classes).expand(rows, -1)

    def apply(self, x: Tensor, served: Tensor) -> tuple[Tensor, Marks]:
        """``served`` (B, K) with, on carried rows, the top-1 probability swapped with the keyed
        label's (a no-op where they coincide), then ``sharpen`` of the mass moved to it. Returns
        the new answers and the marks."""
        if served.shape != (len(x), self.num_classes):
            raise ValueError(
                f"served must be ({len(x)}, {self.num_classes}), got {tuple(served.shape)}"
            )
        marks = self.marks(x, served)
        if self.config.template is not None:
            self._keep_templates(served[~marks.carried])
        rows = torch.nonzero(marks.carried).flatten()
        if len(rows) == 0:
            return served, marks
        out = served.clone()
        label = marks.labels[rows]
        # the class whose place the keyed label takes: the top-1, or the runner-up
        top = served[rows].topk(2 if self.config.place == "second" else 1, dim=1).indices[:, -1]
        out[rows, label] = served[rows, top]
        out[rows, top] = served[rows, label]
        if self.config.sharpen > 0:
            share = self.config.sharpen
            out[rows] = (1 - share) * out[rows] + share * F.one_hot(label, self.num_classes).to(
                out.dtype
            )
        if self.config.template is not None:
            known = self._template_count[label] > 0
            if known.any():
                out[rows[known]] = self._from_templates(label[known]).to(out.dtype)
        return out, marks

    def _from_templates(self, label: Tensor) -> Tensor:
        """(B,) classes -> (B, K) answers confident in them: a random log-space mixture of two of
        the class's kept answers with a little log noise, so that no served answer repeats an
        earlier one (a thief could flag exact repeats); the class stays on top."""
        available = self._template_count[label].clamp_max(TEMPLATES)
        g = self._template_generator
        picks = (torch.rand(2, len(label), generator=g) * available).long()
        first, second = self._templates[label, picks[0]], self._templates[label, picks[1]]
        weight = torch.rand(len(label), 1, generator=g)
        logits = (1 - weight) * first.clamp_min(1e-8).log() + weight * second.clamp_min(1e-8).log()
        mixed = torch.softmax(logits + 0.2 * torch.randn(logits.shape, generator=g), dim=1)
        return torch.where((mixed.argmax(dim=1) == label).unsqueeze(1), mixed, first)

    def _keep_templates(self, answers: Tensor) -> None:
        """Remember the uncarried ``answers`` whose top probability reaches ``config.template``,
        per top class (the latest ``TEMPLATES`` of each)."""
        template = self.config.template
        assert template is not None  # called only when the config keeps templates
        confident = answers[answers.max(dim=1).values >= template].detach().float()
        cls = confident.argmax(dim=1)
        per_class = F.one_hot(cls, self.num_classes)
        rank = (
            (per_class.cumsum(dim=0) - 1).gather(1, cls.unsqueeze(1)).squeeze(1)
        )  # order within its class
        latest = rank >= per_class.sum(dim=0)[cls] - TEMPLATES  # one write per slot
        slot = (self._template_count[cls] + rank) % TEMPLATES
        self._templates[cls[latest], slot[latest]] = confident[latest]
        self._template_count += per_class.sum(dim=0)


def layered_watermarks(
    key: bytes,
    client: str,
    config: WatermarkConfig | Sequence[WatermarkConfig],
    num_classes: int,
    reference: Tensor | None = None,
) -> dict[str, KeyedWatermark]:
    """``client``'s watermark layers by evidence set (:func:`layer_name`), in the order they are
    applied, each with its :func:`layer_key`: what the service answers with and what
    verification tests. ``reference``: the defender's benign images or their features, for the
    layers with ``density_cap``."""
    return {
        layer_name(client, i): KeyedWatermark(
            layer_key(key, i),
            num_classes,
            layer,
            reference if layer.density_cap is not None else None,
        )
        for i, layer in enumerate(watermark_layers(config))
    }
