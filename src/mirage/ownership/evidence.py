"""What verification needs, kept with bounded size (docs/design.md §ownership): per client, the
carried queries themselves (the images a clone was taught the keyed labels on), their buckets and,
with keyed ranks, the served ranking the label indexed (K small integers), at most ``max_items``
per client, one copy of each image. Labels are not stored: they are regenerated from the
client's key and the bucket."""

from __future__ import annotations

import hashlib
import threading
from typing import Protocol

import torch
from torch import Tensor

from mirage.ownership.watermark import Marks


def image_digest(image: Tensor) -> str:
    return hashlib.sha256(
        image.detach().float().contiguous().numpy().astype("<f4").tobytes()
    ).hexdigest()


class EvidenceItems(Protocol):
    """What verification reads from evidence (:func:`~mirage.ownership.name_the_thief`): an
    :class:`Evidence`, or the service's SQLite store (``mirage.serve.evidence.EvidenceStore``)."""

    def items(self, client: str) -> tuple[Tensor | None, list[str], Tensor | None]: ...


class Evidence:
    """In-memory evidence (for the benchmark and the Python API); the service keeps the same in
    SQLite (:class:`mirage.serve.evidence.EvidenceStore`). Thread-safe."""

    def __init__(self, max_items: int = 2048) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_items = max_items
        self._items: dict[str, dict[str, tuple[Tensor, str, Tensor | None]]] = {}
        self._lock = threading.Lock()

    def add(self, client: str, x: Tensor, marks: Marks) -> int:
        """Keep ``client``'s evidence rows of ``x`` (``marks.kept``); returns how many were new."""
        added = 0
        rows = torch.nonzero(marks.kept).flatten().tolist()
        with self._lock:
            kept = self._items.setdefault(client, {})
            for row in rows:
                if len(kept) >= self.max_items:
                    break
                digest = image_digest(x[row])
                if digest not in kept:
                    ranking = None if marks.ranking is None else marks.ranking[row].clone()
                    kept[digest] = (x[row].detach().float().clone(), marks.buckets[row], ranking)
                    added += 1
        return added

    def clients(self) -> list[str]:
        with self._lock:
            return sorted(self._items)

    def items(self, client: str) -> tuple[Tensor | None, list[str], Tensor | None]:
        """(images (M, C, H, W) or ``None`` when there are none, buckets (M,), served rankings
        (M, K) or ``None`` unless every image has one)."""
        with self._lock:
            kept = list(self._items.get(client, {}).values())
        if not kept:
            return None, [], None
        return (
            torch.stack([image for image, _, _ in kept]),
            [bucket for _, bucket, _ in kept],
            stack_rankings([ranking for _, _, ranking in kept]),
        )


def stack_rankings(rankings: list[Tensor | None]) -> Tensor | None:
    """(M, K) from M rankings (K,), or ``None`` when any is missing (uniform labels need none)."""
    present = [r for r in rankings if r is not None]
    if not rankings or len(present) != len(rankings):
        return None
    return torch.stack(present).long()
