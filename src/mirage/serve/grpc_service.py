"""The Open Inference Protocol over gRPC (docs/design.md §grpc): ``inference.GRPCInferenceService``
served beside the REST endpoints, on the same :class:`~mirage.serve.service.Service` — the same
keys, quotas, rate limits, defense, audit log, evidence and metrics.

The API key travels in the call's metadata (``authorization: Bearer <key>`` or ``x-api-key``).
``ModelInfer`` takes one FP32 or FP64 input (B, C, H, W), as ``raw_input_contents`` (what
``tritonclient.grpc`` sends) or typed ``contents``, and answers the probabilities as
``raw_output_contents`` (little-endian FP32), the client's usage in the response's
``parameters``. Errors are the service's typed errors with the gRPC code of
:func:`~mirage.serve.errors.grpc_status`, ``retry-after`` in the trailing metadata when the
client may retry. A client that cancels its call is a client that hung up: its images are dropped
if no worker took them yet, charged if they ran (docs/design.md §reservations).

The messages are generated from ``oip/grpc_predict_v2.proto`` into their own protobuf package;
the service is registered under the protocol's name, which is all the wire carries.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from starlette.datastructures import Headers

from mirage.serve.errors import BadRequest, InternalError, ServeError, grpc_status
from mirage.serve.oip import grpc_predict_v2_pb2 as pb
from mirage.serve.protocol import (
    DATATYPES,
    OUTPUTS,
    VERSIONS,
    _batch_shape,
    _in_range,
    server_metadata,
)
from mirage.serve.service import Service

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
MESSAGE_SLACK = 64 * 1024  # the protobuf framing of a request around its tensor bytes


def _peer_host(peer: str) -> str:
    """The host of a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``)."""
    match = re.match(r"^ipv[46]:\[?([^\]]*?)\]?:\d+$", peer)
    return match.group(1) if match else peer or "unknown"


def _headers(context: grpc.aio.ServicerContext) -> Headers:
    """The call's text metadata as headers (binary ``-bin`` entries are not keys)."""
    pairs = [
        (key.encode("latin-1"), value.encode("latin-1"))
        for key, value in context.invocation_metadata() or ()
        if isinstance(value, str)
    ]
    return Headers(raw=pairs)


