"""Where runs execute: in this process, in a local process pool, or on a Dask cluster.

Every executor takes a picklable function and a list of specs and yields ``(spec, result)`` as
runs finish (in completion order), so the sweep can record each result the moment it lands.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import torch

Runner = Callable[[Any], dict[str, Any]]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("MIRAGE_PROGRESS", "0")


def run_inline(fn: Runner, specs: Sequence[Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
    for spec in specs:
        yield spec, fn(spec)


def run_process_pool(
    fn: Runner, specs: Sequence[Any], *, workers: int = 1, threads_per_worker: int | None = None
) -> Iterator[tuple[Any, dict[str, Any]]]:
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        pending = {pool.submit(fn, spec): spec for spec in specs}
        for future in futures.as_completed(pending):
            yield pending[future], future.result()


def run_dask(
    fn: Runner, specs: Sequence[Any], *, scheduler: str | Any
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """``scheduler``: a ``tcp://host:port`` address or a ``distributed`` Client/cluster object."""
    from distributed import Client, as_completed

    client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    try:
        jobs = {client.submit(fn, spec, pure=False): spec for spec in specs}
        for job in as_completed(jobs):
            yield jobs[job], job.result()
    finally:
        if client is not scheduler:
            client.close()
