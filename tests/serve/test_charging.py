"""Work is charged when it is done, evidence only for answered requests, and failing storage
never freezes the server or lies about charging (docs/design.md §reservations,
§service-errors, §fair-share). Hang-ups are real sockets closed after the body; the locked
SQLite file is another connection's write transaction; the stalled Redis is a SIGSTOPped
process."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sqlite3
import threading
import time

import httpx
import pytest
import torch
from conftest import KEYS, RedisServer, auth, body, make_config, stored
from test_ownership import ownership_config
from torch import nn

from mirage.ownership import EvidenceStore
from mirage.serve.app import create_app
from mirage.serve.batching import MicroBatcher
from mirage.serve.runner import ServerThread

URL_INFER = "/v2/models/digits/infer"


class Counting(nn.Module):
    """The victim, counting the images it ran on; ``gate`` (an Event) holds each forward pass
    until it is set."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.images, self.gate = model, 0, threading.Event()
        self.gate.set()
        self.running = threading.Event()

    def forward(self, x):
        self.running.set()
        self.gate.wait(30)
        self.images += len(x)
        return self.model(x)


@contextlib.contextmanager
def counted_server(config, *, gated: bool = False):
    """``(app, model, url)``: the service of ``config`` on a loopback port, its victim a
    :class:`Counting` one (``gated``: its gate closed, so the next forward pass waits)."""
    app = create_app(config)
    batcher = app.state.service.batcher
    batcher.model = model = Counting(batcher.model)
    if gated:
        model.gate.clear()
    with ServerThread(app) as url:
        yield app, model, url


def send_and_hang_up(url: str, client: str, n: int, seed: int = 0) -> socket.socket:
    """Send a whole inference request of ``n`` images; returns the open socket (close it to hang
    up)."""
    import json

    content = json.dumps(
        body(torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)))
    ).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[client]}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n".encode()
        + content
    )
    return sock


def ledger(config) -> tuple[dict, list[dict]]:
    """(per-client (queries, requests) used, the audit rows) as stored on disk."""
    return stored(config, lambda quotas, audit: (quotas.usage(), audit.rows()))


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_hanging_up_while_queued_computes_and_charges_nothing(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints)
    with counted_server(config, gated=True) as (app, model, url):
        blocker = threading.Thread(
            target=lambda: httpx.post(
                url + URL_INFER, json=body(torch.rand(2, 1, 8, 8)), headers=auth("bob"), timeout=30
            )
        )
        blocker.start()
        wait_until(model.running.is_set)  # the worker is busy with bob's batch
        sockets = [send_and_hang_up(url, "alice", 8, seed) for seed in range(5)]
        wait_until(lambda: app.state.service.batcher.queued() == 5)
        for sock in sockets:
            sock.close()
        # the server sees the hang-ups, drops the queued jobs and releases their charges: only
        # bob's reservation is left
        wait_until(lambda: app.state.service.quotas.reservations() == 1)
        model.gate.set()
        blocker.join(30)
        wait_until(lambda: app.state.service.batcher.queued() == 0)
        time.sleep(0.2)
    usage, rows = ledger(config)
    assert model.images == 2, "the model ran on images whose client had hung up"
    assert usage["bob"] == (2, 1) and usage.get("alice", (0, 0)) == (
        0,
        0,
    )  # reserved, then released
    assert [r["client"] for r in rows] == ["bob"]


@pytest.mark.slow
def test_hanging_up_after_the_model_ran_is_charged_and_marked_undelivered(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints)
    with counted_server(config, gated=True) as (_, model, url):
        sock = send_and_hang_up(url, "alice", 6)
        wait_until(model.running.is_set)  # a worker took the job: it runs to the end
        sock.close()
        time.sleep(1.0)  # the server sees the hang-up (on loopback, within milliseconds)
        model.gate.set()
        wait_until(lambda: ledger(config)[0].get("alice") == (6, 1))
        assert (
            httpx.post(
                url + URL_INFER, json=body(torch.rand(1, 1, 8, 8)), headers=auth("alice")
            ).status_code
            == 200
        )
    usage, rows = ledger(config)
    assert model.images == 7 and usage == {"alice": (7, 2)}
    assert [(r["queries"], r["delivered"]) for r in rows] == [(6, False), (1, True)]


