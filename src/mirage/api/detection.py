"""Per-client query-stream detection: PRADA (Juuti et al., "PRADA: Protecting Against DNN Model
Stealing Attacks", EuroS&P 2019, Algorithm 1; docs/design.md §detection).

Natural queries lie at distances from one another that are roughly normally distributed; the
synthetic queries of Jacobian-based attacks are small steps from earlier ones, so the distance of
each new query to its nearest earlier one is not. For every client, per predicted class c, PRADA
keeps a growing set G_c of queries and a threshold T_c; for a new query x of class c:

    d = min_{y ∈ G_c} ‖x − y‖₂            (the first query of a class only starts G_c)
    D ← D ∪ {d}
    T_c ← max(T_c, mean(D_c) − std(D_c))   (D_c: the distances that admitted members of G_c)
    if d > T_c: G_c ← G_c ∪ {x},  D_c ← D_c ∪ {d}
    alarm if |D| ≥ min_distances and Shapiro–Wilk W(D) < δ.

mirage bounds memory per client and says so: G_c keeps at most ``max_stored`` images in all (the
oldest member leaves first), D the last ``window`` distances (the test runs over that window),
D_c the last ``window`` admitting distances. At the defaults and 28×28 inputs that is
2,000 × 784 × 4 B ≈ 6.3 MB of images plus 3 × 500 floats per client.

What it cannot see: a client is an API key, so an attacker who spreads its queries over several
keys shows each key only its share of the stream (the multi-key attacker of the benchmark).

The decision for each query depends on the ones before it, so a request is handled query by query
(grouped by class; within a class in order); the distances come from one ``torch.cdist`` per class
and request, against the stored set and the request. The test runs once per request, so the alarm
is resolved to the request: ``alarm_at`` counts the client's queries up to the end of the request
that raised it (exact per query for one-image requests).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import shapiro
from torch import Tensor


class PradaConfig(BaseModel):
    """PRADA's knobs. ``delta``: the Shapiro–Wilk threshold δ (lower W = less normal); set it on
    benign streams so that they never alarm (``experiments/ood_gate/ood_gate_and_prada.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delta: float = Field(0.9, gt=0, lt=1)
    min_distances: int = Field(100, ge=3, description="distances needed before the first test")
    window: int = Field(
        500, ge=3, le=5000, description="the test runs on the last `window` distances"
    )
    max_stored: int = Field(2000, ge=1, description="stored queries per client (all classes)")
    check_every: int = Field(
        1, ge=1, description="test after a request once n new distances came in"
    )


@dataclass
class ClientStream:
    """One client's PRADA state (bounded: see the module docstring)."""

    stored: dict[int, deque] = field(default_factory=dict)  # class -> stored images (flat)
    admitted: dict[int, deque] = field(default_factory=dict)  # class -> admitting distances
    thresholds: dict[int, float] = field(default_factory=dict)
    distances: deque = field(default_factory=deque)
    order: deque = field(default_factory=deque)  # classes in order of storing
    queries: int = 0
    since_check: int = 0
    statistic: float | None = None
    alarm_at: int | None = None  # the client's queries up to the end of the request that alarmed

    @property
    def alarmed(self) -> bool:
        return self.alarm_at is not None


class PradaDetector:
    """Per-client PRADA. ``observe(client, x, labels)`` updates that client's state with a batch of
    queries (x: (B, C, H, W), labels: (B,) the victim's predicted classes) and returns it."""

    def __init__(self, config: PradaConfig | None = None) -> None:
        self.config = config or PradaConfig()
        self.clients: dict[str, ClientStream] = {}

    def state(self, client: str) -> ClientStream:
        if client not in self.clients:
            self.clients[client] = ClientStream(distances=deque(maxlen=self.config.window))
        return self.clients[client]

    def observe(self, client: str, x: Tensor, labels: Tensor) -> ClientStream:
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"{x.shape[0]} queries but {labels.shape[0]} labels")
        state = self.state(client)
        flat = x.detach().reshape(x.shape[0], -1).float().cpu()
        labels = labels.detach().cpu().long()
        for c in labels.unique().tolist():
            self._observe_class(state, int(c), flat[labels == c])
        if (
            len(state.distances) >= self.config.min_distances
            and state.since_check >= self.config.check_every
        ):
            state.since_check = 0
            state.statistic = shapiro_w(np.fromiter(state.distances, dtype=np.float64))
            if state.statistic < self.config.delta and state.alarm_at is None:
                state.alarm_at = state.queries
        return state

    def _observe_class(self, state: ClientStream, c: int, batch: Tensor) -> None:
        config = self.config
        stored = state.stored.setdefault(c, deque())
        admitted = state.admitted.setdefault(c, deque(maxlen=config.window))
        before = len(stored)
        candidates = torch.cat([torch.stack(list(stored)), batch]) if stored else batch
        distances = torch.cdist(batch, candidates)  # (B, stored + B), one call per batch
        members: list[int] = []  # columns of `candidates` that are in G_c now, in storing order
        members.extend(range(before))
        for i in range(len(batch)):
            state.queries += 1
            if not members:  # the first query of its class starts G_c
                self._admit(state, c, batch[i], members, before + i)
                continue
            d = float(distances[i, members].min())
            state.distances.append(d)
            threshold = state.thresholds.get(c, 0.0)
            if len(admitted) >= 2:
                threshold = max(threshold, float(np.mean(admitted) - np.std(admitted)))
            state.thresholds[c] = threshold
            if d > threshold:
                admitted.append(d)
                self._admit(state, c, batch[i], members, before + i)
            state.since_check += 1

    def _admit(
        self, state: ClientStream, c: int, image: Tensor, members: list[int], column: int
    ) -> None:
        """Store ``image`` in G_c (column ``column`` of this batch's distances); evict the client's
        oldest stored query past ``max_stored`` (from whichever class holds it)."""
        state.stored[c].append(image)
        members.append(column)
        state.order.append(c)
        while len(state.order) > self.config.max_stored:
            oldest = state.order.popleft()
            state.stored[oldest].popleft()
            if oldest == c:
                members.pop(0)


def shapiro_w(values: np.ndarray) -> float:
    """The Shapiro–Wilk W of ``values``; 1.0 (perfectly normal-looking) for a constant sample."""
    if np.ptp(values) == 0:
        return 1.0
    return float(shapiro(values).statistic)
