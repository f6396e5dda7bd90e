"""The SQLite evidence store (docs/design.md §ownership): bounded per client, one row per
distinct image, persistent across opens, keeping served rankings exactly."""

from __future__ import annotations

import sqlite3

import torch

from mirage.ownership import EvidenceStore
from mirage.ownership.watermark import Marks


def test_evidence_store_is_bounded_deduplicated_and_persistent(tmp_path):
    x = torch.rand(30, 1, 8, 8)
    marks = Marks(
        torch.ones(30, dtype=torch.bool),
        torch.zeros(30, dtype=torch.long),
        tuple(f"{i:02x}" for i in range(30)),
    )
    store = EvidenceStore(tmp_path / "e.sqlite", max_items=20)
    assert (
        store.add("alice", x[:10], Marks(marks.carried[:10], marks.labels[:10], marks.buckets[:10]))
        == 10
    )
    assert store.add("alice", x, marks) == 10  # 10 known, 10 more fit
    assert store.add("alice", x, marks) == 0
    store.close()
    again = EvidenceStore(tmp_path / "e.sqlite", max_items=20)
    images, buckets, ranking = again.items("alice")
    assert (
        images.shape == (20, 1, 8, 8)
        and torch.equal(images, x[:20])
        and buckets == list(marks.buckets[:20])
    )
    assert ranking is None and again.items("bob") == (None, [], None)
    again.close()


def test_evidence_store_keeps_rankings_and_upgrades_a_store_written_without_them(tmp_path):
    """A store from before keyed ranks (no ranking column) opens, keeps its rows and then keeps
    the served rankings of new ones, exactly; a client whose rows lack one gets no ranking."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE evidence (client TEXT NOT NULL, digest TEXT NOT NULL, "
            "bucket TEXT NOT NULL, shape TEXT NOT NULL, image BLOB NOT NULL, "
            "PRIMARY KEY (client, digest))"
        )
        conn.execute(
            "INSERT INTO evidence VALUES ('bob', 'd', 'ab', '[1, 2, 2]', ?)",
            (torch.zeros(4).numpy().astype("<f4").tobytes(),),
        )
    store = EvidenceStore(path)
    x = torch.rand(6, 1, 2, 2)
    ranking = torch.stack([torch.randperm(10) for _ in range(6)])
    marks = Marks(
        torch.ones(6, dtype=torch.bool),
        torch.zeros(6, dtype=torch.long),
        ("cd",) * 6,
        None,
        ranking,
    )
    one = Marks(marks.carried[:1], marks.labels[:1], marks.buckets[:1], None, ranking[:1])
    assert store.add("alice", x, marks) == 6 and store.add("bob", x[:1], one) == 1
    images, buckets, kept = store.items("alice")
    assert torch.equal(images, x) and torch.equal(kept, ranking)
    images, buckets, kept = store.items("bob")
    assert buckets == ["ab", "cd"] and kept is None  # the old row has no ranking
    store.close()
