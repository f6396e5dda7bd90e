"""Results as JSON lines, appended as each run finishes.

A record is written with one ``write`` of a complete line followed by ``fsync``; a line cut short
by a kill is ignored on reading (and overwritten by nothing: later appends start on a new line),
so an interrupted sweep loses at most the run that was being written.

A run is recorded once: :meth:`ResultStore.append` holds an exclusive ``flock`` on the file while
it checks for the run id and writes, so two sweeps that finish the same run (run side by side on
one file) keep the first record and drop the second, and :meth:`ResultStore.read` keeps the first
record of a run id if a file holds two (written before the lock existed).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ResultStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return self._parse(self.path.read_text())

    def _parse(self, text: str) -> list[dict[str, Any]]:
        records, seen = [], set()
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning(
                    "%s:%d: ignoring an incomplete line (interrupted write)", self.path, number
                )
                continue
            if (run_id := record.get("run_id")) is not None:
                if run_id in seen:
                    log.warning(
                        "%s:%d: ignoring a second record of run %s", self.path, number, run_id
                    )
                    continue
                seen.add(run_id)
            records.append(record)
        return records

    def done_ids(self) -> set[str]:
        return {r["run_id"] for r in self.read() if "run_id" in r}

    def append(self, record: dict[str, Any]) -> bool:
        """Append ``record``; ``False`` (and nothing written) if its run is recorded already."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            handle.seek(0)
            run_id = record.get("run_id")
            if run_id is not None and any(
                r.get("run_id") == run_id
                for r in self._parse(handle.read().decode(errors="replace"))
            ):
                log.warning(
                    "%s: run %s is recorded already (another sweep on this file?); "
                    "keeping the first record",
                    self.path,
                    run_id,
                )
                return False
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the whole file with ``records`` atomically (a maintenance step, e.g. a backfill;
        no sweep may be appending meanwhile)."""
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        os.replace(temporary, self.path)
