"""What verification needs, kept with bounded size (docs/design.md §ownership): per client, the
carried queries themselves (the images a clone was taught the keyed labels on), their buckets and,
with keyed ranks, the served ranking the label indexed (K small integers), at most ``max_items``
per client, one copy of each image. Labels are not stored: they are regenerated from the
client's key and the bucket.

Two stores with one interface: :class:`Evidence` in memory (the benchmark, the Python API) and
:class:`EvidenceStore` in SQLite (the service writes it, ``mirage verify`` reads it)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from mirage.ownership.watermark import Marks
from mirage.storage import SQLiteStore


def image_digest(image: Tensor) -> str:
    return hashlib.sha256(
        image.detach().float().contiguous().numpy().astype("<f4").tobytes()
    ).hexdigest()


class EvidenceItems(Protocol):
    """What verification reads from evidence (:func:`~mirage.ownership.name_the_thief`): an
    :class:`Evidence` or an :class:`EvidenceStore`."""

    def items(self, client: str) -> tuple[Tensor | None, list[str], Tensor | None]: ...


class Evidence:
    """In-memory evidence (for the benchmark and the Python API); the service keeps the same in
    SQLite (:class:`EvidenceStore`). Thread-safe."""

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


SCHEMA = """
CREATE TABLE IF NOT EXISTS evidence (
    client TEXT NOT NULL,
    digest TEXT NOT NULL,
    bucket TEXT NOT NULL,
    shape  TEXT NOT NULL,
    image  BLOB NOT NULL,
    ranking BLOB,
    PRIMARY KEY (client, digest)
)
"""
RANKING = "<i2"
"""How a served ranking is stored: K ≤ 32767 classes."""


Record = tuple[str, str, str, str, bytes, bytes | None]
"""One evidence row: (evidence set, image digest, bucket, shape as JSON, image bytes, ranking)."""


class EvidenceStore(SQLiteStore):
    """The evidence in a SQLite file: one row per (client, distinct image), the image as
    little-endian float32 with its shape, bucket and served ranking. Safe across threads and
    processes sharing the file (:class:`mirage.storage.SQLiteStore`); every call blocks."""

    def __init__(self, path: str | Path, max_items: int = 4096, *, timeout: float = 60.0) -> None:
        super().__init__(path, SCHEMA, timeout=timeout)
        self.max_items = max_items
        with self.transaction() as conn:  # a store written before rankings were kept
            if "ranking" not in {row[1] for row in conn.execute("PRAGMA table_info(evidence)")}:
                conn.execute("ALTER TABLE evidence ADD COLUMN ranking BLOB")

    @staticmethod
    def records(client: str, x: Tensor, marks: Marks) -> list[tuple[int, Record]]:
        """``client``'s evidence rows of ``x`` (``marks.kept``) as (row of ``x``, record), written
        by :meth:`write`; no storage here."""
        rows = torch.nonzero(marks.kept).flatten().tolist()
        if not rows:
            return []
        images = x[rows].detach().float().contiguous()
        if marks.ranking is not None and marks.ranking.shape[1] > np.iinfo(RANKING).max:
            raise ValueError(
                f"the evidence store keeps rankings of at most {np.iinfo(RANKING).max} classes"
            )
        rankings = (
            [None] * len(rows)
            if marks.ranking is None
            else [ranking.numpy().astype(RANKING).tobytes() for ranking in marks.ranking[rows]]
        )
        return [
            (
                row,
                (
                    client,
                    image_digest(image),
                    marks.buckets[row],
                    json.dumps(list(image.shape)),
                    image.numpy().astype("<f4").tobytes(),
                    ranking,
                ),
            )
            for row, image, ranking in zip(rows, images, rankings, strict=True)
        ]

    def write(self, records: list[Record]) -> int:
        """Keep ``records`` (one request's carried rows: a few at most), each evidence set up to
        ``max_items``; returns how many were new."""
        added = 0
        with self.transaction() as conn:
            held: dict[str, int] = {}
            for record in records:
                client = record[0]
                if client not in held:
                    (held[client],) = conn.execute(
                        "SELECT COUNT(*) FROM evidence WHERE client = ?", (client,)
                    ).fetchone()
                if held[client] >= self.max_items:
                    continue
                new = conn.execute(
                    "INSERT OR IGNORE INTO evidence VALUES (?, ?, ?, ?, ?, ?)", record
                ).rowcount
                held[client] += new
                added += new
        return added

    def add(self, client: str, x: Tensor, marks: Marks) -> int:
        """Keep ``client``'s evidence rows of ``x`` (``marks.kept``, while it has fewer than
        ``max_items``)."""
        return self.write([record for _, record in self.records(client, x, marks)])

    def clients(self) -> list[str]:
        return [
            c
            for (c,) in self.connection().execute(
                "SELECT DISTINCT client FROM evidence ORDER BY client"
            )
        ]

    def items(self, client: str) -> tuple[Tensor | None, list[str], Tensor | None]:
        rows = (
            self.connection()
            .execute(
                "SELECT bucket, shape, image, ranking FROM evidence WHERE client = ? "
                "ORDER BY rowid",
                (client,),
            )
            .fetchall()
        )
        if not rows:
            return None, [], None
        images = [
            torch.from_numpy(np.frombuffer(blob, dtype="<f4").reshape(json.loads(shape)).copy())
            for _, shape, blob, _ in rows
        ]
        rankings = [
            None
            if blob is None
            else torch.from_numpy(np.frombuffer(blob, dtype=RANKING).astype(np.int64))
            for *_, blob in rows
        ]
        return torch.stack(images), [bucket for bucket, *_ in rows], stack_rankings(rankings)
