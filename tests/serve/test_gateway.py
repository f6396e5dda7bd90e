"""mirage as a defended gateway in front of an upstream OIP V2 server (docs/design.md §gateway).

The upstream is MLServer 1.7.1, a real third-party server, run from its own venv
(tests/serve/third_party/mlserver-requirements.txt, installed by scripts/bootstrap.sh) with a
numpy softmax-linear runtime whose weights the test writes, so the expected probabilities are
computed here in numpy. MLServer 1.7.1 does not implement the binary tensor data extension, so
binary requests upstream are checked against mirage's own server (tested with tritonclient) and
a scripted numpy endpoint; the scripted endpoint also produces the failures (slow, garbage, 5xx,
4xx) a real server will not produce on demand. A grpc:// upstream is MLServer's gRPC port (its
answers equal those over REST) and a scripted ``grpc.server`` for the failures (UNAVAILABLE,
DEADLINE_EXCEEDED, INVALID_ARGUMENT, a hang, wrong answers). Every network wait is bounded (≤ 2 s
per call).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from conftest import INPUT_SHAPE, KEYS, ServerProcess, auth, body, make_config
from upstreams import FakeGrpcUpstream, FakeUpstream, MLServerProcess, mlserver_executable

from mirage.api import InProcessAPI
from mirage.defenses import create_defense
from mirage.models import load_checkpoint
from mirage.serve.app import create_app
from mirage.serve.client import HTTPPredictionAPI
from mirage.serve.config import ModelConfig, ServeConfig
from mirage.serve.gateway import LOG_FLOOR, UpstreamModel
from mirage.serve.oip import grpc_predict_v2_pb2 as pb
from mirage.serve.runner import ServerThread

HEADER = "Inference-Header-Content-Length"
ROOT = Path(__file__).resolve().parents[2]
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
    tmp_path, checkpoints, upstream, caplog
):
    """MLServer 1.7.1 does not implement the binary tensor data extension: it answers 500, which
    the gateway retries and then maps to a 502 ``upstream_error``, charging nothing. MLServer
    resets the connection its 500 went out on, so the gateway sends no request on it again:
    every attempt of every request gets the 500, none a connection error."""
    config = gateway(
        tmp_path,
        checkpoints,
        {
            "url": upstream.url,
            "model": "linear",
            "num_classes": K,
            "binary": True,
            "retries": 1,
            "backoff_s": 0,  # the retry goes out before MLServer's reset can arrive
        },
    )
    with ServerThread(create_app(config)) as url:
        for _ in range(5):
            response = infer(url, torch.rand(2, *INPUT_SHAPE))
            assert (response.status_code, response.json()["reason"]) == (502, "upstream_error")
            assert "HTTP 500 (after 2 attempts)" in response.json()["error"]
        assert used(url) == 0
    attempts = [r.getMessage() for r in caplog.records if "failed (attempt" in r.getMessage()]
    assert len(attempts) == 10 and all("answered HTTP 500" in a for a in attempts), attempts


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


EXAMPLE = "gateway_in_front_of_your_server.py"


def check_the_gateway_example(stdout: str) -> list[str]:
    """examples/gateway_in_front_of_your_server.py as CI runs it; its printed lines, checked:
    the defended answers differ from the upstream's within GRAD²'s L1 budget of 0.5 and keep
    every top-1 label, bob's request past his quota is a 429, and the gateway is stopped."""
    lines = stdout.splitlines()
    summary = re.search(
        r"^over 200 test images: the defended answer differs on (\d+) "
        r"\(L1 mean ([\d.]+), max ([\d.]+)\); top-1 kept on 200/200;",
        stdout,
        re.MULTILINE,
    )
    assert summary is not None, lines
    differ, mean, largest = int(summary[1]), float(summary[2]), float(summary[3])
    assert differ > 0 and 0 < mean <= largest <= 0.5 + 1e-3, lines
    assert any(
        line.startswith(
            "bob (quota 4 images): 2 requests of 2 answered, the next refused: HTTP 429"
        )
        for line in lines
    ), lines
    assert lines[-1].startswith("servers stopped; done in"), lines
    (gateway_url,) = [
        line.split()[2].rstrip(":") for line in lines if line.startswith("gateway at")
    ]
    with pytest.raises(httpx.ConnectError):
        httpx.get(gateway_url + "/v2/health/live", timeout=2)
    return lines


