"""Per-client query quotas and rate limits in SQLite: counts survive a restart and stay exact
under concurrent requests (also from several server processes sharing the file), and a crash
loses, doubles or orphans no charge (docs/design.md §reservations).

Every check-and-charge is one ``BEGIN IMMEDIATE`` transaction — SQLite's write lock is taken
before the counts are read, so two requests can never both see the same remaining quota. The
rate limit is a token bucket per client (capacity ``burst``, refilled at ``rate`` queries/s),
stored in the same row and updated in the same transaction.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
import uuid
from pathlib import Path

from mirage.serve.config import ClientConfig
from mirage.serve.errors import QuotaExceeded, RateLimited
from mirage.storage import SQLiteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    client   TEXT PRIMARY KEY,
    queries  INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens   REAL,
    updated  REAL
);
CREATE TABLE IF NOT EXISTS reservations (
    id      TEXT PRIMARY KEY,
    client  TEXT NOT NULL,
    queries INTEGER NOT NULL,
    owner   TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS auth_failures (
    source   TEXT PRIMARY KEY,
    start    REAL NOT NULL,
    failures INTEGER NOT NULL
)
"""


MAX_AUTH_SOURCES = 10_000
"""Source addresses whose failed authentications are counted at once (the oldest windows are
dropped first). Redis keeps each in a key that expires with its window."""


def room_for(
    client: ClientConfig, used: int, tokens: float | None, updated: float | None, now: float
) -> int | None:
    """How many queries ``client`` could be charged at ``now`` given its stored usage and token
    bucket (``None``: no limit); raises :class:`QuotaExceeded` or :class:`RateLimited` when it
    is none. One rule for every store (SQLite, Redis)."""
    room = None if client.quota is None else client.quota - used
    if room is not None and room < 1:
        raise QuotaExceeded(
            f"client {client.name!r}: the quota of {client.quota} queries is used up"
        )
    capacity, rate = client.bucket_capacity, client.rate
    if capacity is not None and rate is not None:  # a capacity comes with a rate
        level = (
            capacity
            if tokens is None or updated is None  # stored together
            else min(capacity, float(tokens) + max(0.0, now - float(updated)) * rate)
        )
        if level < 1:
            wait = (1 - level) / rate
            raise RateLimited(
                f"client {client.name!r}: rate limit of {client.rate:g} queries/s "
                f"reached; retry in {wait:.3f}s",
                retry_after=wait,
            )
        room = int(level) if room is None else min(room, int(level))
    return room


