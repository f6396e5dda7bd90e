"""A defended gateway (docs/design.md §gateway): the victim is an upstream Open Inference Protocol
V2 endpoint (Triton, KServe, MLServer), over REST or gRPC, and :class:`UpstreamModel` makes it
look like a served model to the micro-batcher: a module from images (B, C, H, W) to logits
(B, K), whose forward pass is one inference request upstream (per ``max_batch`` images).

The upstream's output is read as ``probabilities`` (checked: finite, in [0, 1], rows summing to
1 within ``PROB_TOLERANCE``; returned as their logarithm, clamped at the smallest normal float32
so that no entry is −∞, which the batcher's softmax turns back into the same probabilities) or as
``logits`` (checked finite, returned as they are). Any other answer is an
:class:`~mirage.serve.errors.UpstreamInvalidAnswer`.

:class:`UpstreamClient` holds what both protocols share: the retries, the answer's size limit,
and the checks of the chosen output (its name, shape, datatype, size and values). A transport
carries one attempt and the readiness probe, and reads an answer into :class:`AnswerTensor`s:

- :class:`RestTransport` (``http(s)://``) sends JSON or, with ``binary``, binary tensor data
  (the extension's ``Inference-Header-Content-Length``, FP32 little-endian, and
  ``binary_data_output``); answers are read either way, whatever was asked, streamed in and
  refused past the size their shape allows (an upstream cannot make the gateway buffer a huge
  answer). A connection error, a timeout or a 5xx is retried; a 4xx never is. The connection a
  5xx came on is closed, so its retry goes out on a fresh one. One synchronous
  ``httpx`` client with keep-alive connections serves the forward passes; the readiness probe
  has its own.
- :class:`GrpcTransport` (``grpc://``) calls the protocol's ``inference.GRPCInferenceService``
  on one channel: ``ModelInfer`` with the images as FP32 ``raw_input_contents``, its answer read
  from ``raw_output_contents`` or typed ``contents``; ``ServerReady`` and ``ModelReady`` for
  readiness. The headers travel as call metadata. ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` are
  retried; no other status is. gRPC receives at most ``GRPC_MAX_ANSWER`` bytes of one answer,
  and the answer's size is checked against its shape's limit before it is parsed.

Each attempt ends ``timeout_s`` after it starts, however slowly the answer drips, and the whole
call ``deadline_s`` after it starts; a retried failure is tried again up to ``retries`` times
after ``backoff_s`` (doubled each time). What is left is a typed error that the service answers
with 502 or 504 and charges nothing for (docs/design.md §service-errors). Its message never
quotes the upstream's answer (the log does). The batcher calls the model from its worker threads
(four for a gateway, so one slow upstream call does not hold every other client's).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import httpx
import numpy as np
import torch
from google.protobuf.message import DecodeError
from torch import Tensor

from mirage.models import ModelCard
from mirage.models.formats import ExternalModel
from mirage.serve.config import UpstreamConfig
from mirage.serve.errors import (
    UpstreamError,
    UpstreamInvalidAnswer,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from mirage.serve.oip import grpc_predict_v2_pb2 as pb
from mirage.serve.protocol import DATATYPES, HEADER_LENGTH, byte_count

log = logging.getLogger(__name__)

PROB_TOLERANCE = (
    1e-3  # |row sum − 1| and how far below 0 or above 1 an entry may be (FP16 rounding)
)
LOG_FLOOR = float(np.log(np.finfo(np.float32).tiny))  # log of the smallest normal float32, ≈ −87.3
READY_TIMEOUT_S = 1.0  # the readiness probe's timeout (or timeout_s, when shorter)
EXCERPT = 200  # characters of an upstream body quoted in the log (never to the gateway's clients)
BYTES_PER_VALUE = 32  # an upstream answer's bytes per probability, as JSON at its most verbose
ANSWER_OVERHEAD = 64 * 1024  # an upstream answer's bytes besides the values
PROBE_CLASSES = 4096  # the classes an answer may hold before the number of classes is known
GRPC_SERVICE = "inference.GRPCInferenceService"  # the protocol's name: all the wire carries
GRPC_MAX_ANSWER = 64 * 2**20  # the most bytes gRPC receives as one answer (before the shape's cap)
GRPC_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
GRPC_RECONNECT_MS = (100, 1000)  # a lost upstream's reconnection backoff: first, longest


@dataclass(frozen=True)
class AnswerTensor:
    """One output of an upstream's answer as its transport read it, nothing checked yet: its
    name, shape and datatype as answered, and its values as little-endian bytes of its datatype
    (``raw``) or else as a sequence of numbers (``data``; ``None`` when it has none)."""

    name: object
    shape: object
    datatype: object
    raw: bytes | memoryview | None = None
    data: Any = None


class AttemptFailed(Exception):
    """One attempt that got no answer to read: the typed error it leaves, what only the log
    says, and whether another attempt may fare better."""

    def __init__(self, error: UpstreamError, detail: str, retry: bool) -> None:
        super().__init__(error.message)
        self.error, self.detail, self.retry = error, detail, retry


class InvalidAnswer(Exception):
    """An answer the gateway cannot serve (never retried): what its client is told, and what
    only the log says (what the answer held)."""

    def __init__(self, what: str, detail: str = "") -> None:
        super().__init__(what)
        self.what, self.detail = what, detail


class Transport(Protocol):
    """How the gateway talks to its upstream: one protocol's requests, answers and probe."""

    raw_name: str  # how the protocol names an output's bytes, in the errors

    def encode(self, images: np.ndarray) -> Any:
        """The request for ``images`` (B, C, H, W) float32, made once for all attempts."""
        ...

    def attempt(self, request: Any, limit: int, ends: float) -> list[AnswerTensor]:
        """The outputs of one attempt's answer: at most ``limit`` bytes, by the monotonic time
        ``ends``. Raises :class:`AttemptFailed` when there is no answer to read and
        :class:`InvalidAnswer` when it cannot be read."""
        ...

    def ready(self) -> str | None:
        """``None`` if the upstream model is ready, else why not (one probe)."""
        ...

    def close(self) -> None: ...


