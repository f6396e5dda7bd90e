"""The Open Inference Protocol V2 (JSON) as the service speaks it (docs/design.md §oip): reading
and validating requests, writing responses. No model, no defense, no storage here.

- ``POST /v2/models/{name}/infer`` — ``{"inputs": [{"name": …, "shape": [B, C, H, W],
  "datatype": "FP32", "data": [...]}]}`` → ``{"outputs": [{"name": "probabilities",
  "shape": [B, K], "datatype": "FP32", "data": [...]}]}``;
- ``GET /v2/models/{name}`` — the model's metadata, with mirage's ``parameters`` (classes, the
  defense and its contract, limits, the client's quota).

Every rejection is a typed :class:`~mirage.serve.errors.ServeError`; types are strict (a
boolean, a null or an object is never taken for a number, a list never for a string) and every
string is bounded (docs/design.md §service-errors).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect

from mirage.serve.errors import (
    BadRequest,
    BatchTooLarge,
    ClientGone,
    PayloadTooLarge,
    RequestTimeout,
)

DATATYPES = {"FP32", "FP64"}
MAX_STRING = 256  # characters of the request id and the tensor name
BYTES_PER_VALUE = 32  # a float32 written by json.dumps, its separator and a share of brackets
BODY_OVERHEAD = 64 * 1024  # everything but the numbers: keys, id, name, shape, whitespace


def body_limit(images: int, input_shape: tuple[int, ...], cap: int) -> int:
    """The most bytes a well-formed request of ``images`` images can need, at most ``cap``
    (docs/design.md §service-errors): the model, not only the config, bounds the body."""
    return min(cap, images * math.prod(input_shape) * BYTES_PER_VALUE + BODY_OVERHEAD)


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (declared or actually sent) and a body
    that takes longer than ``timeout`` seconds to arrive. A client that hangs up raises
    :class:`ClientGone` (logged without a traceback)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit() or len(declared) > 18:
            raise BadRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"payload of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"payload exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone("the client disconnected before sending the whole body") from None
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout:g}s") from None
    return b"".join(chunks)


def _bounded_string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise BadRequest(f"{what} is longer than {MAX_STRING} characters")
    return value


def parse_infer_request(body: bytes, input_shape: tuple[int, ...], max_batch: int
                        ) -> tuple[np.ndarray, str | None]:
    """Validate an OIP V2 inference body; returns float32 images (B, *input_shape) and the id."""
    tensor, request_id = _input_tensor(body)
    shape = _batch_shape(tensor["shape"], input_shape, max_batch)
    images = _pixels(tensor["data"], shape)
    return images.astype(np.float32), request_id


def _input_tensor(body: bytes) -> tuple[dict[str, Any], str | None]:
    """The one input tensor object of the request, with its keys and datatype checked, and the id."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise BadRequest(f"the request body is not valid JSON ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object with an 'inputs' list")
    request_id = payload.get("id")
    if request_id is not None:
        request_id = _bounded_string(request_id, "'id'")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest("'inputs' must be a list holding exactly one input tensor object")
    tensor = inputs[0]
    if missing := [k for k in ("name", "shape", "datatype", "data") if k not in tensor]:
        raise BadRequest(f"the input tensor lacks {missing}")
    _bounded_string(tensor["name"], "the input tensor's 'name'")
    datatype = tensor["datatype"]
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"datatype must be one of {sorted(DATATYPES)}, got {str(datatype)[:40]!r}")
    return tensor, request_id


def _batch_shape(shape: Any, input_shape: tuple[int, ...], max_batch: int) -> list[int]:
    expected = f"[B, {', '.join(map(str, input_shape))}]"
    if (not isinstance(shape, list) or len(shape) != 1 + len(input_shape)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
        raise BadRequest(f"shape must be {expected}, got {shape!r}")
    if tuple(shape[1:]) != tuple(input_shape) or shape[0] < 1:
        raise BadRequest(f"shape must be {expected} with B ≥ 1, got {shape}")
    if shape[0] > max_batch:
        raise BatchTooLarge(f"batch of {shape[0]} images exceeds the limit of {max_batch}")
    return shape


def _numbers(data: Any, shape: list[int]) -> list:
    """The values of ``data``, flat: a flat list, or lists nested along the leading axes of
    ``shape`` (each level exactly as long as its axis, the innermost as long as the rest)."""
    if not isinstance(data, list):
        raise BadRequest("'data' must be a (flat or nested) list of numbers")
    flat, depth = data, 0
    while flat and isinstance(flat[0], list):
        if depth + 1 >= len(shape):
            raise BadRequest(f"'data' is nested deeper than shape {shape}")
        width = len(flat[0])
        if (len(flat) != math.prod(shape[:depth + 1]) or width not in (shape[depth + 1], math.prod(shape[depth + 1:]))
                or not all(isinstance(row, list) and len(row) == width for row in flat)):
            raise BadRequest(f"'data' is a ragged or malformed nested list for shape {shape}")
        flat = [value for row in flat for value in row]
        depth += 1
    if depth and len(flat) != math.prod(shape):
        raise BadRequest(f"'data' is a ragged or malformed nested list for shape {shape}")
    if not all(type(value) is float or type(value) is int for value in flat):
        raise BadRequest("'data' must hold only numbers (no strings, booleans, nulls or nested objects)")
    if len(flat) != math.prod(shape):
        raise BadRequest(f"'data' holds {len(flat)} numbers but shape {shape} needs {math.prod(shape)}")
    return flat


def _pixels(data: Any, shape: list[int]) -> np.ndarray:
    """``data`` as a float64 array of ``shape``, every value a finite number in [0, 1]."""
    flat = _numbers(data, shape)
    try:
        images = np.array(flat, dtype=np.float64).reshape(shape)
    except OverflowError:
        raise BadRequest("'data' holds an integer too large for a float") from None
    if not np.isfinite(images).all():
        raise BadRequest("'data' contains NaN or infinite values")
    if images.min() < 0 or images.max() > 1:
        raise BadRequest("pixel values must lie in [0, 1]")
    return images


def infer_response(model: str, request_id: str | None, served: np.ndarray, *, queries_used: int,
                   query_budget: int | None) -> dict[str, Any]:
    """The OIP V2 inference response for served probabilities (B, K), with the client's usage."""
    return {
        "model_name": model, "model_version": "1", "id": request_id,
        "parameters": {"queries_used": queries_used, "query_budget": query_budget},
        "outputs": [{"name": "probabilities", "shape": list(served.shape), "datatype": "FP32",
                     "data": served.reshape(-1).tolist()}],
    }


def model_metadata(model: str, input_shape: tuple[int, int, int], classes: list[str], *,
                   defense: dict[str, Any], limits: dict[str, Any], client: dict[str, Any]) -> dict[str, Any]:
    """The OIP V2 model metadata response; mirage's own facts go in ``parameters``."""
    c, h, w = input_shape
    return {
        "name": model, "versions": ["1"], "platform": "pytorch_torchscript",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)]}],
        "parameters": {"classes": classes, "num_classes": len(classes), "defense": defense,
                       "limits": limits, "client": client},
    }
