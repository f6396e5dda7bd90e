"""mirage as a defended gateway in front of an upstream OIP V2 server (docs/design.md §gateway).

The upstream is MLServer 1.7.1, a real third-party server, run from its own venv
(tests/serve/third_party/mlserver-requirements.txt, installed by scripts/bootstrap.sh) with a
numpy softmax-linear runtime whose weights the test writes, so the expected probabilities are
computed here in numpy. MLServer 1.7.1 does not implement the binary tensor data extension, so
binary requests upstream are checked against mirage's own server (tested with tritonclient) and
a scripted numpy endpoint; the scripted endpoint also produces the failures (slow, garbage, 5xx,
4xx) a real server will not produce on demand. Every network wait is bounded (≤ 2 s per call).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import INPUT_SHAPE, KEYS, ServerProcess, auth, body, make_config
from upstreams import FakeUpstream, MLServerProcess, mlserver_executable

from mirage.api import InProcessAPI
from mirage.defenses import create_defense
from mirage.models import load_checkpoint
from mirage.serve.app import create_app
from mirage.serve.client import HTTPPredictionAPI
from mirage.serve.config import ModelConfig, ServeConfig
from mirage.serve.gateway import LOG_FLOOR, UpstreamModel
from mirage.serve.runner import ServerThread

HEADER = "Inference-Header-Content-Length"
D, K = int(np.prod(INPUT_SHAPE)), 10


def mlserver() -> Path:
    executable = mlserver_executable()
    if executable is None:
        if os.environ.get("MIRAGE_REQUIRE_MLSERVER") == "1":
            pytest.fail(
                "MLServer's venv is missing but MIRAGE_REQUIRE_MLSERVER=1 "
                "(run scripts/bootstrap.sh)"
            )
        pytest.skip(
            "MLServer's venv (.venv-mlserver, or $MIRAGE_MLSERVER_VENV) is missing: "
            "scripts/bootstrap.sh installs it"
        )
    return executable


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "w.npy"
    w = np.random.default_rng(7).normal(scale=0.4, size=(D, K))
    np.save(path, w)
    return path, w


def linear_models(weights_path) -> dict:
    return {
        "linear": ("runtimes.Linear", {"uri": str(weights_path), "version": "1"}),
        "linear-logits": (
            "runtimes.Linear",
            {"uri": str(weights_path), "extra": {"output": "logits"}},
        ),
    }


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, weights):
    server = MLServerProcess(
        mlserver(), tmp_path_factory.mktemp("mlserver"), linear_models(weights[0])
    ).start()
    yield server
    server.kill()


def expected(x: torch.Tensor, w: np.ndarray) -> np.ndarray:
    z = x.double().numpy().reshape(len(x), -1) @ w
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def gateway(tmp_path, checkpoints, upstream: dict, **kwargs) -> ServeConfig:
    """make_config with ``[model] upstream = …``, validated as a whole file would be."""
    raw = make_config(tmp_path, checkpoints, **kwargs).model_dump(mode="json")
    raw["model"] = {
        "name": "digits",
        "upstream": {
            "input_name": "images",
            "input_shape": list(INPUT_SHAPE),
            "timeout_s": 2.0,
            **upstream,
        },
    }
    return ServeConfig.model_validate(raw)


def used(url: str, client: str = "alice") -> int:
    meta = httpx.get(f"{url}/v2/models/digits", headers=auth(client), timeout=5).json()
    return meta["parameters"]["client"]["queries_used"]


def infer(url: str, x: torch.Tensor, client: str = "alice", **kwargs) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/models/digits/infer", json=body(x), headers=auth(client), timeout=10, **kwargs
    )


# -- against MLServer ----------------------------------------------------------------------------


@pytest.mark.slow
def test_gateway_serves_the_upstreams_probabilities(tmp_path, checkpoints, upstream, weights):
    """The real server (a subprocess) in front of MLServer: the answers are MLServer's
    probabilities (JSON and binary to mirage's client), K read from one probe at start, an
    honest platform, the upstream's version path, and each query charged once."""
    config = gateway(
        tmp_path, checkpoints, {"url": upstream.url, "model": "linear", "version": "1"}
    )
    server = ServerProcess(config, tmp_path).start()
    try:
        x = torch.rand(40, *INPUT_SHAPE)
        with HTTPPredictionAPI(server.url, "digits", KEYS["alice"], batch_size=16) as api:
            assert (api.num_classes, api.input_shape) == (K, INPUT_SHAPE)
            assert api.metadata()["platform"] == "mirage_gateway"
            served = api.query(x)
        np.testing.assert_allclose(served.numpy(), expected(x, weights[1]), rtol=0, atol=1e-6)
        raw = np.ascontiguousarray(x[:8].numpy(), dtype="<f4").tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": [8, *INPUT_SHAPE],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        response = httpx.post(
            f"{server.url}/v2/models/digits/infer",
            content=header + raw,
            timeout=10,
            headers={**auth("alice"), HEADER: str(len(header))},
        )
        assert response.status_code == 200, response.text
        length = int(response.headers[HEADER])
        binary = np.frombuffer(response.content[length:], "<f4").reshape(8, K)
        np.testing.assert_allclose(binary, expected(x[:8], weights[1]), rtol=0, atol=1e-6)
        assert used(server.url) == 48
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).json() == {"ready": True}
    finally:
        server.kill()


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "reverse_sigmoid", "params": {"beta": 0.3}},
        {"name": "top_k", "params": {"k": 3}},
        "grad2",
    ],
)
def test_a_defense_on_top_equals_it_in_process_on_the_upstreams_probabilities(
    tmp_path, checkpoints, upstream, weights, spec
):
    """A defense on the gateway answers what the same defense does in process to MLServer's
    probabilities; GRAD² takes its gradients from a surrogate checkpoint."""
    if spec == "grad2":
        spec = {
            "name": "grad2",
            "params": {"epsilon": 0.5, "target": "all-ones"},
            "surrogate": str(checkpoints["surrogate"]),
        }
        params = {
            "epsilon": 0.5,
            "target": "all-ones",
            "surrogate": load_checkpoint(checkpoints["surrogate"])[0],
        }
    else:
        params = spec["params"]
    config = gateway(
        tmp_path,
        checkpoints,
        {"url": upstream.url, "model": "linear", "num_classes": K},
        defense=spec,
    )
    x = torch.rand(24, *INPUT_SHAPE)
    local = create_defense(spec["name"], **params)
    want = local(x, torch.from_numpy(expected(x, weights[1])).float())
    with (
        ServerThread(create_app(config)) as url,
        HTTPPredictionAPI(url, "digits", KEYS["alice"]) as api,
    ):
        served = api.query(x)
    torch.testing.assert_close(served, want, rtol=0, atol=2e-5)
    assert not torch.allclose(served, torch.from_numpy(expected(x, weights[1])).float(), atol=1e-3)


