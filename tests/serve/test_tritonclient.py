"""Triton's own Python client, ``tritonclient.http``, unmodified, against the real server (uvicorn
on 127.0.0.1): health, server and model metadata, readiness, inference with JSON and with binary
tensor data both ways, the ``versions/{v}`` paths, requested outputs, API keys as headers or as a
client plugin, and quotas (docs/design.md §oip, §quotas). tritonclient sends binary inputs and
asks for binary outputs by default, so its defaults are what most of these tests exercise."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from conftest import KEYS, auth, grad2_defense, make_config
from tritonclient.utils import InferenceServerException

import mirage
from mirage.api import InProcessAPI
from mirage.defenses import create_defense
from mirage.models import load_checkpoint
from mirage.serve.app import create_app
from mirage.serve.runner import ServerThread


class BearerToken(triton.InferenceServerClientPlugin):
    """tritonclient's plugin interface: adds the API key to every request the client sends."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, request) -> None:
        request.headers["Authorization"] = f"Bearer {self.key}"


@pytest.fixture(scope="module")
def served(tmp_path_factory, checkpoints):
    """(client, app, host:port) for a server of the undefended victim; clients alice (a large
    quota) and dave (3 queries)."""
    config = make_config(
        tmp_path_factory.mktemp("triton"),
        checkpoints,
        clients=[{"name": "alice", "quota": 10**6}, {"name": "dave", "quota": 3}],
        access={"auth_failures": 10**6},
    )
    app = create_app(config)
    with ServerThread(app) as url:
        address = url.removeprefix("http://")
        client = triton.InferenceServerClient(address, network_timeout=60)
        yield client, app, address
        client.close()


@pytest.fixture(scope="module")
def victim(checkpoints):
    return load_checkpoint(checkpoints["victim"])[0]


def images(n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8)).astype(dtype)


def infer_input(x: np.ndarray, *, binary: bool = True) -> triton.InferInput:
    datatype = {np.float16: "FP16", np.float32: "FP32", np.float64: "FP64"}[x.dtype.type]
    tensor = triton.InferInput("images", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def expected(victim, x: np.ndarray, defense=None) -> np.ndarray:
    return InProcessAPI(victim, defense).query(torch.from_numpy(x.astype(np.float32))).numpy()


def status(error: pytest.ExceptionInfo) -> str:
    return error.value.status()


def test_health_and_metadata(served):
    client, _, _ = served
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")  # no key: the server's readiness
    assert client.is_model_ready("digits", headers=auth("alice"))
    assert client.is_model_ready("digits", "1", headers=auth("alice"))
    assert not client.is_model_ready("digits", "2", headers=auth("alice"))
    assert not client.is_model_ready("other", headers=auth("alice"))
    server = client.get_server_metadata(headers=auth("alice"))
    assert server["name"] == "mirage" and server["version"] == mirage.__version__
    assert "binary_tensor_data" in server["extensions"]
    with pytest.raises(InferenceServerException) as missing:
        client.get_server_metadata()
    assert status(missing) == "401"
    meta = client.get_model_metadata("digits", headers=auth("alice"))
    assert meta["platform"] == "pytorch" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("digits", "1", headers=auth("alice")) == meta
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("digits", "2", headers=auth("alice"))
    assert status(unknown) == "404" and "no version '2'" in unknown.value.message()


@pytest.mark.parametrize("version", ["", "1"], ids=["plain-path", "versioned-path"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize(
    "binary_out", [True, False, None], ids=["binary-out", "json-out", "default-out"]
)
def test_infer_matches_in_process(served, victim, binary_in, binary_out, version):
    """Every combination of path (plain, /versions/1), body (JSON, binary) and output (JSON,
    binary, the client's default)."""
    client, _, _ = served
    x = images(5, seed=1)
    outputs = (
        None
        if binary_out is None
        else [triton.InferRequestedOutput("probabilities", binary_data=binary_out)]
    )
    result = client.infer(
        "digits",
        [infer_input(x, binary=binary_in)],
        outputs=outputs,
        request_id="req-1",
        model_version=version,
        headers=auth("alice"),
    )
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected(victim, x), rtol=0, atol=1e-6
    )
    response = result.get_response()
    assert (
        response["id"] == "req-1"
        and response["model_name"] == "digits"
        and response["model_version"] == "1"
    )
    (output,) = response["outputs"]
    sent_binary = binary_out is not False  # no outputs: tritonclient asks binary_data_output = true
    assert ("binary_data_size" in output.get("parameters", {})) == sent_binary
    assert ("data" in output) == (not sent_binary)
    assert result.get_output("probabilities")["shape"] == [5, 10]


def test_a_headers_dict_reused_after_a_binary_call_gets_a_400_that_says_why(served):
    """tritonclient writes Inference-Header-Content-Length into the headers dict it is given; a
    caller who passes the same dict to a later JSON call sends that stale length. The body is then
    framed wrongly (Triton refuses it too), and the 400 says what to do."""
    client, _, _ = served
    headers = auth("alice")
    client.infer("digits", [infer_input(images(2), binary=True)], headers=headers)
    assert "Inference-Header-Content-Length" in headers  # the client's side effect
    with pytest.raises(InferenceServerException) as stale:
        client.infer(
            "digits", [infer_input(images(2), binary=False)], model_version="1", headers=headers
        )
    assert status(stale) == "400" and "stale" in stale.value.message()


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_datatypes(served, victim, dtype):
    client, _, _ = served
    x = images(3, seed=2, dtype=dtype)
    result = client.infer("digits", [infer_input(x)], headers=auth("alice"))
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected(victim, x), rtol=0, atol=1e-6
    )


def test_versions_path_and_requested_outputs(served, victim):
    client, _, _ = served
    x = images(2, seed=3)
    result = client.infer("digits", [infer_input(x)], model_version="1", headers=auth("alice"))
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected(victim, x), rtol=0, atol=1e-6
    )
    with pytest.raises(InferenceServerException) as version:
        client.infer("digits", [infer_input(x)], model_version="3", headers=auth("alice"))
    assert status(version) == "404"
    with pytest.raises(InferenceServerException) as output:
        client.infer(
            "digits",
            [infer_input(x)],
            outputs=[triton.InferRequestedOutput("logits")],
            headers=auth("alice"),
        )
    assert status(output) == "400" and "unknown output 'logits'" in output.value.message()
    with pytest.raises(InferenceServerException) as model:
        client.infer("other", [infer_input(x)], headers=auth("alice"))
    assert status(model) == "404"
    with pytest.raises(InferenceServerException) as shape:
        client.infer("digits", [infer_input(images(2)[:, :, :7, :])], headers=auth("alice"))
    assert status(shape) == "400"
    with pytest.raises(InferenceServerException) as compressed:
        client.infer(
            "digits", [infer_input(x)], request_compression_algorithm="gzip", headers=auth("alice")
        )
    assert status(compressed) == "400" and "uncompressed" in compressed.value.message()
    accepts_gzip = client.infer(
        "digits", [infer_input(x)], response_compression_algorithm="gzip", headers=auth("alice")
    )  # answered uncompressed, which the client reads
    np.testing.assert_allclose(
        accepts_gzip.as_numpy("probabilities"), expected(victim, x), rtol=0, atol=1e-6
    )


