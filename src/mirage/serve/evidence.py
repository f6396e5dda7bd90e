"""The ownership evidence of a service, in SQLite (docs/design.md §ownership): per client, the
carried queries (image bytes, shape, bucket and, with keyed ranks, the served ranking as
little-endian int16), at most ``max_items`` each, one row per distinct image. It has the
interface of :class:`mirage.ownership.Evidence`, so the service writes it and ``mirage verify``
reads it. Labels are never stored: they follow from the client's key."""

from __future__ import annotations

import json
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


class EvidenceStore(SQLiteStore):
    def __init__(self, path: str | Path, max_items: int = 4096) -> None:
        super().__init__(path, SCHEMA)
        self.max_items = max_items
        with self.transaction() as conn:  # a store written before rankings were kept
            if "ranking" not in {row[1] for row in conn.execute("PRAGMA table_info(evidence)")}:
                conn.execute("ALTER TABLE evidence ADD COLUMN ranking BLOB")

    def add(self, client: str, x: Tensor, marks: Marks) -> int:
        """Keep ``client``'s evidence rows of ``x`` (``marks.kept``, while it has fewer than ``max_items``)."""
        rows = torch.nonzero(marks.kept).flatten().tolist()
        if not rows:
            return 0
        images = x[rows].detach().float().contiguous()
        if marks.ranking is not None and marks.ranking.shape[1] > np.iinfo(RANKING).max:
            raise ValueError(f"the evidence store keeps rankings of at most {np.iinfo(RANKING).max} classes")
        rankings = [None] * len(rows) if marks.ranking is None else \
            [ranking.numpy().astype(RANKING).tobytes() for ranking in marks.ranking[rows]]
        records = [(client, image_digest(image), marks.buckets[row], json.dumps(list(image.shape)),
                    image.numpy().astype("<f4").tobytes(), ranking)
                   for row, image, ranking in zip(rows, images, rankings, strict=True)]
        with self.transaction() as conn:
            (held,) = conn.execute("SELECT COUNT(*) FROM evidence WHERE client = ?", (client,)).fetchone()
            added = 0
            for record in records:  # a request's carried rows: a few at most
                if held + added >= self.max_items:
                    break
                added += conn.execute("INSERT OR IGNORE INTO evidence VALUES (?, ?, ?, ?, ?, ?)", record).rowcount
            return added

    def clients(self) -> list[str]:
        return [c for (c,) in self.connection().execute("SELECT DISTINCT client FROM evidence ORDER BY client")]

    def items(self, client: str) -> tuple[Tensor | None, list[str], Tensor | None]:
        rows = self.connection().execute(
            "SELECT bucket, shape, image, ranking FROM evidence WHERE client = ? ORDER BY rowid",
            (client,)).fetchall()
        if not rows:
            return None, [], None
        images = [torch.from_numpy(np.frombuffer(blob, dtype="<f4").reshape(json.loads(shape)).copy())
                  for _, shape, blob, _ in rows]
        rankings = [None if blob is None else torch.from_numpy(np.frombuffer(blob, dtype=RANKING).astype(np.int64))
                    for *_, blob in rows]
        return torch.stack(images), [bucket for bucket, *_ in rows], stack_rankings(rankings)