@pytest.mark.slow
def test_forty_hang_ups_get_no_free_work(tmp_path, checkpoints):
    """The hostile probe's case: a client with quota 256 sends 40 requests of 64 images and hangs
    up after each body. Whatever ran is charged; nothing runs past the quota."""
    config = make_config(tmp_path, checkpoints, clients=[{"name": "alice", "quota": 256}])
    with counted_server(config) as (app, model, url):
        for seed in range(40):
            send_and_hang_up(url, "alice", 64, seed).close()
        time.sleep(1.0)
        wait_until(lambda: app.state.service.batcher.queued() == 0)
        time.sleep(0.3)
    usage, rows = ledger(config)
    charged = usage.get("alice", (0, 0))[0]
    assert model.images == charged <= 256
    assert sum(r["queries"] for r in rows) == charged  # every charge audited


@pytest.mark.slow
def test_evidence_is_written_only_for_answered_requests(tmp_path, checkpoints):
    config = ownership_config(tmp_path, checkpoints)
    with counted_server(config) as (app, model, url):
        for seed in range(10):  # hung up: queued or run, never evidence
            model.gate.clear()
            sock = send_and_hang_up(url, "alice", 32, seed)
            wait_until(model.running.is_set)
            model.running.clear()
            sock.close()
            time.sleep(0.5)  # the server sees the hang-up before the answer is ready
            model.gate.set()
        wait_until(lambda: app.state.service.batcher.queued() == 0)
        time.sleep(0.3)
        store = EvidenceStore(config.ownership.evidence)
        assert store.clients() == [], "evidence was written for answers nobody received"
        answered = httpx.post(
            url + URL_INFER, json=body(torch.rand(32, 1, 8, 8)), headers=auth("bob"), timeout=30
        )
        assert answered.status_code == 200
        assert store.clients() == ["bob"]
        store.close()


def test_fair_share_a_flood_does_not_queue_ahead_of_another_client():
    """Round-robin over clients: with 20 of alice's full batches queued, bob's request is in the
    first or second batch, not the twenty-first."""
    batches: list[list[str]] = []
    gate = threading.Event()
    batcher = MicroBatcher(Gate(gate), lambda key: None, max_images=64, max_wait=0.05)
    answer = batcher._answer
    batcher._answer = lambda jobs: (batches.append([job.client for job in jobs]), answer(jobs))
    batcher.start()
    futures = [batcher.submit("k", torch.rand(64, 1, 2, 2), "alice") for _ in range(20)]
    futures.append(batcher.submit("k", torch.rand(1, 1, 2, 2), "bob"))
    gate.set()
    for future in futures:
        future.result(10)
    batcher.stop()
    first_bob = next(i for i, clients in enumerate(batches) if "bob" in clients)
    assert first_bob <= 1, batches
    assert sum(len(b) for b in batches) == 21


class Gate(nn.Module):
    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x):
        self.gate.wait(10)
        return torch.zeros(len(x), 3)


def live_latency(url: str) -> float:
    start = time.monotonic()
    assert httpx.get(url + "/v2/health/live", timeout=10).status_code == 200
    return time.monotonic() - start