@pytest.mark.slow
def test_the_gateway_example_runs_as_ci_runs_it(run_example):
    """The example starts MLServer itself (from the venv mlserver() finds) and stops it."""
    mlserver()
    lines = check_the_gateway_example(run_example(EXAMPLE))
    (upstream_url,) = [
        line.removeprefix("your server: MLServer at ").split(",")[0]
        for line in lines
        if line.startswith("your server: MLServer at ")
    ]
    with pytest.raises(httpx.ConnectError):
        httpx.get(upstream_url + "/v2/health/live", timeout=2)


@pytest.mark.slow
def test_the_gateway_example_in_front_of_a_server_already_running(upstream, run_example):
    """--upstream: the example starts no server of its own and leaves the running one up."""
    stdout = run_example(EXAMPLE, "--upstream", upstream.url, "--model", "linear")
    lines = check_the_gateway_example(stdout)
    assert lines[0] == f"your server: {upstream.url}, model 'linear'"
    assert httpx.get(upstream.url + "/v2/health/live", timeout=2).status_code == 200


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


SCRIPTED = {
    "model": "linear",
    "num_classes": K,
    "retries": 2,
    "backoff_s": 0.01,
    "timeout_s": 0.5,
    "ready_cache_s": 0,
}
"""The scripted upstreams' gateway settings: 2 retries 10 ms apart, 0.5 s per attempt, readiness
probed afresh each time."""


