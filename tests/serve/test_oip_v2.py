"""The rest of the Open Inference Protocol V2 REST API, spoken to the real server (uvicorn on
127.0.0.1) with a plain HTTP client: server metadata, the ``versions/{v}`` paths, an honest
``platform``, requested ``outputs`` and ``parameters``, and the binary tensor data extension, in
requests and responses (docs/design.md §oip). Every malformed binary body is a 400 with the JSON
error body, and charges nothing (docs/design.md §service-errors, §reservations)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from conftest import auth, body, make_config
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hardening import FUZZ, Server, check

import mirage
from mirage.api import InProcessAPI
from mirage.models import load_checkpoint
from mirage.serve.app import create_app
from mirage.serve.runner import ServerThread

URL = "/v2/models/digits"
HEADER = "Inference-Header-Content-Length"
DTYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


def binary_request(
    x: np.ndarray,
    datatype: str = "FP32",
    *,
    size: int | None = None,
    tensor: dict | None = None,
    **payload,
) -> tuple[bytes, dict]:
    """A request with ``x`` as binary tensor data: (body, headers); ``size`` overrides the
    declared binary_data_size, ``tensor`` other fields of the input, ``payload`` the request's."""
    raw = np.ascontiguousarray(x, dtype=DTYPES.get(datatype, "<f4")).tobytes()
    spec = {
        "name": "images",
        "shape": list(x.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw) if size is None else size},
        **(tensor or {}),
    }
    header = json.dumps({"inputs": [spec], **payload}).encode()
    return header + raw, {HEADER: str(len(header))}


def decode(response: httpx.Response) -> tuple[dict, dict[str, np.ndarray]]:
    """(the JSON header, each output as an array) of an inference response, JSON or binary."""
    length = response.headers.get(HEADER)
    content = response.content
    header = json.loads(content if length is None else content[: int(length)])
    offset, arrays = int(length or 0), {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            arrays[output["name"]] = np.asarray(output["data"], dtype=np.float32).reshape(
                output["shape"]
            )
        else:
            arrays[output["name"]] = np.frombuffer(content[offset : offset + size], "<f4").reshape(
                output["shape"]
            )
            offset += size
    assert offset == (len(content) if length is not None else 0), (
        "bytes left over after the outputs"
    )
    return header, arrays


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoints):
    config = make_config(
        tmp_path_factory.mktemp("oip"),
        checkpoints,
        clients=[{"name": "alice", "quota": 10**9}, {"name": "dave", "quota": 0}],
        access={"auth_failures": 10**9},
        limits={"max_batch": 4, "max_payload_bytes": 1 << 20},
    )
    server = Server(config)
    yield server
    server.close()


@pytest.fixture(scope="module")
def victim(checkpoints):
    return load_checkpoint(checkpoints["victim"])[0]


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def test_server_metadata_needs_a_key_and_names_the_extension(server):
    http = server.http
    meta = http.get("/v2", headers=auth("alice"))
    assert meta.status_code == 200
    assert meta.json() == {
        "name": "mirage",
        "version": mirage.__version__,
        "extensions": ["binary_tensor_data"],
    }
    assert http.get("/v2").json()["reason"] == "missing_key"
    assert http.get("/v2", headers={"X-API-Key": "wrong"}).status_code == 401
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}


