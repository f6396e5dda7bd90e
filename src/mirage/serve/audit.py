"""The audit log: one SQLite row per answered request — client, time, model, per-image input
hashes and the served answer — written only for requests that were answered; and one row per
security event, such as a failed authentication (docs/design.md §audit)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from mirage.serve.quotas import SQLiteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    time         REAL NOT NULL,
    client       TEXT NOT NULL,
    model        TEXT NOT NULL,
    request_id   TEXT,
    queries      INTEGER NOT NULL,
    input_sha256 TEXT NOT NULL,
    served       TEXT NOT NULL,
    reservation  TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    time   REAL NOT NULL,
    kind   TEXT NOT NULL,
    source TEXT NOT NULL,
    detail TEXT NOT NULL
)
"""


def image_hashes(images: np.ndarray) -> list[str]:
    """SHA-256 of each image's float32 little-endian bytes; images: (B, C, H, W)."""
    flat = np.ascontiguousarray(images, dtype="<f4").reshape(len(images), -1)
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in flat]


class AuditLog(SQLiteStore):
    def __init__(self, path: str | Path) -> None:
        super().__init__(path, SCHEMA)
        with self.transaction() as conn:  # a log written before reservations existed
            if "reservation" not in {row[1] for row in conn.execute("PRAGMA table_info(audit)")}:
                conn.execute("ALTER TABLE audit ADD COLUMN reservation TEXT")
            conn.execute("CREATE INDEX IF NOT EXISTS audit_reservation ON audit (reservation)")

    def record(self, *, client: str, model: str, request_id: str | None, images: np.ndarray,
               served: np.ndarray, reservation: str | None = None, settle: bool = False) -> None:
        """images: (B, C, H, W); served: (B, K) as sent to the client; ``reservation``: the
        charge it answers (docs/design.md §reservations). ``settle``: the quota store shares this
        file, so the reservation is committed in the same transaction."""
        with self.transaction() as conn:
            if settle:
                conn.execute("DELETE FROM reservations WHERE id = ?", (reservation,))
            conn.execute(
                "INSERT INTO audit (time, client, model, request_id, queries, input_sha256, served, reservation) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), client, model, request_id, len(images), json.dumps(image_hashes(images)),
                 json.dumps(served.tolist()), reservation))

    def answered(self, reservations: list[str]) -> set[str]:
        """The reservations among ``reservations`` whose answer is in the log."""
        found: set[str] = set()
        conn = self.connection()
        for start in range(0, len(reservations), 500):
            chunk = reservations[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found |= {r for (r,) in conn.execute(f"SELECT reservation FROM audit WHERE reservation IN ({marks})", chunk)}
        return found

    def record_event(self, kind: str, *, source: str, detail: str) -> None:
        """A security event: ``auth_failed`` or ``auth_throttled`` from the address ``source``, or
        ``prada_alarm`` for the client named by ``source`` (docs/design.md §detection)."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO events (time, kind, source, detail) VALUES (?, ?, ?, ?)",
                         (time.time(), kind, source[:256], detail[:512]))

    def events(self) -> list[dict]:
        rows = self.connection().execute("SELECT time, kind, source, detail FROM events ORDER BY id")
        return [{"time": t, "kind": k, "source": s, "detail": d} for t, k, s, d in rows]

    def rows(self, client: str | None = None) -> list[dict]:
        query = "SELECT time, client, model, request_id, queries, input_sha256, served FROM audit"
        args: tuple = ()
        if client is not None:
            query, args = query + " WHERE client = ?", (client,)
        out = []
        for t, c, m, rid, n, hashes, served in self.connection().execute(query + " ORDER BY id", args):
            out.append({"time": t, "client": c, "model": m, "request_id": rid, "queries": n,
                        "input_sha256": json.loads(hashes), "served": json.loads(served)})
        return out

    def count(self) -> tuple[int, int]:
        """(rows, total queries) in the log."""
        rows, queries = self.connection().execute("SELECT COUNT(*), COALESCE(SUM(queries), 0) FROM audit").fetchone()
        return int(rows), int(queries)