@pytest.fixture
def scripted(tmp_path, checkpoints):
    """A scripted upstream and a gateway in front of it (retries 2, backoff 10 ms, timeout
    0.5 s)."""
    state = {"answer": lambda request: probs_json(uniform(1))}
    fake = FakeUpstream(lambda request: state["answer"](request)).start()
    config = gateway(
        tmp_path,
        checkpoints,
        {"url": fake.url, **SCRIPTED},
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
    assert infer(url, x).status_code == 200
    failed, retried, next_one = (request["connection"] for request in fake.requests[-3:])
    # a 5xx's connection is closed (an upstream may reset it: MLServer does); a 200's is kept
    assert retried != failed and next_one == retried


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
        ({"url": "grpcs://127.0.0.1:8081"}, "grpcs:// .* is not supported"),
        ({"url": "grpc://127.0.0.1"}, "grpc://host:port"),
        ({"url": "grpc://127.0.0.1:8081/v2"}, "no path"),
        (
            {"url": "grpc://127.0.0.1:8081", "headers_env": {"grpc-timeout": "T"}},
            "cannot be sent as gRPC metadata",
        ),
        (
            {"url": "grpc://127.0.0.1:8081", "headers_env": {"Token-Bin": "T"}},
            "cannot be sent as gRPC metadata",
        ),
        (
            {"url": "grpc://127.0.0.1:8081", "headers_env": {"TE": "T"}},
            "cannot be sent as gRPC metadata",
        ),
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
        {"url": fake.url, **SCRIPTED, "ready_cache_s": 1.0, "deadline_s": 1.2},
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


# -- a gRPC upstream ----------------------------------------------------------------------------


def test_a_grpc_upstream_answers_what_the_same_upstream_answers_over_rest(
    tmp_path, checkpoints, upstream, weights
):
    """MLServer's gRPC port behind one gateway and its REST port behind another: the same images
    get the same answers (numpy's), K read from one probe at start, the version asked for, and
    readiness from ServerReady and ModelReady; logits over gRPC are softmaxed as over REST."""
    x = torch.rand(20, *INPUT_SHAPE)
    served = {}
    for name, url in (("rest", upstream.url), ("grpc", upstream.grpc_url)):
        (tmp_path / name).mkdir()
        config = gateway(
            tmp_path / name, checkpoints, {"url": url, "model": "linear", "version": "1"}
        )
        with ServerThread(create_app(config)) as gateway_url:
            assert httpx.get(f"{gateway_url}/v2/health/ready", timeout=5).status_code == 200
            response = infer(gateway_url, x)
            assert response.status_code == 200, response.text
            served[name] = np.asarray(response.json()["outputs"][0]["data"]).reshape(20, K)
            assert used(gateway_url) == 20
    np.testing.assert_array_equal(served["grpc"], served["rest"])
    np.testing.assert_allclose(served["grpc"], expected(x, weights[1]), rtol=0, atol=1e-6)
    (tmp_path / "logits").mkdir()
    config = gateway(
        tmp_path / "logits",
        checkpoints,
        {"url": upstream.grpc_url, "model": "linear-logits", "output": "logits"},
    )
    with ServerThread(create_app(config)) as gateway_url:
        response = infer(gateway_url, x[:5])
        assert response.status_code == 200, response.text
        logits = np.asarray(response.json()["outputs"][0]["data"]).reshape(5, K)
    np.testing.assert_allclose(logits, expected(x[:5], weights[1]), rtol=0, atol=1e-6)


def grpc_probs(rows: np.ndarray, form: str = "raw", **output) -> pb.ModelInferResponse:
    """An answer holding ``rows`` as ``raw_output_contents`` (FP32) or typed ``fp32``/``fp64``
    contents; ``output`` overrides the output tensor's fields."""
    datatype = "FP64" if form == "fp64" else "FP32"
    tensor = pb.ModelInferResponse.InferOutputTensor(
        name="probs", datatype=datatype, shape=list(rows.shape)
    )
    response = pb.ModelInferResponse(model_name="linear")
    if form == "fp32":
        tensor.contents.fp32_contents.extend(rows.reshape(-1).tolist())
    elif form == "fp64":
        tensor.contents.fp64_contents.extend(rows.reshape(-1).tolist())
    else:
        response.raw_output_contents.append(rows.astype("<f4").tobytes())
    for key, value in output.items():
        if key == "shape":
            del tensor.shape[:]
            tensor.shape.extend(value)
        else:
            setattr(tensor, key, value)
    response.outputs.append(tensor)
    return response


def grpc_linear(w: np.ndarray, form: str = "raw"):
    """A numpy softmax-linear ModelInfer: raw FP32 images in, ``form`` out."""

    def answer(request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        x = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(request.inputs[0].shape)
        return grpc_probs(expected(torch.from_numpy(x.copy()), w), form)

    return answer


@pytest.fixture
def grpc_scripted(tmp_path, checkpoints):
    """A scripted gRPC upstream and ``start(**upstream)``, which starts a gateway in front of it
    (retries 2, backoff 10 ms, timeout 0.5 s, no readiness cache, unless overridden) and returns
    its URL."""
    state = {"answer": lambda request, context: grpc_probs(uniform(1))}
    fake = FakeGrpcUpstream(lambda request, context: state["answer"](request, context)).start()
    threads = []

    def start(**upstream) -> str:
        config = gateway(
            tmp_path,
            checkpoints,
            {"url": fake.url, **SCRIPTED, **upstream},
        )
        threads.append(ServerThread(create_app(config)))
        return threads[-1].start()

    yield fake, state, start
    for thread in threads:
        thread.stop()
    fake.stop()


@pytest.mark.parametrize("form", ["raw", "fp32", "fp64"])
def test_a_grpc_request_carries_raw_fp32_and_either_answer_form_is_read(
    grpc_scripted, weights, monkeypatch, form
):
    """The request: one FP32 input as ``raw_input_contents``, the model's name and version, the
    output asked for by name, the header as lower-cased call metadata. The answer is read from
    ``raw_output_contents`` or typed FP32 or FP64 contents."""
    fake, state, start = grpc_scripted
    state["answer"] = grpc_linear(weights[1], form)
    monkeypatch.setenv("MIRAGE_TEST_UPSTREAM_AUTH", "Bearer token-1")
    url = start(
        version="3",
        output_name="probs",
        headers_env={"Authorization": "MIRAGE_TEST_UPSTREAM_AUTH"},
    )
    x = torch.rand(7, *INPUT_SHAPE)
    response = infer(url, x)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        np.asarray(response.json()["outputs"][0]["data"]).reshape(7, K),
        expected(x, weights[1]),
        rtol=0,
        atol=1e-6,
    )
    ((request, metadata),) = fake.requests
    assert (request.model_name, request.model_version) == ("linear", "3")
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == (
        "images",
        "FP32",
        [7, *INPUT_SHAPE],
    )
    assert not tensor.HasField("contents") and [o.name for o in request.outputs] == ["probs"]
    np.testing.assert_array_equal(
        np.frombuffer(request.raw_input_contents[0], "<f4"), x.numpy().reshape(-1)
    )
    assert metadata["authorization"] == "Bearer token-1"


def test_grpc_unavailable_is_retried_and_invalid_argument_is_not(grpc_scripted, caplog):
    """UNAVAILABLE once, then an answer: 200, charged once. UNAVAILABLE each time: 502
    ``upstream_unreachable`` after 3 attempts. INVALID_ARGUMENT: 502 ``upstream_error`` at once.
    The upstream's details go to the log, never to the gateway's client."""
    fake, state, start = grpc_scripted
    url = start()
    x = torch.rand(2, *INPUT_SHAPE)
    failures = iter([grpc.StatusCode.UNAVAILABLE])

    def flaky(request, context):
        code = next(failures, None)
        if code is not None:
            context.abort(code, "warming up")
        return grpc_probs(uniform(2))

    state["answer"] = flaky
    response = infer(url, x)
    assert response.status_code == 200 and fake.count() == 2 and used(url) == 2, response.text

    def abort(code: grpc.StatusCode, details: str):
        def answer(request, context):
            context.abort(code, details)

        return answer

    state["answer"] = abort(grpc.StatusCode.UNAVAILABLE, "overloaded")
    response = infer(url, x)
    assert (response.status_code, response.json()["reason"]) == (502, "upstream_unreachable")
    assert "after 3 attempts" in response.json()["error"] and fake.count() == 5
    state["answer"] = abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'images'")
    response = infer(url, x)
    assert (response.status_code, response.json()["reason"]) == (502, "upstream_error")
    assert "gRPC INVALID_ARGUMENT" in response.json()["error"] and fake.count() == 6
    assert "overloaded" not in response.text and "unknown input" not in response.text
    assert "overloaded" in caplog.text and "unknown input" in caplog.text
    assert fake.url not in response.text and used(url) == 2


def test_grpc_deadline_exceeded_is_retried_then_a_504(grpc_scripted):
    fake, state, start = grpc_scripted
    url = start()

    def expired(request, context):
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "queue timeout")

    state["answer"] = expired
    response = infer(url, torch.rand(2, *INPUT_SHAPE))
    assert (response.status_code, response.json()["reason"]) == (504, "upstream_timeout")
    assert "after 3 attempts" in response.json()["error"] and fake.count() == 3
    assert used(url) == 0