def test_version_paths(server):
    http, before = server.http, server.state()
    plain = http.get(URL, headers=auth("alice")).json()
    assert (
        plain["versions"] == ["1"] and plain["platform"] == "pytorch"
    )  # a mirage checkpoint: eager nn.Module
    assert http.get(URL + "/versions/1", headers=auth("alice")).json() == plain
    for path in (URL + "/versions/2", URL + "/versions/2/ready"):
        missing = http.get(path, headers=auth("alice"))
        assert (missing.status_code, missing.json()["reason"]) == (404, "unknown_version"), path
    assert http.get(URL + "/versions/1/ready", headers=auth("alice")).json() == {
        "name": "digits",
        "ready": True,
    }
    assert http.get(URL + "/versions/2/ready").json() == {
        "ready": True
    }  # no key: readiness only, names nothing
    assert (
        http.get("/v2/models/other/versions/1", headers=auth("alice")).json()["reason"]
        == "unknown_model"
    )
    refused = http.post(
        URL + "/versions/2/infer", json=body(torch.rand(1, 1, 8, 8)), headers=auth("alice")
    )
    assert (refused.status_code, refused.json()["reason"]) == (404, "unknown_version")
    assert server.state() == before
    answered = http.post(
        URL + "/versions/1/infer", json=body(torch.rand(2, 1, 8, 8)), headers=auth("alice")
    )
    assert answered.status_code == 200 and answered.json()["model_version"] == "1"
    query = http.post(
        URL + "/infer?version=2", json=body(torch.rand(1, 1, 8, 8)), headers=auth("alice")
    )
    assert query.status_code == 200, "a query string is not a version path"


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_binary_request_answers_as_json_does(server, victim, datatype):
    x = pixels(3, seed=1).astype(DTYPES[datatype])
    content, headers = binary_request(x, datatype, id="binary-1")
    response = server.http.post(
        URL + "/infer", content=content, headers={**auth("alice"), **headers}
    )
    assert response.status_code == 200, response.text
    assert (
        response.headers["content-type"] == "application/json"
        and HEADER.lower() not in response.headers
    )
    header, outputs = decode(response)
    assert header["id"] == "binary-1" and header["outputs"][0]["datatype"] == "FP32"
    expected = InProcessAPI(victim).query(torch.from_numpy(x.astype(np.float32)))
    np.testing.assert_allclose(outputs["probabilities"], expected.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "outputs, parameters, binary",
    [
        (None, {"binary_data_output": True}, True),
        ([{"name": "probabilities"}], {"binary_data_output": True}, True),
        (
            [{"name": "probabilities", "parameters": {"binary_data": False}}],
            {"binary_data_output": True},
            False,
        ),
        ([{"name": "probabilities", "parameters": {"binary_data": True}}], None, True),
        ([], None, False),
        (None, {"binary_data_output": False, "priority": 1, "note": "x"}, False),
    ],
)
@pytest.mark.parametrize("binary_input", [False, True])
def test_requested_outputs_and_binary_responses(
    server, victim, outputs, parameters, binary, binary_input
):
    x = pixels(2, seed=2)
    payload = {
        "id": "r-7",
        **({"outputs": outputs} if outputs is not None else {}),
        **({"parameters": parameters} if parameters is not None else {}),
    }
    if binary_input:
        content, headers = binary_request(x, **payload)
    else:
        content, headers = json.dumps({**body(torch.from_numpy(x)), **payload}).encode(), {}
    response = server.http.post(
        URL + "/infer", content=content, headers={**auth("alice"), **headers}
    )
    assert response.status_code == 200, response.text
    assert (HEADER.lower() in response.headers) == binary
    assert response.headers["content-type"] == (
        "application/octet-stream" if binary else "application/json"
    )
    header, arrays = decode(response)
    assert header["id"] == "r-7" and header["model_name"] == "digits"
    assert header["parameters"]["query_budget"] == 10**9
    (output,) = header["outputs"]
    assert ("binary_data_size" in output.get("parameters", {})) == binary and (
        "data" in output
    ) != binary
    if binary:
        assert output["parameters"]["binary_data_size"] == 2 * 10 * 4
    np.testing.assert_allclose(
        arrays["probabilities"],
        InProcessAPI(victim).query(torch.from_numpy(x)).numpy(),
        rtol=0,
        atol=1e-6,
    )


