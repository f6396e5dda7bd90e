"""Results as JSON lines, appended as each run finishes.

A record is written with one ``write`` of a complete line followed by ``fsync``; a line cut short
by a kill is ignored on reading (and overwritten by nothing: later appends start on a new line),
so an interrupted sweep loses at most the run that was being written.
"""

from __future__ import annotations

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
        records = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: ignoring an incomplete line (interrupted write)", self.path, number)
        return records

    def done_ids(self) -> set[str]:
        return {r["run_id"] for r in self.read() if "run_id" in r}

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the whole file with ``records`` atomically (a maintenance step, e.g. a backfill;
        no sweep may be appending meanwhile)."""
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        os.replace(temporary, self.path)