def test_a_grpc_upstream_that_hangs_is_cut_at_deadline_s(grpc_scripted):
    """Each attempt's gRPC deadline is timeout_s, or what is left of deadline_s: a hang is a 504
    by deadline_s, after 2 attempts."""
    fake, state, start = grpc_scripted
    url = start(timeout_s=0.3, deadline_s=0.5)

    def hang(request, context):
        while context.is_active():
            time.sleep(0.01)
        return grpc_probs(uniform(1))

    state["answer"] = hang
    begun = time.monotonic()
    response = infer(url, torch.rand(1, *INPUT_SHAPE))
    seconds = time.monotonic() - begun
    assert (response.status_code, response.json()["reason"]) == (504, "upstream_timeout")
    assert "within 0.3s" in response.json()["error"] and fake.count() == 2
    assert 0.5 <= seconds < 1.5, seconds
    assert used(url) == 0


def short_raw(n: int) -> pb.ModelInferResponse:
    response = grpc_probs(uniform(n))
    response.raw_output_contents[0] = b"\0" * 4
    return response


def typed_count(n: int) -> pb.ModelInferResponse:
    response = grpc_probs(uniform(n), "fp32")
    del response.outputs[0].contents.fp32_contents[K:]
    return response


def huge(n: int) -> pb.ModelInferResponse:
    response = grpc_probs(uniform(n))
    response.parameters["padding"].string_param = "x" * 200_000
    return response


def two_outputs(n: int) -> pb.ModelInferResponse:
    response = grpc_probs(uniform(n))
    response.outputs.append(response.outputs[0])
    response.raw_output_contents.append(response.raw_output_contents[0])
    return response


GRPC_GARBAGE = {  # name: (answer for n images, what the 502 says)
    "wrong size": (short_raw, "4 bytes of raw_output_contents"),
    "wrong batch": (lambda n: grpc_probs(uniform(n + 1)), "shape"),
    "wrong classes": (lambda n: grpc_probs(uniform(n, K - 1), "fp32"), "shape"),
    "flat shape": (lambda n: grpc_probs(uniform(n), shape=[n * K]), "not [B, K]"),
    "typed count": (typed_count, f"holds {K} values"),
    "no values": (lambda n: grpc_probs(uniform(n), "fp32", datatype="FP16"), "no values"),
    "integers": (lambda n: grpc_probs(uniform(n), datatype="INT64"), "datatype"),
    "nan": (lambda n: grpc_probs(np.full((n, K), np.nan)), "NaN"),
    "unnormalised": (lambda n: grpc_probs(2 * uniform(n), "fp64"), "not a probability vector"),
    "no outputs": (lambda n: pb.ModelInferResponse(model_name="linear"), "no outputs"),
    "two outputs": (two_outputs, "output_name"),
    "huge": (huge, "exceeds"),
}


