"""Prometheus text exposition (format 0.0.4) of the service's counters and histograms,
kept in-process under one lock. Persisted per-client totals come from the quota store."""

from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict
from typing import ClassVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value


class Metrics:
    """Counters and histograms keyed by (name, labels); :meth:`render` writes the exposition."""

    HELP: ClassVar[dict[str, tuple[str, str]]] = {
        "mirage_requests_total": ("counter", "Answered inference requests."),
        "mirage_queries_total": ("counter", "Answered queries (images)."),
        "mirage_rejected_requests_total": ("counter", "Rejected requests by reason."),
        "mirage_model_seconds_total": ("counter", "Seconds spent in the victim's forward pass."),
        "mirage_defense_seconds_total": ("counter", "Seconds spent in the defense."),
        "mirage_request_latency_seconds": ("histogram", "Latency of answered inference requests."),
        "mirage_defense_batch_seconds": ("histogram", "Defense time per micro-batch."),
        "mirage_microbatch_queries": ("histogram", "Queries (images) per micro-batch."),
        "mirage_client_queries_used": ("gauge", "Queries charged to each client (persisted)."),
        "mirage_client_requests_used": ("gauge", "Requests charged to each client (persisted)."),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._histograms: dict[str, dict[tuple, Histogram]] = defaultdict(dict)
        self._buckets = {"mirage_request_latency_seconds": LATENCY_BUCKETS,
                         "mirage_defense_batch_seconds": LATENCY_BUCKETS,
                         "mirage_microbatch_queries": BATCH_BUCKETS}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._histograms[name]
            if key not in series:
                series[key] = Histogram(self._buckets[name])
            series[key].observe(value)

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self, gauges: dict[str, dict[tuple, float]] | None = None, *, aggregate: bool = False) -> str:
        """The exposition; ``aggregate`` sums the series over their ``client`` label (for a
        scraper without the metrics token, docs/design.md §access)."""
        lines: list[str] = []
        with self._lock:
            counters = {n: dict(s) for n, s in self._counters.items()}
            histograms = {n: {k: (list(h.counts), h.sum, h.buckets) for k, h in s.items()}
                          for n, s in self._histograms.items()}
        if aggregate:
            merged: dict[str, dict[tuple, float]] = {}
            for name, series in counters.items():
                for key, value in series.items():
                    key = tuple(pair for pair in key if pair[0] != "client")
                    merged.setdefault(name, {}).setdefault(key, 0.0)
                    merged[name][key] += value
            counters, gauges = merged, None
        for name, (kind, text) in self.HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "counter":
                for key, value in sorted(counters.get(name, {}).items()):
                    lines.append(f"{name}{_labels(key)} {_number(value)}")
            elif kind == "gauge":
                for key, value in sorted((gauges or {}).get(name, {}).items()):
                    lines.append(f"{name}{_labels(key)} {_number(value)}")
            else:
                for key, (counts, total, buckets) in sorted(histograms.get(name, {}).items()):
                    cumulative = 0
                    for bound, count in zip((*buckets, math.inf), counts, strict=True):
                        cumulative += count
                        lines.append(f"{name}_bucket{_labels((*key, ('le', _number(bound))))} {cumulative}")
                    lines.append(f"{name}_sum{_labels(key)} {_number(total)}")
                    lines.append(f"{name}_count{_labels(key)} {cumulative}")
        return "\n".join(lines) + "\n"
