"""The defended prediction service (docs/design.md §service): load → predict → defend → audit.

Endpoints (Open Inference Protocol V2, JSON):

- ``POST /v2/models/{name}/infer`` — ``{"inputs": [{"name": …, "shape": [B, C, H, W],
  "datatype": "FP32", "data": [...]}]}`` → ``{"outputs": [{"name": "probabilities",
  "shape": [B, K], "datatype": "FP32", "data": [...]}]}``; needs an API key.
- ``GET /v2/models/{name}`` — metadata: classes, defense and its budget, limits, the client's quota.
- ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2/models/{name}/ready``,
  ``GET /metrics`` (Prometheus text).

A request is validated completely (size, JSON, shape, dtype, finiteness, range, key, model)
before the quota is charged; the charge is one SQLite transaction; if the model or defense then
fails, the charge is refunded. Every rejection is a :class:`~mirage.serve.errors.ServeError`
turned into a JSON ``{"error", "reason"}`` response by the one handler in :func:`create_app`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import zlib
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from mirage.defenses import create_defense
from mirage.defenses.base import Defense
from mirage.models import ModelCard, load_checkpoint
from mirage.serve.audit import AuditLog
from mirage.serve.auth import KeyRing, key_from_headers
from mirage.serve.batching import MicroBatcher
from mirage.serve.config import ClientConfig, ServeConfig
from mirage.serve.errors import (
    BadRequest,
    BatchTooLarge,
    InferenceFailed,
    MethodNotAllowed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ServeError,
    UnknownModel,
    http_status,
)
from mirage.serve.metrics import CONTENT_TYPE, Metrics
from mirage.serve.quotas import QuotaStore

log = logging.getLogger(__name__)

DATATYPES = {"FP32", "FP64"}
SHARED = "*"


def load_model(config: ServeConfig) -> tuple[nn.Module, ModelCard, list[str]]:
    """The victim, its card and class names, from a checkpoint directory or a scenario's victim."""
    source = config.model
    if source.checkpoint is not None:
        model, card = load_checkpoint(source.checkpoint)
    else:
        from mirage.scenarios import get_scenario
        from mirage.training.victim import get_victim

        model, card, _ = get_victim(get_scenario(source.scenario), show_progress=False)
    if source.classes is not None:
        classes = list(source.classes)
    elif card.dataset == "fmnist":
        from mirage.data.fashion_mnist import CLASSES

        classes = list(CLASSES)
    else:
        classes = [str(k) for k in range(card.num_classes)]
    if len(classes) != card.num_classes:
        raise ValueError(f"{len(classes)} class names for a {card.num_classes}-class model")
    return model.eval(), card, classes


def client_seed(base: int, client: str) -> int:
    """A stable per-client seed (the same after a restart)."""
    return (base + zlib.crc32(client.encode())) % (2**31)


class DefenseFactory:
    """Builds the configured defense — one shared instance, or one per client created lazily."""

    def __init__(self, config: ServeConfig, victim: nn.Module | None = None,
                 card: ModelCard | None = None) -> None:
        self.config = config.defense
        self.params = dict(self.config.params)
        surrogate = self.config.surrogate
        if surrogate is not None:
            paths = surrogate if isinstance(surrogate, list) else [surrogate]
            members = [load_checkpoint(p)[0].eval() for p in paths]
            self.params[self.config.surrogate_param] = members if isinstance(surrogate, list) else members[0]
        elif self.config.surrogate_training is not None:
            from mirage.scenarios import get_scenario
            from mirage.training.surrogate import SurrogateConfig, get_surrogate

            if victim is None or card is None:
                raise ValueError("surrogate_training needs the victim and its card")
            members, _, _ = get_surrogate(get_scenario(config.model.scenario), victim, card,
                                          SurrogateConfig(**self.config.surrogate_training))
            self.params[self.config.surrogate_param] = members if len(members) > 1 else members[0]
        if self.config.reference_set is not None:
            from mirage.scenarios import defender_sample, get_scenario

            if config.model.scenario is None:
                raise ValueError("defense.reference_set needs model.scenario (whose training data it samples)")
            picked = defender_sample(get_scenario(config.model.scenario), self.config.reference_set)
            self.params["reference_x"], self.params["reference_y"] = picked.images, picked.labels
        self.enabled = self.config.name != "none"
        self.prototype = self._build(None) if self.enabled else None
        self._instances: dict[str, Defense] = {}

    def _build(self, client: str | None) -> Defense:
        params = dict(self.params)
        if self.config.seed_per_client and client is not None:
            params["seed"] = client_seed(int(params.get("seed", 0)), client)
        return create_defense(self.config.name, **params)

    def key(self, client: str) -> str:
        return client if self.config.per_client else SHARED

    def __call__(self, key: str) -> Defense | None:
        if not self.enabled:
            return None
        if key == SHARED:
            return self.prototype
        if key not in self._instances:
            self._instances[key] = self._build(key)
        return self._instances[key]

    def describe(self) -> dict[str, Any]:
        defense = self.prototype
        params = {}
        if defense is not None:
            for name in type(defense.params).model_fields:
                value = getattr(defense.params, name)
                params[name] = value if isinstance(value, (str, int, float, bool, type(None))) else (
                    f"<{type(value).__name__}>")
        contract = create_defense("none").contract if defense is None else defense.contract
        return {"name": self.config.name, "params": params, "contract": dataclasses.asdict(contract),
                "per_client": self.config.per_client, "seed_per_client": self.config.seed_per_client}