def test_wrong_answers_from_a_grpc_upstream_are_502s_never_retried(grpc_scripted):
    """The same checks as over REST: each wrong answer is a 502 ``upstream_invalid_answer`` that
    says what is wrong, tried once, charging nothing (an answer past its shape's size, too)."""
    fake, state, start = grpc_scripted
    url = start()
    x = torch.rand(3, *INPUT_SHAPE)
    for name, (make, says) in GRPC_GARBAGE.items():
        state["answer"] = lambda request, context, make=make: make(3)
        before = fake.count()
        response = infer(url, x)
        assert (response.status_code, response.json()["reason"]) == (
            502,
            "upstream_invalid_answer",
        ), (name, response.text)
        assert says in response.json()["error"], (name, response.text)
        assert fake.count() == before + 1, f"{name}: an answer is never retried"
    assert used(url) == 0
    state["answer"] = lambda request, context: grpc_probs(uniform(3))
    assert infer(url, x).status_code == 200 and used(url) == 3


def test_an_answer_past_what_the_grpc_channel_receives_is_a_502(grpc_scripted, monkeypatch):
    """gRPC itself refuses an answer over ``GRPC_MAX_ANSWER`` bytes (here 20 kB, below the
    shape's limit): a 502 ``upstream_invalid_answer``, never retried."""
    import mirage.serve.gateway

    monkeypatch.setattr(mirage.serve.gateway, "GRPC_MAX_ANSWER", 20_000)
    fake, state, start = grpc_scripted
    url = start()
    padded = grpc_probs(uniform(2))
    padded.parameters["padding"].string_param = "x" * 30_000
    state["answer"] = lambda request, context: padded
    response = infer(url, torch.rand(2, *INPUT_SHAPE))
    assert (response.status_code, response.json()["reason"]) == (502, "upstream_invalid_answer")
    assert "exceeds the 20000 bytes gRPC receives" in response.json()["error"]
    assert fake.count() == 1 and used(url) == 0


def test_grpc_readiness_asks_server_ready_and_model_ready(grpc_scripted):
    fake, _, start = grpc_scripted
    url = start(version="2")
    assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
    assert [call for call, _ in fake.ready_calls] == ["ServerReady", "ModelReady"]
    assert (fake.ready_calls[1][1].name, fake.ready_calls[1][1].version) == ("linear", "2")
    fake.ready = False
    response = httpx.get(f"{url}/v2/models/digits/ready", timeout=5)
    assert (response.status_code, response.json()["reason"]) == (503, "not_ready")
    assert "not ready" in response.json()["error"] and fake.url not in response.json()["error"]
    fake.ready = True
    assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200


def test_a_grpc_upstream_that_goes_away_and_comes_back(grpc_scripted):
    """A stopped upstream: a quick 502 ``upstream_unreachable`` and not ready; started again on
    the same port, the channel reconnects within a second: ready, and answers."""
    fake, state, start = grpc_scripted
    url = start(timeout_s=1.0)
    x = torch.rand(2, *INPUT_SHAPE)
    state["answer"] = lambda request, context: grpc_probs(uniform(2))
    assert infer(url, x).status_code == 200
    fake.stop()
    begun = time.monotonic()
    response = infer(url, x)
    assert (response.status_code, response.json()["reason"]) == (502, "upstream_unreachable")
    assert time.monotonic() - begun < 1.0
    ready = httpx.get(f"{url}/v2/health/ready", timeout=5)
    assert ready.status_code == 503 and "cannot be reached" in ready.json()["error"]
    back = FakeGrpcUpstream(lambda request, context: grpc_probs(uniform(2)), port=fake.port)
    back.start()
    try:
        deadline = time.monotonic() + 3
        while httpx.get(f"{url}/v2/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not reconnect"
            time.sleep(0.05)
        assert time.monotonic() - begun < 2.5
        assert infer(url, x).status_code == 200 and used(url) == 4
    finally:
        back.stop()
