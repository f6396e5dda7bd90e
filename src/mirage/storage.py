"""SQLite files the service and ownership keep (docs/design.md §quotas, §audit, §ownership): one
connection per thread in WAL mode, ``BEGIN IMMEDIATE`` write transactions, and files readable
by their owner only. Safe across threads and across processes sharing a file; every call blocks,
so async code calls it from a thread (docs/design.md §service-errors)."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def private(path: Path) -> None:
    """Create ``path`` readable and writable by its owner only (0600), or make it so: it holds
    usage, audit or evidence rows. SQLite gives its ``-wal`` and ``-shm`` files the same mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SQLiteStore:
    """One connection per thread to a SQLite file in WAL mode, with a write-transaction helper."""

    def __init__(self, path: str | Path, schema: str, *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private(self.path)
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        with self.transaction() as conn:
            for statement in schema.split(";"):
                conn.execute(statement)

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any exception)."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def ping(self, timeout: float) -> None:
        """Raise :class:`sqlite3.Error` unless a write transaction can start within ``timeout``
        seconds (another process holding the write lock, a read-only or vanished file fail)."""
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
