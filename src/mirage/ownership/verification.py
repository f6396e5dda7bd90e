"""Is a suspect model a clone made through this key? An exact test (docs/design.md §ownership).

The keyed labels are uniform over the K classes and independent across buckets (a PRF of the
bucket). For a model that never saw this key's answers, its outputs on the evidence images are
independent of those labels. Give each evidence image i an integer score ``q_i(k)`` per class,
computed from the suspect's output alone, and sum per bucket: ``v_b(k) = Σ_{i∈b} q_i(k)``. The
statistic ``S = Σ_b v_b(y_b)`` with ``y_b`` iid uniform has as null law the convolution over
buckets of "``v_b(k)`` for a uniform k", so ``P(S ≥ s)`` is exact given the suspect's outputs,
with no clean models needed. Three scores:

* argmax matches (``q = one-hot prediction``; with one image per bucket, the Binomial(M, 1/K)
  tail), for reading;
* the suspect's probability on a 1/16 grid (``q = round(16 p(k | x))``), for reading (it decided
  before the rank score did);
* **the decision's, the rank**: ``q = #{j : p(j | x) < p(k | x)}``, how many classes the suspect
  puts below k (K − 1 for its argmax, 0 for its last; ties score alike). A clone taught the keyed
  label by answers that still carry the truthful class (soft labels, averaged or partly restored
  answers) often learns it as its runner-up rather than its argmax: the probability score counts
  that runner-up by its mass, small beside the argmax's, the rank counts it almost as an argmax
  and does not depend on the suspect's calibration. Measured in ``results/ownership/``.

Images of one bucket share a label, so they are not independent trials; this test does not
assume they are (a Binomial over images would overstate the evidence when a bucket holds
similar images the suspect labels alike).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mirage.models.base import clean_posteriors
from mirage.ownership.evidence import EvidenceItems
from mirage.ownership.watermark import (
    KeyedWatermark,
    WatermarkConfig,
    derive_key,
    layer_name,
    layered_watermarks,
    watermark_layers,
)

RESOLUTION = 16
"""The probability statistic's scores are round(RESOLUTION · p(k | x)): integers, so that the null
is an exact convolution."""


def rank_scores(probs: Tensor) -> Tensor:
    """(M, K) posteriors -> (M, K) int64: for each class, how many classes have a strictly smaller
    probability (the decision's score, a function of the suspect's outputs only)."""
    return torch.searchsorted(
        probs.sort(dim=1).values.contiguous(), probs.contiguous(), right=False
    )


def exact_tail(
    scores: Tensor, buckets: list[str], labels: Mapping[str, int]
) -> tuple[int, float, float]:
    """(observed statistic s, its null mean, exact P(S ≥ s)) for ``S = Σ_i scores[i, y_{b(i)}]``
    with per-bucket labels ``y_b`` iid uniform over the K columns. ``scores``: (M, K) non-negative
    integers fixed before the labels are looked at (a function of the suspect's outputs only)."""
    if scores.ndim != 2 or len(scores) != len(buckets):
        raise ValueError("scores must be (M, K) with one bucket per row")
    if len(buckets) == 0:
        return 0, 0.0, 1.0
    values = scores.long().numpy()
    if (values < 0).any():
        raise ValueError("scores must be non-negative integers")
    k = values.shape[1]
    per_bucket: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(k, dtype=np.int64))
    for row, bucket in zip(values, buckets, strict=True):
        per_bucket[bucket] += row
    observed = int(sum(v[labels[b]] for b, v in per_bucket.items()))
    mean = float(sum(v.mean() for v in per_bucket.values()))
    # The null pmf over 0 … observed, everything above folded into the last cell (only P(S ≥ s)
    # is needed): one shifted add per class and bucket.
    null = np.zeros(observed + 1)
    null[0] = 1.0
    for v in per_bucket.values():
        nxt = np.zeros_like(null)
        for shift in np.minimum(v, observed):
            nxt[shift:] += null[: len(null) - shift] / k
            nxt[-1] += null[len(null) - shift :].sum() / k if shift else 0.0
        null = nxt
    return observed, mean, float(min(1.0, null[-1]))