def test_logits_upstream_and_a_wrong_declaration(tmp_path, checkpoints, upstream, weights):
    """``output = "logits"`` softmaxes MLServer's logits; declaring probabilities for an
    upstream that answers logits is a 502 that says so, and charges nothing."""
    x = torch.rand(6, *INPUT_SHAPE)
    config = gateway(
        tmp_path, checkpoints, {"url": upstream.url, "model": "linear-logits", "output": "logits"}
    )
    with ServerThread(create_app(config)) as url:
        response = infer(url, x)
        assert response.status_code == 200, response.text
        served = np.asarray(response.json()["outputs"][0]["data"]).reshape(6, K)
        np.testing.assert_allclose(served, expected(x, weights[1]), rtol=0, atol=1e-6)
    wrong = gateway(
        tmp_path / "wrong",
        checkpoints,
        {"url": upstream.url, "model": "linear-logits", "num_classes": K},
    )
    (tmp_path / "wrong").mkdir()
    with ServerThread(create_app(wrong)) as url:
        response = infer(url, x)
        assert response.status_code == 502
        assert response.json()["reason"] == "upstream_invalid_answer"
        assert "not a probability vector" in response.json()["error"]
        assert (
            "output = 'logits'" in response.json()["error"]
            and "not charged" in response.json()["error"]
        )
        assert used(url) == 0