class UpstreamClient:
    """The gateway's side of the upstream: one inference call, with retries, decoded and
    checked, over the transport the URL's scheme picks."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.transport: Transport = (
            GrpcTransport(config) if config.protocol == "grpc" else RestTransport(config)
        )
        self._ready_lock = threading.Lock()
        self._ready_at = -math.inf
        self._ready_reason: str | None = None
        self.num_classes = config.num_classes

    @property
    def where(self) -> str:
        """The upstream model, as the logs name it (never its headers). Errors, which the
        gateway's clients read, name neither its address nor what its error bodies say."""
        version = f" version {self.config.version}" if self.config.version else ""
        return f"upstream model {self.config.model!r}{version} at {self.config.url}"

    def __call__(self, x: Tensor) -> Tensor:
        """Logits (B, K) float32 of the images ``x`` (B, C, H, W)."""
        x = x.detach().cpu().float().contiguous()
        size = self.config.max_batch or len(x)
        return torch.cat([self._infer(chunk.numpy()) for chunk in x.split(size)])

    # -- one request ---------------------------------------------------------------------------

    def _infer(self, images: np.ndarray) -> Tensor:
        request = self.transport.encode(images)
        try:
            outputs = self._call(request, self._answer_limit(len(images)))
            logits = self._logits(self._values(outputs, len(images)))
        except InvalidAnswer as invalid:
            raise self._invalid(invalid.what, invalid.detail) from None
        return torch.from_numpy(logits)

    def _answer_limit(self, batch: int) -> int:
        """The most bytes an answer for ``batch`` images may take: JSON at ``BYTES_PER_VALUE`` per
        probability (K from the config or the probe, else ``PROBE_CLASSES``) plus
        ``ANSWER_OVERHEAD``. A larger answer is refused, never parsed (over REST, as it streams
        in)."""
        return ANSWER_OVERHEAD + batch * (self.num_classes or PROBE_CLASSES) * BYTES_PER_VALUE

    def _call(self, request: Any, limit: int) -> list[AnswerTensor]:
        """The outputs of the upstream's answer, after at most ``retries`` retries of a failure
        the transport says may pass; anything else raises the typed error of the last attempt.
        Each attempt ends ``timeout_s`` after it starts and the whole call ``deadline_s`` after
        it starts (no attempt starts later)."""
        config, error = self.config, None
        attempts = config.retries + 1
        deadline = time.monotonic() + config.call_deadline_s
        for attempt in range(attempts):
            if attempt:
                time.sleep(config.backoff_s * 2 ** (attempt - 1))
            if time.monotonic() >= deadline:
                break
            ends = min(time.monotonic() + config.timeout_s, deadline)
            try:
                return self.transport.attempt(request, limit, ends)
            except AttemptFailed as failure:
                error = failure.error
                log.warning(
                    "the %s failed (attempt %d of %d): %s: %s",
                    self.where,
                    attempt + 1,
                    attempts,
                    error.message,
                    failure.detail[:EXCERPT],
                )
                if not failure.retry:
                    raise error from None
        if error is None:  # pragma: no cover — the first attempt always starts
            raise UpstreamTimeout(
                f"the upstream call's deadline of {config.call_deadline_s:g}s passed"
            )
        tries = f" (after {attempt + 1} attempts)" if attempt else ""
        raise type(error)(error.message + tries)

    def _values(self, outputs: list[AnswerTensor], batch: int) -> np.ndarray:
        """The chosen output as a float64 array (B, K): its shape, datatype and size checked,
        its values not yet. What the client is told names no string of the upstream's answer
        (only the log quotes them)."""
        if not outputs:
            raise InvalidAnswer("it has no outputs")
        index = self._output_index(outputs)
        tensor = outputs[index]
        shape, datatype = tensor.shape, tensor.datatype
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ):
            raise InvalidAnswer(
                f"output {index} has a shape that is not [B, K]", f"shape {str(shape)[:60]}"
            )
        if (
            shape[0] != batch
            or shape[1] < 2
            or (self.num_classes is not None and shape[1] != self.num_classes)
        ):
            classes = self.num_classes if self.num_classes is not None else "K ≥ 2"
            raise InvalidAnswer(
                f"output {index} has shape {shape} for {batch} images, not [{batch}, {classes}]"
            )
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise InvalidAnswer(
                f"output {index} has a datatype not among {sorted(DATATYPES)}",
                f"datatype {str(datatype)[:40]!r}",
            )
        count, dtype = math.prod(shape), DATATYPES[datatype]
        if tensor.raw is not None:
            if len(tensor.raw) != count * dtype.itemsize:
                raise InvalidAnswer(
                    f"output {index} has {len(tensor.raw)} bytes of "
                    f"{self.transport.raw_name} for shape {shape} of {datatype} "
                    f"({count * dtype.itemsize} needed)"
                )
            return np.frombuffer(tensor.raw, dtype=dtype).astype(np.float64).reshape(shape)
        if tensor.data is None:
            raise InvalidAnswer(f"output {index} holds no values")
        try:
            values = np.array(tensor.data, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            raise InvalidAnswer(
                f"output {index} holds data that is not a list of numbers"
            ) from None
        if values.size != count:
            raise InvalidAnswer(f"output {index} holds {values.size} values for shape {shape}")
        return values.reshape(shape)

    def _output_index(self, outputs: list[AnswerTensor]) -> int:
        names = [str(o.name)[:64] for o in outputs]
        wanted = self.config.output_name
        if wanted is None:
            if len(outputs) != 1:
                raise InvalidAnswer(
                    f"it has {len(outputs)} outputs; set model.upstream.output_name",
                    f"outputs {names}",
                )
            return 0
        if wanted not in names:
            raise InvalidAnswer(f"it has no output {wanted!r}", f"outputs {names}")
        return names.index(wanted)

    def _logits(self, values: np.ndarray) -> np.ndarray:
        """float32 logits of the checked output: the output itself (``logits``) or the
        logarithm of the probabilities, clamped at ``LOG_FLOOR``."""
        if not np.isfinite(values).all():
            raise InvalidAnswer("its output holds NaN or infinite values")
        if self.config.output == "logits":
            logits = values.astype(np.float32)
            if not np.isfinite(logits).all():
                raise InvalidAnswer("its logits overflow float32")
            return logits
        sums = values.sum(axis=1)
        low, high = values.min(), values.max()
        worst = int(np.argmax(np.abs(sums - 1)))
        if (
            low < -PROB_TOLERANCE
            or high > 1 + PROB_TOLERANCE
            or abs(sums[worst] - 1) > PROB_TOLERANCE
        ):
            raise InvalidAnswer(
                f"its output is not a probability vector per image (row {worst} sums to "
                f"{sums[worst]:.6g}; values in [{low:.6g}, {high:.6g}]); if the upstream answers "
                "logits, set model.upstream.output = 'logits'"
            )
        with np.errstate(divide="ignore"):  # log 0 = -inf, floored to LOG_FLOOR
            return np.maximum(np.log(np.clip(values, 0, 1)), LOG_FLOOR).astype(np.float32)

    def _invalid(self, what: str, detail: str = "") -> UpstreamInvalidAnswer:
        """The error for an answer the gateway cannot serve; ``detail`` (what the answer held) goes
        to the log only."""
        log.warning(
            "the %s answered something the gateway cannot serve: %s%s",
            self.where,
            what,
            f" ({detail})" if detail else "",
        )
        return UpstreamInvalidAnswer(
            f"the upstream model answered something the gateway cannot serve: {what}"
        )

    # -- readiness -----------------------------------------------------------------------------

    def readiness(self) -> str | None:
        """``None`` if the upstream model is ready, else why not; probed by the transport (at
        most ``READY_TIMEOUT_S``) at most once per ``ready_cache_s``."""
        with self._ready_lock:
            now = time.monotonic()
            if now - self._ready_at < self.config.ready_cache_s:
                return self._ready_reason
            reason = self.transport.ready()
            if reason != self._ready_reason:
                if reason is None:
                    log.info("the %s is ready", self.where)
                else:
                    log.warning("the %s is not ready: %s", self.where, reason)
            self._ready_at, self._ready_reason = time.monotonic(), reason
            return reason

    def close(self) -> None:
        self.transport.close()


class RestTransport:
    """The upstream's REST endpoints: ``POST …/infer`` (JSON or binary tensor data) and
    ``GET …/ready``."""

    raw_name = "binary tensor data"

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        headers = config.headers()
        base = f"/v2/models/{config.model}" + (
            f"/versions/{config.version}" if config.version else ""
        )
        self.infer_path, self.ready_path = base + "/infer", base + "/ready"
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        self._http = httpx.Client(
            base_url=config.url, headers=headers, timeout=config.timeout_s, limits=limits
        )
        self._probe = httpx.Client(
            base_url=config.url, headers=headers, timeout=min(READY_TIMEOUT_S, config.timeout_s)
        )

    def encode(self, images: np.ndarray) -> tuple[bytes, dict[str, str]]:
        config = self.config
        tensor: dict[str, Any] = {
            "name": config.input_name,
            "shape": list(images.shape),
            "datatype": "FP32",
        }
        payload: dict[str, Any] = {"inputs": [tensor]}
        if config.output_name is not None:
            output: dict[str, Any] = {"name": config.output_name}
            if config.binary:
                output["parameters"] = {"binary_data": True}
            payload["outputs"] = [output]
        elif config.binary:
            payload["parameters"] = {"binary_data_output": True}
        if not config.binary:
            tensor["data"] = images.reshape(-1).tolist()
            return json.dumps(payload).encode(), {"Content-Type": "application/json"}
        raw = np.ascontiguousarray(images, dtype="<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        header = json.dumps(payload).encode()
        return header + raw, {
            "Content-Type": "application/octet-stream",
            HEADER_LENGTH: str(len(header)),
        }

    def attempt(
        self, request: tuple[bytes, dict[str, str]], limit: int, ends: float
    ) -> list[AnswerTensor]:
        """One request upstream, its answer streamed in: at most ``limit`` bytes (declared or
        sent; more is an :class:`InvalidAnswer`), the last byte by ``ends``. A connection error,
        a timeout or a 5xx may pass; a 4xx would be refused again."""
        config = self.config
        try:
            status, headers, answer = self._post(*request, limit, ends)
        except httpx.TimeoutException as failure:
            error: UpstreamError = UpstreamTimeout(
                f"the upstream model did not answer within {config.timeout_s:g}s "
                f"({type(failure).__name__})"
            )
            raise AttemptFailed(error, str(failure), retry=True) from None
        except httpx.TransportError as failure:
            error = UpstreamUnreachable(
                f"cannot reach the upstream model server ({type(failure).__name__})"
            )
            raise AttemptFailed(error, str(failure), retry=True) from None
        if status != 200:
            error = UpstreamError(f"the upstream model answered HTTP {status}")
            raise AttemptFailed(error, _excerpt(answer), retry=status >= 500)
        return self._outputs(headers, answer)

    def _post(
        self, content: bytes, headers: dict[str, str], limit: int, ends: float
    ) -> tuple[int, httpx.Headers, bytes]:
        timeout = httpx.Timeout(max(0.001, ends - time.monotonic()))
        with self._http.stream(
            "POST", self.infer_path, content=content, headers=headers, timeout=timeout
        ) as response:
            declared = byte_count(response.headers.get("content-length"))
            if declared is not None and declared > limit:
                raise InvalidAnswer(
                    f"its answer of {declared} bytes exceeds the {limit} bytes its shape allows"
                )
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise InvalidAnswer(f"its answer exceeds the {limit} bytes its shape allows")
                if time.monotonic() > ends:
                    raise httpx.ReadTimeout(
                        f"the answer was still arriving after {self.config.timeout_s:g}s"
                    )
                chunks.append(chunk)
            if response.status_code >= 500:
                _discard_connection(response)
            return response.status_code, response.headers, b"".join(chunks)

    def _outputs(self, headers: httpx.Headers, content: bytes) -> list[AnswerTensor]:
        """The outputs of an inference response, JSON or binary tensor data: each binary
        output's bytes are the ``binary_data_size`` it declares, after those of the binary
        outputs before it (fewer when the body ends sooner)."""
        length = headers.get(HEADER_LENGTH)
        if length is not None:
            if byte_count(length) is None or int(length) > len(content):
                raise InvalidAnswer(
                    f"its {HEADER_LENGTH} header does not fit a body of {len(content)} bytes",
                    f"header {length[:40]!r}",
                )
            header, binary = content[: int(length)], memoryview(content)[int(length) :]
        else:
            header, binary = content, memoryview(b"")
        try:
            payload = json.loads(header)
        except (ValueError, RecursionError) as failure:
            raise InvalidAnswer(
                f"its body is not valid JSON ({type(failure).__name__})",
                f"{str(failure)[:EXCERPT]}; it begins {bytes(header[:60])!r}",
            ) from None
        outputs = payload.get("outputs") if isinstance(payload, dict) else None
        if (
            not isinstance(outputs, list)
            or not outputs
            or not all(isinstance(o, dict) for o in outputs)
        ):
            raise InvalidAnswer("it has no 'outputs' list of tensor objects")
        tensors, offset = [], 0
        for output in outputs:
            size, raw = _binary_size(output), None
            if size is not None:
                raw = binary[offset : offset + size] if size >= 0 else binary[:0]
                offset += max(size, 0)
            data = output.get("data")
            tensors.append(
                AnswerTensor(
                    output.get("name"),
                    output.get("shape"),
                    output.get("datatype"),
                    raw,
                    data if isinstance(data, list) else None,
                )
            )
        return tensors

    def ready(self) -> str | None:
        """``GET …/ready``: ready means HTTP 200 and, if the body says, ``"ready": true``
        (Triton and MLServer answer 200 or 400 with no body, KServe and mirage
        ``{"ready": …}``)."""
        try:
            response = self._probe.get(self.ready_path)
        except httpx.TimeoutException:
            return "the upstream model server did not answer its readiness probe in time"
        except httpx.TransportError:
            return "the upstream model server cannot be reached"
        if response.status_code != 200:
            return f"the upstream model is not ready (HTTP {response.status_code})"
        try:
            body = response.json() if response.content.strip() else {}
        except ValueError:
            body = {}
        if isinstance(body, dict) and body.get("ready") is False:
            return "the upstream model is not ready"
        return None

    def close(self) -> None:
        self._http.close()
        self._probe.close()


class GrpcTransport:
    """The upstream's ``inference.GRPCInferenceService`` on one plaintext channel, shared by the
    worker threads and the readiness probe: ``ModelInfer``, ``ServerReady``, ``ModelReady``.
    The channel reconnects to a lost upstream within ``GRPC_RECONNECT_MS``."""

    raw_name = "raw_output_contents"

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.metadata = tuple((name.lower(), value) for name, value in config.headers().items())
        first, longest = GRPC_RECONNECT_MS
        self._channel = grpc.insecure_channel(
            config.grpc_target,
            options=[
                ("grpc.max_receive_message_length", GRPC_MAX_ANSWER),
                ("grpc.max_send_message_length", -1),
                ("grpc.initial_reconnect_backoff_ms", first),
                ("grpc.min_reconnect_backoff_ms", first),
                ("grpc.max_reconnect_backoff_ms", longest),
            ],
        )
        method = f"/{GRPC_SERVICE}/"
        self._infer = self._channel.unary_unary(method + "ModelInfer")  # bytes in, bytes out
        self._server_ready = self._channel.unary_unary(
            method + "ServerReady",
            request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString,
        )
        self._model_ready = self._channel.unary_unary(
            method + "ModelReady",
            request_serializer=pb.ModelReadyRequest.SerializeToString,
            response_deserializer=pb.ModelReadyResponse.FromString,
        )

    def encode(self, images: np.ndarray) -> bytes:
        """A serialized ``ModelInferRequest``: one FP32 input, its bytes little-endian in
        ``raw_input_contents``, and ``output_name`` as its requested output when given."""
        config = self.config
        request = pb.ModelInferRequest(
            model_name=config.model,
            model_version=config.version or "",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=config.input_name, datatype="FP32", shape=list(images.shape)
                )
            ],
            raw_input_contents=[np.ascontiguousarray(images, dtype="<f4").tobytes()],
        )
        if config.output_name is not None:
            request.outputs.add(name=config.output_name)
        return request.SerializeToString()

    def attempt(self, request: bytes, limit: int, ends: float) -> list[AnswerTensor]:
        """One ``ModelInfer`` call whose gRPC deadline is ``ends``; its answer is refused past
        ``limit`` bytes before it is parsed. ``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` may pass;
        any other status would be answered again."""
        try:
            answer = self._infer(
                request, timeout=max(0.001, ends - time.monotonic()), metadata=self.metadata
            )
        except grpc.RpcError as failure:
            code, details = _status(failure)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(
                "CLIENT: Received message larger than max"
            ):
                raise InvalidAnswer(
                    f"its answer exceeds the {GRPC_MAX_ANSWER} bytes gRPC receives", details
                ) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                error: UpstreamError = UpstreamTimeout(
                    f"the upstream model did not answer within {self.config.timeout_s:g}s "
                    "(gRPC DEADLINE_EXCEEDED)"
                )
            elif code == grpc.StatusCode.UNAVAILABLE:
                error = UpstreamUnreachable(
                    "cannot reach the upstream model server (gRPC UNAVAILABLE)"
                )
            else:
                error = UpstreamError(f"the upstream model answered gRPC {code.name}")
            raise AttemptFailed(error, details or "(no details)", code in GRPC_RETRIED) from None
        if len(answer) > limit:
            raise InvalidAnswer(
                f"its answer of {len(answer)} bytes exceeds the {limit} bytes its shape allows"
            )
        try:
            response = pb.ModelInferResponse.FromString(answer)
        except DecodeError as failure:
            raise InvalidAnswer(
                "its answer is not a ModelInferResponse message", str(failure)[:EXCERPT]
            ) from None
        raw = response.raw_output_contents
        return [
            AnswerTensor(
                output.name,
                list(output.shape),
                output.datatype,
                raw[index] if index < len(raw) else None,
                _typed_contents(output),
            )
            for index, output in enumerate(response.outputs)
        ]

    def ready(self) -> str | None:
        """``ServerReady``, then ``ModelReady`` for the model (and version), both within
        ``READY_TIMEOUT_S`` (or ``timeout_s``, when shorter)."""
        config = self.config
        ends = time.monotonic() + min(READY_TIMEOUT_S, config.timeout_s)
        try:
            server = self._server_ready(
                pb.ServerReadyRequest(),
                timeout=max(0.001, ends - time.monotonic()),
                metadata=self.metadata,
            )
            if not server.ready:
                return "the upstream model server is not ready"
            model = self._model_ready(
                pb.ModelReadyRequest(name=config.model, version=config.version or ""),
                timeout=max(0.001, ends - time.monotonic()),
                metadata=self.metadata,
            )
        except grpc.RpcError as failure:
            code, _ = _status(failure)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "the upstream model server did not answer its readiness probe in time"
            if code == grpc.StatusCode.UNAVAILABLE:
                return "the upstream model server cannot be reached"
            return f"the upstream model is not ready (gRPC {code.name})"
        return None if model.ready else "the upstream model is not ready"

    def close(self) -> None:
        self._channel.close()


