"""The Open Inference Protocol V2 REST API as the service speaks it (docs/design.md §oip):
reading and validating requests, writing responses. No model, no defense, no storage here.

Sections cited are those of the OIP V2 REST specification (KServe's "Open Inference Protocol",
the ``kserve/open-inference-protocol`` repository's ``specification/protocol/inference_rest.md``)
and of its binary tensor data extension (KServe's "Binary Tensor Data Extension", Triton's
``docs/protocol/extension_binary_data.md``):

- ``GET /v2`` — server metadata (§"Server Metadata": ``name``, ``version``, ``extensions``);
- ``GET /v2/models/{name}[/versions/{v}]`` — model metadata (§"Model Metadata"), with an honest
  ``platform`` and mirage's own facts (classes, the defense and its contract, limits, the
  client's quota) in ``parameters``;
- ``POST /v2/models/{name}[/versions/{v}]/infer`` — §"Inference": one input tensor (B, C, H, W)
  of FP16/FP32/FP64 pixels in [0, 1], as JSON ``data`` or as binary tensor data; the one output
  ``probabilities`` (B, K), FP32, all outputs or only the requested ``outputs``, each as JSON or
  binary (the extension's ``binary_data`` output parameter, defaulting to the request parameter
  ``binary_data_output``); the request ``id`` comes back in the response.

Binary tensor data (extension §"Binary Tensor Request" / §"Binary Tensor Response"): the header
``Inference-Header-Content-Length: L`` says the first L bytes of the body are the JSON object;
the rest is the tensors' raw little-endian, row-major bytes, in the order of the inputs whose
``parameters.binary_data_size`` gives their length. It is decoded with one ``np.frombuffer``:
no Python loop over elements. The JSON body is decoded once.

Every rejection is a typed :class:`~mirage.serve.errors.ServeError`; types are strict (a
boolean, a null or an object is never taken for a number, a list never for a string), every
string is bounded, and every size of a binary body is checked against the shape and the body
(docs/design.md §service-errors).
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect

from mirage import __version__
from mirage.serve.errors import (
    BadRequest,
    BatchTooLarge,
    ClientGone,
    PayloadTooLarge,
    RequestTimeout,
)

DATATYPES: dict[str, np.dtype] = {
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}  # OIP → little-endian
MAX_STRING = 256  # characters of the request id, the tensor names and string parameters
MAX_PARAMETERS = 64  # keys of one `parameters` object
BYTES_PER_VALUE = 32  # a float32 written by json.dumps, its separator and a share of brackets
BODY_OVERHEAD = 64 * 1024  # everything but the numbers: keys, id, name, shape, whitespace
HEADER_LENGTH = "Inference-Header-Content-Length"  # binary tensor data extension
EXTENSIONS = ("binary_tensor_data",)  # what GET /v2 announces: only what is implemented
VERSIONS = ("1",)  # the served model's versions (one)
OUTPUTS = ("probabilities",)  # the model's outputs, in response order
UNSUPPORTED = {
    "shared_memory_region": "shared-memory",
    "shared_memory_byte_size": "shared-memory",
    "shared_memory_offset": "shared-memory",
    "classification": "classification",
}


def byte_count(text: str | None) -> int | None:
    """A header's byte count: 1–18 ASCII digits, else ``None`` (``str.isdigit`` also takes "²" and
    other Unicode digits, which ``int`` refuses)."""
    if text is None or not (text.isascii() and text.isdigit() and len(text) <= 18):
        return None
    return int(text)


def body_limit(images: int, input_shape: tuple[int, ...], cap: int) -> int:
    """The most bytes a well-formed request of ``images`` images can need, at most ``cap``
    (docs/design.md §service-errors): the model, not only the config, bounds the body."""
    return min(cap, images * math.prod(input_shape) * BYTES_PER_VALUE + BODY_OVERHEAD)


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The raw body, refusing more than ``limit`` bytes (declared or actually sent) and a body
    that takes longer than ``timeout`` seconds to arrive, and a compressed body (a
    ``Content-Encoding`` other than ``identity``, such as tritonclient's
    ``request_compression_algorithm``), which the service does not decompress. A client that
    hangs up raises :class:`ClientGone` (logged without a traceback)."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BadRequest(
            f"Content-Encoding {encoding[:40]!r} is not supported: send the body uncompressed"
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        if byte_count(declared) is None:
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


@dataclass(frozen=True)
class InferRequest:
    """A validated inference request (§"Inference", ``$inference_request``): the images as
    float32 (B, C, H, W), the request ``id``, and the outputs to answer, in order, each with
    whether it goes back as binary tensor data."""

    images: np.ndarray
    id: str | None
    outputs: tuple[tuple[str, bool], ...]


def parse_infer_request(
    body: bytes, input_shape: tuple[int, ...], max_batch: int, header_length: str | None = None
) -> InferRequest:
    """Validate an OIP V2 inference body. ``header_length`` is the request's
    ``Inference-Header-Content-Length`` header: with it, the body is that many bytes of JSON
    followed by binary tensor data (extension §"Binary Tensor Request"); without it, JSON only."""
    header, binary = _split(body, header_length)
    payload = _json_object(header, binary_hint=header_length is None)
    request_id = payload.get("id")
    if request_id is not None:
        request_id = _bounded_string(request_id, "'id'")
    parameters = _parameters(payload.get("parameters"), "the request's 'parameters'")
    binary_output = _flag(parameters, "binary_data_output", False, "the request parameter")
    tensor = _input_tensor(payload)
    shape = _batch_shape(tensor["shape"], input_shape, max_batch)
    tensor_parameters = _parameters(tensor.get("parameters"), "the input tensor's 'parameters'")
    _supported(tensor_parameters, "the input tensor")
    if "binary_data_size" in tensor_parameters:
        if "data" in tensor:
            raise BadRequest(
                "the input tensor has both 'data' and parameters.binary_data_size; give one"
            )
        images = _binary_pixels(
            binary, tensor_parameters["binary_data_size"], shape, tensor["datatype"]
        )
    else:
        if len(binary):
            raise BadRequest(
                f"{len(binary)} bytes follow the JSON header ({HEADER_LENGTH}) but no input "
                "tensor has parameters.binary_data_size"
            )
        if "data" not in tensor:
            raise BadRequest(
                "the input tensor lacks 'data' (or parameters.binary_data_size with binary data)"
            )
        images = _pixels(tensor["data"], shape)
    outputs = _requested_outputs(payload.get("outputs"), binary_output)
    return InferRequest(images.astype(np.float32), request_id, outputs)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(the JSON header, the binary tensor data after it) of a body."""
    if header_length is None:
        return body, memoryview(b"")
    length = byte_count(header_length)
    if length is None:
        raise BadRequest(
            f"invalid {HEADER_LENGTH} header: {header_length[:40]!r} is not a byte count"
        )
    if length > len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {length} bytes but the body has only {len(body)}")
    return body[:length], memoryview(body)[length:]