def test_mlserver_refuses_binary_tensor_data_and_the_gateway_says_502(
    tmp_path, checkpoints, upstream
):
    """MLServer 1.7.1 does not implement the binary tensor data extension: it answers 500, which
    the gateway retries and then maps to 502 ``upstream_error``, charging nothing."""
    config = gateway(
        tmp_path,
        checkpoints,
        {"url": upstream.url, "model": "linear", "num_classes": K, "binary": True, "retries": 1},
    )
    with ServerThread(create_app(config)) as url:
        response = infer(url, torch.rand(2, *INPUT_SHAPE))
        assert (response.status_code, response.json()["reason"]) == (502, "upstream_error")
        assert (
            "HTTP 500" in response.json()["error"]
            and "after 2 attempts" in response.json()["error"]
        )
        assert used(url) == 0


@pytest.mark.slow
def test_upstream_killed_is_a_quick_502_charges_nothing_and_readiness_follows(
    tmp_path, checkpoints, weights
):
    upstream = MLServerProcess(mlserver(), tmp_path / "mlserver", linear_models(weights[0])).start()
    config = gateway(
        tmp_path,
        checkpoints,
        {
            "url": upstream.url,
            "model": "linear",
            "num_classes": K,
            "timeout_s": 1.0,
            "retries": 2,
            "ready_cache_s": 0.2,
        },
    )
    server = ServerProcess(config, tmp_path).start()
    try:
        x = torch.rand(4, *INPUT_SHAPE)
        assert infer(server.url, x).status_code == 200
        upstream.kill()
        start = time.monotonic()
        response = infer(server.url, x)
        assert time.monotonic() - start < 3.0
        assert (response.status_code, response.json()["reason"]) == (502, "upstream_unreachable"), (
            response.text
        )
        assert "after 3 attempts" in response.json()["error"]
        assert used(server.url) == 4
        time.sleep(0.3)  # past ready_cache_s
        for path in ("/v2/health/ready", "/v2/models/digits/ready"):
            ready = httpx.get(server.url + path, timeout=5)
            assert (ready.status_code, ready.json()["reason"]) == (503, "not_ready"), path
        assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200
        upstream.start()  # the same port: readiness and answers come back
        time.sleep(0.3)
        assert httpx.get(server.url + "/v2/health/ready", timeout=5).json() == {"ready": True}
        response = infer(server.url, x)
        assert response.status_code == 200
        np.testing.assert_allclose(
            np.asarray(response.json()["outputs"][0]["data"]).reshape(4, K),
            expected(x, weights[1]),
            rtol=0,
            atol=1e-6,
        )
        assert used(server.url) == 8
    finally:
        server.kill()
        upstream.kill()


# -- binary tensor data upstream -----------------------------------------------------------------


def numpy_linear(w: np.ndarray, *, answer_binary: bool | None = None):
    """A Triton-like endpoint in numpy: binary or JSON requests; answers binary when asked (or
    as ``answer_binary`` forces)."""

    def answer(request: dict) -> tuple[int, dict, bytes]:
        content, length = request["body"], request["headers"].get(HEADER)
        header = json.loads(content[: int(length)] if length else content)
        tensor = header["inputs"][0]
        if "binary_data_size" in tensor.get("parameters", {}):
            x = np.frombuffer(content[int(length) :], "<f4").reshape(tensor["shape"])
        else:
            x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        p = expected(torch.from_numpy(x.copy()), w).astype("<f4")
        binary = (
            header.get("parameters", {}).get("binary_data_output", False)
            if answer_binary is None
            else answer_binary
        )
        output = {"name": "probs", "shape": list(p.shape), "datatype": "FP32"}
        if not binary:
            output["data"] = p.reshape(-1).tolist()
            return (
                200,
                {"Content-Type": "application/json"},
                json.dumps({"outputs": [output]}).encode(),
            )
        output["parameters"] = {"binary_data_size": p.nbytes}
        head = json.dumps({"model_name": "linear", "outputs": [output]}).encode()
        return (
            200,
            {HEADER: str(len(head)), "Content-Type": "application/octet-stream"},
            head + p.tobytes(),
        )

    return answer


