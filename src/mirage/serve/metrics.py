"""The service's counters and histograms, in a ``prometheus_client`` registry of its own (one per
service, so two services in one process never share series). Persisted per-client totals come
from the quota store at scrape time. A scraper without the metrics token sees only the liveness
counters of :data:`PUBLIC`, summed over their ``client`` label: no alarm, defense timing or
rejection series, which would tell a thief when it was flagged (docs/design.md §access)."""

from __future__ import annotations

from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

prometheus_client.disable_created_metrics()  # no *_created series next to every counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# name: (kind, help, labels, buckets)
SERIES: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "mirage_requests_total": ("counter", "Answered inference requests.", ("client", "model"), None),
    "mirage_queries_total": ("counter", "Answered queries (images).", ("client", "model"), None),
    "mirage_rejected_requests_total": (
        "counter",
        "Rejected requests by reason.",
        ("reason",),
        None,
    ),
    "mirage_prada_alarms_total": (
        "counter",
        "Clients whose query stream raised PRADA's alarm.",
        ("client", "model"),
        None,
    ),
    "mirage_defense_alarms_total": (
        "counter",
        "Clients whose defense raised its own stream alarm.",
        ("client", "model"),
        None,
    ),
    "mirage_model_seconds_total": (
        "counter",
        "Seconds spent in the victim's forward pass.",
        ("model",),
        None,
    ),
    "mirage_defense_seconds_total": ("counter", "Seconds spent in the defense.", ("model",), None),
    "mirage_request_latency_seconds": (
        "histogram",
        "Latency of answered inference requests.",
        ("model",),
        LATENCY_BUCKETS,
    ),
    "mirage_defense_batch_seconds": (
        "histogram",
        "Defense time per micro-batch.",
        ("model",),
        LATENCY_BUCKETS,
    ),
    "mirage_microbatch_queries": (
        "histogram",
        "Queries (images) per micro-batch.",
        ("model",),
        BATCH_BUCKETS,
    ),
}
PUBLIC = ("mirage_requests_total", "mirage_queries_total")
"""The series ``/metrics`` shows without the token: answered requests and queries, summed."""
GAUGES = {
    "mirage_client_queries_used": "Queries charged to each client (persisted).",
    "mirage_client_requests_used": "Requests charged to each client (persisted).",
}


class _Collected:
    """A collector over ready-made metric families (what ``generate_latest`` takes)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def _public(registry: CollectorRegistry) -> list[Metric]:
    """The :data:`PUBLIC` series, each summed over its ``client`` label."""
    families = []
    for family in registry.collect():
        if (
            not any(sample.name in PUBLIC for sample in family.samples)
            and f"{family.name}_total" not in PUBLIC
        ):
            continue
        summed: dict[tuple, float] = {}
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "client"))
            summed[(sample.name, labels)] = summed.get((sample.name, labels), 0.0) + sample.value
        merged = Metric(family.name, family.documentation, family.type)
        for (name, labels), value in summed.items():
            merged.add_sample(name, dict(labels), value)
        families.append(merged)
    return families


class Metrics:
    """Counters and histograms by name and labels; :meth:`render` writes the exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        for name, (kind, text, labels, buckets) in SERIES.items():
            if kind == "counter":
                self._counters[name] = Counter(name, text, labels, registry=self.registry)
            elif buckets is not None:
                self._histograms[name] = Histogram(
                    name, text, labels, buckets=buckets, registry=self.registry
                )
            else:
                raise ValueError(f"histogram {name} needs its buckets")

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._counters[name].labels(**labels).inc(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._histograms[name].labels(**labels).observe(value)

    def counter(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(
        self, gauges: dict[str, dict[tuple, float]] | None = None, *, aggregate: bool = False
    ) -> str:
        """The exposition, with ``gauges`` ({name: {((label, value), …): value}}) appended;
        ``aggregate``: only the :data:`PUBLIC` series, summed over their ``client`` label, and no
        gauges."""
        if aggregate:
            return generate_latest(_Collected(_public(self.registry))).decode()
        families: list[Metric] = []
        for name, series in (gauges or {}).items():
            family = None
            for key, value in sorted(series.items()):
                if family is None:
                    family = GaugeMetricFamily(name, GAUGES[name], labels=[k for k, _ in key])
                family.add_metric([v for _, v in key], value)
            if family is not None:
                families.append(family)
        return (generate_latest(self.registry) + generate_latest(_Collected(families))).decode()
