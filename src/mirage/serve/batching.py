"""Micro-batching: concurrent requests are joined into one batch for the victim's forward pass,
and each defense instance sees all of its requests of that batch at once (so GRAD²'s scoring and
MAD's Jacobians run on batches, not single images).

Jobs wait in one queue per client, and a batch is filled one job at a time from the client served
least recently (docs/design.md §fair-share): a client flooding the service with large batches
delays another client's request by about one batch, not by its whole backlog.

``workers`` threads take batches; the forward passes of different batches may overlap (a
gateway's upstream calls wait on the network), while the defense instances are called by one
thread at a time, so lazily created and stateful instances need no locking of their own.
Requests hand a job over and wait on a :class:`concurrent.futures.Future`; a job whose future
was cancelled before a worker took it (its client hung up) is dropped without running.

A served watermark's evidence (docs/design.md §ownership) is collected per defense call
(:class:`DeferredEvidence`) and handed to each job with its answer; the service writes it to the
store only once the request is answered and charged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mirage.api.inprocess import clean_posteriors
from mirage.defenses.base import Defense
from mirage.ownership.evidence import EvidenceStore, Record
from mirage.ownership.watermark import Marks
from mirage.serve.errors import UpstreamError
from mirage.serve.metrics import Metrics

log = logging.getLogger(__name__)

MAX_REMEMBERED_CLIENTS = 100_000
"""Clients whose last turn the scheduler remembers; idle ones are forgotten past this."""


class DeferredEvidence:
    """The evidence a served watermark hands over, held instead of written (docs/design.md
    §ownership): the micro-batcher collects each defense call's records (:meth:`collecting`) and
    gives every request its own, and the service writes them (:meth:`EvidenceStore.write`) only
    once that request was answered and charged — never for a client that hung up, was refused or
    whose answer failed."""

    def __init__(self, store: EvidenceStore) -> None:
        self.store = store
        self._local = threading.local()

    def add(self, client: str, x: Tensor, marks: Marks) -> int:
        collected = getattr(self._local, "records", None)
        if collected is None:
            raise RuntimeError(
                "served evidence is collected per micro-batch: call the defense inside collecting()"
            )
        records = self.store.records(client, x, marks)
        collected.extend(records)
        return len(records)

    @contextlib.contextmanager
    def collecting(self) -> Iterator[list[tuple[int, Record]]]:
        """``with evidence.collecting() as records:`` — (row of the defense's batch, record) of
        every ``add`` in this thread meanwhile."""
        records: list[tuple[int, Record]] = []
        self._local.records = records
        try:
            yield records
        finally:
            self._local.records = None


@dataclass
class Answer:
    """A job's served probabilities (B, K) and the evidence records its defense handed over
    (see :class:`DeferredEvidence`), for the service to write once the request is charged."""

    served: Tensor
    evidence: list = field(default_factory=list)


@dataclass
class Job:
    key: Hashable
    x: Tensor
    client: str = ""
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Answer ``(key, x)`` jobs with ``defense_for(key)(x, softmax(model(x)))``.

    Args:
        model: the victim (eval mode), images in [0, 1].
        defense_for: the defense instance for a job key (``None``: clean posteriors); called by
            one thread at a time.
        max_images: stop collecting once a batch holds this many images.
        max_wait: seconds to wait for more jobs after the first one arrives.
        workers: threads taking batches (forward passes overlap; defenses do not).
        evidence: a :class:`DeferredEvidence` whose records each job gets
            back in its :class:`Answer` (``None``: no served watermark).
    """

    def __init__(
        self,
        model: nn.Module,
        defense_for: Callable[[Any], Defense | None],
        *,
        max_images: int = 256,
        max_wait: float = 0.002,
        metrics: Metrics | None = None,
        model_name: str = "model",
        workers: int = 1,
        evidence: Any = None,
    ) -> None:
        self.model = model.eval()
        self.defense_for = defense_for
        self.max_images = max_images
        self.max_wait = max_wait
        self.metrics = metrics or Metrics()
        self.model_name = model_name
        self.workers = workers
        self.evidence = evidence
        self._pending: dict[str, deque[Job]] = {}
        self._last_served: dict[str, int] = {}
        self._turns = 0
        self._cond = threading.Condition()
        self._defense_lock = threading.Lock()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        if self.alive:
            return
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._run, name=f"mirage-microbatcher-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        with self._cond:
            left = [job for jobs in self._pending.values() for job in jobs]
            self._pending.clear()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the micro-batcher stopped"))

    def submit(self, key: Hashable, x: Tensor, client: str = "") -> Future:
        """Queue ``x`` (B, C, H, W) of ``client`` for the defense instance ``key``; the future
        yields an :class:`Answer`. Cancel it to drop the job if no worker has taken it yet."""
        if not self.alive:
            raise RuntimeError("the micro-batcher is not running")
        job = Job(key, x, client)
        with self._cond:
            self._pending.setdefault(client, deque()).append(job)
            self._cond.notify()
        return job.future

    def queued(self) -> int:
        """Jobs waiting for a worker."""
        with self._cond:
            return sum(len(jobs) for jobs in self._pending.values())

    # -- the workers ---------------------------------------------------------------------------

    def _run(self) -> None:
        while (jobs := self._next_batch()) is not None:
            if jobs:
                self._answer(jobs)

    def _next_batch(self) -> list[Job] | None:
        """The next batch, filled from the least recently served clients (``None``: stopping). Waits
        up to ``max_wait`` after the first job for more, while they fit."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = time.perf_counter() + self.max_wait
            batch: list[Job] = []
            total = 0
            while total < self.max_images:
                job = self._next_job(self.max_images - total, first=not batch)
                if job is None:
                    remaining = deadline - time.perf_counter()
                    if self._pending or remaining <= 0 or self._stopping:
                        break  # what waits does not fit, or the wait is over
                    self._cond.wait(remaining)
                    continue
                if job.future.set_running_or_notify_cancel():  # else its client hung up: dropped
                    batch.append(job)
                    total += len(job.x)
            return batch

    def _next_job(self, room: int, *, first: bool) -> Job | None:
        """The head job of the least recently served client whose head fits ``room`` images (any
        size when it is the batch's first): a client that was just served waits behind every
        other that has work, and one that has been idle goes first."""
        fitting = [
            client for client, jobs in self._pending.items() if first or len(jobs[0].x) <= room
        ]
        if not fitting:
            return None
        client = min(fitting, key=lambda name: self._last_served.get(name, -1))
        jobs = self._pending[client]
        job = jobs.popleft()
        if not jobs:
            del self._pending[client]
        self._turns += 1
        self._last_served[client] = self._turns
        if (
            len(self._last_served) > MAX_REMEMBERED_CLIENTS
        ):  # forget idle clients: they go first anyway
            self._last_served = {
                name: turn for name, turn in self._last_served.items() if name in self._pending
            }
        return job

    def _answer(self, jobs: list[Job]) -> None:
        x = torch.cat([job.x for job in jobs])
        labels = {"model": self.model_name}
        self.metrics.observe("mirage_microbatch_queries", len(x), **labels)
        try:
            start = time.perf_counter()
            clean = clean_posteriors(self.model, x)
            self.metrics.inc("mirage_model_seconds_total", time.perf_counter() - start, **labels)
        except Exception as error:
            if isinstance(
                error, UpstreamError
            ):  # a gateway's upstream (docs/design.md §gateway): no traceback
                log.info(
                    "the upstream failed on a micro-batch of %d images: %s", len(x), error.message
                )
            else:
                log.exception("model forward pass failed")
            for job in jobs:
                job.future.set_exception(error)
            return
        offsets, offset = [], 0
        for job in jobs:
            offsets.append(offset)
            offset += len(job.x)
        groups: dict[Hashable, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(index)
        with self._defense_lock:
            for key, members in groups.items():
                self._defend(
                    key, [jobs[i] for i in members], [offsets[i] for i in members], x, clean
                )

    def _defend(
        self, key: Hashable, jobs: list[Job], offsets: list[int], x: Tensor, clean: Tensor
    ) -> None:
        """One defense call for ``jobs`` (all of instance ``key``); each gets its rows and the
        evidence records of its rows."""
        rows = torch.cat(
            [
                torch.arange(offset, offset + len(job.x))
                for offset, job in zip(offsets, jobs, strict=True)
            ]
        )
        collecting = (
            self.evidence.collecting() if self.evidence is not None else contextlib.nullcontext([])
        )
        try:
            start = time.perf_counter()
            with collecting as records:
                defense = self.defense_for(key)
                served = (
                    clean[rows]
                    if defense is None
                    else defense(x[rows], clean[rows]).detach().float().cpu()
                )
            seconds = time.perf_counter() - start
            self.metrics.inc("mirage_defense_seconds_total", seconds, model=self.model_name)
            self.metrics.observe("mirage_defense_batch_seconds", seconds, model=self.model_name)
        except Exception as error:
            log.exception("defense failed for %s", key)
            for job in jobs:
                job.future.set_exception(error)
            return
        start_row = 0
        for job in jobs:
            end_row = start_row + len(job.x)
            mine = [record for row, record in records if start_row <= row < end_row]
            job.future.set_result(Answer(served[start_row:end_row], mine))
            start_row = end_row
