"""How an attacker shapes its query stream against a query-stream detector such as PRADA
(docs/design.md §countermeasures, §detection): benign decoys mixed into the stream, and the
stream spread over several API keys. :class:`~mirage.attacks.QueryClient` uses both.

**Decoys** (``mix_benign = f``). Position i of the stream (0-based, counting every image sent,
decoy or not) is a decoy when ⌊(i + 1)·f⌋ > ⌊i·f⌋, so every prefix of L images holds exactly
⌊L·f⌋ decoys, spread evenly: at f = 0.3 positions 3, 6, 9, … are decoys, at f = 0.5 every second
one. Position 0 is never a decoy. The decoys are natural images of the attacker's own data, in a
seeded random order without replacement (reshuffled when the data runs out); they may coincide
with images the attack asks itself.

**Keys** (``api_keys = k``). The attacker holds k API keys and sends successive requests
round-robin over them; a request goes whole to one key, so the keys' shares are equal up to one
request. A per-key detector sees one key's share only: its nearest-neighbour distances, its
classes and its alarm are computed without the other keys' queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor

from mirage.api.base import PredictionAPI

MAX_DENOMINATOR = 1000
"""``mix_benign`` is read as the nearest fraction with at most this denominator (0.3 is 3/10), so
the decoy schedule is exact integer arithmetic."""


def decoy_fraction(fraction: float) -> Fraction:
    """``fraction`` in [0, 1) as an exact fraction (denominator ≤ :data:`MAX_DENOMINATOR`)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the decoy fraction must lie in [0, 1), got {fraction}")
    return Fraction(fraction).limit_denominator(MAX_DENOMINATOR)


def decoys_before(length: int, fraction: Fraction) -> int:
    """Decoys among the first ``length`` positions of the stream: ⌊length·f⌋."""
    return length * fraction.numerator // fraction.denominator


def decoy_mask(start: int, stop: int, fraction: Fraction) -> Tensor:
    """(stop − start,) bool: which stream positions in [start, stop) are decoys."""
    position = torch.arange(start, stop + 1, dtype=torch.long)
    before = position * fraction.numerator // fraction.denominator  # decoys before each position
    return before[1:] > before[:-1]


class DecoyPool:
    """The attacker's natural images handed out as decoys: a seeded permutation consumed front to
    back, a fresh one drawn whenever it runs out (no image repeats before all were used)."""

    def __init__(self, images: Tensor, generator: torch.Generator) -> None:
        if len(images) == 0:
            raise ValueError("decoys need at least one image of the attacker's data")
        self.images = images
        self.generator = generator
        self._order = torch.empty(0, dtype=torch.long)

    def take(self, n: int) -> Tensor:
        """The next ``n`` decoys: (n, C, H, W)."""
        while len(self._order) < n:
            self._order = torch.cat(
                [self._order, torch.randperm(len(self.images), generator=self.generator)]
            )
        index, self._order = self._order[:n], self._order[n:]
        return self.images[index]


def key_apis(api: PredictionAPI | Sequence[PredictionAPI], keys: int = 1) -> list[PredictionAPI]:
    """One prediction API per key the attacker holds.

    ``api`` is one API or a sequence of them, one per key (e.g. one
    :class:`~mirage.serve.client.HTTPPredictionAPI` per API key). With ``keys > 1`` and a single
    API, that API is the first key and ``keys − 1`` more are built with its ``for_client``
    (:meth:`~mirage.api.InProcessAPI.for_client`: same model, defense and detector, another client
    with a ledger of its own), named ``<client>+1``, ``<client>+2``, …; an API without
    ``for_client`` (a remote service: a key is a secret the attacker must hold) raises
    ``TypeError``. A sequence must hold ``keys`` APIs when ``keys > 1``.
    """
    apis = list(api) if isinstance(api, Sequence) else [api]
    if not apis:
        raise ValueError("no prediction API given")
    if keys > 1 and len(apis) == 1:
        for_client = getattr(apis[0], "for_client", None)
        if for_client is None:
            raise TypeError(
                f"api_keys={keys} needs one API per key: {type(apis[0]).__name__} cannot make "
                f"views for other clients, pass a sequence of {keys} APIs instead"
            )
        base = getattr(apis[0], "client", "default")
        apis += [for_client(f"{base}+{i}") for i in range(1, keys)]
    elif keys > 1 and len(apis) != keys:
        raise ValueError(f"api_keys={keys} but {len(apis)} APIs were given")
    first = apis[0]
    for other in apis[1:]:
        if tuple(other.input_shape) != tuple(first.input_shape) or int(other.num_classes) != int(
            first.num_classes
        ):
            raise ValueError(
                "the APIs of one attacker must serve the same model (input shape and classes)"
            )
    return apis