class InferenceServicer:
    """The six calls of the protocol, each a thin adapter onto :class:`Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def _client(self, context: grpc.aio.ServicerContext, what: str):
        return await self.service.authenticate_key(
            _peer_host(context.peer()), _headers(context), f"gRPC {what}"
        )

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.service.readiness() is None)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        headers = _headers(context)
        if (
            "authorization" in headers or "x-api-key" in headers
        ):  # as REST: unauthenticated, readiness only
            await self._client(context, "ModelReady")
            self.service.check_model(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=await self.service.readiness() is None)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context
    ) -> pb.ServerMetadataResponse:
        await self._client(context, "ServerMetadata")
        return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context
    ) -> pb.ModelMetadataResponse:
        client = await self._client(context, "ModelMetadata")
        self.service.check_model(request.name, request.version or None)
        meta = await self.service.metadata(client)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        start = time.perf_counter()
        client = await self._client(context, "ModelInfer")
        name = request.model_name
        alarmed, _ = await self.service.admit(client, name, request.model_version or None)
        limits = self.service.config.limits
        images = await asyncio.to_thread(
            parse_infer_request, request, self.service.input_shape, limits.max_batch
        )
        outputs = requested_outputs(request)
        gone = asyncio.Event()
        work = asyncio.ensure_future(
            self.service.answer(
                client,
                name,
                images,
                request.id or None,
                alarmed=alarmed,
                hung_up=gone.wait,
                start=start,
            )
        )
        try:
            served, used = await asyncio.shield(work)
        except asyncio.CancelledError:  # the client cancelled: the service decides what is charged
            gone.set()
            work.add_done_callback(
                _settled
            )  # its outcome (answered, or ClientGone) goes to the log
            raise
        parameters = {"queries_used": pb.InferParameter(int64_param=used)}
        if client.quota is not None:
            parameters["query_budget"] = pb.InferParameter(int64_param=client.quota)
        blob = np.ascontiguousarray(served, dtype="<f4").tobytes()
        return pb.ModelInferResponse(
            model_name=name,
            model_version=VERSIONS[0],
            id=request.id,
            parameters=parameters,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=output, datatype="FP32", shape=list(served.shape)
                )
                for output in outputs
            ],
            raw_output_contents=[blob] * len(outputs),
        )


def _settled(work: asyncio.Future) -> None:
    """Read the outcome of a call whose client cancelled, so asyncio never reports it unread."""
    if not work.cancelled() and (error := work.exception()) is not None:
        log.info("a cancelled gRPC call ended with %s", type(error).__name__)


def parse_infer_request(
    request: pb.ModelInferRequest, input_shape: tuple[int, ...], max_batch: int
) -> np.ndarray:
    """The images (B, C, H, W) float32 of a ``ModelInferRequest``, validated as the REST body is
    (:mod:`mirage.serve.protocol`): one input, a known datatype, the model's shape, a batch
    within ``max_batch``, exactly the bytes or values the shape needs, finite pixels in [0, 1]."""
    if len(request.inputs) != 1:
        raise BadRequest("'inputs' must hold exactly one input tensor")
    tensor = request.inputs[0]
    if tensor.datatype not in ("FP32", "FP64"):
        raise BadRequest(f"datatype must be FP32 or FP64, got {tensor.datatype[:40]!r}")
    for key in tensor.parameters:
        if key.startswith("shared_memory"):
            raise BadRequest(
                "the shared-memory extension is not supported; send the tensor's contents"
            )
    shape = _batch_shape(list(tensor.shape), input_shape, max_batch)
    count, dtype = math.prod(shape), DATATYPES[tensor.datatype]
    typed = (
        tensor.contents.fp32_contents
        if tensor.datatype == "FP32"
        else tensor.contents.fp64_contents
    )
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or len(typed):
            raise BadRequest(
                "give the input either as one raw_input_contents entry or as typed contents, "
                "not both"
            )
        raw = request.raw_input_contents[0]
        if len(raw) != count * dtype.itemsize:
            raise BadRequest(
                f"raw_input_contents holds {len(raw)} bytes but shape {shape} of {tensor.datatype} "
                f"needs {count * dtype.itemsize}"
            )
        images = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
    else:
        if len(typed) != count:
            raise BadRequest(
                f"the input's contents hold {len(typed)} values but shape {shape} needs {count}"
            )
        images = np.asarray(typed, dtype=np.float64).reshape(shape)
    return _in_range(images, "the input tensor").astype(np.float32)


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    """The outputs to answer, in order: those requested (each known, once), else all of them."""
    names = [output.name for output in request.outputs]
    if unknown := [n for n in names if n not in OUTPUTS]:
        raise BadRequest(
            f"unknown output {unknown[0][:64]!r}; the model's outputs are {list(OUTPUTS)}"
        )
    if len(set(names)) != len(names):
        raise BadRequest("an output is requested twice")
    return names or list(OUTPUTS)


def _rpc(
    service: Service, method: Callable[[Any, Any], Awaitable[Any]]
) -> Callable[[Any, Any], Awaitable[Any]]:
    """``method`` with the service's typed errors turned into gRPC statuses (and counted as
    rejections, as REST counts them)."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(request, context)
        except ServeError as error:
            await _abort(service, context, error)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 — never a traceback to the client
            log.error("unexpected %s in gRPC %s: %s", type(error).__name__, method.__name__, error)
            await _abort(service, context, InternalError("internal server error"))

    return call


async def _abort(service: Service, context: grpc.aio.ServicerContext, error: ServeError) -> None:
    service.metrics.inc("mirage_rejected_requests_total", reason=error.reason)
    trailers = [("reason", error.reason)]
    if error.retry_after:
        trailers.append(("retry-after", str(max(1, math.ceil(error.retry_after)))))
    context.set_trailing_metadata(trailers)
    await context.abort(getattr(grpc.StatusCode, grpc_status(error)), error.message)


# the generated message classes (their protobuf base is untyped here)
METHODS: dict[str, tuple[type[Any], type[Any]]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}


def grpc_server(
    service: Service, host: str, port: int, *, reuse_port: bool = False
) -> grpc.aio.Server:
    """An asyncio gRPC server (not started) answering the protocol on ``host:port`` for
    ``service``; messages are capped at what ``limits.max_payload_bytes`` allows REST bodies.
    The port is this process's alone unless ``reuse_port`` (worker processes sharing it)."""
    servicer = InferenceServicer(service)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _rpc(service, getattr(servicer, name)),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in METHODS.items()
    }
    cap = service.config.limits.max_payload_bytes + MESSAGE_SLACK
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", cap),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", int(reuse_port)),
        ]
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)])
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port}")
    return server
