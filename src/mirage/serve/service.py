"""Everything one server holds, and one request's way through it (docs/design.md §service):
authenticate → validate → charge → micro-batch (model, defense) → audit → answer.

A request is validated completely (size, JSON, shape, dtype, finiteness, range, key, model)
before the quota is charged. The charge is a reservation: committed once the answer is in the
audit log, released if the model or defense fails or the client hangs up, and settled at the
next start if the process dies in between (docs/design.md §service-errors, §reservations).

With ``[detection]``, each answered request then feeds the client's PRADA detector; once it has
alarmed, the client is flagged, refused before anything is charged, or answered by the alarm
defense (docs/design.md §detection). That state is in this process's memory: a restart forgets
it, and replicas do not share it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from fastapi import Request

from mirage.api.detection import ClientStream
from mirage.serve.audit import AuditLog
from mirage.serve.auth import KeyRing, hash_key, key_from_headers
from mirage.serve.batching import MicroBatcher
from mirage.serve.config import ClientConfig, ServeConfig
from mirage.serve.detection import StreamWatch
from mirage.serve.errors import (
    AuthThrottled,
    ClientGone,
    InferenceFailed,
    InvalidKey,
    MissingKey,
    QueryStreamRefused,
    UnknownModel,
    UnknownVersion,
    UpstreamError,
)
from mirage.serve.gateway import UpstreamModel
from mirage.serve.loading import ServedDefenses, class_names, load_model, platform
from mirage.serve.metrics import Metrics
from mirage.serve.protocol import (
    HEADER_LENGTH,
    VERSIONS,
    body_limit,
    infer_response,
    model_metadata,
    parse_infer_request,
    read_body,
)
from mirage.serve.quotas import QuotaStore

if TYPE_CHECKING:
    from mirage.serve.redis_store import RedisQuotaStore

log = logging.getLogger(__name__)
T = TypeVar("T")


def open_store(config: ServeConfig) -> QuotaStore | RedisQuotaStore:
    """The configured backend of quotas, limits and reservations (docs/design.md §shared-state)."""
    storage = config.storage
    if storage.backend == "redis":
        from mirage.serve.redis_store import RedisQuotaStore

        return RedisQuotaStore(storage.url, prefix=storage.prefix)
    return QuotaStore(storage.database)


class Service:
    """The model, its defenses, the key ring, the quota store, the audit log and the metrics."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        model, card, scenario = load_model(config)
        self.model = model
        self.upstream = model if isinstance(model, UpstreamModel) else None  # a gateway (docs/design.md §gateway)
        self.input_shape: tuple[int, int, int] = tuple(model.input_shape)  # type: ignore[assignment]
        self.classes = class_names(config, card)
        self.evidence = None
        if config.ownership is not None:
            from mirage.serve.evidence import EvidenceStore

            self.evidence = EvidenceStore(config.ownership.evidence, config.ownership.max_items)
        detection = config.detection
        self.defenses = ServedDefenses(config.defense, scenario, model, card, ownership=config.ownership,
                                       evidence=self.evidence,
                                       alarm=detection.alarm_defense if detection is not None else None)
        self.watch = StreamWatch(detection, self._alarm) if detection is not None else None
        self._defense_alarms: set[str] = set()
        self.keys = KeyRing(config.clients)
        self.quotas = open_store(config)
        self.audit = AuditLog(config.audit_path)
        self._one_file = config.storage.backend == "sqlite" and config.audit_path == config.storage.database
        kept, released = self.quotas.reconcile(self.audit.answered, lease=config.storage.reservation_lease_s)
        if kept or released:
            log.warning("settled the reservations of a process that is gone: %d kept (answered), "
                        "%d released (unanswered)", kept, released)
        self.reconciled = (kept, released)
        self.metrics = Metrics()
        limits = config.limits
        self.batcher = MicroBatcher(self.model, self.defenses, max_images=limits.microbatch_images,
                                    max_wait=limits.microbatch_wait_ms / 1000, metrics=self.metrics,
                                    model_name=config.model.name)

    def authenticate(self, request: Request) -> ClientConfig:
        """The client whose key the request carries (docs/design.md §access)."""
        return self._checked(request, self.keys.authenticate)

    def metrics_access(self, request: Request) -> bool:
        """Whether ``/metrics`` may show per-client series: only with the configured bearer token.
        No token: aggregate-only; a wrong one: 401, a failed authentication like any other."""
        if "authorization" not in request.headers and "x-api-key" not in request.headers:
            return False
        self._checked(request, self._metrics_token)
        return True

    def _metrics_token(self, key: str) -> None:
        digest = self.config.access.metrics_key_sha256
        if digest is None or not hmac.compare_digest(hash_key(key), digest):
            raise InvalidKey("invalid metrics token")

    def _checked(self, request: Request, check: Callable[[str], T]) -> T:
        """``check(key)`` on the presented key. A source address that failed
        ``access.auth_failures`` times in its window gets 429 until the window ends; every failure
        up to there is written to the audit log, the one that starts the throttle as
        ``auth_throttled``."""
        access = self.config.access
        source = request.client.host if request.client else "unknown"
        wait = self.quotas.auth_throttled(source, access.auth_window_s, access.auth_failures)
        if wait is not None:
            raise AuthThrottled(f"too many failed authentications from {source}; retry in {wait:.0f}s",
                                retry_after=wait)
        try:
            return check(key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key")))
        except (MissingKey, InvalidKey) as error:
            failures = self.quotas.auth_failed(source, access.auth_window_s)
            if failures <= access.auth_failures:
                kind = "auth_failed" if failures < access.auth_failures else "auth_throttled"
                self.audit.record_event(kind, source=source,
                                        detail=f"{error.reason}: {request.method} {request.url.path[:200]}")
            raise

    def check_model(self, name: str, version: str | None = None) -> None:
        """The model of a path, and its version on a ``/versions/{v}`` path (OIP V2 REST)."""
        if name != self.config.model.name:
            raise UnknownModel(f"unknown model {name[:64]!r}")
        if version is not None and version not in VERSIONS:
            raise UnknownVersion(f"model {name!r} has no version {version[:64]!r}; its versions are {list(VERSIONS)}")

    def metadata(self, client: ClientConfig) -> dict[str, Any]:
        limits = self.config.limits
        return model_metadata(
            self.config.model.name, self.input_shape, self.classes, platform=platform(self.config.model),
            defense=self.defenses.describe() if self.config.access.disclose_defense else None,
            limits={"max_batch": limits.max_batch, "max_payload_bytes": limits.max_payload_bytes},
            client=self._client_metadata(client))

    def _client_metadata(self, client: ClientConfig) -> dict[str, Any]:
        """The client's quota and limits; whether its query stream is flagged only when the
        defense is disclosed (``access.disclose_defense``): by default an attacker is not told."""
        meta = {"name": client.name, "quota": client.quota, "queries_used": self.quotas.used(client.name),
                "rate": client.rate, "burst": client.bucket_capacity}
        if self.watch is not None and self.config.access.disclose_defense:
            meta.update(flagged=self.watch.alarmed(client.name), on_alarm=self.watch.config.on_alarm)
        return meta

    def _alarm(self, client: str, state: ClientStream) -> None:
        """A client's first PRADA alarm: one audit event, the metric, a warning."""
        detection = self.watch.config
        detail = (f"queries={state.alarm_at} W={state.statistic:.4f} delta={detection.prada.delta} "
                  f"on_alarm={detection.on_alarm}")
        self.audit.record_event("prada_alarm", source=client, detail=detail)
        self.metrics.inc("mirage_prada_alarms_total", client=client, model=self.config.model.name)
        log.warning("PRADA alarm for client %s after %d queries (Shapiro-Wilk W %.4f < delta %s); on_alarm=%s",
                    client, state.alarm_at, state.statistic, detection.prada.delta, detection.on_alarm)

    def _new_defense_alarm(self, key: str) -> int | None:
        """Where the defense instance of ``key`` raised its own stream alarm (``Defense.stream_alarm``,
        e.g. gated GRAD²'s ``alarm_rate``) if it did and nobody has recorded it yet."""
        defense = self.defenses(key)
        position = None if defense is None else defense.stream_alarm
        if position is None or key in self._defense_alarms:
            return None
        self._defense_alarms.add(key)
        return position

    def _record_defense_alarm(self, client: str, position: int) -> None:
        """A client's first defense alarm: one audit event, the metric, a warning."""
        self.audit.record_event("defense_alarm", source=client,
                                detail=f"queries={position} defense={self.config.defense.name}")
        self.metrics.inc("mirage_defense_alarms_total", client=client, model=self.config.model.name)
        log.warning("the defense raised a stream alarm for client %s at query %d", client, position)

    async def infer(self, name: str, request: Request, version: str | None = None) -> tuple[bytes, dict[str, str]]:
        """The response body and headers to one inference request (JSON or binary tensor data)."""
        start = time.perf_counter()
        client = self.authenticate(request)
        self.check_model(name, version)
        alarmed = self.watch is not None and self.watch.alarmed(client.name)
        if alarmed and self.watch.config.on_alarm == "refuse":
            raise QueryStreamRefused(f"client {client.name!r} is refused: its query stream raised an alarm")
        limits = self.config.limits
        room = self.quotas.headroom(client)  # one indexed read (SQLite) or round trip (Redis)
        servable = limits.max_batch if room is None else min(limits.max_batch, room)
        body = await read_body(request, body_limit(servable, self.input_shape, limits.max_payload_bytes),
                               limits.body_timeout_s)
        parsed = await asyncio.to_thread(parse_infer_request, body, self.input_shape, limits.max_batch,
                                         request.headers.get(HEADER_LENGTH))
        images, request_id = parsed.images, parsed.id
        n = len(images)
        used, reservation = await asyncio.to_thread(self.quotas.reserve, client, n)
        audited = False
        try:
            key = self.defenses.key(client.name, alarmed=alarmed)
            future = self.batcher.submit(key, torch.from_numpy(images))
            served = (await asyncio.wrap_future(future)).numpy()
            if await request.is_disconnected():
                raise ClientGone("the client disconnected before its answer was ready; not charged")
            await asyncio.to_thread(self.audit.record, client=client.name, model=name, request_id=request_id,
                                    images=images, served=served, reservation=reservation,
                                    settle=self._one_file)
            audited = True
            if not self._one_file:
                await asyncio.to_thread(self.quotas.commit, reservation)
        except BaseException as error:
            if not audited:
                await asyncio.shield(asyncio.to_thread(self.quotas.release, client, reservation))
            if isinstance(error, ClientGone):
                log.info("client %s disconnected; its %d queries were released", client.name, n)
                raise
            if isinstance(error, UpstreamError):  # a gateway's upstream failed: 502 or 504, not 500
                log.warning("the upstream failed for client %s; its %d queries were released: %s",
                            client.name, n, error.message)
                raise type(error)(f"{error.message}; the queries were not charged") from None
            if isinstance(error, Exception):
                log.exception("inference failed for client %s", client.name)
                raise InferenceFailed(f"the model or defense failed ({type(error).__name__}); "
                                      "the queries were not charged") from error
            raise
        if self.watch is not None:
            await self._observe(client.name, images, served)
        if (position := self._new_defense_alarm(key)) is not None:
            await asyncio.to_thread(self._record_defense_alarm, client.name, position)
        labels = {"model": name, "client": client.name}
        self.metrics.inc("mirage_requests_total", **labels)
        self.metrics.inc("mirage_queries_total", n, **labels)
        self.metrics.observe("mirage_request_latency_seconds", time.perf_counter() - start, model=name)
        return infer_response(name, parsed, served, queries_used=used, query_budget=client.quota)

    async def _observe(self, client: str, images: Any, served: Any) -> None:
        """Feed an answered (and audited) request to the detector, in a worker thread that runs
        to the end even if this request is cancelled, so an alarm is always recorded. A detector
        failure is logged; the answer stands (it is charged)."""
        try:
            await asyncio.to_thread(self.watch.observe, client, images, served)
        except Exception:
            log.exception("the query-stream detector failed for client %s; its answer stands", client)

    def render_metrics(self, per_client: bool) -> str:
        if not per_client:
            return self.metrics.render(aggregate=True)
        usage = self.quotas.usage()
        names = [c.name for c in self.config.clients]
        gauges = {
            "mirage_client_queries_used": {(("client", c),): usage.get(c, (0, 0))[0] for c in names},
            "mirage_client_requests_used": {(("client", c),): usage.get(c, (0, 0))[1] for c in names},
        }
        return self.metrics.render(gauges)

    def readiness(self) -> str | None:
        """``None`` when the service can answer, else why not: the worker is down or, for a
        gateway, the upstream model is not ready (probed, cached briefly; docs/design.md §gateway)."""
        if not self.batcher.alive:
            return "the inference worker is not running"
        return self.upstream.readiness() if self.upstream is not None else None

    def close(self) -> None:
        self.batcher.stop()
        if self.upstream is not None:
            self.upstream.close()
        self.quotas.close()
        self.audit.close()
        if self.evidence is not None:
            self.evidence.close()
