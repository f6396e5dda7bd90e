"""Crash-consistent accounting (docs/design.md §reservations): a real server process is killed by
SIGKILL in the middle of a burst, three times; after each restart the usage equals the audit log,
query for query and request for request, and no reservation is left."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from conftest import KEYS, ServerProcess, make_config

from mirage.serve.audit import AuditLog
from mirage.serve.quotas import QuotaStore

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


def ledger(config) -> tuple[dict, dict, int]:
    """(usage per client, audited (queries, requests) per client, open reservations)."""
    quotas, audit = QuotaStore(config.storage.database), AuditLog(config.audit_path)
    try:
        audited: dict[str, tuple[int, int]] = {}
        for row in audit.rows():
            q, r = audited.get(row["client"], (0, 0))
            audited[row["client"]] = (q + row["queries"], r + 1)
        return quotas.usage(), audited, quotas.reservations()
    finally:
        quotas.close()
        audit.close()


def burst(url: str, stop: threading.Event, answered: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set():
            try:
                response = http.post(URL_INFER, json=body(4), headers={"X-API-Key": KEYS["alice"]})
            except httpx.HTTPError:
                return  # the server is gone
            if response.status_code == 200:
                answered.append(4)


@pytest.mark.slow
def test_sigkill_mid_burst_leaves_usage_equal_to_the_audit_log(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints, clients=[{"name": "alice", "quota": 10**9}])
    server = ServerProcess(config, tmp_path)
    orphans = []
    try:
        server.start()
        for _trial in range(3):
            stop, answered = threading.Event(), []
            workers = [
                threading.Thread(target=burst, args=(server.url, stop, answered)) for _ in range(12)
            ]
            for w in workers:
                w.start()
            deadline = time.monotonic() + 20
            while len(answered) < 20 and time.monotonic() < deadline:
                time.sleep(0.02)
            server.kill()  # SIGKILL, mid-burst
            stop.set()
            for w in workers:
                w.join(30)
            orphans.append(ledger(config)[2])
            server.start()  # reconciles at start
            usage, audited, open_reservations = ledger(config)
            assert open_reservations == 0
            assert usage.get("alice", (0, 0)) == audited.get("alice", (0, 0)), (usage, audited)
            assert audited["alice"][0] >= sum(answered)  # every answer the clients got is charged
    finally:
        server.kill()
    print(f"open reservations after each kill: {orphans}")
    assert sum(orphans) > 0, "no kill caught a request in flight"