def match_pvalue(
    predictions: Tensor, buckets: list[str], labels: Mapping[str, int], num_classes: int
) -> tuple[int, float, float]:
    """(matches, expected matches, exact P(S ≥ matches)) of argmax ``predictions`` (M,) against the
    keyed ``labels`` of their ``buckets``: :func:`exact_tail` of the one-hot predictions."""
    if len(predictions) != len(buckets):
        raise ValueError("one bucket per prediction")
    if len(predictions) and not (
        0 <= int(predictions.min()) and int(predictions.max()) < num_classes
    ):
        raise ValueError(f"predictions must be classes of {num_classes}")
    one_hot = (
        torch.nn.functional.one_hot(predictions.long(), num_classes)
        if len(predictions)
        else torch.zeros(0, num_classes, dtype=torch.long)
    )
    return exact_tail(one_hot, buckets, labels)


@dataclass(frozen=True)
class OwnershipTest:
    """One client's test: evidence size, distinct buckets; for reading, argmax matches and the
    probability statistic (Σ round(16·p(y_b | x))) with their exact p-values; the rank statistic
    (``score``: Σ of how many classes the suspect ranks below y_b) with its exact p-value, which
    decides, corrected for testing every client (Bonferroni): ``named``."""

    client: str
    images: int
    buckets: int
    matches: int
    expected: float
    match_p_value: float
    probability_score: int
    expected_probability_score: float
    probability_p_value: float
    score: int
    expected_score: float
    p_value: float
    corrected_p_value: float
    alpha: float

    @property
    def named(self) -> bool:
        return self.corrected_p_value <= self.alpha


def verify_key(
    suspect: nn.Module,
    watermark: KeyedWatermark,
    images: Tensor | None,
    buckets: list[str],
    *,
    ranking: Tensor | None = None,
    client: str = "",
    tests: int = 1,
    alpha: float = 1e-6,
) -> OwnershipTest:
    """The exact test of ``suspect`` against one key's evidence (``tests``: how many clients are
    tested in all, for the correction). With keyed ranks (``watermark.config.ranked``),
    ``ranking`` (M, K) gives each evidence image's classes in the served answer's decreasing
    order, and the null is uniform over the keyed ranks given it."""
    return verify_keys(
        suspect, [(watermark, images, buckets, ranking)], client=client, tests=tests, alpha=alpha
    )


def verify_keys(
    suspect: nn.Module,
    parts: Sequence[tuple[KeyedWatermark, Tensor | None, list[str], Tensor | None]],
    *,
    client: str = "",
    tests: int = 1,
    alpha: float = 1e-6,
) -> OwnershipTest:
    """One exact test of ``suspect`` against the union of several keys' evidence, each part
    (watermark, images, buckets, ranking) as :func:`verify_key` takes it: a thief that spread its
    queries over several API keys left a share of its evidence with each, and their sum is one
    statistic. The null is still exact: the keys are independent, so every (key, bucket) label is
    an independent uniform draw, and :func:`exact_tail` convolves over them all. The keys must
    share their number of classes and of choices (one watermark config)."""
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
    if not parts:
        raise ValueError("verify_keys needs at least one key's evidence")
    k, choices = parts[0][0].num_classes, parts[0][0].choices
    if any((w.num_classes, w.choices) != (k, choices) for w, *_ in parts):
        raise ValueError(
            "the keys of one test must share their number of classes and of keyed choices"
        )
    all_probs, all_candidates, all_buckets, labels = [], [], [], {}
    for part, (watermark, images, buckets, ranking) in enumerate(parts):
        probs = (
            clean_posteriors(suspect, images, batch_size=512)
            if images is not None
            else torch.zeros(0, k)
        )
        if probs.shape[1] != k:
            raise ValueError(f"the suspect answers {probs.shape[1]} classes, the watermark has {k}")
        all_probs.append(probs)
        if len(buckets) != len(probs):
            raise ValueError("one bucket per evidence image")
        all_candidates.append(watermark.candidates(buckets, ranking))
        all_buckets += [f"{part}:{b}" for b in buckets]
        labels.update({f"{part}:{b}": watermark.label_of(b) for b in set(buckets)})
    probs, candidates = torch.cat(all_probs), torch.cat(all_candidates)

    def test(scores: Tensor) -> tuple[int, float, float]:
        return exact_tail(scores.gather(1, candidates), all_buckets, labels)

    matches, expected, match_p = test(torch.nn.functional.one_hot(probs.argmax(1), k))
    mass, expected_mass, mass_p = test((probs * RESOLUTION).round().long())
    score, expected_score, p = test(rank_scores(probs))
    return OwnershipTest(
        client=client,
        images=len(all_buckets),
        buckets=len(labels),
        matches=matches,
        expected=expected,
        match_p_value=match_p,
        probability_score=mass,
        expected_probability_score=expected_mass,
        probability_p_value=mass_p,
        score=score,
        expected_score=expected_score,
        p_value=p,
        corrected_p_value=min(1.0, p * tests),
        alpha=alpha,
    )


