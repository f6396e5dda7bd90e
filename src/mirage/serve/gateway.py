"""A defended gateway (docs/design.md §gateway): the victim is an upstream Open Inference Protocol
V2 REST endpoint (Triton, KServe, MLServer), and :class:`UpstreamModel` makes it look like a
served model to the micro-batcher: a module from images (B, C, H, W) to logits (B, K), whose
forward pass is one inference request upstream (per ``max_batch`` images).

The upstream's output is read as ``probabilities`` (checked: finite, in [0, 1], rows summing to
1 within ``PROB_TOLERANCE``; returned as their logarithm, clamped at the smallest normal float32
so that no entry is −∞, which the batcher's softmax turns back into the same probabilities) or as
``logits`` (checked finite, returned as they are). Any other answer is an
:class:`~mirage.serve.errors.UpstreamInvalidAnswer`.

Requests go out as JSON or, with ``binary``, as binary tensor data (the extension's
``Inference-Header-Content-Length``, FP32 little-endian, and ``binary_data_output``); answers
are read either way, whatever was asked, streamed in and refused past the size their shape allows
(an upstream cannot make the gateway buffer a huge answer). Each attempt ends ``timeout_s`` after
it starts, however slowly the answer drips, and the whole call ``deadline_s`` after it starts; a
connection error, a timeout or a 5xx is retried up to ``retries`` times after ``backoff_s``
(doubled each time); a 4xx never is. What is left is a typed error that the service answers with
502 or 504 and charges nothing for (docs/design.md §service-errors). Its message never quotes the
upstream's answer (the log does).

The batcher calls the model from its worker threads (four for a gateway, so one slow upstream
call does not hold every other client's), and one synchronous ``httpx`` client with keep-alive
connections serves their forward passes; the readiness probe has its own.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any

import httpx
import numpy as np
import torch
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


class UpstreamClient:
    """The HTTP side of the gateway: one inference call, with retries, decoded and checked."""

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
        content, headers = self._encode(images)
        answer_headers, answer = self._post(content, headers, self._answer_limit(len(images)))
        values = self._decode(answer_headers, answer, len(images))
        return torch.from_numpy(self._logits(values))

    def _answer_limit(self, batch: int) -> int:
        """The most bytes an answer for ``batch`` images may take: JSON at ``BYTES_PER_VALUE`` per
        probability (K from the config or the probe, else ``PROBE_CLASSES``) plus
        ``ANSWER_OVERHEAD``. A larger answer is refused as it streams in, never buffered whole."""
        return ANSWER_OVERHEAD + batch * (self.num_classes or PROBE_CLASSES) * BYTES_PER_VALUE

    def _encode(self, images: np.ndarray) -> tuple[bytes, dict[str, str]]:
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

    def _post(
        self, content: bytes, headers: dict[str, str], limit: int
    ) -> tuple[httpx.Headers, bytes]:
        """The upstream's 200 answer (its headers and body), after at most ``retries`` retries of
        a connection error, a timeout or a 5xx; anything else raises the typed error of the last
        attempt. Each attempt ends ``timeout_s`` after it starts, however slowly the answer
        drips in, and the whole call ``deadline_s`` after it starts (no attempt starts later)."""
        config, error = self.config, None
        attempts = config.retries + 1
        deadline = time.monotonic() + config.call_deadline_s
        for attempt in range(attempts):
            if attempt:
                time.sleep(config.backoff_s * 2 ** (attempt - 1))
            if time.monotonic() >= deadline:
                break
            retry = True
            try:
                status, answer_headers, answer = self._attempt(content, headers, limit, deadline)
            except httpx.TimeoutException as failure:
                error = UpstreamTimeout(
                    f"the upstream model did not answer within {config.timeout_s:g}s "
                    f"({type(failure).__name__})"
                )
                detail = str(failure)
            except httpx.TransportError as failure:
                error = UpstreamUnreachable(
                    f"cannot reach the upstream model server ({type(failure).__name__})"
                )
                detail = str(failure)
            else:
                if status == 200:
                    return answer_headers, answer
                error = UpstreamError(f"the upstream model answered HTTP {status}")
                detail, retry = _excerpt(answer), status >= 500  # a 4xx would be refused again
            log.warning(
                "the %s failed (attempt %d of %d): %s: %s",
                self.where,
                attempt + 1,
                attempts,
                error.message,
                detail[:EXCERPT],
            )
            if not retry:
                raise error
        if error is None:  # pragma: no cover — the first attempt always starts
            raise UpstreamTimeout(
                f"the upstream call's deadline of {config.call_deadline_s:g}s passed"
            )
        tries = f" (after {attempt + 1} attempts)" if attempt else ""
        raise type(error)(error.message + tries)

    def _attempt(
        self, content: bytes, headers: dict[str, str], limit: int, deadline: float
    ) -> tuple[int, httpx.Headers, bytes]:
        """One request upstream, its answer streamed in: at most ``limit`` bytes (declared or
        sent; more is an :class:`UpstreamInvalidAnswer`, never retried), and ``timeout_s`` (or
        what is left of the call's ``deadline``) from start to the last byte."""
        ends = min(time.monotonic() + self.config.timeout_s, deadline)
        timeout = httpx.Timeout(max(0.001, ends - time.monotonic()))
        with self._http.stream(
            "POST", self.infer_path, content=content, headers=headers, timeout=timeout
        ) as response:
            declared = byte_count(response.headers.get("content-length"))
            if declared is not None and declared > limit:
                raise self._invalid(
                    f"its answer of {declared} bytes exceeds the {limit} bytes its shape allows"
                )
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise self._invalid(f"its answer exceeds the {limit} bytes its shape allows")
                if time.monotonic() > ends:
                    raise httpx.ReadTimeout(
                        f"the answer was still arriving after {self.config.timeout_s:g}s"
                    )
                chunks.append(chunk)
            return response.status_code, response.headers, b"".join(chunks)

    def _decode(self, headers: httpx.Headers, content: bytes, batch: int) -> np.ndarray:
        """The chosen output of an inference response, JSON or binary tensor data, as a
        float64 array (B, K), its shape and values not yet checked against the model. What the
        client is told names no string of the upstream's answer (only the log quotes them)."""
        length = headers.get(HEADER_LENGTH)
        if length is not None:
            if byte_count(length) is None or int(length) > len(content):
                raise self._invalid(
                    f"its {HEADER_LENGTH} header does not fit a body of {len(content)} bytes",
                    f"header {length[:40]!r}",
                )
            header, binary = content[: int(length)], memoryview(content)[int(length) :]
        else:
            header, binary = content, memoryview(b"")
        try:
            payload = json.loads(header)
        except (ValueError, RecursionError) as failure:
            raise self._invalid(
                f"its body is not valid JSON ({type(failure).__name__})",
                f"{str(failure)[:EXCERPT]}; it begins {bytes(header[:60])!r}",
            ) from None
        outputs = payload.get("outputs") if isinstance(payload, dict) else None
        if (
            not isinstance(outputs, list)
            or not outputs
            or not all(isinstance(o, dict) for o in outputs)
        ):
            raise self._invalid("it has no 'outputs' list of tensor objects")
        index = self._output_index(outputs)
        tensor = outputs[index]
        shape, datatype = tensor.get("shape"), tensor.get("datatype")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ):
            raise self._invalid(
                f"output {index} has a shape that is not [B, K]", f"shape {str(shape)[:60]}"
            )
        if (
            shape[0] != batch
            or shape[1] < 2
            or (self.num_classes is not None and shape[1] != self.num_classes)
        ):
            classes = self.num_classes if self.num_classes is not None else "K ≥ 2"
            raise self._invalid(
                f"output {index} has shape {shape} for {batch} images, not [{batch}, {classes}]"
            )
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise self._invalid(
                f"output {index} has a datatype not among {sorted(DATATYPES)}",
                f"datatype {str(datatype)[:40]!r}",
            )
        count = math.prod(shape)
        size = _binary_size(tensor)
        if size is not None:
            offset = sum(max(_binary_size(other) or 0, 0) for other in outputs[:index])
            dtype = DATATYPES[datatype]
            if size != count * dtype.itemsize or offset + size > len(binary):
                raise self._invalid(
                    f"output {index} declares {size} bytes of binary tensor data "
                    f"for shape {shape} of {datatype} ({count * dtype.itemsize} needed), and "
                    f"{len(binary) - offset} follow its JSON header"
                )
            return (
                np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
                .astype(np.float64)
                .reshape(shape)
            )
        data = tensor.get("data")
        if not isinstance(data, list):
            raise self._invalid(f"output {index} has neither 'data' nor binary_data_size")
        try:
            values = np.array(data, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            raise self._invalid(
                f"output {index} holds 'data' that is not a list of numbers"
            ) from None
        if values.size != count:
            raise self._invalid(f"output {index} holds {values.size} values for shape {shape}")
        return values.reshape(shape)

    def _output_index(self, outputs: list[dict[str, Any]]) -> int:
        names = [str(o.get("name"))[:64] for o in outputs]
        wanted = self.config.output_name
        if wanted is None:
            if len(outputs) != 1:
                raise self._invalid(
                    f"it has {len(outputs)} outputs; set model.upstream.output_name",
                    f"outputs {names}",
                )
            return 0
        if wanted not in names:
            raise self._invalid(f"it has no output {wanted!r}", f"outputs {names}")
        return names.index(wanted)

    def _logits(self, values: np.ndarray) -> np.ndarray:
        """float32 logits of the checked output: the output itself (``logits``) or the
        logarithm of the probabilities, clamped at ``LOG_FLOOR``."""
        if not np.isfinite(values).all():
            raise self._invalid("its output holds NaN or infinite values")
        if self.config.output == "logits":
            logits = values.astype(np.float32)
            if not np.isfinite(logits).all():
                raise self._invalid("its logits overflow float32")
            return logits
        sums = values.sum(axis=1)
        low, high = values.min(), values.max()
        worst = int(np.argmax(np.abs(sums - 1)))
        if (
            low < -PROB_TOLERANCE
            or high > 1 + PROB_TOLERANCE
            or abs(sums[worst] - 1) > PROB_TOLERANCE
        ):
            raise self._invalid(
                f"its output is not a probability vector per image (row {worst} sums to "
                f"{sums[worst]:.6g}; values in [{low:.6g}, {high:.6g}]); if the upstream answers "
                "logits, set model.upstream.output = 'logits'"
            )
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
        """``None`` if the upstream model is ready, else why not; probed (``GET …/ready``, at
        most ``READY_TIMEOUT_S``) at most once per ``ready_cache_s``. Ready means HTTP 200 and,
        if the body says, ``"ready": true`` (Triton and MLServer answer 200 or 400 with no body,
        KServe and mirage ``{"ready": …}``)."""
        with self._ready_lock:
            now = time.monotonic()
            if now - self._ready_at < self.config.ready_cache_s:
                return self._ready_reason
            reason = self._probe_ready()
            if reason != self._ready_reason:
                if reason is None:
                    log.info("the %s is ready", self.where)
                else:
                    log.warning("the %s is not ready: %s", self.where, reason)
            self._ready_at, self._ready_reason = time.monotonic(), reason
            return reason

    def _probe_ready(self) -> str | None:
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


def _binary_size(tensor: dict[str, Any]) -> int | None:
    """An output's ``parameters.binary_data_size`` (−1 when it is not a byte count), or ``None``
    when it has none (its values are JSON ``data``)."""
    parameters = tensor.get("parameters")
    if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else -1


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