def malformed_bodies() -> list[tuple[str, bytes, dict, int]]:
    """(case, body, headers, status): binary bodies and parameters that must be refused."""
    x = pixels(2, seed=3)
    good, headers = binary_request(x)
    length = int(headers[HEADER])
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan

    def header(value) -> dict:
        return {HEADER: str(value)}

    def json_only(**payload) -> bytes:
        return json.dumps({**body(torch.from_numpy(x)), **payload}).encode()

    return [
        ("header length beyond the body", good, header(len(good) + 1), 400),
        ("header length not a number", good, header("12a"), 400),
        ("header length negative", good, header(-5), 400),
        ("header length zero", good, header(0), 400),
        ("header length cuts the JSON", good, header(length - 3), 400),
        ("header length too long by a byte", good, header(length + 1), 400),
        ("non-JSON header", b"\x00\xffnot json" + good[length:], header(10), 400),
        ("header is a JSON list", b"[1, 2]" + good[length:], header(6), 400),
        ("binary without the header", good, {}, 400),
        ("size does not match shape x dtype", *binary_request(x, size=2 * 64 * 4 - 4), 400),
        ("size negative", *binary_request(x, size=-512), 400),
        ("size a boolean", *binary_request(x, size=True), 400),
        ("size a string", *binary_request(x, size="512"), 400),
        ("size a float", *binary_request(x, size=512.0), 400),
        ("size of FP64 for FP32 data", *binary_request(x, "FP32", size=2 * 64 * 8), 400),
        ("missing data", good[:-8], header(length), 400),
        ("no data at all", good[:length], header(length), 400),
        ("trailing bytes", good + b"\x00" * 4, header(length), 400),
        ("wrong datatype", *binary_request(x, "INT8"), 400),
        ("datatype UINT8", *binary_request(x.astype(np.uint8), "UINT8", size=128), 400),
        ("both data and binary_data_size", *binary_request(x, tensor={"data": [0.5] * 128}), 400),
        (
            "binary bytes but no binary input",
            json_only() + b"\x00" * 8,
            header(len(json_only())),
            400,
        ),
        ("NaN in the binary data", *binary_request(nan), 400),
        ("out of range in the binary data", *binary_request(x + 1.5), 400),
        ("wrong shape", *binary_request(pixels(2)[:, :, :, :7]), 400),
        ("parameters not an object", *binary_request(x, tensor={"parameters": [512]}), 400),
        (
            "shared memory input",
            *binary_request(
                x, tensor={"parameters": {"shared_memory_region": "r", "binary_data_size": 512}}
            ),
            400,
        ),
        ("request parameters a list", json_only(parameters=[1]), {}, 400),
        ("request parameter an object", json_only(parameters={"a": {"b": 1}}), {}, 400),
        ("request parameter null", json_only(parameters={"a": None}), {}, 400),
        (
            "binary_data_output a string",
            json_only(parameters={"binary_data_output": "true"}),
            {},
            400,
        ),
        ("unknown output", json_only(outputs=[{"name": "logits"}]), {}, 400),
        ("output twice", json_only(outputs=[{"name": "probabilities"}] * 2), {}, 400),
        ("output without a name", json_only(outputs=[{"parameters": {}}]), {}, 400),
        ("output name a list", json_only(outputs=[{"name": ["probabilities"]}]), {}, 400),
        ("outputs an object", json_only(outputs={"name": "probabilities"}), {}, 400),
        (
            "binary_data a number",
            json_only(outputs=[{"name": "probabilities", "parameters": {"binary_data": 1}}]),
            {},
            400,
        ),
        (
            "classification",
            json_only(outputs=[{"name": "probabilities", "parameters": {"classification": 3}}]),
            {},
            400,
        ),
        ("batch too large", *binary_request(pixels(5)), 413),
        ("gzip", good, {**headers, "Content-Encoding": "gzip"}, 400),
    ]


