"""The real server (uvicorn on 127.0.0.1, a free port) hit with a real HTTP client."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    INPUT_SHAPE,
    KEYS,
    METRICS_KEY,
    auth,
    body,
    grad2_defense,
    make_config,
    stored_counts,
)

from mirage.api import InProcessAPI, QueryBudgetExceeded
from mirage.defenses import create_defense
from mirage.models import load_checkpoint
from mirage.serve.app import create_app
from mirage.serve.audit import AuditLog
from mirage.serve.client import HTTPPredictionAPI
from mirage.serve.config import load_config
from mirage.serve.protocol import body_limit
from mirage.serve.runner import ServerThread

URL_INFER = "/v2/models/digits/infer"


@pytest.mark.slow
def test_bad_request_matrix(tmp_path, checkpoints):
    config = make_config(
        tmp_path,
        checkpoints,
        clients=[{"name": "alice", "quota": 1000}, {"name": "dave", "quota": 2}],
    )
    x = torch.rand(2, 1, 8, 8)
    good = body(x)
    nested = body(x, data=x.tolist())
    cases = [
        ("bad json", b"{not json", auth("alice"), 400, "bad_request"),
        ("not utf-8", b"\xff\xfe\x00garbage", auth("alice"), 400, "bad_request"),
        ("not an object", json.dumps([1, 2]).encode(), auth("alice"), 400, "bad_request"),
        ("no inputs", json.dumps({"id": "a"}).encode(), auth("alice"), 400, "bad_request"),
        (
            "two inputs",
            json.dumps({"inputs": good["inputs"] * 2}).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "missing data",
            json.dumps(
                {"inputs": [{"name": "i", "shape": [1, 1, 8, 8], "datatype": "FP32"}]}
            ).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "wrong image shape",
            json.dumps(body(torch.rand(2, 1, 8, 7))).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "wrong rank",
            json.dumps(body(x, shape=[2, 64])).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "float shape",
            json.dumps(body(x, shape=[2.0, 1, 8, 8])).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "empty batch",
            json.dumps(body(x, shape=[0, 1, 8, 8], data=[])).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "shape/data mismatch",
            json.dumps(body(x, shape=[3, 1, 8, 8])).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "wrong datatype",
            json.dumps(body(x, datatype="INT8")).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "strings",
            json.dumps(body(x, data=["0.5"] * 128)).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "booleans",
            json.dumps(body(x, data=[True] * 128)).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "nulls",
            json.dumps(body(x, data=[None] * 128)).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "ragged",
            json.dumps(body(x, data=[[0.1, 0.2], [0.3]])).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "NaN",
            json.dumps(body(x, data=[float("nan")] + [0.5] * 127)).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "Infinity",
            json.dumps(body(x, data=[float("inf")] + [0.5] * 127)).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "1e400",
            (
                '{"inputs": [{"name": "i", "shape": [1, 1, 8, 8], "datatype": "FP32", '
                '"data": [1e400' + ", 0.5" * 63 + "]}]}"
            ).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "out of range",
            json.dumps(body(x, data=[2.0] * 128)).encode(),
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "deep nesting",
            b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            auth("alice"),
            400,
            "bad_request",
        ),
        (
            "payload too large",
            json.dumps(body(x)).encode() + b" " * 200_000,
            auth("alice"),
            413,
            "payload_too_large",
        ),
        (
            "batch too large",
            json.dumps(body(torch.rand(65, 1, 8, 8), data=[0.5])).encode(),
            auth("alice"),
            413,
            "batch_too_large",
        ),
        ("missing key", json.dumps(good).encode(), {}, 401, "missing_key"),
        ("wrong key", json.dumps(good).encode(), {"X-API-Key": "nope"}, 401, "invalid_key"),
        (
            "bad scheme",
            json.dumps(good).encode(),
            {"Authorization": "Basic abc"},
            401,
            "invalid_key",
        ),
        (
            "over quota",
            json.dumps(body(torch.rand(3, 1, 8, 8))).encode(),
            auth("dave"),
            429,
            "quota_exceeded",
        ),
        (
            "nested ok shape but bad key",
            json.dumps(nested).encode(),
            {"X-API-Key": "x"},
            401,
            "invalid_key",
        ),
    ]
    with ServerThread(create_app(config)) as url, httpx.Client(base_url=url) as http:
        for name, content, headers, status, reason in cases:
            response = http.post(
                URL_INFER, content=content, headers={"Content-Type": "application/json", **headers}
            )
            assert response.status_code == status, (name, response.text)
            assert response.json()["reason"] == reason, name
            assert response.json()["error"], name
        chunked = http.post(URL_INFER, content=iter([b" " * 50_000] * 5), headers=auth("alice"))
        assert "content-length" not in chunked.request.headers
        assert (chunked.status_code, chunked.json()["reason"]) == (413, "payload_too_large")
        unknown = http.post("/v2/models/other/infer", json=good, headers=auth("alice"))
        assert (unknown.status_code, unknown.json()["reason"]) == (404, "unknown_model")
        assert http.get(URL_INFER).status_code == 405
        assert http.get("/nowhere").json()["reason"] == "not_found"
        assert http.get("/v2/models/digits").status_code == 401
        usage, audit = stored_counts(config)
        assert usage == {} and audit == (0, 0), "a rejected request changed the quota or the log"
        for payload in (good, nested):  # the same store then accepts well-formed requests
            ok = http.post(URL_INFER, json=payload, headers=auth("alice"))
            assert ok.status_code == 200, ok.text
            assert ok.json()["outputs"][0]["shape"] == [2, 10]
        metrics = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text
    assert stored_counts(config) == ({"alice": (4, 2)}, (2, 4))
    assert 'mirage_rejected_requests_total{reason="bad_request"} 21' in metrics


def test_rate_limit(tmp_path, checkpoints):
    config = make_config(
        tmp_path, checkpoints, clients=[{"name": "carol", "quota": 100, "rate": 0.5, "burst": 3}]
    )
    with (
        ServerThread(create_app(config)) as url,
        httpx.Client(base_url=url, headers=auth("carol")) as http,
    ):
        statuses = [
            http.post(URL_INFER, json=body(torch.rand(1, 1, 8, 8))).status_code for _ in range(3)
        ]
        refused = http.post(URL_INFER, json=body(torch.rand(1, 1, 8, 8)))
        too_big = http.post(URL_INFER, json=body(torch.rand(4, 1, 8, 8)))
    assert statuses == [200, 200, 200]
    assert (refused.status_code, refused.json()["reason"]) == (429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1
    assert (too_big.status_code, too_big.json()["reason"]) == (429, "rate_limited")
    assert stored_counts(config) == ({"carol": (3, 3)}, (3, 3))


def test_a_batch_beyond_the_clients_headroom_is_429_and_one_beyond_the_limits_is_413(
    tmp_path, checkpoints
):
    """A body larger than the client's headroom could need, but within what max_batch images can
    need, is refused for the client's quota or rate (429, Retry-After when waiting helps), not as
    too large; too many images or too many bytes for any client stay 413."""
    config = make_config(
        tmp_path,
        checkpoints,
        clients=[
            {"name": "carol", "quota": 5, "rate": 1.0, "burst": 3},  # headroom 3: the burst
            {"name": "erin", "quota": 1000, "rate": 1.0, "burst": 64},
            {"name": "frank", "quota": 1000, "rate": 1.0, "burst": 10},
        ],
    )
    big = json.dumps(body(torch.rand(60, 1, 8, 8))).encode()
    assert body_limit(4, INPUT_SHAPE, 200_000) < len(big) < body_limit(64, INPUT_SHAPE, 200_000)
    json_type = {"Content-Type": "application/json"}
    with (
        ServerThread(create_app(config)) as url,
        httpx.Client(base_url=url, headers=json_type) as http,
    ):

        def post(content, client):
            return http.post(URL_INFER, content=content, headers=auth(client))

        quota, chunked = post(big, "carol"), post(iter([big[:40_000], big[40_000:]]), "carol")
        over_batch = post(json.dumps(body(torch.rand(65, 1, 8, 8))).encode(), "carol")
        over_bytes = post(big + b" " * 200_000, "carol")
        burst = post(big, "frank")  # 60 images never fit a burst of 10: waiting does not help
        assert post(big, "erin").status_code == 200  # 4 tokens left
        rate = post(big, "erin")
    for response in (quota, chunked):
        assert (response.status_code, response.json()["reason"]) == (429, "quota_exceeded"), (
            response.text
        )
        assert "retry-after" not in response.headers
    assert (over_batch.status_code, over_batch.json()["reason"]) == (413, "batch_too_large")
    assert (over_bytes.status_code, over_bytes.json()["reason"]) == (413, "payload_too_large")
    assert (burst.status_code, burst.json()["reason"]) == (429, "rate_limited")
    assert "retry-after" not in burst.headers and "burst of 10" in burst.json()["error"]
    assert (rate.status_code, rate.json()["reason"]) == (429, "rate_limited"), rate.text
    assert 50 <= int(rate.headers["retry-after"]) <= 57
    assert stored_counts(config) == ({"erin": (60, 1)}, (1, 60))


def test_quota_survives_restart(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints, clients=[{"name": "alice", "quota": 10}])
    with ServerThread(create_app(config)) as url:
        api = HTTPPredictionAPI(url, "digits", KEYS["alice"])
        api.query(torch.rand(7, 1, 8, 8))
        assert api.queries_used == 7
    with ServerThread(create_app(config)) as url:
        api = HTTPPredictionAPI(url, "digits", KEYS["alice"])
        assert (api.queries_used, api.query_budget) == (7, 10)
        with pytest.raises(QueryBudgetExceeded):
            api.query(torch.rand(4, 1, 8, 8))  # refused by the client before sending
        stale = HTTPPredictionAPI(url, "digits", KEYS["alice"])
        api.query(torch.rand(3, 1, 8, 8))
        with pytest.raises(QueryBudgetExceeded):
            stale.query(torch.rand(1, 1, 8, 8))  # the client thinks 3 are left; the server refuses
    assert stored_counts(config) == ({"alice": (10, 2)}, (2, 10))


@pytest.mark.slow
def test_exact_counts_under_concurrency(tmp_path, checkpoints):
    """32 concurrent clients on two servers sharing one SQLite file: no lost or double count."""
    threads, per_client_quota, shared_quota = 32, 12, 50
    clients = [{"name": f"c{i}", "quota": per_client_quota} for i in range(threads)]
    clients.append({"name": "shared", "quota": shared_quota})
    config = make_config(tmp_path, checkpoints, clients=clients)
    results: dict[str, list[int]] = {}
    errors = []

    def work(index: int, urls: list[str]) -> None:
        try:
            with httpx.Client(base_url=urls[index % 2], timeout=60) as http:
                mine = [
                    http.post(
                        URL_INFER, json=body(torch.rand(4, 1, 8, 8)), headers=auth(f"c{index}")
                    ).status_code
                    for _ in range(4)
                ]
                shared = [
                    http.post(
                        URL_INFER, json=body(torch.rand(1, 1, 8, 8)), headers=auth("shared")
                    ).status_code
                    for _ in range(4)
                ]
            results[f"c{index}"], results[f"shared{index}"] = mine, shared
        except Exception as error:  # noqa: BLE001 — reported below
            errors.append(error)

    with ServerThread(create_app(config)) as first, ServerThread(create_app(config)) as second:
        workers = [threading.Thread(target=work, args=(i, [first, second])) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        with httpx.Client(base_url=first) as http:
            metrics = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text
    assert not errors
    statuses = [s for r in results.values() for s in r]
    assert set(statuses) <= {200, 429}
    for i in range(threads):
        assert results[f"c{i}"].count(200) == per_client_quota // 4
    shared_ok = sum(results[f"shared{i}"].count(200) for i in range(threads))
    assert shared_ok == shared_quota
    usage, (audit_rows, audit_queries) = stored_counts(config)
    assert usage["shared"] == (shared_quota, shared_quota)
    assert all(usage[f"c{i}"] == (per_client_quota, per_client_quota // 4) for i in range(threads))
    assert audit_rows == statuses.count(200)
    assert audit_queries == threads * per_client_quota + shared_quota
    assert f'mirage_client_queries_used{{client="shared"}} {shared_quota}' in metrics


def parse_metrics(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value.replace("+Inf", "inf"))
    return samples


def test_metrics_endpoint(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints, defense=grad2_defense(checkpoints))
    with ServerThread(create_app(config)) as url, httpx.Client(base_url=url) as http:
        sizes = [1, 5, 3]
        for n in sizes:
            assert (
                http.post(
                    URL_INFER, json=body(torch.rand(n, 1, 8, 8)), headers=auth("bob")
                ).status_code
                == 200
            )
        assert (
            http.post(
                URL_INFER, json=body(torch.rand(1, 1, 8, 8)), headers={"X-API-Key": "bad"}
            ).status_code
            == 401
        )
        response = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").json() == {"ready": True}
        assert http.get("/v2/models/digits/ready", headers=auth("bob")).json() == {
            "name": "digits",
            "ready": True,
        }
        assert http.get("/v2/models/nope/ready", headers=auth("bob")).status_code == 404
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for name in (
        "mirage_queries_total",
        "mirage_request_latency_seconds",
        "mirage_defense_seconds_total",
        "mirage_rejected_requests_total",
        "mirage_client_queries_used",
    ):
        assert re.search(rf"^# TYPE {name} (counter|histogram|gauge)$", text, re.MULTILINE), name
    samples = parse_metrics(text)
    assert samples['mirage_queries_total{client="bob",model="digits"}'] == sum(sizes)
    assert samples['mirage_requests_total{client="bob",model="digits"}'] == len(sizes)
    assert samples['mirage_rejected_requests_total{reason="invalid_key"}'] == 1
    assert samples['mirage_client_queries_used{client="bob"}'] == sum(sizes)
    assert samples['mirage_client_queries_used{client="alice"}'] == 0
    assert samples['mirage_defense_seconds_total{model="digits"}'] > 0
    buckets = [
        v for k, v in samples.items() if k.startswith("mirage_request_latency_seconds_bucket")
    ]
    assert buckets == sorted(buckets) and buckets[-1] == len(sizes)
    assert samples['mirage_request_latency_seconds_count{model="digits"}'] == len(sizes)
    assert (
        sum(v for k, v in samples.items() if k.startswith("mirage_microbatch_queries_count")) >= 1
    )


@pytest.mark.parametrize("defense", ["none", "grad2"])
def test_http_client_matches_inprocess(tmp_path, checkpoints, defense):
    spec = grad2_defense(checkpoints) if defense == "grad2" else {"name": "none"}
    config = make_config(tmp_path, checkpoints, defense=spec, access={"disclose_defense": True})
    model, _ = load_checkpoint(checkpoints["victim"])
    local = None
    if defense == "grad2":
        surrogate, _ = load_checkpoint(checkpoints["surrogate"])
        local = create_defense("grad2", epsilon=0.5, target="all-ones", surrogate=surrogate)
    x = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = InProcessAPI(model, local).query(x)
    with (
        ServerThread(create_app(config)) as url,
        HTTPPredictionAPI(url, "digits", KEYS["alice"], batch_size=16) as api,
    ):
        served = api.query(x)
        assert (api.num_classes, api.input_shape, api.queries_used) == (10, (1, 8, 8), 100)
        assert api.defense["name"] == defense
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-6)
    if defense == "grad2":
        assert (served - InProcessAPI(model).query(x)).abs().sum(
            1
        ).max() > 0.1  # the defense is active


def test_per_client_defense_state(tmp_path, checkpoints):
    spec = {
        **grad2_defense(checkpoints),
        "params": {"epsilon": 0.5, "target": "random", "seed": 7},
        "seed_per_client": True,
    }
    config = make_config(tmp_path, checkpoints, defense=spec)
    app = create_app(config)
    x = torch.rand(8, 1, 8, 8)
    with ServerThread(app) as url:
        alice = HTTPPredictionAPI(url, "digits", KEYS["alice"]).query(x)
        bob = HTTPPredictionAPI(url, "digits", KEYS["bob"]).query(x)
        again = HTTPPredictionAPI(url, "digits", KEYS["alice"]).query(x)
    instances = app.state.service.defenses._instances
    assert set(instances) == {"alice", "bob"}
    assert instances["alice"].params.seed != instances["bob"].params.seed
    torch.testing.assert_close(again, alice, rtol=0, atol=1e-6)
    assert not torch.allclose(alice, bob, atol=1e-4)  # different coordinated targets per client


def test_failure_after_charge_is_refunded(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints)
    app = create_app(config)

    def broken(key):
        raise RuntimeError("defense crashed")

    app.state.service.batcher.defense_for = broken
    app.state.service.defenses.enabled = True
    with ServerThread(app) as url, httpx.Client(base_url=url) as http:
        response = http.post(URL_INFER, json=body(torch.rand(2, 1, 8, 8)), headers=auth("alice"))
    assert (response.status_code, response.json()["reason"]) == (500, "inference_failed")
    usage, audit = stored_counts(config)
    assert usage.get("alice", (0, 0)) == (0, 0) and audit == (0, 0)


def test_audit_log_records_answers(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints)
    x = torch.rand(3, 1, 8, 8)
    with ServerThread(create_app(config)) as url:
        served = HTTPPredictionAPI(url, "digits", KEYS["bob"]).query(x)
    audit = AuditLog(config.audit_path)
    rows = audit.rows()
    audit.close()
    assert len(rows) == 1 and rows[0]["client"] == "bob" and rows[0]["queries"] == 3
    assert len(set(rows[0]["input_sha256"])) == 3
    torch.testing.assert_close(torch.tensor(rows[0]["served"]), served, rtol=0, atol=0)


def test_example_config_and_toml_paths(tmp_path, checkpoints):
    example = load_config(Path(__file__).parents[2] / "examples" / "serve.toml")
    assert example.defense.name and example.clients
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "serve.toml").write_text(
        f'[model]\nname = "digits"\ncheckpoint = "{checkpoints["victim"]}"\n'
        '[storage]\ndatabase = "db/quotas.sqlite"\n'
        f'[[clients]]\nname = "alice"\nkey_sha256 = "{"a" * 64}"\nquota = 5\n'
    )
    config = load_config(tmp_path / "cfg" / "serve.toml")
    assert config.storage.database == tmp_path / "cfg" / "db" / "quotas.sqlite"
    with pytest.raises(ValueError):
        load_config_text = (
            '[model]\nname = "x"\n[[clients]]\nname = "a"\nkey_sha256 = "plain-key"\n'
        )
        (tmp_path / "bad.toml").write_text(load_config_text)
        load_config(tmp_path / "bad.toml")


def test_unlearn_target_draws_its_reference_set_from_the_scenarios_training_data(
    tmp_path, checkpoints
):
    from mirage.scenarios import ReferenceSet, defender_sample, get_scenario
    from mirage.serve.loading import ServedDefenses

    spec = {
        **grad2_defense(checkpoints),
        "params": {"epsilon": 0.5, "target": "unlearn"},
        "reference_set": {"size": 30, "seed": 2},
    }  # the earlier key of `reference`
    with pytest.raises(ValueError, match="reference needs model.scenario"):
        make_config(tmp_path, checkpoints, defense=spec)
    raw = make_config(tmp_path, checkpoints).model_dump(mode="json")
    raw["model"], raw["defense"] = {"name": "digits", "scenario": "digits"}, spec
    config = type(make_config(tmp_path, checkpoints)).model_validate(raw)
    assert config.defense.reference == ReferenceSet(size=30, seed=2)
    model, card = load_checkpoint(checkpoints["victim"])
    defenses = ServedDefenses(config.defense, get_scenario("digits"), model, card)
    expected = defender_sample(get_scenario("digits"), ReferenceSet(size=30, seed=2))
    assert torch.equal(defenses.prototype.params.reference_x, expected.images)
    assert torch.equal(defenses.prototype.params.reference_y, expected.labels)
    with pytest.raises(ValueError, match="size"):
        type(config).model_validate(
            {**raw, "defense": {**raw["defense"], "reference_set": {"size": 0}}}
        )