def new_owner() -> str:
    """This process's name on its reservations: host, pid and a random token (a reused pid is
    another owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_gone(owner: str, created: float, me: str, *, lease: float, now: float) -> bool:
    """Whether the process that made a reservation is gone, so the reservation is an orphan: on
    this host, its pid is not running (or is ours under another token); elsewhere, or past the
    lease, the reservation is older than ``lease`` seconds."""
    host, _, rest = owner.partition(":")
    pid, _, _ = rest.partition(":")
    if now - created > lease:
        return True
    if host != me.partition(":")[0] or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return owner != me
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class QuotaStore(SQLiteStore):
    """Exact per-client counters of answered queries, with quota and token-bucket checks."""

    def __init__(self, path: str | Path, *, clock=time.time, timeout: float = 60.0) -> None:
        super().__init__(path, SCHEMA, timeout=timeout)
        self._clock = clock
        self.owner = new_owner()

    def reserve(self, client: ClientConfig, n: int) -> tuple[int, str]:
        """Atomically check the quota and rate limit for ``n`` queries, charge them and record the
        charge as a reservation of this process; returns the client's total of charged queries
        afterwards and the reservation's id. :meth:`commit` keeps the charge once the answer is
        audited, :meth:`release` undoes it; a reservation its process left behind is settled by
        :meth:`reconcile`.

        Raises :class:`QuotaExceeded` or :class:`RateLimited` (and records nothing) if refused.
        """
        if n < 1:
            raise ValueError("a charge needs at least one query")
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT queries, tokens, updated FROM usage WHERE client = ?", (client.name,)
            ).fetchone()
            used, tokens, updated = row if row is not None else (0, None, None)
            if client.quota is not None and used + n > client.quota:
                raise QuotaExceeded(
                    f"client {client.name!r}: {n} queries requested but only "
                    f"{max(0, client.quota - used)} of the quota of {client.quota} remain"
                )
            now = self._clock()
            capacity, rate = client.bucket_capacity, client.rate
            if capacity is not None and rate is not None:  # a capacity comes with a rate
                if n > capacity:
                    raise RateLimited(
                        f"a request of {n} queries exceeds the rate-limit burst of "
                        f"{capacity:g}; send smaller batches"
                    )
                tokens = (
                    capacity
                    if tokens is None
                    else min(capacity, tokens + max(0.0, now - updated) * rate)
                )
                if tokens < n:
                    wait = (n - tokens) / rate
                    raise RateLimited(
                        f"client {client.name!r}: rate limit of {client.rate:g} queries/s "
                        f"reached; retry in {wait:.3f}s",
                        retry_after=wait,
                    )
                tokens -= n
            conn.execute(
                "INSERT INTO usage (client, queries, requests, tokens, updated) "
                "VALUES (?, ?, 1, ?, ?) "
                "ON CONFLICT(client) DO UPDATE SET queries = queries + excluded.queries, "
                "requests = requests + 1, tokens = excluded.tokens, updated = excluded.updated",
                (client.name, n, tokens, now),
            )
            reservation = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO reservations (id, client, queries, owner, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (reservation, client.name, n, self.owner, now),
            )
        return used + n, reservation

    def commit(self, reservation: str) -> None:
        """Keep a reserved charge: its answer is in the audit log."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM reservations WHERE id = ?", (reservation,))

    def release(self, client: ClientConfig, reservation: str) -> None:
        """Undo a reserved charge whose request was not answered (once, however often called)."""
        capacity = client.bucket_capacity
        with self.transaction() as conn:
            row = conn.execute(
                "DELETE FROM reservations WHERE id = ? RETURNING queries", (reservation,)
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE usage SET queries = queries - ?, requests = requests - 1, "
                    "tokens = CASE WHEN tokens IS NULL THEN NULL ELSE MIN(tokens + ?, ?) END "
                    "WHERE client = ?",
                    (row[0], row[0], capacity if capacity is not None else 0.0, client.name),
                )

    def reconcile(self, answered, *, lease: float) -> tuple[int, int]:
        """Settle the reservations of processes that are gone (crashed, killed): a charge whose
        answer is in the audit log (``answered(ids)`` returns those ids) is kept, any other is
        released, so usage equals the audit log again. Returns (kept, released)."""
        now = self._clock()
        rows = (
            self.connection()
            .execute("SELECT id, queries, client, owner, created FROM reservations")
            .fetchall()
        )
        orphans = [r for r in rows if owner_gone(r[3], r[4], self.owner, lease=lease, now=now)]
        done = answered([r[0] for r in orphans]) if orphans else set()
        kept = released = 0
        with self.transaction() as conn:
            for reservation, queries, client, _, _ in orphans:
                if (
                    conn.execute(
                        "DELETE FROM reservations WHERE id = ? RETURNING id", (reservation,)
                    ).fetchone()
                    is None
                ):
                    continue  # settled meanwhile
                if reservation in done:
                    kept += 1
                else:
                    conn.execute(
                        "UPDATE usage SET queries = queries - ?, requests = requests - 1 "
                        "WHERE client = ?",
                        (queries, client),
                    )
                    released += 1
        return kept, released

    def reservations(self) -> int:
        return int(self.connection().execute("SELECT COUNT(*) FROM reservations").fetchone()[0])

    def charge(self, client: ClientConfig, n: int) -> int:
        """:meth:`reserve` and :meth:`commit` at once; the client's total afterwards."""
        used, reservation = self.reserve(client, n)
        self.commit(reservation)
        return used

    def headroom(self, client: ClientConfig) -> int | None:
        """How many queries ``client`` could be charged now (``None``: no limit), read without
        charging. Raises :class:`QuotaExceeded` or :class:`RateLimited` when it is none, so a
        request that cannot be served is refused before its body is read."""
        row = (
            self.connection()
            .execute("SELECT queries, tokens, updated FROM usage WHERE client = ?", (client.name,))
            .fetchone()
        )
        used, tokens, updated = row if row is not None else (0, None, None)
        return room_for(client, used, tokens, updated, self._clock())

    def auth_throttled(self, source: str, window: float, limit: int) -> float | None:
        """Seconds until ``source`` may try a key again (it failed ``limit`` times in its current
        fixed window of ``window`` seconds), or ``None`` if it may now."""
        row = (
            self.connection()
            .execute("SELECT start, failures FROM auth_failures WHERE source = ?", (source,))
            .fetchone()
        )
        if row is None or row[1] < limit:
            return None
        left = row[0] + window - self._clock()
        return left if left > 0 else None

    def auth_failed(self, source: str, window: float) -> int:
        """Count a failed authentication from ``source`` in its window; returns the count so far.
        Windows that ended are deleted, and at most ``MAX_AUTH_SOURCES`` sources are kept (the
        oldest windows go first), so the table stays bounded whatever addresses fail."""
        now = self._clock()
        with self.transaction() as conn:
            conn.execute("DELETE FROM auth_failures WHERE start <= ?", (now - window,))
            conn.execute(
                "DELETE FROM auth_failures WHERE source IN (SELECT source FROM auth_failures "
                "ORDER BY start DESC LIMIT -1 OFFSET ?)",
                (MAX_AUTH_SOURCES - 1,),
            )
            row = conn.execute(
                "SELECT start, failures FROM auth_failures WHERE source = ?", (source,)
            ).fetchone()
            start, failures = (
                (now, 1) if row is None or now - row[0] >= window else (row[0], row[1] + 1)
            )
            conn.execute(
                "INSERT OR REPLACE INTO auth_failures (source, start, failures) VALUES (?, ?, ?)",
                (source, start, failures),
            )
        return failures

    def used(self, client_name: str) -> int:
        row = (
            self.connection()
            .execute("SELECT queries FROM usage WHERE client = ?", (client_name,))
            .fetchone()
        )
        return int(row[0]) if row else 0

    def usage(self) -> dict[str, tuple[int, int]]:
        """``{client: (queries, requests)}`` for every client that was ever charged."""
        rows = self.connection().execute("SELECT client, queries, requests FROM usage").fetchall()
        return {name: (int(q), int(r)) for name, q, r in rows}
