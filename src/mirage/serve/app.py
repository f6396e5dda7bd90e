"""The defended prediction service's routes (docs/design.md §service, §oip).

Split along KServe's lines: :mod:`mirage.serve.protocol` reads and writes Open Inference Protocol
V2 messages, :mod:`mirage.serve.loading` builds the model and the defense, :mod:`mirage.serve.
service` takes a request through authentication, quota, micro-batching and audit, and
:mod:`mirage.serve.errors` maps every rejection to its HTTP status. This module only routes.

The Open Inference Protocol V2 REST API (its §"Health", §"Server Metadata", §"Model Metadata",
§"Inference"; the binary tensor data extension in :mod:`mirage.serve.protocol`), where
``[/versions/{v}]`` is optional and ``v`` must be a version of the model (else 404
``unknown_version``):

- ``POST /v2/models/{name}[/versions/{v}]/infer``, ``GET /v2/models/{name}[/versions/{v}]``,
  ``GET /v2`` (server metadata) — all need an API key;
- ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2/models/{name}[/versions/{v}]/ready``
  (without a key: readiness only), ``GET /metrics`` (Prometheus text; without the metrics token only
  the liveness counters, docs/design.md §access).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mirage.serve.config import ServeConfig
from mirage.serve.errors import (
    InternalError,
    NotReady,
    ServeError,
    error_response,
    from_http_status,
)
from mirage.serve.metrics import CONTENT_TYPE
from mirage.serve.protocol import server_metadata
from mirage.serve.service import Service

log = logging.getLogger(__name__)


def create_app(
    config: ServeConfig,
    *,
    announce: Callable[[str], None] | None = None,
    shared_port: bool = False,
) -> FastAPI:
    """Build the service (model, surrogates and defense loaded now) and its FastAPI app.
    ``announce``: who is told :meth:`Service.summary` once the service has started (default:
    this module's log, at INFO; ``mirage serve`` prints it). ``shared_port``: the gRPC port is
    shared with other worker processes (``SO_REUSEPORT``, docs/design.md §workers)."""
    service = Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        grpc = None
        try:
            if (
                config.grpc is not None
            ):  # the gRPC binding, on this event loop (docs/design.md §grpc)
                from mirage.serve.grpc_service import grpc_server

                grpc = grpc_server(
                    service, config.grpc.host, config.grpc.port, reuse_port=shared_port
                )
                await grpc.start()
                log.info("OIP V2 over gRPC on %s:%d", config.grpc.host, config.grpc.port)
            (announce or _log_summary)(service.summary())
            yield
        finally:
            if grpc is not None:
                await grpc.stop(grace=1)
            service.close()

    app = FastAPI(
        title="mirage defended prediction service",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.state.service = service

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        service.metrics.inc("mirage_rejected_requests_total", reason=error.reason)
        body, status, headers = error_response(error)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error(
            "unexpected %s on %s %s: %s",
            type(error).__name__,
            request.method,
            request.url.path,
            error,
        )
        return await serve_error(request, InternalError("internal server error"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        return await serve_error(request, from_http_status(error.status_code, message))

    # The version, on the /versions/{version} paths, is read from path_params: a function
    # argument would also take it from a query string on the paths without one.
    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request) -> Response:
        body, headers = await service.infer(name, request, request.path_params.get("version"))
        return Response(body, headers=headers)

    @app.get("/v2")
    async def server(request: Request) -> dict:
        await service.authenticate(request)
        return server_metadata()

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata(name: str, request: Request) -> dict:
        client = await service.authenticate(request)
        service.check_model(name, request.path_params.get("version"))
        return await service.metadata(client)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, request: Request) -> dict:
        if "authorization" not in request.headers and "x-api-key" not in request.headers:
            return {
                "ready": await _ready(service)
            }  # readiness only: neither confirms nor names the model
        await service.authenticate(request)
        service.check_model(name, request.path_params.get("version"))
        return {"name": name, "ready": await _ready(service)}

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": await _ready(service)}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        per_client = await service.metrics_access(request)
        return Response(
            await service.storage(service.render_metrics, per_client), media_type=CONTENT_TYPE
        )

    return app


def _log_summary(summary: str) -> None:
    log.info("mirage serve started:\n%s", summary)


async def _ready(service: Service) -> bool:
    """True, or 503 ``not_ready`` saying why (storage and a gateway's upstream are probed off the
    event loop)."""
    reason = await service.readiness()
    if reason is not None:
        raise NotReady(reason)
    return True
