"""Micro-batching: concurrent requests are joined into one batch for the victim's forward pass,
and each defense instance sees all of its requests of that batch at once (so GRAD²'s scoring and
MAD's Jacobians run on batches, not single images).

One worker thread owns the model and every defense instance; requests hand it a job and wait on
a :class:`concurrent.futures.Future`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mirage.api.inprocess import clean_posteriors
from mirage.defenses.base import Defense
from mirage.serve.errors import UpstreamError
from mirage.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Job:
    key: str
    x: Tensor
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Answer ``(key, x)`` jobs with ``defense_for(key)(x, softmax(model(x)))``.

    Args:
        model: the victim (eval mode), images in [0, 1].
        defense_for: the defense instance for a job key (``None``: clean posteriors); called only
            from the worker thread, so lazily created instances need no locking.
        max_images: stop collecting once a batch holds this many images.
        max_wait: seconds to wait for more jobs after the first one arrives.
    """

    def __init__(self, model: nn.Module, defense_for: Callable[[str], Defense | None], *,
                 max_images: int = 256, max_wait: float = 0.002, metrics: Metrics | None = None,
                 model_name: str = "model") -> None:
        self.model = model.eval()
        self.defense_for = defense_for
        self.max_images = max_images
        self.max_wait = max_wait
        self.metrics = metrics or Metrics()
        self.model_name = model_name
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if not self.alive:
            self._thread = threading.Thread(target=self._run, name="mirage-microbatcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, key: str, x: Tensor) -> Future:
        """Queue ``x`` (B, C, H, W) for the defense instance ``key``; the future yields (B, K)."""
        if not self.alive:
            raise RuntimeError("the micro-batcher is not running")
        job = Job(key, x)
        self._queue.put(job)
        return job.future

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        jobs, total = [first], len(first.x)
        deadline = time.perf_counter() + self.max_wait
        while total < self.max_images:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            total += len(job.x)
        return jobs, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            jobs, stopping = self._collect(first)
            self._answer(jobs)

    def _answer(self, jobs: list[Job]) -> None:
        x = torch.cat([job.x for job in jobs])
        labels = {"model": self.model_name}
        self.metrics.observe("mirage_microbatch_queries", len(x), **labels)
        try:
            start = time.perf_counter()
            clean = clean_posteriors(self.model, x)
            self.metrics.inc("mirage_model_seconds_total", time.perf_counter() - start, **labels)
        except Exception as error:
            if isinstance(error, UpstreamError):  # a gateway's upstream (docs/design.md §gateway): no traceback
                log.info("the upstream failed on a micro-batch of %d images: %s", len(x), error.message)
            else:
                log.exception("model forward pass failed")
            for job in jobs:
                job.future.set_exception(error)
            return
        offsets, offset = [], 0
        for job in jobs:
            offsets.append(offset)
            offset += len(job.x)
        groups: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(index)
        for key, members in groups.items():
            rows = torch.cat([torch.arange(offsets[i], offsets[i] + len(jobs[i].x)) for i in members])
            try:
                start = time.perf_counter()
                defense = self.defense_for(key)
                served = clean[rows] if defense is None else defense(x[rows], clean[rows]).detach().float().cpu()
                seconds = time.perf_counter() - start
                self.metrics.inc("mirage_defense_seconds_total", seconds, **labels)
                self.metrics.observe("mirage_defense_batch_seconds", seconds, **labels)
            except Exception as error:
                log.exception("defense failed for %s", key)
                for i in members:
                    jobs[i].future.set_exception(error)
                continue
            start_row = 0
            for i in members:
                n = len(jobs[i].x)
                jobs[i].future.set_result(served[start_row:start_row + n])
                start_row += n