def _json_object(header: bytes, *, binary_hint: bool) -> dict[str, Any]:
    try:
        payload = json.loads(header)
    except (ValueError, RecursionError) as error:
        hint = (
            f"; binary tensor data needs the {HEADER_LENGTH} header"
            if binary_hint
            else f" in its first {HEADER_LENGTH} bytes; if the whole body is JSON, drop that "
            "header (a stale one: tritonclient writes it into the headers dict of an earlier "
            "binary call)"
        )
        raise BadRequest(
            f"the request body is not valid JSON{hint} ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object with an 'inputs' list")
    return payload


def _parameters(value: Any, what: str) -> dict[str, Any]:
    """A ``parameters`` object (§"Parameters"): string keys, each value a string, a number or a
    boolean; ``{}`` when absent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    if len(value) > MAX_PARAMETERS:
        raise BadRequest(f"{what} holds more than {MAX_PARAMETERS} parameters")
    for key, item in value.items():
        _bounded_string(key, f"a key of {what}")
        if isinstance(item, str):
            _bounded_string(item, f"{what}[{key[:40]!r}]")
        elif not isinstance(item, bool | int | float):
            raise BadRequest(
                f"{what}[{key[:40]!r}] must be a string, a number or a boolean, "
                f"got {type(item).__name__}"
            )
    return value


def _flag(parameters: dict[str, Any], key: str, default: bool, what: str) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{what} {key!r} must be a boolean, got {type(value).__name__}")
    return value


def _supported(parameters: dict[str, Any], what: str) -> None:
    """Refuse the parameters of extensions the service does not implement, rather than answer
    something the client did not ask for."""
    for key in parameters:
        if key in UNSUPPORTED:
            raise BadRequest(
                f"{what} asks for the {UNSUPPORTED[key]} extension ({key!r}), which this "
                f"server does not implement; it implements {list(EXTENSIONS)}"
            )


def _input_tensor(payload: dict[str, Any]) -> dict[str, Any]:
    """The one input tensor object of the request (``$request_input``), with its name, shape
    and datatype present and the name and datatype checked."""
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest("'inputs' must be a list holding exactly one input tensor object")
    tensor = inputs[0]
    if missing := [k for k in ("name", "shape", "datatype") if k not in tensor]:
        raise BadRequest(f"the input tensor lacks {missing}")
    _bounded_string(tensor["name"], "the input tensor's 'name'")
    datatype = tensor["datatype"]
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"datatype must be one of {sorted(DATATYPES)}, got {str(datatype)[:40]!r}")
    return tensor


def _batch_shape(shape: Any, input_shape: tuple[int, ...], max_batch: int) -> list[int]:
    expected = f"[B, {', '.join(map(str, input_shape))}]"
    if (
        not isinstance(shape, list)
        or len(shape) != 1 + len(input_shape)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    ):
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
        if (
            len(flat) != math.prod(shape[: depth + 1])
            or width not in (shape[depth + 1], math.prod(shape[depth + 1 :]))
            or not all(isinstance(row, list) and len(row) == width for row in flat)
        ):
            raise BadRequest(f"'data' is a ragged or malformed nested list for shape {shape}")
        flat = [value for row in flat for value in row]
        depth += 1
    if depth and len(flat) != math.prod(shape):
        raise BadRequest(f"'data' is a ragged or malformed nested list for shape {shape}")
    if not set(map(type, flat)) <= {float, int}:  # one C-level pass; a bool is not an int here
        raise BadRequest(
            "'data' must hold only numbers (no strings, booleans, nulls or nested objects)"
        )
    if len(flat) != math.prod(shape):
        raise BadRequest(
            f"'data' holds {len(flat)} numbers but shape {shape} needs {math.prod(shape)}"
        )
    return flat


def _pixels(data: Any, shape: list[int]) -> np.ndarray:
    """JSON ``data`` as a float64 array of ``shape``, every value a finite number in [0, 1]."""
    flat = _numbers(data, shape)
    try:
        images = np.array(flat, dtype=np.float64).reshape(shape)
    except OverflowError:
        raise BadRequest("'data' holds an integer too large for a float") from None
    return _in_range(images, "'data'")


def _binary_pixels(binary: memoryview, size: Any, shape: list[int], datatype: str) -> np.ndarray:
    """The binary tensor data of the input (extension §"Binary Tensor Request": little-endian,
    row-major, no padding) as an array of ``shape``, in one ``np.frombuffer``. The declared
    ``binary_data_size`` must be what ``shape`` × ``datatype`` needs and exactly what the body
    holds after the JSON header."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(
            f"parameters.binary_data_size must be a non-negative integer, got {str(size)[:40]!r}"
        )
    dtype = DATATYPES[datatype]
    count = math.prod(shape)
    if size != count * dtype.itemsize:
        raise BadRequest(
            f"parameters.binary_data_size is {size} bytes but shape {shape} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    if len(binary) != size:
        raise BadRequest(
            f"the body holds {len(binary)} bytes of binary tensor data after its "
            f"{HEADER_LENGTH} bytes of JSON, but binary_data_size says {size}"
        )
    return _in_range(
        np.frombuffer(binary, dtype=dtype, count=count).reshape(shape), "the binary tensor data"
    )


def _in_range(images: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(images).all():
        raise BadRequest(f"{what} contains NaN or infinite values")
    if images.min() < 0 or images.max() > 1:
        raise BadRequest("pixel values must lie in [0, 1]")
    return images


def _requested_outputs(value: Any, binary_default: bool) -> tuple[tuple[str, bool], ...]:
    """The outputs to answer (``$request_output``), each with whether it is sent as binary
    tensor data: its ``binary_data`` parameter, else the request's ``binary_data_output``. No
    ``outputs`` (or an empty list): every output of the model (§"Inference")."""
    if value is None or value == []:
        return tuple((name, binary_default) for name in OUTPUTS)
    if not isinstance(value, list):
        raise BadRequest("'outputs' must be a list of requested output objects")
    outputs: dict[str, bool] = {}
    for item in value:
        if not isinstance(item, dict) or "name" not in item:
            raise BadRequest("each requested output must be an object with a 'name'")
        name = _bounded_string(item["name"], "a requested output's 'name'")
        if name not in OUTPUTS:
            raise BadRequest(
                f"unknown output {name[:64]!r}; the model's outputs are {list(OUTPUTS)}"
            )
        if name in outputs:
            raise BadRequest(f"output {name!r} is requested twice")
        parameters = _parameters(item.get("parameters"), f"the parameters of output {name!r}")
        _supported(parameters, f"output {name!r}")
        outputs[name] = _flag(
            parameters, "binary_data", binary_default, f"output {name!r}'s parameter"
        )
    return tuple(outputs.items())


def infer_response(
    model: str,
    request: InferRequest,
    served: np.ndarray,
    *,
    queries_used: int,
    query_budget: int | None,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of the inference response (§"Inference", ``$inference_response``)
    for served probabilities (B, K), with the client's usage in ``parameters``. An output sent as
    binary has ``parameters.binary_data_size`` and its little-endian float32 bytes follow the
    JSON object, whose length is the ``Inference-Header-Content-Length`` header (extension
    §"Binary Tensor Response"); with no binary output the body is JSON only."""
    tensors, blobs = [], []
    for name, binary in request.outputs:
        tensor: dict[str, Any] = {"name": name, "shape": list(served.shape), "datatype": "FP32"}
        if binary:
            blob = np.ascontiguousarray(served, dtype="<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = served.reshape(-1).tolist()
        tensors.append(tensor)
    header = json.dumps(
        {
            "model_name": model,
            "model_version": VERSIONS[0],
            "id": request.id,
            "parameters": {"queries_used": queries_used, "query_budget": query_budget},
            "outputs": tensors,
        }
    ).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *blobs]), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def server_metadata() -> dict[str, Any]:
    """The server metadata response (§"Server Metadata"): the extensions it implements."""
    return {"name": "mirage", "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(
    model: str,
    input_shape: tuple[int, int, int],
    classes: list[str],
    *,
    platform: str,
    defense: dict[str, Any] | None,
    limits: dict[str, Any],
    client: dict[str, Any],
) -> dict[str, Any]:
    """The model metadata response (§"Model Metadata"); ``platform`` says what the served model
    is (docs/design.md §model-formats); mirage's own facts go in ``parameters``."""
    c, h, w = input_shape
    return {
        "name": model,
        "versions": list(VERSIONS),
        "platform": platform,
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": [{"name": OUTPUTS[0], "datatype": "FP32", "shape": [-1, len(classes)]}],
        "parameters": {
            "classes": classes,
            "num_classes": len(classes),
            "defense": defense,
            "limits": limits,
            "client": client,
        },
    }
