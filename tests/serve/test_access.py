"""Nothing unauthenticated but liveness and readiness (docs/design.md §access): /metrics is
aggregate-only without its own token, metadata names no defense internals unless the config opts
in (never seeds or keys), a model's readiness without a key does not name the model, and failed
authentication is throttled per source address and written to the audit log."""

from __future__ import annotations

import http.client
import threading

import httpx
import pytest
import torch
from conftest import KEYS, METRICS_KEY, grad2_defense, make_config

from mirage.serve.app import create_app
from mirage.serve.audit import AuditLog
from mirage.serve.runner import ServerThread

URL_INFER = "/v2/models/digits/infer"


def body(n: int) -> dict:
    return {
        "inputs": [
            {
                "name": "images",
                "shape": [n, 1, 8, 8],
                "datatype": "FP32",
                "data": torch.rand(n * 64).tolist(),
            }
        ]
    }


def test_metrics_need_their_token_for_per_client_series(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints)
    with ServerThread(create_app(config)) as url, httpx.Client(base_url=url) as http:
        assert (
            http.post(URL_INFER, json=body(2), headers={"X-API-Key": KEYS["alice"]}).status_code
            == 200
        )
        public = http.get("/metrics")
        full = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
        client_key = http.get("/metrics", headers={"Authorization": f"Bearer {KEYS['alice']}"})
    assert public.status_code == 200 and "alice" not in public.text and "client=" not in public.text
    assert 'mirage_queries_total{model="digits"} 2' in public.text
    # liveness counters only: no rejection, alarm or timing series tell a thief how it is seen
    assert {
        line.split("{")[0].split(" ")[0]
        for line in public.text.splitlines()
        if not line.startswith("#")
    } == {"mirage_requests_total", "mirage_queries_total"}
    assert (
        "mirage_rejected_requests_total" in full.text
        and "mirage_defense_seconds_total" in full.text
    )
    assert full.status_code == 200 and 'mirage_client_queries_used{client="alice"} 2' in full.text
    assert client_key.status_code == 401  # a client's key is not the metrics token


def test_metadata_hides_the_defense_unless_disclosed_and_never_its_seed(tmp_path, checkpoints):
    spec = {**grad2_defense(checkpoints), "params": {"epsilon": 0.5, "target": "random", "seed": 7}}
    hidden = make_config(tmp_path / "a", checkpoints, defense=spec)
    shown = make_config(
        tmp_path / "b", checkpoints, defense=spec, access={"disclose_defense": True}
    )
    answers = []
    for config in (hidden, shown):
        with ServerThread(create_app(config)) as url, httpx.Client(base_url=url) as http:
            answers.append(
                http.get("/v2/models/digits", headers={"X-API-Key": KEYS["alice"]}).json()
            )
    assert answers[0]["parameters"]["defense"] is None and "grad2" not in str(answers[0])
    described = answers[1]["parameters"]["defense"]
    assert described["name"] == "grad2" and described["params"]["epsilon"] == 0.5
    assert not [k for k in described["params"] if "seed" in k or "key" in k]


def test_readiness_without_a_key_does_not_name_the_model(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints)
    with ServerThread(create_app(config)) as url, httpx.Client(base_url=url) as http:
        for name in ("digits", "guess"):
            response = http.get(f"/v2/models/{name}/ready")
            assert response.json() == {"ready": True} and "digits" not in response.text
        unknown = http.get("/v2/models/guess/ready", headers={"X-API-Key": KEYS["alice"]})
        assert unknown.status_code == 404 and "digits" not in unknown.text
        assert http.get("/v2/models/digits").status_code == 401


@pytest.mark.slow
def test_two_thousand_wrong_keys_are_throttled_within_the_first_fifty(tmp_path, checkpoints):
    """8 connections send 250 wrong keys each; in the order the answers come, at most the first
    fifty are 401s, exactly ``auth_failures`` of them, and every other is a 429 with Retry-After."""
    config = make_config(tmp_path, checkpoints, access={"auth_failures": 10, "auth_window_s": 600})
    statuses, lock = [], threading.Lock()

    def guess(worker: int, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(250):
            connection.request(
                "POST", URL_INFER, body=b"{}", headers={"X-API-Key": f"wrong-{worker}-{i}"}
            )
            response = connection.getresponse()
            response.read()
            with lock:
                statuses.append((response.status, response.getheader("retry-after")))
        connection.close()

    with ServerThread(create_app(config)) as url:
        port = int(url.rsplit(":", 1)[1])
        workers = [threading.Thread(target=guess, args=(w, port)) for w in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(300)
        still = httpx.post(url + URL_INFER, json=body(1), headers={"X-API-Key": KEYS["alice"]})
    codes = [status for status, _ in statuses]
    assert len(codes) == 2000 and codes.count(401) == 10 and codes.count(429) == 1990
    assert max(i for i, code in enumerate(codes) if code == 401) < 50
    assert all(int(retry) >= 1 for status, retry in statuses if status == 429)
    assert (
        still.status_code == 429
    )  # per source address: the address is throttled, whatever the key
    assert still.json()["reason"] == "auth_throttled"
    audit = AuditLog(config.audit_path)
    events = audit.events()
    audit.close()
    # written from the storage threads, so concurrent failures land in any order
    assert sorted(e["kind"] for e in events) == ["auth_failed"] * 9 + ["auth_throttled"]
    assert all(e["source"] == "127.0.0.1" for e in events)
