"""The audit log: one SQLite row per charged request — client, time, model, per-image input
hashes, the served answer and whether it was delivered (a client that hangs up after its images
ran is charged for the work, and its row says it was not delivered) — and one row per security
event, such as a failed authentication, kept for ``events_retention_days`` (docs/design.md
§audit)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from mirage.storage import SQLiteStore

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
    reservation  TEXT,
    delivered    INTEGER NOT NULL DEFAULT 1
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
    def __init__(
        self, path: str | Path, *, timeout: float = 60.0, events_retention_days: float | None = None
    ) -> None:
        super().__init__(path, SCHEMA, timeout=timeout)
        self.events_retention_s = (
            None if events_retention_days is None else events_retention_days * 86400
        )
        self._events_written = 0
        with (
            self.transaction() as conn
        ):  # a log written before reservations or delivery were recorded
            columns = {row[1] for row in conn.execute("PRAGMA table_info(audit)")}
            if "reservation" not in columns:
                conn.execute("ALTER TABLE audit ADD COLUMN reservation TEXT")
            if "delivered" not in columns:
                conn.execute("ALTER TABLE audit ADD COLUMN delivered INTEGER NOT NULL DEFAULT 1")
            conn.execute("CREATE INDEX IF NOT EXISTS audit_reservation ON audit (reservation)")
            conn.execute("CREATE INDEX IF NOT EXISTS events_time ON events (time)")
        self.expire_events()

    def record(
        self,
        *,
        client: str,
        model: str,
        request_id: str | None,
        images: np.ndarray,
        served: np.ndarray,
        reservation: str | None = None,
        settle: bool = False,
        delivered: bool = True,
    ) -> None:
        """images: (B, C, H, W); served: (B, K) as computed for the client; ``reservation``: the
        charge it answers (docs/design.md §reservations). ``settle``: the quota store shares this
        file, so the reservation is committed in the same transaction. ``delivered``: false for
        a client that hung up once its images had run (charged: the work was done; docs/design.md
        §service-errors)."""
        with self.transaction() as conn:
            if settle:
                conn.execute("DELETE FROM reservations WHERE id = ?", (reservation,))
            conn.execute(
                "INSERT INTO audit (time, client, model, request_id, queries, input_sha256, "
                "served, reservation, delivered) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    client,
                    model,
                    request_id,
                    len(images),
                    json.dumps(image_hashes(images)),
                    json.dumps(served.tolist()),
                    reservation,
                    int(delivered),
                ),
            )

    def answered(self, reservations: list[str]) -> set[str]:
        """The reservations among ``reservations`` whose answer is in the log."""
        found: set[str] = set()
        conn = self.connection()
        for start in range(0, len(reservations), 500):
            chunk = reservations[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found |= {
                r
                for (r,) in conn.execute(
                    f"SELECT reservation FROM audit WHERE reservation IN ({marks})", chunk
                )
            }
        return found

    def record_event(self, kind: str, *, source: str, detail: str) -> None:
        """A security event: ``auth_failed`` or ``auth_throttled`` from the address ``source``, or
        ``prada_alarm`` for the client named by ``source`` (docs/design.md §detection)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO events (time, kind, source, detail) VALUES (?, ?, ?, ?)",
                (time.time(), kind, source[:256], detail[:512]),
            )
        self._events_written += 1
        if self._events_written % 1000 == 0:
            self.expire_events()

    def expire_events(self) -> int:
        """Delete the events older than the retention (at start and every 1,000 events); returns
        how many. Answered requests are billing records and stay."""
        if self.events_retention_s is None:
            return 0
        with self.transaction() as conn:
            return conn.execute(
                "DELETE FROM events WHERE time < ?", (time.time() - self.events_retention_s,)
            ).rowcount

    def events(self) -> list[dict]:
        rows = self.connection().execute(
            "SELECT time, kind, source, detail FROM events ORDER BY id"
        )
        return [{"time": t, "kind": k, "source": s, "detail": d} for t, k, s, d in rows]

    def rows(self, client: str | None = None) -> list[dict]:
        query = (
            "SELECT time, client, model, request_id, queries, input_sha256, served, delivered "
            "FROM audit"
        )
        args: tuple = ()
        if client is not None:
            query, args = query + " WHERE client = ?", (client,)
        out = []
        for t, c, m, rid, n, hashes, served, delivered in self.connection().execute(
            query + " ORDER BY id", args
        ):
            out.append(
                {
                    "time": t,
                    "client": c,
                    "model": m,
                    "request_id": rid,
                    "queries": n,
                    "input_sha256": json.loads(hashes),
                    "served": json.loads(served),
                    "delivered": bool(delivered),
                }
            )
        return out

    def count(self) -> tuple[int, int]:
        """(rows, total queries) in the log."""
        rows, queries = (
            self.connection()
            .execute("SELECT COUNT(*), COALESCE(SUM(queries), 0) FROM audit")
            .fetchone()
        )
        return int(rows), int(queries)