@pytest.mark.parametrize("answer_binary", [None, False])
def test_binary_tensor_data_upstream(tmp_path, checkpoints, weights, answer_binary):
    """With ``binary = true`` the gateway sends FP32 binary tensor data and asks for a binary
    answer; it reads a binary or a JSON answer alike."""
    fake = FakeUpstream(numpy_linear(weights[1], answer_binary=answer_binary)).start()
    try:
        config = gateway(
            tmp_path,
            checkpoints,
            {"url": fake.url, "model": "linear", "num_classes": K, "binary": True},
        )
        x = torch.rand(9, *INPUT_SHAPE)
        with ServerThread(create_app(config)) as url:
            response = infer(url, x)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(
            np.asarray(response.json()["outputs"][0]["data"]).reshape(9, K),
            expected(x, weights[1]),
            rtol=0,
            atol=1e-6,
        )
        (request,) = fake.requests
        header = json.loads(request["body"][: int(request["headers"][HEADER])])
        assert header["inputs"][0]["parameters"] == {"binary_data_size": 9 * D * 4}
        assert (
            header["parameters"] == {"binary_data_output": True}
            and "data" not in header["inputs"][0]
        )
    finally:
        fake.stop()


def test_a_mirage_server_as_the_upstream_with_a_token_from_the_environment(
    tmp_path, checkpoints, monkeypatch
):
    """mirage's own server (binary tensor data both ways, tested with tritonclient) as the
    upstream: the API key comes from the environment variable ``headers_env`` names."""
    victim = load_checkpoint(checkpoints["victim"])[0]
    (tmp_path / "upstream").mkdir()
    inner = make_config(tmp_path / "upstream", checkpoints)
    monkeypatch.setenv("MIRAGE_TEST_UPSTREAM_AUTH", f"Bearer {KEYS['bob']}")
    x = torch.rand(12, *INPUT_SHAPE)
    with ServerThread(create_app(inner)) as upstream_url:
        config = gateway(
            tmp_path,
            checkpoints,
            {
                "url": upstream_url,
                "model": "digits",
                "version": "1",
                "binary": True,
                "output_name": "probabilities",
                "headers_env": {"Authorization": "MIRAGE_TEST_UPSTREAM_AUTH"},
            },
        )
        with ServerThread(create_app(config)) as url:
            assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
            response = infer(url, x)
            assert response.status_code == 200, response.text
            assert used(url) == 12
        assert (
            used(upstream_url, "bob") == 12 + 1
        )  # the gateway's probe for K at start, then the queries
    served = np.asarray(response.json()["outputs"][0]["data"]).reshape(12, K)
    np.testing.assert_allclose(served, InProcessAPI(victim).query(x).numpy(), rtol=0, atol=1e-5)
    monkeypatch.delenv("MIRAGE_TEST_UPSTREAM_AUTH")
    with pytest.raises(ValueError, match="MIRAGE_TEST_UPSTREAM_AUTH"):
        create_app(config)


# -- failures the upstream is scripted to produce -----------------------------------------------


def probs_json(rows: np.ndarray, **output) -> tuple[int, dict, bytes]:
    tensor = {
        "name": "probs",
        "shape": list(rows.shape),
        "datatype": "FP32",
        "data": rows.reshape(-1).tolist(),
        **output,
    }
    return 200, {"Content-Type": "application/json"}, json.dumps({"outputs": [tensor]}).encode()


def uniform(n: int, k: int = K) -> np.ndarray:
    return np.full((n, k), 1 / k)


def nan_binary(n: int) -> tuple[int, dict, bytes]:
    p = uniform(n).astype("<f4")
    p[0, 0] = np.nan
    head = json.dumps(
        {
            "outputs": [
                {
                    "name": "probs",
                    "shape": [n, K],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": p.nbytes},
                }
            ]
        }
    ).encode()
    return 200, {HEADER: str(len(head))}, head + p.tobytes()


def bad_binary_size(n: int) -> tuple[int, dict, bytes]:
    head = json.dumps(
        {
            "outputs": [
                {
                    "name": "probs",
                    "shape": [n, K],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 4},
                }
            ]
        }
    ).encode()
    return 200, {HEADER: str(len(head))}, head + b"\0" * 4


