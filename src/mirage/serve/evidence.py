"""The ownership evidence of a service, in SQLite (docs/design.md §ownership): per client, the
carried queries (image bytes, shape, bucket and, with keyed ranks, the served ranking as
little-endian int16), at most ``max_items`` each, one row per distinct image. It has the
interface of :class:`mirage.ownership.Evidence`, so the service writes it and ``mirage verify``
reads it. Labels are never stored: they follow from the client's key."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mirage.ownership.evidence import image_digest, stack_rankings
from mirage.ownership.watermark import Marks
from mirage.serve.quotas import SQLiteStore

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


class DeferredEvidence:
    """The evidence a served watermark hands over, held instead of written (docs/design.md
    §ownership): the micro-batcher collects each defense call's records (:meth:`collecting`) and
    gives every request its own, and the service writes them (:meth:`EvidenceStore.write`) only
    once that request was answered and charged — never for a client that hung up, was refused or
    whose answer failed."""

    def __init__(self, store: EvidenceStore) -> None:
        self.store = store
        self._local = threading.local()

    def add(self, client: str, x: Tensor, marks: Marks) -> int:
        collected = getattr(self._local, "records", None)
        if collected is None:
            raise RuntimeError(
                "served evidence is collected per micro-batch: call the defense inside collecting()"
            )
        records = self.store.records(client, x, marks)
        collected.extend(records)
        return len(records)

    @contextmanager
    def collecting(self) -> Iterator[list[tuple[int, Record]]]:
        """``with evidence.collecting() as records:`` — (row of the defense's batch, record) of
        every ``add`` in this thread meanwhile."""
        records: list[tuple[int, Record]] = []
        self._local.records = records
        try:
            yield records
        finally:
            self._local.records = None
