"""Shared state for replicas (docs/design.md §shared-state): the Redis store keeps the same
promises as the SQLite one, and two server processes on one Redis answer and charge exactly a
quota's worth of images to 64 concurrent clients, also across a restart of both and of Redis."""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest
import torch
from conftest import KEYS, RedisServer, ServerProcess, make_config, redis_binary

from mirage.serve.audit import AuditLog
from mirage.serve.config import ClientConfig
from mirage.serve.errors import QuotaExceeded, RateLimited
from mirage.serve.quotas import QuotaStore
from mirage.serve.redis_store import RedisQuotaStore

URL_INFER = "/v2/models/digits/infer"


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        store = QuotaStore(tmp_path / "q.sqlite")
        yield store
    else:
        server = RedisServer(tmp_path / "redis").start()
        store = RedisQuotaStore(server.url)
        yield store
        store.close()
        server.stop()
        return
    store.close()


def test_both_backends_keep_the_same_promises(store):
    client = ClientConfig(name="a", key_sha256="0" * 64, quota=10, rate=100.0, burst=8)
    assert store.headroom(client) == 8
    used, first = store.reserve(client, 5)
    assert used == 5 and store.reservations() == 1
    with pytest.raises(RateLimited):
        store.reserve(client, 4)  # 3 tokens left
    store.release(client, first)
    store.release(client, first)  # once only
    assert store.used("a") == 0 and store.reservations() == 0
    used, second = store.reserve(client, 6)
    store.commit(second)
    with pytest.raises(QuotaExceeded):
        store.reserve(client, 5)
    store.reserve(client, 2)  # left behind by a process that is gone
    store.owner = store.owner.rsplit(":", 1)[0] + ":restarted"  # the same pid, another process
    assert store.reconcile(lambda ids: set(), lease=300) == (0, 1)
    assert store.usage() == {"a": (6, 1)} and store.reservations() == 0
    assert [store.auth_failed("10.0.0.1", 60) for _ in range(3)] == [1, 2, 3]
    assert (
        store.auth_throttled("10.0.0.1", 60, 3) > 50
        and store.auth_throttled("10.0.0.1", 60, 4) is None
    )
    assert store.auth_throttled("10.0.0.2", 60, 1) is None


def body() -> dict:
    return {
        "inputs": [
            {
                "name": "images",
                "shape": [1, 1, 8, 8],
                "datatype": "FP32",
                "data": torch.rand(64).tolist(),
            }
        ]
    }


def drain(urls: list[str], clients: int, stop_after: int | None) -> list[int]:
    """``clients`` threads, alternating between the replicas, send 1-image requests until the
    quota refuses them (or ``stop_after`` answers in all); the status codes."""
    statuses: list[int] = []
    lock, enough = threading.Lock(), threading.Event()

    def work(index: int) -> None:
        with httpx.Client(base_url=urls[index % len(urls)], timeout=60) as http:
            while not enough.is_set():
                status = http.post(
                    URL_INFER, json=body(), headers={"X-API-Key": KEYS["alice"]}
                ).status_code
                with lock:
                    statuses.append(status)
                    if stop_after is not None and statuses.count(200) >= stop_after:
                        enough.set()
                if status != 200:
                    return

    workers = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
    return statuses


@pytest.mark.slow
def test_two_replicas_on_one_redis_answer_exactly_the_quota(tmp_path, checkpoints):
    quota = 500
    redis = RedisServer(tmp_path / "redis", persistent=True).start()
    config = make_config(
        tmp_path,
        checkpoints,
        clients=[{"name": "alice", "quota": quota}],
        storage={"backend": "redis", "url": redis.url},
    )
    replicas = [ServerProcess(config, tmp_path), ServerProcess(config, tmp_path)]
    try:
        for replica in replicas:
            replica.start()
        first = drain([r.url for r in replicas], 64, stop_after=quota // 2)
        for replica in replicas:  # restart everything: both replicas and Redis
            replica.kill(sig=15)
        redis.stop()
        redis.start()
        for replica in replicas:
            replica.start()
        second = drain([r.url for r in replicas], 64, stop_after=None)
        store = RedisQuotaStore(redis.url)
        usage, reservations = store.usage(), store.reservations()
        store.close()
    finally:
        for replica in replicas:
            replica.kill()
        redis.stop()
    statuses = first + second
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert statuses.count(200) == quota
    assert usage == {"alice": (quota, quota)} and reservations == 0
    audit = AuditLog(config.audit_path)
    assert audit.count() == (quota, quota)
    audit.close()


def test_a_missing_redis_server_fails_where_it_is_required(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("MIRAGE_REQUIRE_REDIS", "1")  # as .ci/run sets it
    with pytest.raises(pytest.fail.Exception, match="MIRAGE_REQUIRE_REDIS"):
        redis_binary()
    monkeypatch.delenv("MIRAGE_REQUIRE_REDIS")
    with pytest.raises(pytest.skip.Exception):
        redis_binary()