@pytest.mark.slow
def test_a_locked_sqlite_file_is_a_503_and_freezes_nothing(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints, storage={"timeout_s": 1.0})
    with ServerThread(create_app(config)) as url:
        lock = sqlite3.connect(config.storage.database, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            results: dict[str, httpx.Response] = {}
            threads = [
                threading.Thread(
                    target=lambda: results.__setitem__(
                        "login",
                        httpx.post(
                            url + URL_INFER,
                            json=body(torch.rand(1, 1, 8, 8)),
                            headers={"X-API-Key": "wrong"},
                            timeout=30,
                        ),
                    )
                ),
                threading.Thread(
                    target=lambda: results.__setitem__(
                        "infer",
                        httpx.post(
                            url + URL_INFER,
                            json=body(torch.rand(1, 1, 8, 8)),
                            headers=auth("alice"),
                            timeout=30,
                        ),
                    )
                ),
            ]
            for thread in threads:
                thread.start()
            latencies = [live_latency(url) for _ in range(20)]
            for thread in threads:
                thread.join(30)
            ready = httpx.get(url + "/v2/health/ready", timeout=10)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert max(latencies) < 0.5, latencies
        for name in ("login", "infer"):
            response = results[name]
            assert (response.status_code, response.json()["reason"]) == (
                503,
                "storage_unavailable",
            ), response.text
        assert "nothing was charged" in results["infer"].json()["error"]
        assert (ready.status_code, ready.json()["reason"]) == (
            503,
            "not_ready",
        ) and "storage" in ready.text
        time.sleep(1.1)  # the health probe is cached for a second
        assert httpx.get(url + "/v2/health/ready").status_code == 200
        assert (
            httpx.post(
                url + URL_INFER, json=body(torch.rand(1, 1, 8, 8)), headers=auth("alice")
            ).status_code
            == 200
        )
    assert ledger(config)[0] == {"alice": (1, 1)}


@pytest.mark.slow
def test_a_stalled_redis_is_a_503_and_readiness_says_so(tmp_path, checkpoints):
    redis = RedisServer(tmp_path / "redis", persistent=True).start()
    config = make_config(
        tmp_path, checkpoints, storage={"backend": "redis", "url": redis.url, "timeout_s": 1.0}
    )
    try:
        with ServerThread(create_app(config)) as url:
            assert (
                httpx.post(
                    url + URL_INFER, json=body(torch.rand(1, 1, 8, 8)), headers=auth("alice")
                ).status_code
                == 200
            )
            redis.proc.send_signal(signal.SIGSTOP)
            try:
                start = time.monotonic()
                stalled = httpx.post(
                    url + URL_INFER,
                    json=body(torch.rand(1, 1, 8, 8)),
                    headers=auth("alice"),
                    timeout=30,
                )
                seconds = time.monotonic() - start
                latencies = [live_latency(url) for _ in range(10)]
                time.sleep(1.1)
                ready = httpx.get(url + "/v2/health/ready", timeout=10)
            finally:
                redis.proc.send_signal(signal.SIGCONT)
            assert (stalled.status_code, stalled.json()["reason"]) == (
                503,
                "storage_unavailable",
            ), stalled.text
            assert "nothing was charged" in stalled.json()["error"] and seconds < 4
            assert max(latencies) < 0.5, latencies
            assert ready.status_code == 503 and "storage" in ready.json()["error"]
            time.sleep(1.1)
            assert httpx.get(url + "/v2/health/ready", timeout=10).status_code == 200
            assert (
                httpx.post(
                    url + URL_INFER, json=body(torch.rand(1, 1, 8, 8)), headers=auth("alice")
                ).status_code
                == 200
            )
            meta = httpx.get(url + "/v2/models/digits", headers=auth("alice")).json()
            assert meta["parameters"]["client"]["queries_used"] == 2
    finally:
        redis.stop()


@pytest.mark.slow
def test_storage_failures_say_truly_what_was_charged(tmp_path, checkpoints):
    """A full disk when the answer is recorded: 503 'nothing was charged', and nothing is. If the
    release fails too: the charge is said to be held, and readiness settles it once storage
    recovers. A commit failing after the audit row: the client gets its answer (charged)."""
    config = make_config(tmp_path, checkpoints, storage={"audit": str(tmp_path / "audit.sqlite")})
    app = create_app(config)
    service = app.state.service
    full = sqlite3.OperationalError("database or disk is full")

    def fail(*args, **kwargs):
        raise full

    one = {"json": body(torch.rand(2, 1, 8, 8)), "headers": auth("alice")}
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        record, release, commit = (
            service.audit.record,
            service.quotas.release,
            service.quotas.commit,
        )
        service.audit.record = fail
        response = http.post(URL_INFER, **one)
        assert (response.status_code, response.json()["reason"]) == (503, "storage_unavailable")
        assert (
            "nothing was charged" in response.json()["error"]
            and "model" not in response.json()["error"]
        )
        assert service.quotas.usage().get("alice", (0, 0)) == (0, 0)

        service.quotas.release = fail
        response = http.post(URL_INFER, **one)
        assert response.status_code == 503 and "held as a reservation" in response.json()["error"]
        assert service.quotas.usage()["alice"] == (2, 1) and service.quotas.reservations() == 1
        service.audit.record, service.quotas.release = record, release
        time.sleep(1.1)
        assert http.get("/v2/health/ready").status_code == 200  # settles the held charge
        assert service.quotas.usage()["alice"] == (0, 0) and service.quotas.reservations() == 0

        service.quotas.commit = fail
        response = http.post(URL_INFER, **one)
        service.quotas.commit = commit
        assert response.status_code == 200  # audited: answered and charged
        assert service.quotas.usage()["alice"] == (2, 1)


def test_redis_without_persistence_is_named_or_refused(tmp_path, checkpoints, caplog):
    redis = RedisServer(tmp_path / "redis", persistent=False).start()
    try:
        storage = {"backend": "redis", "url": redis.url}
        with caplog.at_level(logging.WARNING, logger="mirage.serve.service"):
            create_app(
                make_config(tmp_path / "a", checkpoints, storage=storage)
            ).state.service.close()
        assert "PERSISTS NOTHING" in caplog.text
        with pytest.raises(ValueError, match="persists nothing"):
            create_app(
                make_config(
                    tmp_path / "b", checkpoints, storage={**storage, "require_persistence": True}
                )
            )
    finally:
        redis.stop()