def parse_infer_request(body: bytes, input_shape: tuple[int, ...], max_batch: int
                        ) -> tuple[np.ndarray, str | None]:
    """Validate an OIP V2 inference body; returns float32 images (B, *input_shape) and the id."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise BadRequest(f"the request body is not valid JSON ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object with an 'inputs' list")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest("'inputs' must be a list holding exactly one input tensor object")
    tensor = inputs[0]
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in tensor]
    if missing:
        raise BadRequest(f"the input tensor lacks {missing}")
    if tensor["datatype"] not in DATATYPES:
        raise BadRequest(f"datatype must be one of {sorted(DATATYPES)}, got {tensor['datatype']!r}")
    shape = tensor["shape"]
    if (not isinstance(shape, list) or len(shape) != 1 + len(input_shape)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise BadRequest(f"shape must be [B, {', '.join(map(str, input_shape))}], got {shape!r}")
    if tuple(shape[1:]) != tuple(input_shape) or shape[0] < 1:
        raise BadRequest(f"shape must be [B, {', '.join(map(str, input_shape))}] with B ≥ 1, got {shape}")
    if shape[0] > max_batch:
        raise BatchTooLarge(f"batch of {shape[0]} images exceeds the limit of {max_batch}")
    data = tensor["data"]
    if not isinstance(data, list):
        raise BadRequest("'data' must be a (flat or nested) list of numbers")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest("'data' is a ragged or malformed nested list") from None
    if array.dtype.kind not in "fiu":
        raise BadRequest("'data' must hold only numbers (no strings, booleans, nulls or nested objects)")
    if array.size != math.prod(shape):
        raise BadRequest(f"'data' holds {array.size} numbers but shape {shape} needs {math.prod(shape)}")
    images = array.astype(np.float64).reshape(shape)
    if not np.isfinite(images).all():
        raise BadRequest("'data' contains NaN or infinite values")
    if images.min() < 0 or images.max() > 1:
        raise BadRequest("pixel values must lie in [0, 1]")
    return images.astype(np.float32), request_id


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"payload of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"payload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class Service:
    """Everything one server holds: model, defenses, key ring, quota store, audit log, metrics."""

    def __init__(self, config: ServeConfig, *, model: nn.Module | None = None,
                 classes: list[str] | None = None) -> None:
        self.config = config
        card = None
        if model is None:
            model, card, classes = load_model(config)
        self.model = model.eval()
        self.input_shape: tuple[int, int, int] = tuple(model.input_shape)  # type: ignore[assignment]
        self.num_classes = int(model.num_classes)
        self.classes = classes or [str(k) for k in range(self.num_classes)]
        self.defenses = DefenseFactory(config, model, card)
        self.keys = KeyRing(config.clients)
        self.quotas = QuotaStore(config.storage.database)
        self.audit = AuditLog(config.audit_path)
        self.metrics = Metrics()
        limits = config.limits
        self.batcher = MicroBatcher(self.model, self.defenses, max_images=limits.microbatch_images,
                                    max_wait=limits.microbatch_wait_ms / 1000, metrics=self.metrics,
                                    model_name=config.model.name)

    def authenticate(self, request: Request) -> ClientConfig:
        key = key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key"))
        return self.keys.authenticate(key)

    def check_model(self, name: str) -> None:
        if name != self.config.model.name:
            raise UnknownModel(f"unknown model {name!r}; this server serves {self.config.model.name!r}")

    def metadata(self, client: ClientConfig) -> dict[str, Any]:
        c, h, w = self.input_shape
        limits = self.config.limits
        return {
            "name": self.config.model.name, "versions": ["1"], "platform": "pytorch_torchscript",
            "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, c, h, w]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, self.num_classes]}],
            "parameters": {
                "classes": self.classes, "num_classes": self.num_classes,
                "defense": self.defenses.describe(),
                "limits": {"max_batch": limits.max_batch, "max_payload_bytes": limits.max_payload_bytes},
                "client": {"name": client.name, "quota": client.quota,
                           "queries_used": self.quotas.used(client.name),
                           "rate": client.rate, "burst": client.bucket_capacity},
            },
        }

    async def infer(self, name: str, request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        client = self.authenticate(request)
        self.check_model(name)
        body = await read_body(request, self.config.limits.max_payload_bytes)
        images, request_id = await asyncio.to_thread(parse_infer_request, body, self.input_shape,
                                                     self.config.limits.max_batch)
        n = len(images)
        used = await asyncio.to_thread(self.quotas.charge, client, n)
        audited = False
        try:
            future = self.batcher.submit(self.defenses.key(client.name), torch.from_numpy(images))
            served = (await asyncio.wrap_future(future)).numpy()
            await asyncio.to_thread(self.audit.record, client=client.name, model=name,
                                    request_id=request_id, images=images, served=served)
            audited = True
        except BaseException as error:
            if not audited:
                await asyncio.shield(asyncio.to_thread(self.quotas.refund, client, n))
            if isinstance(error, Exception):
                log.exception("inference failed for client %s", client.name)
                raise InferenceFailed(f"the model or defense failed ({type(error).__name__}); "
                                      "the queries were not charged") from error
            raise
        labels = {"model": name, "client": client.name}
        self.metrics.inc("mirage_requests_total", **labels)
        self.metrics.inc("mirage_queries_total", n, **labels)
        self.metrics.observe("mirage_request_latency_seconds", time.perf_counter() - start, model=name)
        return {
            "model_name": name, "model_version": "1", "id": request_id,
            "parameters": {"queries_used": used, "query_budget": client.quota},
            "outputs": [{"name": "probabilities", "shape": [n, self.num_classes], "datatype": "FP32",
                         "data": served.reshape(-1).tolist()}],
        }

    def render_metrics(self) -> str:
        usage = self.quotas.usage()
        names = [c.name for c in self.config.clients]
        gauges = {
            "mirage_client_queries_used": {(("client", c),): usage.get(c, (0, 0))[0] for c in names},
            "mirage_client_requests_used": {(("client", c),): usage.get(c, (0, 0))[1] for c in names},
        }
        return self.metrics.render(gauges)

    def close(self) -> None:
        self.batcher.stop()
        self.quotas.close()
        self.audit.close()


def create_app(config: ServeConfig, *, model: nn.Module | None = None,
               classes: list[str] | None = None) -> FastAPI:
    """Build the service (model, surrogate and defense loaded now) and its FastAPI app."""
    service = Service(config, model=model, classes=classes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="mirage defended prediction service", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        service.metrics.inc("mirage_rejected_requests_total", reason=error.reason)
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))} if error.retry_after else None
        return JSONResponse({"error": error.message, "reason": error.reason},
                            status_code=http_status(error), headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        typed = {404: NotFound, 405: MethodNotAllowed}.get(error.status_code, BadRequest)
        return await serve_error(request, typed(f"{request.method} {request.url.path}: {error.detail}"))

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        answer = await service.infer(name, request)
        return Response(json.dumps(answer), media_type="application/json")

    @app.get("/v2/models/{name}")
    async def metadata(name: str, request: Request) -> dict:
        client = service.authenticate(request)
        service.check_model(name)
        return await asyncio.to_thread(service.metadata, client)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> dict:
        service.check_model(name)
        if not service.batcher.alive:
            raise NotReady("the inference worker is not running")
        return {"name": name, "ready": True}

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        if not service.batcher.alive:
            raise NotReady("the inference worker is not running")
        return {"ready": True}

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await asyncio.to_thread(service.render_metrics)
        return Response(text, media_type=CONTENT_TYPE)

    return app
