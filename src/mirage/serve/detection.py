"""Per-client query-stream detection in the service: one PRADA detector (Juuti et al., EuroS&P
2019, Algorithm 1; :class:`mirage.api.detection.PradaDetector`) watching every client's answered
requests, and what its first alarm for a client sets off (docs/design.md §detection).

The detector sees a request after its answer is in the audit log: its images, and as their
classes the argmax of the *served* answer, which is what the client received (with a defense
that keeps top-1 it is the victim's prediction; ``InProcessAPI`` feeds the clean argmax).

Its state lives in this process's memory only: a restart forgets every client's stream and
alarm, and replicas (docs/design.md §shared-state) do not share it, so each sees and judges only
the requests it answered. Memory per client is bounded as PRADA's module says.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import torch

from mirage.api.detection import ClientStream, PradaDetector
from mirage.serve.config import DetectionConfig

log = logging.getLogger(__name__)


class StreamWatch:
    """``observe(client, images, served)`` after each answered request; ``alarmed(client)``
    before the next one. ``on_alarm(client, state)`` is called once per client, from the thread
    that observed the request that raised the alarm."""

    def __init__(
        self, config: DetectionConfig, on_alarm: Callable[[str, ClientStream], None] | None = None
    ) -> None:
        self.config = config
        self.detector = PradaDetector(config.prada)
        self.on_alarm = on_alarm
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def alarmed(self, client: str) -> bool:
        state = self.detector.clients.get(client)
        return state is not None and state.alarmed

    def observe(self, client: str, images: np.ndarray, served: np.ndarray) -> ClientStream:
        """Feed one answered request: ``images`` (B, C, H, W), ``served`` (B, K) as sent. A
        client's requests are observed one at a time (their order is the order they finish)."""
        with self._guard:
            lock = self._locks.setdefault(client, threading.Lock())
        with lock:
            before = self.alarmed(client)
            state = self.detector.observe(
                client,
                torch.from_numpy(np.ascontiguousarray(images)),
                torch.from_numpy(np.asarray(served)).argmax(1),
            )
            if state.alarmed and not before and self.on_alarm is not None:
                self.on_alarm(client, state)
        return state
