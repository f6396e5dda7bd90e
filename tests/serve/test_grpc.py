"""The Open Inference Protocol over gRPC (docs/design.md §grpc), tested unmodified with Triton's
own gRPC clients (``tritonclient.grpc``, sync and asyncio, raw binary contents): the same answers,
keys, quotas, audit and errors as REST, on a real server process."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from conftest import (
    KEYS,
    ServerProcess,
    auth,
    body,
    free_port,
    grad2_defense,
    make_config,
    stored_counts,
)
from tritonclient.utils import InferenceServerException

from mirage.serve.config import GrpcConfig
from mirage.serve.grpc_service import parse_infer_request
from mirage.serve.oip import grpc_predict_v2_pb2 as pb

MODEL = "digits"


def _bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


def _inputs(x: np.ndarray) -> list:
    tensor = grpcclient.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


@pytest.fixture
def served(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints, defense=grad2_defense(checkpoints))
    config = config.model_copy(update={"grpc": GrpcConfig(port=free_port())})
    server = ServerProcess(config, tmp_path).start()
    yield server, config, f"127.0.0.1:{config.grpc.port}"
    server.kill()


@pytest.mark.slow
def test_tritonclient_grpc_gets_the_rest_answers_under_the_same_quota_and_audit(served):
    server, config, address = served
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    rest = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        json=body(torch.from_numpy(x)),
        headers=auth("alice"),
    )
    assert rest.status_code == 200
    expected = np.asarray(rest.json()["outputs"][0]["data"], dtype=np.float32).reshape(4, 10)

    client = grpcclient.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=_bearer("alice"))
    meta = client.get_model_metadata(MODEL, headers=_bearer("alice"), as_json=True)
    assert (
        meta["inputs"][0]["shape"] == ["-1", "1", "8", "8"]
        and meta["outputs"][0]["name"] == "probabilities"
    )
    assert client.get_server_metadata(headers=_bearer("alice")).name == "mirage"
    result = client.infer(
        MODEL,
        _inputs(x),
        outputs=[grpcclient.InferRequestedOutput("probabilities")],
        headers=_bearer("alice"),
        request_id="r1",
    )
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=0, atol=1e-6)
    response = result.get_response()
    assert (
        response.id == "r1" and response.parameters["queries_used"].int64_param == 8
    )  # 4 REST + 4 gRPC
    assert response.parameters["query_budget"].int64_param == 1000

    async def asynchronous():
        async with aioclient.InferenceServerClient(address) as client:
            inputs = [aioclient.InferInput("images", list(x.shape), "FP32")]
            inputs[0].set_data_from_numpy(x)
            answered = await client.infer(
                MODEL, inputs, headers=_bearer("alice"), model_version="1"
            )
            return answered.as_numpy("probabilities"), answered.get_response()

    probabilities, response = asyncio.run(asynchronous())
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-6)
    assert response.parameters["queries_used"].int64_param == 12
    usage, (rows, queries) = stored_counts(config)
    assert usage["alice"] == (12, 3) and (rows, queries) == (3, 12)  # every transport in one ledger


@pytest.mark.slow
def test_grpc_errors_carry_the_services_reasons_as_grpc_codes(served):
    _, _, address = served
    client = grpcclient.InferenceServerClient(address)
    x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)

    def code(call) -> str:
        with pytest.raises(InferenceServerException) as caught:
            call()
        return caught.value.status()

    assert code(lambda: client.infer(MODEL, _inputs(x))) == "StatusCode.UNAUTHENTICATED"
    assert (
        code(lambda: client.infer(MODEL, _inputs(x), headers={"authorization": "Bearer nope"}))
        == "StatusCode.UNAUTHENTICATED"
    )
    assert (
        code(lambda: client.infer("other", _inputs(x), headers=_bearer("alice")))
        == "StatusCode.NOT_FOUND"
    )
    assert (
        code(lambda: client.infer(MODEL, _inputs(x), headers=_bearer("alice"), model_version="7"))
        == "StatusCode.NOT_FOUND"
    )
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    assert (
        code(lambda: client.infer(MODEL, _inputs(bad), headers=_bearer("alice")))
        == "StatusCode.INVALID_ARGUMENT"
    )
    assert (
        code(
            lambda: client.infer(
                MODEL, _inputs(np.full((2, 1, 8, 7), 0.5, np.float32)), headers=_bearer("alice")
            )
        )
        == "StatusCode.INVALID_ARGUMENT"
    )
    assert (
        code(
            lambda: client.infer(
                MODEL, _inputs(np.full((65, 1, 8, 8), 0.5, np.float32)), headers=_bearer("alice")
            )
        )
        == "StatusCode.RESOURCE_EXHAUSTED"
    )
    # carol: quota 5, 3 of burst: the second request of 3 images is beyond her rate, the quota after
    assert client.infer(MODEL, _inputs(x[:1].repeat(3, 0)), headers=_bearer("carol")) is not None
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, _inputs(x[:1].repeat(3, 0)), headers=_bearer("carol"))
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


@pytest.mark.slow
def test_a_raw_grpc_call_gets_the_retry_after_and_reason_in_its_trailers(served):
    _, _, address = served
    channel = grpc.insecure_channel(address)
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    x = np.full((3, 1, 8, 8), 0.5, dtype="<f4")
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="images", datatype="FP32", shape=list(x.shape)
            )
        ],
        raw_input_contents=[x.tobytes()],
    )
    metadata = (("authorization", f"Bearer {KEYS['carol']}"),)
    assert len(infer(request, metadata=metadata).raw_output_contents[0]) == 3 * 10 * 4
    with pytest.raises(grpc.RpcError) as caught:
        infer(request, metadata=metadata)
    trailers = dict(caught.value.trailing_metadata())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers["reason"] == "rate_limited" and int(trailers["retry-after"]) >= 1
    channel.close()


def test_requests_are_validated_before_any_work():
    shape = (1, 8, 8)

    def request(**kwargs) -> pb.ModelInferRequest:
        tensor = {
            "name": "images",
            "datatype": "FP32",
            "shape": [2, 1, 8, 8],
            **kwargs.pop("tensor", {}),
        }
        return pb.ModelInferRequest(
            model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(**tensor)], **kwargs
        )

    good = np.full((2, 1, 8, 8), 0.25, dtype="<f4")
    assert parse_infer_request(request(raw_input_contents=[good.tobytes()]), shape, 64).shape == (
        2,
        1,
        8,
        8,
    )
    typed = request(
        tensor={"contents": pb.InferTensorContents(fp32_contents=good.reshape(-1).tolist())}
    )
    np.testing.assert_array_equal(parse_infer_request(typed, shape, 64), good)
    as_fp64 = request(
        tensor={"datatype": "FP64"}, raw_input_contents=[good.astype("<f8").tobytes()]
    )
    np.testing.assert_array_equal(parse_infer_request(as_fp64, shape, 64), good)
    for bad, message in (
        (request(raw_input_contents=[good.tobytes()[:-4]]), "needs 512"),
        (request(), "contents hold 0 values"),
        (request(tensor={"datatype": "INT8"}, raw_input_contents=[b""]), "datatype"),
        (request(raw_input_contents=[good.tobytes(), good.tobytes()]), "one raw_input_contents"),
        (request(raw_input_contents=[(good * 5).tobytes()]), r"\[0, 1\]"),
        (pb.ModelInferRequest(model_name=MODEL), "exactly one input"),
    ):
        with pytest.raises(Exception, match=message):
            parse_infer_request(bad, shape, 64)


@pytest.mark.slow
def test_a_grpc_call_cancelled_while_queued_computes_and_charges_nothing(tmp_path, checkpoints):
    """A client that gives up (its deadline passes) before a worker takes its images is a client
    that hung up: the job is dropped and its reservation released, as over REST."""
    import threading
    import time

    from test_charging import counted_server, ledger, wait_until

    config = make_config(tmp_path, checkpoints).model_copy(
        update={"grpc": GrpcConfig(port=free_port())}
    )
    with counted_server(config, gated=True) as (app, model, url):
        blocker = threading.Thread(
            target=lambda: httpx.post(
                url + f"/v2/models/{MODEL}/infer",
                json=body(torch.rand(2, 1, 8, 8)),
                headers=auth("bob"),
                timeout=30,
            )
        )
        blocker.start()
        wait_until(model.running.is_set)  # the worker is busy with bob's batch
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{config.grpc.port}")
        x = np.full((4, 1, 8, 8), 0.5, dtype=np.float32)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, _inputs(x), headers=_bearer("alice"), client_timeout=1.0)
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        wait_until(lambda: app.state.service.quotas.reservations() == 1)  # bob's only
        model.gate.set()
        blocker.join(30)
        wait_until(lambda: app.state.service.batcher.queued() == 0)
        time.sleep(0.2)
    usage, rows = ledger(config)
    assert model.images == 2, "the model ran on images whose client had given up"
    assert usage.get("alice", (0, 0)) == (0, 0) and [r["client"] for r in rows] == ["bob"]
