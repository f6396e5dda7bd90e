"""Several worker processes behind one port (docs/design.md §workers): a quota stays exact when
two workers on one Redis answer 32 concurrent clients over REST and gRPC, both workers answer, a
killed worker is replaced while the others serve, and a worker that cannot start stops the
server with its one-line reason."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import KEYS, RedisServer, ServerProcess, free_port, make_config
from test_shared_state import URL_INFER, body, drain
from tritonclient.utils import InferenceServerException

from mirage.serve.audit import AuditLog
from mirage.serve.config import GrpcConfig
from mirage.serve.redis_store import RedisQuotaStore


def workers_of(pid: int) -> list[int]:
    """The worker processes of the supervisor ``pid``: its children, from /proc, less
    multiprocessing's resource tracker."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"resource_tracker" not in command:
            children.append(int(stat.parent.name))
    return sorted(children)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


@pytest.mark.slow
def test_two_workers_on_one_port_answer_exactly_the_quota_over_rest_and_grpc(tmp_path, checkpoints):
    quota = 300
    redis = RedisServer(tmp_path / "redis").start()
    config = make_config(
        tmp_path,
        checkpoints,
        clients=[{"name": "alice", "quota": quota}],
        storage={"backend": "redis", "url": redis.url},
    ).model_copy(update={"grpc": GrpcConfig(port=free_port())})
    server = ServerProcess(config, tmp_path, workers=2)
    try:
        server.start()
        wait_for(lambda: len(workers_of(server.proc.pid)) == 2)
        workers = workers_of(server.proc.pid)
        before = {pid: cpu_seconds(pid) for pid in workers}
        rest = drain([server.url], 32, stop_after=quota - 40)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{config.grpc.port}")
        x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
        tensor = grpcclient.InferInput("images", [1, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(x)
        answered_grpc, refusal = 0, None
        while refusal is None and answered_grpc <= quota:
            try:
                client.infer(
                    "digits", [tensor], headers={"authorization": f"Bearer {KEYS['alice']}"}
                )
                answered_grpc += 1
            except InferenceServerException as error:
                refusal = error
        client.close()
        used = {pid: cpu_seconds(pid) - before[pid] for pid in workers}
        store = RedisQuotaStore(redis.url)
        usage, reservations = store.usage(), store.reservations()
        store.close()
    finally:
        server.kill(sig=signal.SIGTERM)
        redis.stop()
    assert set(rest) <= {200, 429}, sorted(set(rest))
    assert rest.count(200) + answered_grpc == quota
    assert "RESOURCE_EXHAUSTED" in str(refusal.status())
    assert usage == {"alice": (quota, rest.count(200) + answered_grpc)} and reservations == 0
    audit = AuditLog(config.audit_path)
    assert audit.count()[1] == quota
    audit.close()
    assert all(seconds > 0 for seconds in used.values()), used  # both workers answered
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # SIGTERM stopped them


@pytest.mark.slow
def test_a_killed_worker_is_replaced_while_the_other_serves(tmp_path, checkpoints):
    server = ServerProcess(make_config(tmp_path, checkpoints), tmp_path, workers=2).start()
    try:
        # both ready: a worker killed before it is ready stops the server (it could not start)
        wait_for(lambda: server.log.read_text().count(" ready (pid ") == 2)
        first, second = workers_of(server.proc.pid)
        os.kill(first, signal.SIGKILL)  # a connection it had accepted would be reset: none here
        wait_for(lambda: first not in workers_of(server.proc.pid))
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for _ in range(20):  # served meanwhile, by the survivor or the replacement
                response = http.post(URL_INFER, json=body(), headers={"X-API-Key": KEYS["alice"]})
                assert response.status_code == 200
        wait_for(
            lambda: (
                len(now := workers_of(server.proc.pid)) == 2 and first not in now and second in now
            )
        )
    finally:
        server.kill(sig=signal.SIGTERM)


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_server_with_its_reason(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints)
    missing = tmp_path / "gone.safetensors"
    config = config.model_copy(
        update={"model": config.model.model_copy(update={"checkpoint": missing})}
    )
    path = tmp_path / "serve.json"
    path.write_text(config.model_dump_json())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mirage.serve.runner",
            "--config",
            str(path),
            "--workers",
            "2",
            "--port",
            str(free_port()),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: worker" in result.stderr and "gone" in result.stderr