@pytest.mark.slow
def test_malformed_binary_bodies_are_400_and_charge_nothing(server):
    before = server.state()
    assert server.quotas.reservations() == 0
    for case, content, headers, status in malformed_bodies():
        response = server.http.post(
            URL + "/infer", content=content, headers={**auth("alice"), **headers}
        )
        assert response.status_code == status, (case, response.text[:300])
        assert set(response.json()) == {"error", "reason"} and response.json()["error"], case
        assert server.state() == before, (
            f"{case}: a rejected request changed the quota or the audit log"
        )
        assert server.quotas.reservations() == 0, case
    messages = {
        case: server.http.post(
            URL + "/infer", content=content, headers={**auth("alice"), **headers}
        ).json()["error"]
        for case, content, headers, _ in malformed_bodies()
    }
    assert "Inference-Header-Content-Length" in messages["binary without the header"]
    assert "needs 512" in messages["size does not match shape x dtype"]
    assert "unknown output 'logits'" in messages["unknown output"]
    good, headers = binary_request(pixels(2, seed=4))
    assert (
        server.http.post(
            URL + "/infer", content=good, headers={**auth("alice"), **headers}
        ).status_code
        == 200
    )
    (usage, (rows, queries)) = server.state()
    assert usage["alice"][0] - before[0].get("alice", (0, 0))[0] == 2
    assert (rows, queries) == (before[1][0] + 1, before[1][1] + 2)


def test_body_limits_hold_for_binary_bodies(server):
    # max_batch 4 images of 64 values: a body of 200 kB can be no well-formed request
    content, headers = binary_request(pixels(2))
    padded = content + b"\x00" * 200_000
    response = server.http.post(
        URL + "/infer", content=padded, headers={**auth("alice"), **headers}
    )
    assert (response.status_code, response.json()["reason"]) == (413, "payload_too_large")
    chunked = server.http.post(
        URL + "/infer",
        content=iter([padded[i : i + 50_000] for i in range(0, len(padded), 50_000)]),
        headers={**auth("alice"), **headers},
    )
    assert "content-length" not in chunked.request.headers
    assert (chunked.status_code, chunked.json()["reason"]) == (413, "payload_too_large")
    broke = server.http.post(URL + "/infer", content=content, headers={**auth("dave"), **headers})
    assert (broke.status_code, broke.json()["reason"]) == (429, "quota_exceeded")


def test_a_binary_request_whose_defense_fails_is_released(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints)
    app = create_app(config)

    def broken(key):
        raise RuntimeError("defense crashed")

    app.state.service.batcher.defense_for = broken
    content, headers = binary_request(pixels(3))
    with ServerThread(app) as url, httpx.Client(base_url=url) as http:
        response = http.post(URL + "/infer", content=content, headers={**auth("alice"), **headers})
        quotas = app.state.service.quotas
        assert (response.status_code, response.json()["reason"]) == (500, "inference_failed")
        assert quotas.usage().get("alice", (0, 0)) == (0, 0) and quotas.reservations() == 0
        assert app.state.service.audit.count() == (0, 0)


HEADER_TEXT = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=6)


@st.composite
def mutated_binary_requests(draw) -> tuple[bytes, dict]:
    """A valid binary request with its header length, declared size, datatype or bytes changed."""
    n = draw(st.integers(1, 4))
    datatype = draw(st.sampled_from(["FP32", "FP64", "FP16", "INT8", "BYTES"]))
    x = np.random.default_rng(draw(st.integers(0, 2**32))).random((n, 1, 8, 8))
    size = draw(st.none() | st.integers(-10, 4 * 64 * 8 + 10) | st.booleans() | st.text(max_size=4))
    content, headers = binary_request(x, datatype, size=size)
    length = int(headers[HEADER])
    if draw(st.booleans()):
        headers = {HEADER: draw(st.integers(-5, len(content) + 5).map(str) | HEADER_TEXT)}
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(content)))
        content = (
            content[:cut] + draw(st.binary(max_size=16)) + content[cut + draw(st.integers(0, 16)) :]
        )
    if draw(st.integers(0, 4)) == 0:
        content = content[:length] + draw(st.binary(max_size=600))
    return content, headers


@settings(FUZZ, max_examples=300)
@given(request=mutated_binary_requests())
@pytest.mark.slow
def test_fuzz_binary_bodies(server, request):
    content, headers = request
    before = server.state()
    response = server.send("POST", URL + "/infer", content, {**auth("alice"), **headers})
    check(server, response, before)
    assert server.quotas.reservations() == 0
