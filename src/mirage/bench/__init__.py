"""The benchmark: sweeps, runs, results, reports; and :func:`evaluate`, one protocol run of a
defense instance (docs/design.md §protect), imported on first use."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("evaluate", "Evaluation"):
        from mirage.bench import evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module 'mirage.bench' has no attribute {name!r}")