GARBAGE = {  # name: (answer for n images, what the 502 says)
    "not json": (lambda n: (200, {}, b"{oops"), "not valid JSON"),
    "no outputs": (lambda n: (200, {}, b'{"model_name": "linear"}'), "no 'outputs'"),
    "wrong batch": (lambda n: probs_json(uniform(n + 1)), "shape"),
    "wrong classes": (lambda n: probs_json(uniform(n, K - 1)), "shape"),
    "flat shape": (lambda n: probs_json(uniform(n), shape=[n * K]), "not [B, K]"),
    "nan": (nan_binary, "NaN"),
    "json nan": (
        lambda n: (
            200,
            {},
            json.dumps(
                {
                    "outputs": [
                        {
                            "name": "p",
                            "shape": [n, K],
                            "datatype": "FP64",
                            "data": [float("nan")] * (n * K),
                        }
                    ]
                }
            ).encode(),
        ),
        "NaN",
    ),
    "unnormalised": (lambda n: probs_json(2 * uniform(n)), "not a probability vector"),
    "negative": (
        lambda n: probs_json(uniform(n) + 0.15 * np.where(np.arange(K) % 2, 1, -1)),
        "not a probability vector",
    ),
    "integers": (lambda n: probs_json(np.zeros((n, K), int), datatype="INT64"), "datatype"),
    "strings": (lambda n: probs_json(uniform(n), data=["a"] * (n * K)), "not a list of numbers"),
    "two outputs": (
        lambda n: (
            200,
            {},
            json.dumps(
                {
                    "outputs": [
                        {"name": "a", "shape": [n, K], "datatype": "FP32", "data": [0.1] * (n * K)},
                        {"name": "b", "shape": [n, K], "datatype": "FP32", "data": [0.1] * (n * K)},
                    ]
                }
            ).encode(),
        ),
        "output_name",
    ),
    "short binary": (lambda n: (200, {HEADER: "10"}, b'{"outputs"'), "not valid JSON"),
    "bad binary size": (lambda n: bad_binary_size(n), "binary tensor data"),
}


@pytest.fixture
def scripted(tmp_path, checkpoints):
    """A scripted upstream and a gateway in front of it (retries 2, backoff 10 ms, timeout
    0.5 s)."""
    state = {"answer": lambda request: probs_json(uniform(1))}
    fake = FakeUpstream(lambda request: state["answer"](request)).start()
    config = gateway(
        tmp_path,
        checkpoints,
        {
            "url": fake.url,
            "model": "linear",
            "num_classes": K,
            "retries": 2,
            "backoff_s": 0.01,
            "timeout_s": 0.5,
            "ready_cache_s": 0,
        },
    )
    thread = ServerThread(create_app(config))
    url = thread.start()
    yield fake, state, url
    thread.stop()
    fake.stop()


@pytest.mark.slow
def test_garbage_from_the_upstream_is_a_502_that_says_what_and_charges_nothing(scripted):
    fake, state, url = scripted
    x = torch.rand(3, *INPUT_SHAPE)
    for name, (make, says) in GARBAGE.items():
        state["answer"] = lambda request, make=make: make(3)
        before = fake.count()
        response = infer(url, x)
        assert response.status_code == 502, (name, response.text)
        assert response.json()["reason"] == "upstream_invalid_answer", name
        assert says in response.json()["error"] and "not charged" in response.json()["error"], (
            name,
            response.text,
        )
        assert fake.count() == before + 1, f"{name}: a 200 answer is never retried"
    assert used(url) == 0
    state["answer"] = lambda request: probs_json(uniform(3))
    assert infer(url, x).status_code == 200 and used(url) == 3


def test_retries_on_5xx_never_on_4xx(scripted, caplog):
    """5xx: retried, then 502; 4xx: 502 at once. What the upstream's error body says goes to the
    log, never to the gateway's client (an upstream's 500 may be a traceback)."""
    fake, state, url = scripted
    x = torch.rand(2, *INPUT_SHAPE)
    state["answer"] = lambda request: (503, {}, b"overloaded")
    response = infer(url, x)
    assert (response.status_code, response.json()["reason"]) == (502, "upstream_error")
    assert "HTTP 503" in response.json()["error"] and fake.count() == 3  # 1 + 2 retries
    assert "overloaded" not in response.text and "overloaded" in caplog.text
    state["answer"] = lambda request: (400, {}, b'{"error": "unknown input"}')
    response = infer(url, x)
    assert (response.status_code, response.json()["reason"]) == (502, "upstream_error")
    assert "HTTP 400" in response.json()["error"] and "unknown input" not in response.text
    assert "unknown input" in caplog.text and fake.url not in response.text
    assert fake.count() == 4  # never retried
    assert used(url) == 0
    flaky = iter([(500, {}, b"")])
    state["answer"] = lambda request: next(flaky, None) or probs_json(uniform(2))
    response = infer(url, x)
    assert (
        response.status_code == 200 and fake.count() == 6 and used(url) == 2
    )  # one retry, charged once