def _status(failure: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a failed call (``UNKNOWN`` when it carries none)."""
    code = failure.code() if isinstance(failure, grpc.Call) else None
    details = failure.details() if isinstance(failure, grpc.Call) else None
    return code or grpc.StatusCode.UNKNOWN, details or ""


def _typed_contents(output: pb.ModelInferResponse.InferOutputTensor) -> Any:
    """An output's typed values for its datatype (``fp32_contents``, ``fp64_contents``), or
    ``None`` for a datatype without a float field of its own."""
    contents = output.contents
    return {"FP32": contents.fp32_contents, "FP64": contents.fp64_contents}.get(output.datatype)


def _binary_size(tensor: dict[str, Any]) -> int | None:
    """An output's ``parameters.binary_data_size`` (−1 when it is not a byte count), or ``None``
    when it has none (its values are JSON ``data``)."""
    parameters = tensor.get("parameters")
    if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else -1


def _discard_connection(response: httpx.Response) -> None:
    """Close the connection that carried ``response`` (httpx's ``network_stream`` extension), so
    that the pool opens a fresh one for the next request instead of reusing it. After a 5xx an
    upstream may close its side a moment later (MLServer 1.7.1 resets the connection its 500
    went out on): a retry sent on it would fail as a connection error."""
    stream = response.extensions.get("network_stream")
    if stream is not None:
        stream.close()


def _excerpt(body: bytes) -> str:
    text = body[: 4 * EXCERPT].decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:EXCERPT] + ("…" if len(text) > EXCERPT else "") if text else "(empty body)"


class UpstreamModel(ExternalModel):
    """An upstream OIP V2 model as the served model: images (B, C, H, W) in [0, 1] to logits
    (B, K), with ``input_shape`` from the config and ``num_classes`` from the config or one probe
    request at start. It has no parameters: a defense that needs gradients takes them from its
    surrogate checkpoint, never from the victim."""

    def __init__(self, config: UpstreamConfig) -> None:
        client = UpstreamClient(config)
        try:
            super().__init__(client, config.input_shape, config.num_classes, has_modes=False)
        except UpstreamError as error:
            client.close()
            raise ValueError(
                f"cannot read the number of classes from the upstream ({error.message}); start it "
                "first, or give model.upstream.num_classes"
            ) from error
        client.num_classes = self.num_classes
        self.client = client

    def card(self) -> ModelCard:
        """What the service records of the victim: an upstream, not a file or a checkpoint."""
        config, channels = self.client.config, self.input_shape[0]
        return ModelCard(
            architecture=f"upstream:{config.model}",
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            mean=(0.0,) * channels,
            std=(1.0,) * channels,
            training={
                "source": config.url,
                "format": "upstream",
                "model": config.model,
                "version": config.version,
                "output": config.output,
            },
        )

    def readiness(self) -> str | None:
        return self.client.readiness()

    def close(self) -> None:
        self.client.close()
