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
import functools
import hmac
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from fastapi import Request
from starlette.datastructures import Headers

from mirage.api.alarm import AlarmPolicy
from mirage.api.base import QueryRefused
from mirage.api.detection import ClientStream
from mirage.devices import on_device, resolve_device
from mirage.ownership import EvidenceStore
from mirage.serve.audit import AuditLog
from mirage.serve.auth import KeyRing, hash_key, presented_key
from mirage.serve.batching import Answer, DeferredEvidence, MicroBatcher
from mirage.serve.config import ClientConfig, ServeConfig
from mirage.serve.detection import StreamWatch
from mirage.serve.errors import (
    AuthThrottled,
    ClientGone,
    InferenceFailed,
    InvalidKey,
    MissingKey,
    QueryStreamRefused,
    ServeError,
    StorageUnavailable,
    UnknownModel,
    UnknownVersion,
    UpstreamError,
)
from mirage.serve.gateway import UpstreamModel
from mirage.serve.loading import (
    InstanceKey,
    ServedDefenses,
    class_names,
    load_model,
    platform,
)
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
HEALTH_CACHE_S = 1.0
"""How long a storage health probe is reused by readiness (a flood of probes is not a flood of
storage calls)."""


def open_store(config: ServeConfig) -> QuotaStore | RedisQuotaStore:
    """The configured backend of quotas, limits and reservations (docs/design.md §shared-state)."""
    storage = config.storage
    if storage.backend == "redis":
        from mirage.serve.redis_store import RedisQuotaStore

        assert storage.url is not None  # the config requires it for redis

        store = RedisQuotaStore(storage.url, prefix=storage.prefix, timeout=storage.timeout_s)
        kept = store.persistence()
        if kept is None:
            if storage.require_persistence:
                store.close()
                raise ValueError(
                    f"the Redis server at {storage.url} persists nothing (appendonly no, no save "
                    "points): a restart would give every quota back. Turn on AOF or RDB, or set "
                    "storage.require_persistence = false"
                )
            log.warning(
                "THE REDIS SERVER AT %s PERSISTS NOTHING (appendonly no, no save points): a "
                "restart gives every client its quota back and forgets every charge. Turn on "
                "appendonly, or set storage.require_persistence = true to refuse such a server",
                storage.url,
            )
        return store
    return QuotaStore(storage.database, timeout=storage.timeout_s)


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises: SQLite's errors, OS errors (a full disk) and Redis's."""
    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
    try:
        import redis
    except ImportError:  # pragma: no cover — redis is a dependency
        return errors
    return (*errors, redis.RedisError)


class StorageCalls:
    """Every storage call of a request in a thread pool of its own, off the event loop
    (docs/design.md §service-errors): a locked SQLite file or a stalled Redis delays the requests
    that need it — each up to ``storage.timeout_s``, then a 503 — and nothing else.

    The stores' own timeouts (SQLite's busy timeout, Redis's socket timeout) are the deadline, so
    a call that fails has had no effect; the wait here is only a backstop (twice as long, plus a
    second), after which the call's effect is unknown (:attr:`StorageUnavailable.settled` false)."""

    def __init__(self, timeout: float, workers: int = 8) -> None:
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="mirage-storage")
        self.errors = storage_errors()

    async def __call__(
        self,
        fn: Callable[..., T],
        *args: Any,
        on_late: Callable[[T], None] | None = None,
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs)`` in the pool; its result, or :class:`StorageUnavailable`.
        ``on_late``: called with the result should the call finish after the backstop gave up."""
        future = asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(fn, *args, **kwargs)
        )
        try:
            return await asyncio.wait_for(asyncio.shield(future), 2 * self.timeout + 1)
        except TimeoutError:
            if (
                on_late is not None
            ):  # the done callback runs on the event loop: the late call goes to the pool
                future.add_done_callback(
                    lambda done: (
                        done.cancelled()
                        or done.exception() is not None
                        or self.pool.submit(on_late, done.result())
                    )
                )
            raise StorageUnavailable(
                f"storage did not answer within {self.timeout:g}s", settled=False
            ) from None
        except self.errors as error:
            raise StorageUnavailable(f"storage failed ({type(error).__name__})") from error

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Service:
    """The model, its defenses, the key ring, the quota store, the audit log and the metrics."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        # an absent device is an error before anything loads (docs/design.md §devices)
        self.device = (
            None if config.model.upstream is not None else resolve_device(config.model.device)
        )
        model, card, scenario = load_model(config)
        self.model = model
        self.upstream = (
            model if isinstance(model, UpstreamModel) else None
        )  # a gateway (docs/design.md §gateway)
        # every served model (ImageClassifier, ExternalModel, UpstreamModel) has an input_shape
        self.input_shape: tuple[int, int, int] = tuple(model.input_shape)  # type: ignore[arg-type]
        self.classes = class_names(config, card)
        storage = config.storage
        self.evidence = None
        if config.ownership is not None:
            self.evidence = DeferredEvidence(
                EvidenceStore(
                    config.ownership.evidence, config.ownership.max_items, timeout=storage.timeout_s
                )
            )
        detection = config.detection
        self.defenses = ServedDefenses(
            config.defense,
            scenario,
            model,
            card,
            ownership=config.ownership,
            evidence=self.evidence,
            alarm=detection.alarm_defense if detection is not None else None,
        )
        self.watch = StreamWatch(detection, self._alarm) if detection is not None else None
        self.alarm_policy = (
            AlarmPolicy()
            if detection is None
            else AlarmPolicy(
                detection.on_alarm, has_alarm_defense=detection.alarm_defense is not None
            )
        )
        self._defense_alarms: set[InstanceKey] = set()
        self.keys = KeyRing(config.clients)
        self.quotas = open_store(config)
        self.audit = AuditLog(
            config.audit_path,
            timeout=storage.timeout_s,
            events_retention_days=storage.events_retention_days,
        )
        self.storage = StorageCalls(storage.timeout_s)
        self._one_file = storage.backend == "sqlite" and config.audit_path == storage.database
        kept, released = self.quotas.reconcile(
            self.audit.answered, lease=storage.reservation_lease_s
        )
        if kept or released:
            log.warning(
                "settled the reservations of a process that is gone: %d kept (answered), "
                "%d released (unanswered)",
                kept,
                released,
            )
        self.reconciled = (kept, released)
        self._unreleased: list[
            tuple[ClientConfig, str]
        ] = []  # charges to settle once storage recovers
        self._unreleased_lock = threading.Lock()
        self._health: tuple[float, str | None] = (-math.inf, None)
        self._health_lock = asyncio.Lock()
        self.metrics = Metrics()
        limits = config.limits
        workers = limits.model_workers or (4 if self.upstream is not None else 1)
        self.batcher = MicroBatcher(
            on_device(self.model, self.device),
            self.defenses,
            max_images=limits.microbatch_images,
            max_wait=limits.microbatch_wait_ms / 1000,
            metrics=self.metrics,
            model_name=config.model.name,
            workers=workers,
            evidence=self.evidence,
        )

    def summary(self) -> str:
        """What this service serves and how, in a few lines for the operator at start (logged at
        INFO when the app starts, printed by ``mirage serve``): the model and where it comes from,
        its input and classes, the device, the defense with its public parameters and parts,
        ownership, detection, storage, gRPC, clients and limits. Never a key, seed or secret."""
        config = self.config
        limits = config.limits
        shape = "×".join(map(str, self.input_shape))
        device = "the upstream's" if self.device is None else self.device
        model = (
            f"model {config.model.name!r}: {self._model_source()}; input {shape}, "
            f"{len(self.classes)} classes ({_few(self.classes)}); device {device}"
        )
        lines = [model, *self._defense_summary()]
        ownership = config.ownership
        lines.append(
            "ownership: off"
            if ownership is None
            else f"ownership: on, {len(ownership.watermark)} watermark layer(s); "
            f"evidence {ownership.evidence} (at most {ownership.max_items} per client)"
        )
        detection = config.detection
        if detection is None:
            lines.append("detection: off")
        else:
            switch = (
                f" to {detection.alarm_defense.name}" if detection.alarm_defense is not None else ""
            )
            lines.append(
                f"detection: on, PRADA (delta {detection.prada.delta:g}); on alarm: "
                f"{detection.on_alarm}{switch}"
            )
        storage = config.storage
        where = (
            f"redis {_without_credentials(storage.url)}"
            if storage.backend == "redis"
            else f"sqlite {storage.database}"
        )
        lines.append(f"storage: {where}; audit log {config.audit_path}")
        lines.append(
            "grpc: off"
            if config.grpc is None
            else f"grpc: on, {config.grpc.host}:{config.grpc.port}"
        )
        lines.append(
            f"clients: {len(config.clients)}; limits: max_batch {limits.max_batch}, "
            f"max_payload_bytes {limits.max_payload_bytes}"
        )
        return "\n".join(lines)

    def _model_source(self) -> str:
        source = self.config.model
        if source.upstream is not None:
            upstream = source.upstream
            version = f" version {upstream.version}" if upstream.version else ""
            return f"upstream {upstream.url}, model {upstream.model!r}{version} (a gateway)"
        if source.checkpoint is not None:
            return f"checkpoint {source.checkpoint}"
        if source.path is not None:
            return f"{source.file_format} file {source.path}"
        retrained = (
            f" trained with {self.config.defense.name}" if self.config.defense.training_time else ""
        )
        return f"scenario {source.scenario!r} (its victim{retrained})"

    def _defense_summary(self) -> list[str]:
        """The defense line and, for a query-time defense, its parts' line."""
        spec = self.config.defense
        described = self.defenses.describe()
        public = {
            k: v
            for k, v in described["params"].items()
            if v is not None and not (isinstance(v, str) and v.startswith("<") and v.endswith(">"))
        }
        params = ", ".join(f"{k}={v}" for k, v in public.items())
        if spec.name == "none":
            return ["defense: none (the model's answers as they are)"]
        if spec.training_time:
            return [
                f"defense: {spec.name}, training-time (the served victim was trained with it)"
                + (f"; {params}" if params else "")
            ]
        sharing = "one instance per client" if spec.per_client else "one shared instance"
        if spec.seed_per_client:
            sharing += ", seeded per client"
        lines = [f"defense: {spec.name}" + (f" ({params})" if params else "") + f"; {sharing}"]
        parts, resolved = spec.parts(), self.defenses.params
        found = []
        if isinstance(parts.surrogate, str):
            found.append(f"surrogate {parts.surrogate} (trained for the scenario)")
        elif isinstance(parts.surrogate, list):
            found.append(
                f"surrogate ensemble of {len(parts.surrogate)}: "
                f"{', '.join(map(str, parts.surrogate))}"
            )
        elif parts.surrogate is not None:
            found.append(f"surrogate {parts.surrogate}")
        if parts.gate is not None:
            found.append(
                f"gate {parts.gate.score}, tau {resolved['tau']:.6g} "
                f"(benign FPR {parts.gate.benign_fpr:g})"
            )
        if parts.reference is not None:
            found.append(f"reference set of {parts.reference.size} images")
        if parts.watermark is not None:
            found.append(
                f"watermark set: {parts.watermark.size} images of class "
                f"{parts.watermark.source_class} -> {parts.watermark.target_class}"
            )
        if isinstance(parts.misinformation, tuple):
            found.append(
                f"detector {parts.misinformation[0]}, "
                f"misinformation model {parts.misinformation[1]}"
            )
        elif parts.misinformation is not None:
            found.append("detector and misinformation model trained for the scenario")
        if found:
            lines.append("  parts: " + "; ".join(found))
        return lines

    async def authenticate(self, request: Request) -> ClientConfig:
        """The client whose key the request carries (docs/design.md §access)."""
        return await self.authenticate_key(_source(request), request.headers, _what(request))

    async def authenticate_key(self, source: str, headers: Headers, what: str) -> ClientConfig:
        """The client whose key ``headers`` (HTTP headers, or gRPC metadata as headers) present,
        for a call from ``source`` described by ``what`` in the audit log."""
        return await self._checked(source, headers, what, self.keys.authenticate)

    async def metrics_access(self, request: Request) -> bool:
        """Whether ``/metrics`` may show per-client series: only with the configured bearer token.
        No token: liveness counters only; a wrong one: 401, a failed authentication like any
        other."""
        if "authorization" not in request.headers and "x-api-key" not in request.headers:
            return False
        await self._checked(_source(request), request.headers, _what(request), self._metrics_token)
        return True

    def _metrics_token(self, key: str) -> None:
        digest = self.config.access.metrics_key_sha256
        if digest is None or not hmac.compare_digest(hash_key(key), digest):
            raise InvalidKey("invalid metrics token")

    async def _checked(
        self, source: str, headers: Headers, what: str, check: Callable[[str], T]
    ) -> T:
        """``check(key)`` on the presented key. A source address that failed
        ``access.auth_failures`` times in its window gets 429 until the window ends; every failure
        up to there is written to the audit log, the one that starts the throttle as
        ``auth_throttled``. The source is the peer's address; ``X-Forwarded-For`` names it only
        from ``access.trusted_proxies`` (uvicorn's proxy headers, :mod:`mirage.serve.runner`)."""
        access = self.config.access
        key = presented_key(headers)
        if (wait := await self._auth_wait(source)) is not None:
            raise AuthThrottled(
                f"too many failed authentications from {source}; retry in {wait:.0f}s",
                retry_after=wait,
            )
        try:
            return check(key)
        except (MissingKey, InvalidKey) as error:
            failures = await self._nothing_charged(
                self.quotas.auth_failed, source, access.auth_window_s
            )
            if (
                failures > access.auth_failures
            ):  # concurrent failures passed the check above together
                wait = await self._auth_wait(source) or access.auth_window_s
                raise AuthThrottled(
                    f"too many failed authentications from {source}; retry in {wait:.0f}s",
                    retry_after=wait,
                ) from None
            kind = "auth_failed" if failures < access.auth_failures else "auth_throttled"
            await self._nothing_charged(
                self.audit.record_event, kind, source=source, detail=f"{error.reason}: {what[:200]}"
            )
            raise

    async def _auth_wait(self, source: str) -> float | None:
        access = self.config.access
        return await self._nothing_charged(
            self.quotas.auth_throttled, source, access.auth_window_s, access.auth_failures
        )

    def check_model(self, name: str, version: str | None = None) -> None:
        """The model of a path, and its version on a ``/versions/{v}`` path (OIP V2 REST)."""
        if name != self.config.model.name:
            raise UnknownModel(f"unknown model {name[:64]!r}")
        if version is not None and version not in VERSIONS:
            raise UnknownVersion(
                f"model {name!r} has no version {version[:64]!r}; its versions are {list(VERSIONS)}"
            )

    async def metadata(self, client: ClientConfig) -> dict[str, Any]:
        limits = self.config.limits
        used = await self.storage(self.quotas.used, client.name)
        return model_metadata(
            self.config.model.name,
            self.input_shape,
            self.classes,
            platform=platform(self.config.model),
            defense=self.defenses.describe() if self.config.access.disclose_defense else None,
            limits={"max_batch": limits.max_batch, "max_payload_bytes": limits.max_payload_bytes},
            client=self._client_metadata(client, used),
        )

    def _client_metadata(self, client: ClientConfig, used: int) -> dict[str, Any]:
        """The client's quota and limits; whether its query stream is flagged only when the
        defense is disclosed (``access.disclose_defense``): by default an attacker is not told."""
        meta = {
            "name": client.name,
            "quota": client.quota,
            "queries_used": used,
            "rate": client.rate,
            "burst": client.bucket_capacity,
        }
        if self.watch is not None and self.config.access.disclose_defense:
            meta.update(
                flagged=self.watch.alarmed(client.name), on_alarm=self.watch.config.on_alarm
            )
        return meta

    def _alarm(self, client: str, state: ClientStream) -> None:
        """A client's first PRADA alarm: one audit event, the metric, a warning."""
        assert self.watch is not None  # the watch calls this
        detection = self.watch.config
        detail = (
            f"queries={state.alarm_at} W={state.statistic:.4f} delta={detection.prada.delta} "
            f"on_alarm={detection.on_alarm}"
        )
        self.audit.record_event("prada_alarm", source=client, detail=detail)
        self.metrics.inc("mirage_prada_alarms_total", client=client, model=self.config.model.name)
        log.warning(
            "PRADA alarm for client %s after %d queries (Shapiro-Wilk W %.4f < delta %s); "
            "on_alarm=%s",
            client,
            state.alarm_at,
            state.statistic,
            detection.prada.delta,
            detection.on_alarm,
        )

    def _new_defense_alarm(self, key: InstanceKey) -> int | None:
        """Where the defense instance of ``key`` raised its own stream alarm
        (``Defense.stream_alarm``, e.g. gated GRAD²'s ``alarm_rate``) if it did and nobody has
        recorded it yet."""
        defense = self.defenses(key)
        position = None if defense is None else defense.stream_alarm
        if position is None or key in self._defense_alarms:
            return None
        self._defense_alarms.add(key)
        return position

    def _record_defense_alarm(self, client: str, position: int) -> None:
        """A client's first defense alarm: one audit event, the metric, a warning."""
        self.audit.record_event(
            "defense_alarm",
            source=client,
            detail=f"queries={position} defense={self.config.defense.name}",
        )
        self.metrics.inc("mirage_defense_alarms_total", client=client, model=self.config.model.name)
        log.warning("the defense raised a stream alarm for client %s at query %d", client, position)

    async def infer(
        self, name: str, request: Request, version: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """The response body and headers to one REST inference request (JSON or binary tensor
        data): :meth:`admit`, the body read within what ``max_batch`` images can need, then
        :meth:`answer`.

        The body limit is the model's and the config's, never the client's headroom: a body too
        large for any client is a 413, while a batch the client's quota or rate cannot take now
        is the 429 that :meth:`answer`'s reservation raises (``quota_exceeded``, or
        ``rate_limited`` with ``Retry-After`` when waiting helps). A client with no headroom at
        all gets its 429 from :meth:`admit`, before a byte of the body is read."""
        start = time.perf_counter()
        client = await self.authenticate(request)
        alarmed, _ = await self.admit(client, name, version)
        limits = self.config.limits
        body = await read_body(
            request,
            body_limit(limits.max_batch, self.input_shape, limits.max_payload_bytes),
            limits.body_timeout_s,
        )
        parsed = await asyncio.to_thread(
            parse_infer_request,
            body,
            self.input_shape,
            limits.max_batch,
            request.headers.get(HEADER_LENGTH),
        )
        served, used = await self.answer(
            client,
            name,
            parsed.images,
            parsed.id,
            alarmed=alarmed,
            hung_up=lambda: _hung_up(request),
            start=start,
        )
        return infer_response(name, parsed, served, queries_used=used, query_budget=client.quota)

    async def admit(self, client: ClientConfig, name: str, version: str | None) -> tuple[bool, int]:
        """What is settled before a request's images are read, whatever the transport: the model
        and version exist, a client refused for its alarm is refused; returns whether the client's
        stream raised an alarm and how many images it may still send (at most ``max_batch``)."""
        self.check_model(name, version)
        alarmed = self.watch is not None and self.watch.alarmed(client.name)
        try:
            self.alarm_policy.admit(client.name, alarmed)
        except QueryRefused as refused:
            raise QueryStreamRefused(str(refused)) from None
        limits = self.config.limits
        room = await self._nothing_charged(self.quotas.headroom, client)
        return alarmed, limits.max_batch if room is None else min(limits.max_batch, room)

    async def answer(
        self,
        client: ClientConfig,
        name: str,
        images: np.ndarray,
        request_id: str | None,
        *,
        alarmed: bool,
        hung_up: Callable[[], Awaitable[Any]],
        start: float,
    ) -> tuple[np.ndarray, int]:
        """The served answers (B, K) to a client's validated images (B, C, H, W) float32, and its
        queries used, whatever the transport; ``hung_up()`` returns once the client is gone.

        Charged when the work is done (docs/design.md §reservations): the reservation made
        before the images are queued is released if the client hangs up before a worker takes
        them (the job is dropped) or if anything fails, and kept once the model ran on them — also
        when the client hung up meanwhile (its audit row says ``delivered = 0``). Ownership
        evidence is written only for a request that is answered and charged."""
        n = len(images)
        used, reservation = await self._nothing_charged(
            self.quotas.reserve,
            client,
            n,
            on_late=lambda done: self._release_later(client, done[1]),
        )
        key = self.defenses.key(client.name, alarmed=self.alarm_policy.switched(alarmed))
        try:
            answer, gone = await self._computed(
                hung_up, self.batcher.submit(key, torch.from_numpy(images), client.name)
            )
            served = answer.served.numpy()
            await self.storage(
                self.audit.record,
                client=client.name,
                model=name,
                request_id=request_id,
                images=images,
                served=served,
                reservation=reservation,
                settle=self._one_file,
                delivered=not gone,
            )
        except BaseException as error:  # noqa: BLE001 — every failure releases, then re-raises (a typed error)
            raise await self._unanswered(client, reservation, n, error) from None
        if not self._one_file:
            try:
                await self.storage(self.quotas.commit, reservation)
            except (
                StorageUnavailable
            ) as error:  # the audit row stands: the charge is kept when reconciled
                log.warning(
                    "could not commit the reservation of client %s (%s); its answer is audited, "
                    "so the charge stands and is settled as kept",
                    client.name,
                    error.message,
                )
        if gone:
            log.info(
                "client %s hung up after its %d images ran; charged, not delivered", client.name, n
            )
            raise ClientGone("the client hung up after its images ran; charged")
        if answer.evidence:
            await self._write_evidence(client.name, answer.evidence)
        if self.watch is not None:
            await self._observe(client.name, images, served)
        if (position := self._new_defense_alarm(key)) is not None:
            await self.storage(self._record_defense_alarm, client.name, position)
        self.metrics.inc("mirage_requests_total", model=name, client=client.name)
        self.metrics.inc("mirage_queries_total", n, model=name, client=client.name)
        self.metrics.observe(
            "mirage_request_latency_seconds", time.perf_counter() - start, model=name
        )
        return served, used

    async def _nothing_charged(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A storage call before anything is charged: its failure is a 503 saying so."""
        try:
            return await self.storage(fn, *args, **kwargs)
        except StorageUnavailable as error:
            raise StorageUnavailable(
                f"{error.message}; the request was not answered and nothing was charged",
                retry_after=1,
            ) from None

    async def _computed(
        self, hung_up: Callable[[], Awaitable[Any]], future: Future
    ) -> tuple[Answer, bool]:
        """The job's answer, and whether the client hung up meanwhile. A client that hangs up
        before a worker took its job has the job dropped (:class:`ClientGone`, nothing computed);
        once the job runs, it runs to the end."""
        answer = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(hung_up())
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done() and future.cancel():
                raise ClientGone(
                    "the client hung up before its images ran; nothing was computed or charged"
                )
            return await answer, gone.done()
        except asyncio.CancelledError:
            future.cancel()
            raise
        finally:
            gone.cancel()

    async def _unanswered(
        self, client: ClientConfig, reservation: str, n: int, error: BaseException
    ) -> BaseException:
        """Release the reservation of a request that will not be answered, and the error to
        raise, whose message says truly what was charged."""
        unknown = (
            isinstance(error, StorageUnavailable) and not error.settled
        )  # the audit write may yet land
        if unknown:
            self._hold(client, reservation)  # settled against the audit log later
        else:
            try:
                await asyncio.shield(self.storage(self.quotas.release, client, reservation))
            except StorageUnavailable as failure:
                unknown = True
                log.warning(
                    "could not release the reservation of client %s (%s); "
                    "retried when storage recovers",
                    client.name,
                    failure.message,
                )
                self._hold(client, reservation)
        held = (
            f"its charge of {n} queries is held as a reservation and settled against the audit "
            "log once storage recovers (released unless the answer was recorded)"
        )
        if isinstance(error, ClientGone):
            log.info("client %s hung up; its %d queries were released", client.name, n)
            return error
        if isinstance(error, StorageUnavailable):
            return StorageUnavailable(
                f"{error.message} while recording the answer; the request was not answered "
                f"and {held if unknown else 'nothing was charged'}",
                retry_after=1,
            )
        if unknown:
            return StorageUnavailable(
                f"the request failed ({_short(error)}) and storage failed too; {held}",
                retry_after=1,
            )
        if isinstance(error, UpstreamError):  # a gateway's upstream failed: 502 or 504, not 500
            log.warning(
                "the upstream failed for client %s; its %d queries were released: %s",
                client.name,
                n,
                error.message,
            )
            return type(error)(f"{error.message}; the queries were not charged")
        if isinstance(error, Exception):
            log.error("inference failed for client %s", client.name, exc_info=error)
            return InferenceFailed(
                f"the model or defense failed ({type(error).__name__}); "
                "the queries were not charged"
            )
        return error

    def _hold(self, client: ClientConfig, reservation: str) -> None:
        """Keep a charge to settle once storage recovers (readiness retries it)."""
        with self._unreleased_lock:
            self._unreleased.append((client, reservation))

    def _release_later(self, client: ClientConfig, reservation: str) -> None:
        """Undo a charge that storage recorded after the request had given up on it."""
        try:
            self.quotas.release(client, reservation)
        except self.storage.errors:
            self._hold(client, reservation)

    async def _write_evidence(self, client: str, records: list) -> None:
        """Keep an answered, charged request's watermark evidence; a failure is logged (the answer
        stands)."""
        assert self.evidence is not None  # answers carry evidence only when it is kept
        try:
            await self.storage(self.evidence.store.write, records)
        except StorageUnavailable as error:
            log.warning(
                "could not keep %d evidence rows of client %s: %s",
                len(records),
                client,
                error.message,
            )

    async def _observe(self, client: str, images: Any, served: Any) -> None:
        """Feed an answered (and audited) request to the detector, in a worker thread that runs
        to the end even if this request is cancelled, so an alarm is always recorded. A detector
        failure is logged; the answer stands (it is charged)."""
        assert self.watch is not None  # called only with a detector
        try:
            await asyncio.to_thread(self.watch.observe, client, images, served)
        except Exception:
            log.exception(
                "the query-stream detector failed for client %s; its answer stands", client
            )

    def render_metrics(self, per_client: bool) -> str:
        if not per_client:
            return self.metrics.render(aggregate=True)
        usage = self.quotas.usage()
        names = [c.name for c in self.config.clients]
        gauges: dict[str, dict[tuple, float]] = {
            "mirage_client_queries_used": {
                (("client", c),): usage.get(c, (0, 0))[0] for c in names
            },
            "mirage_client_requests_used": {
                (("client", c),): usage.get(c, (0, 0))[1] for c in names
            },
        }
        return self.metrics.render(gauges)

    async def readiness(self) -> str | None:
        """``None`` when the service can answer, else why not: the worker is down, storage fails
        or does not answer (probed at most once per ``HEALTH_CACHE_S``), or, for a gateway, the
        upstream model is not ready (probed, cached briefly; docs/design.md §gateway)."""
        if not self.batcher.alive:
            return "the inference worker is not running"
        if (reason := await self._storage_health()) is not None:
            return reason
        return None if self.upstream is None else await asyncio.to_thread(self.upstream.readiness)

    async def _storage_health(self) -> str | None:
        async with self._health_lock:
            checked, reason = self._health
            if time.monotonic() - checked < HEALTH_CACHE_S:
                return reason
            probe = min(1.0, self.config.storage.timeout_s)
            try:
                await self.storage(self.quotas.ping, probe)
                await self.storage(self.audit.ping, probe)
                reason = None
                if self._unreleased:
                    await self.storage(self._settle_unreleased)
            except StorageUnavailable as error:
                reason = f"storage is unavailable: {error.message}"
            self._health = (time.monotonic(), reason)
            return reason

    def _settle_unreleased(self) -> None:
        """Release the charges that could not be released when their request failed; a charge
        whose answer did reach the audit log (its write outlived the request's wait) is kept."""
        with self._unreleased_lock:
            pending, self._unreleased = self._unreleased, []
        try:
            answered = self.audit.answered([reservation for _, reservation in pending])
            while pending:
                client, reservation = pending[0]
                if reservation in answered:
                    self.quotas.commit(reservation)
                else:
                    self.quotas.release(client, reservation)
                pending.pop(0)
        finally:
            with self._unreleased_lock:
                self._unreleased.extend(pending)

    def close(self) -> None:
        self.batcher.stop()
        if self.upstream is not None:
            self.upstream.close()
        self.storage.close()
        self.quotas.close()
        self.audit.close()
        if self.evidence is not None:
            self.evidence.store.close()


def _source(request: Request) -> str:
    """The peer address of a REST request (``X-Forwarded-For`` only from trusted proxies:
    :mod:`mirage.serve.runner`)."""
    return request.client.host if request.client else "unknown"


def _what(request: Request) -> str:
    return f"{request.method} {request.url.path}"


async def _hung_up(request: Request) -> None:
    """Return once the client has hung up. Called after the body was read, so the next ASGI
    message is ``http.disconnect`` (uvicorn sends it when the connection is lost)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _few(names: list[str], shown: int = 4) -> str:
    """``0, 1, 2, …, 9``: the first names and the last."""
    return (
        ", ".join(names)
        if len(names) <= shown + 1
        else f"{', '.join(names[:shown])}, …, {names[-1]}"
    )


def _without_credentials(url: str | None) -> str:
    """A storage URL as it may be logged: a password in it is masked."""
    from urllib.parse import urlsplit

    parts = urlsplit(url or "")
    if parts.password is None:
        return url or ""
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}***@{host}").geturl()


def _short(error: BaseException) -> str:
    return error.message if isinstance(error, ServeError) else type(error).__name__