@pytest.mark.slow
def test_a_slow_upstream_is_a_504(scripted):
    fake, state, url = scripted

    def slow(request):
        time.sleep(1.5)
        return probs_json(uniform(2))

    state["answer"] = slow
    start = time.monotonic()
    response = infer(url, torch.rand(2, *INPUT_SHAPE))
    elapsed = time.monotonic() - start
    assert (response.status_code, response.json()["reason"]) == (504, "upstream_timeout"), (
        response.text
    )
    assert (
        "within 0.5s" in response.json()["error"] and "after 3 attempts" in response.json()["error"]
    )
    assert 1.5 <= elapsed < 3.0 and fake.count() == 3
    assert used(url) == 0


def test_readiness_follows_the_upstreams(scripted):
    fake, _, url = scripted
    assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
    fake.ready = False
    response = httpx.get(f"{url}/v2/models/digits/ready", timeout=5)
    assert (response.status_code, response.json()["reason"]) == (503, "not_ready")
    assert "HTTP 400" in response.json()["error"] and fake.url not in response.json()["error"]
    fake.ready = True
    assert httpx.get(f"{url}/v2/models/digits/ready", headers=auth("alice"), timeout=5).json() == {
        "name": "digits",
        "ready": True,
    }


# -- the model and the config -------------------------------------------------------------------


def test_probabilities_become_finite_logits_that_softmax_back(checkpoints):
    """log of the upstream's probabilities, a zero clamped at the smallest normal float32: the
    batcher's softmax gives the probabilities back, no −∞ anywhere."""
    p = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    fake = FakeUpstream(
        lambda request: probs_json(p[: json.loads(request["body"])["inputs"][0]["shape"][0]])
    ).start()
    try:
        from mirage.serve.config import UpstreamConfig

        model = UpstreamModel(
            UpstreamConfig(
                url=fake.url,
                model="m",
                input_name="x",
                input_shape=(1, 2, 2),
                retries=0,
                timeout_s=1,
            )
        )
        logits = model(torch.rand(2, 1, 2, 2))
        assert model.num_classes == 3 and logits.dtype == torch.float32
        assert torch.isfinite(logits).all() and logits.min() == pytest.approx(LOG_FLOOR)
        torch.testing.assert_close(
            torch.softmax(logits, 1), torch.from_numpy(p).float(), rtol=0, atol=1e-7
        )
        assert list(model.parameters()) == [] and model.card().training["format"] == "upstream"
        model.close()
    finally:
        fake.stop()