def name_the_thief(
    suspect: nn.Module,
    evidence: EvidenceItems,
    watermarks: Mapping[str, KeyedWatermark],
    *,
    groups: Sequence[Sequence[str]] = (),
    alpha: float = 1e-6,
) -> list[OwnershipTest]:
    """Test ``suspect`` against every client's key and evidence (with keyed ranks, the served
    rankings the evidence kept), and against each of ``groups`` (clients the defender believes
    one party, e.g. one account's keys: one test of their pooled evidence, named
    ``"a,b,…"``), most significant first; the correction counts every test. A layered watermark
    gives each client one evidence set per layer (``client#i``,
    :func:`~mirage.ownership.layered_watermarks`): each is a test, and the client is named when
    any of its layers is."""
    for group in groups:
        if len(group) < 2 or len(set(group)) != len(group) or not set(group) <= set(watermarks):
            raise ValueError(f"a group names two or more distinct known clients, got {list(group)}")
    evidence_of = {c: evidence.items(c) for c in watermarks}
    count = len(watermarks) + len(groups)

    def parts(clients: Sequence[str]) -> list:
        return [(watermarks[c], *evidence_of[c]) for c in clients]

    tests = [
        verify_keys(suspect, parts([c]), client=c, tests=count, alpha=alpha) for c in watermarks
    ]
    tests += [
        verify_keys(suspect, parts(g), client=",".join(g), tests=count, alpha=alpha) for g in groups
    ]
    return sorted(tests, key=lambda t: (t.p_value, t.client))


def verify_clients(
    suspect: nn.Module,
    secret: bytes,
    clients: Sequence[str],
    layers: WatermarkConfig | Sequence[WatermarkConfig],
    evidence: EvidenceItems,
    *,
    groups: Sequence[Sequence[str]] = (),
    alpha: float = 1e-6,
) -> list[OwnershipTest]:
    """What ``mirage verify`` runs: ``suspect`` tested against every layer of every client's
    watermark, each key derived from the service's ``secret`` as the service derives it, on the
    ``evidence`` the service kept, and against each of ``groups`` (client names; pooled layer by
    layer). See :func:`name_the_thief`."""
    if not hasattr(suspect, "num_classes"):
        raise ValueError(
            "the suspect must say its number of classes (num_classes), as mirage's loaders do"
        )
    layers = watermark_layers(layers)
    num_classes: int = suspect.num_classes  # type: ignore[assignment]  # a loader's int
    watermarks = {
        name: watermark
        for client in clients
        for name, watermark in layered_watermarks(
            derive_key(secret, client), client, layers, num_classes
        ).items()
    }
    pooled = [[layer_name(c, i) for c in group] for group in groups for i in range(len(layers))]
    return name_the_thief(suspect, evidence, watermarks, groups=pooled, alpha=alpha)
