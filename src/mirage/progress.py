"""Rich progress bars for long work, silenced in tests and non-interactive runs on request."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_enabled(requested: bool = True) -> bool:
    return requested and os.environ.get("MIRAGE_PROGRESS", "1") != "0"


@contextmanager
def progress_bar(
    description: str, total: int, *, enabled: bool = True
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n, **fields)``; shows a bar with ETA when enabled."""
    if not progress_enabled(enabled):
        yield lambda n=1, **fields: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: float) -> None:
            info = " ".join(f"{k}={v:.4g}" for k, v in fields.items())
            progress.update(task, advance=n, info=info)

        yield advance