@pytest.mark.parametrize(
    "upstream, message",
    [
        ({"url": "http://user:secret@127.0.0.1:1"}, "must not carry credentials"),
        ({"url": "127.0.0.1:8080"}, "http"),
        ({"headers_env": {"Authorization": "Bearer abc"}}, "must name an environment variable"),
        ({"headers_env": {"Content-Type": "X"}}, "sets Content-Type itself"),
        ({"output": "scores"}, "output"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"retries": -1}, "retries"),
        ({"input_shape": [1, 8]}, "input_shape"),
        ({"token": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_the_upstream_table_says_what_is_wrong(upstream, message):
    table = {
        "url": "http://127.0.0.1:1",
        "model": "m",
        "input_name": "x",
        "input_shape": [1, 8, 8],
        **upstream,
    }
    with pytest.raises(ValueError, match=message):
        ModelConfig.model_validate({"name": "m", "upstream": table})


def test_a_gateway_has_no_scenario_and_takes_one_source(tmp_path, checkpoints):
    table = {"url": "http://127.0.0.1:1", "model": "m", "num_classes": K}
    with pytest.raises(ValueError, match="exactly one of"):
        ModelConfig.model_validate(
            {
                "name": "m",
                "checkpoint": "dir",
                "upstream": {**table, "input_name": "x", "input_shape": [1, 8, 8]},
            }
        )
    with pytest.raises(ValueError, match="needs model.scenario"):
        gateway(
            tmp_path,
            checkpoints,
            table,
            defense={"name": "grad2", "params": {"epsilon": 0.5}, "surrogate": "distilled"},
        )


def test_an_unreachable_upstream_without_num_classes_cannot_start(tmp_path, checkpoints):
    from upstreams import free_port

    config = gateway(
        tmp_path,
        checkpoints,
        {"url": f"http://127.0.0.1:{free_port()}", "model": "m", "retries": 0},
    )
    with pytest.raises(ValueError, match="give model.upstream.num_classes"):
        create_app(config)
    config = gateway(
        tmp_path,
        checkpoints,
        {"url": f"http://127.0.0.1:{free_port()}", "model": "m", "retries": 0, "num_classes": K},
    )
    with ServerThread(create_app(config)) as url:  # it starts, live but not ready
        assert httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
        assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 503


def test_a_huge_upstream_answer_is_refused_as_it_streams(scripted):
    """100 MB where the shape allows a few KB: a 502 that charges nothing, without buffering it
    (declared, or streamed without a length)."""
    _fake, state, url = scripted

    def endless(wfile):
        block = b" " * 65536
        try:
            for _ in range(1600):  # 100 MB
                wfile.write(block)
        except OSError:
            pass  # the gateway hung up

    for headers in ({"Content-Length": str(100 * 2**20)}, {"Connection": "close"}):
        state["answer"] = lambda request, headers=headers: (200, headers, endless)
        start = time.monotonic()
        response = infer(url, torch.rand(2, *INPUT_SHAPE))
        assert (response.status_code, response.json()["reason"]) == (
            502,
            "upstream_invalid_answer",
        ), response.text
        assert "exceeds" in response.json()["error"] and time.monotonic() - start < 5
    assert used(url) == 0


@pytest.mark.slow
def test_a_dripping_upstream_is_cut_at_the_deadline(tmp_path, checkpoints):
    """An answer dripping one byte every 50 ms never trips a between-bytes timeout; the attempt's
    own deadline (timeout_s) and the call's (deadline_s) cut it."""
    answer = probs_json(uniform(1))[2]

    def drip(wfile):
        try:
            for byte in answer:
                wfile.write(bytes([byte]))
                wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    fake = FakeUpstream(lambda request: (200, {"Content-Length": str(len(answer))}, drip)).start()
    config = gateway(
        tmp_path,
        checkpoints,
        {
            "url": fake.url,
            "model": "linear",
            "num_classes": K,
            "retries": 2,
            "backoff_s": 0.01,
            "timeout_s": 0.5,
            "deadline_s": 1.2,
        },
    )
    try:
        with ServerThread(create_app(config)) as url:
            start = time.monotonic()
            response = infer(url, torch.rand(1, *INPUT_SHAPE))
            seconds = time.monotonic() - start
            assert (response.status_code, response.json()["reason"]) == (504, "upstream_timeout"), (
                response.text
            )
            assert 1.0 <= seconds < 2.0, seconds
            assert used(url) == 0
    finally:
        fake.stop()


def test_the_upstreams_answer_is_never_quoted_to_clients(scripted, caplog):
    _fake, state, url = scripted
    secret = b"<html>internal error at db-7.corp:5432 password=hunter2</html>"
    for answer in (
        (200, {}, secret),
        (
            200,
            {"Content-Type": "application/json"},
            json.dumps(
                {
                    "outputs": [
                        {"name": "hunter2", "shape": "hunter2", "datatype": "FP32", "data": []}
                    ]
                }
            ).encode(),
        ),
    ):
        state["answer"] = lambda request, answer=answer: answer
        response = infer(url, torch.rand(1, *INPUT_SHAPE))
        assert response.status_code == 502 and "hunter2" not in response.text, response.text
    assert "hunter2" in caplog.text  # the operator's log keeps it
