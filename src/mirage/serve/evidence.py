"""The ownership evidence of a service, in SQLite (docs/design.md §ownership): per client, the
carried queries (image bytes, shape, bucket), at most ``max_items`` each, one row per distinct
image. It has the interface of :class:`mirage.ownership.Evidence`, so the service writes it and
``mirage verify`` reads it. Labels are never stored: they follow from the client's key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mirage.ownership.evidence import image_digest
from mirage.ownership.watermark import Marks
from mirage.serve.quotas import SQLiteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS evidence (
    client TEXT NOT NULL,
    digest TEXT NOT NULL,
    bucket TEXT NOT NULL,
    shape  TEXT NOT NULL,
    image  BLOB NOT NULL,
    PRIMARY KEY (client, digest)
)
"""


class EvidenceStore(SQLiteStore):
    def __init__(self, path: str | Path, max_items: int = 4096) -> None:
        super().__init__(path, SCHEMA)
        self.max_items = max_items

    def add(self, client: str, x: Tensor, marks: Marks) -> int:
        """Keep ``client``'s evidence rows of ``x`` (``marks.kept``, while it has fewer than ``max_items``)."""
        rows = torch.nonzero(marks.kept).flatten().tolist()
        if not rows:
            return 0
        images = x[rows].detach().float().contiguous()
        records = [(client, image_digest(image), marks.buckets[row], json.dumps(list(image.shape)),
                    image.numpy().astype("<f4").tobytes()) for row, image in zip(rows, images, strict=True)]
        with self.transaction() as conn:
            (held,) = conn.execute("SELECT COUNT(*) FROM evidence WHERE client = ?", (client,)).fetchone()
            added = 0
            for record in records:  # a request's carried rows: a few at most
                if held + added >= self.max_items:
                    break
                added += conn.execute("INSERT OR IGNORE INTO evidence VALUES (?, ?, ?, ?, ?)", record).rowcount
            return added

    def clients(self) -> list[str]:
        return [c for (c,) in self.connection().execute("SELECT DISTINCT client FROM evidence ORDER BY client")]

    def items(self, client: str) -> tuple[Tensor | None, list[str]]:
        rows = self.connection().execute(
            "SELECT bucket, shape, image FROM evidence WHERE client = ? ORDER BY rowid", (client,)).fetchall()
        if not rows:
            return None, []
        images = [torch.from_numpy(np.frombuffer(blob, dtype="<f4").reshape(json.loads(shape)).copy())
                  for _, shape, blob in rows]
        return torch.stack(images), [bucket for bucket, _, _ in rows]