def test_custom_parameters_pass(served, victim):
    client, _, _ = served
    x = images(1, seed=4)
    result = client.infer(
        "digits",
        [infer_input(x)],
        parameters={"tenant": "blue", "trace": True},
        priority=2,
        timeout=10_000,
        headers=auth("alice"),
    )
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), expected(victim, x), rtol=0, atol=1e-6
    )


def test_api_keys(served):
    client, app, address = served
    x = images(2, seed=5)
    for headers, code in [
        (None, "401"),
        ({"Authorization": "Bearer wrong"}, "401"),
        ({"X-API-Key": "nope"}, "401"),
    ]:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("digits", [infer_input(x)], headers=headers)
        assert status(refused) == code
    assert client.infer("digits", [infer_input(x)], headers={"X-API-Key": KEYS["alice"]}).as_numpy(
        "probabilities"
    ).shape == (2, 10)
    with_plugin = triton.InferenceServerClient(address)  # a client whose plugin carries the key
    with_plugin.register_plugin(BearerToken(KEYS["alice"]))
    try:
        assert with_plugin.infer("digits", [infer_input(x)]).as_numpy("probabilities").shape == (
            2,
            10,
        )
        assert with_plugin.get_model_metadata("digits")["parameters"]["client"]["name"] == "alice"
    finally:
        with_plugin.close()
    assert app.state.service.quotas.usage()["alice"][0] >= 4


def test_quota_counts_what_tritonclient_sends(served):
    client, app, _ = served
    quotas = app.state.service.quotas
    for n in (1, 2):
        client.infer("digits", [infer_input(images(n))], headers=auth("dave"))
    assert quotas.usage()["dave"] == (3, 2)
    with pytest.raises(InferenceServerException) as over:
        client.infer("digits", [infer_input(images(1))], headers=auth("dave"))
    assert status(over) == "429" and "quota" in over.value.message()
    assert quotas.usage()["dave"] == (3, 2) and quotas.reservations() == 0


def test_grad2_served_through_tritonclient_matches_in_process(tmp_path, checkpoints, victim):
    config = make_config(tmp_path, checkpoints, defense=grad2_defense(checkpoints))
    surrogate, _ = load_checkpoint(checkpoints["surrogate"])
    local = create_defense("grad2", epsilon=0.5, target="all-ones", surrogate=surrogate)
    x = images(16, seed=6)
    with ServerThread(create_app(config)) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            served = client.infer("digits", [infer_input(x)], headers=auth("bob")).as_numpy(
                "probabilities"
            )
        finally:
            client.close()
    np.testing.assert_allclose(served, expected(victim, x, local), rtol=0, atol=1e-6)
    assert np.abs(served - expected(victim, x)).sum(1).max() > 0.1  # the defense is active


def test_the_asyncio_client(served, victim):
    _, _, address = served
    x = images(4, seed=7)

    async def run() -> np.ndarray:
        async with triton_aio.InferenceServerClient(address) as aio:
            assert await aio.is_server_ready()
            assert (await aio.get_server_metadata(headers=auth("alice")))["name"] == "mirage"
            tensor = triton_aio.InferInput("images", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = await aio.infer("digits", [tensor], model_version="1", headers=auth("alice"))
            return result.as_numpy("probabilities")

    np.testing.assert_allclose(asyncio.run(run()), expected(victim, x), rtol=0, atol=1e-6)
