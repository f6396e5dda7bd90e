"""A tiny digits LeNet (random weights, saved with save_checkpoint) served on a loopback port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from mirage.models import ModelCard, create_model, save_checkpoint
from mirage.serve.auth import hash_key
from mirage.serve.config import ServeConfig

os.environ.setdefault("MIRAGE_PROGRESS", "0")

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
KEYS = {
    "alice": "key-alice-0123456789",
    "bob": "key-bob-0123456789",
    "carol": "key-carol-0123456789",
}
METRICS_KEY = "key-metrics-0123456789"


def tiny_checkpoint(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = create_model("lenet", INPUT_SHAPE, NUM_CLASSES, (0.3,), (0.3,))
    card = ModelCard(
        architecture="lenet",
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
        mean=(0.3,),
        std=(0.3,),
        dataset="digits",
        seed=seed,
    )
    return save_checkpoint(model, card, directory)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "victim": tiny_checkpoint(root / "victim", 0),
        "surrogate": tiny_checkpoint(root / "surrogate", 1),
    }


def make_config(
    tmp: Path,
    checkpoints: dict[str, Path],
    *,
    defense: dict | None = None,
    clients: list[dict] | None = None,
    limits: dict | None = None,
    access: dict | None = None,
    storage: dict | None = None,
) -> ServeConfig:
    if clients is None:
        clients = [
            {"name": "alice", "quota": 1000},
            {"name": "bob", "quota": 1000},
            {"name": "carol", "quota": 5, "rate": 1.0, "burst": 3},
        ]
    raw = {
        "model": {"name": "digits", "checkpoint": str(checkpoints["victim"])},
        "defense": defense or {"name": "none"},
        "limits": {"max_batch": 64, "max_payload_bytes": 200_000, **(limits or {})},
        "storage": {"database": str(tmp / "serve.sqlite"), **(storage or {})},
        "access": {"metrics_key_sha256": hash_key(METRICS_KEY), **(access or {})},
        "clients": [
            {"key_sha256": hash_key(c.pop("key", KEYS.get(c["name"], f"key-{c['name']}"))), **c}
            for c in (dict(c) for c in clients)
        ],
    }
    return ServeConfig.model_validate(raw)


def grad2_defense(checkpoints: dict[str, Path]) -> dict:
    return {
        "name": "grad2",
        "params": {"epsilon": 0.5, "target": "all-ones"},
        "surrogate": str(checkpoints["surrogate"]),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m mirage.serve.runner`` on 127.0.0.1 in a subprocess (killable, restartable)."""

    def __init__(
        self, config: ServeConfig, directory: Path, port: int | None = None, *, workers: int = 1
    ) -> None:
        self.workers = workers
        self.path = directory / f"serve-{id(self)}.json"
        self.path.write_text(json.dumps(config.model_dump(mode="json")))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MIRAGE_PROGRESS": "0"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mirage.serve.runner",
                    "--config",
                    str(self.path),
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                ],
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("the server did not become ready")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None


def redis_binary() -> str:
    """The redis-server binary. scripts/bootstrap.sh installs it, so with MIRAGE_REQUIRE_REDIS=1
    (set by .ci/run) its absence fails the test instead of skipping it."""
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("MIRAGE_REQUIRE_REDIS") == "1":
            pytest.fail(
                "redis-server is missing but MIRAGE_REQUIRE_REDIS=1 (run scripts/bootstrap.sh)"
            )
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh installs it)")
    return path


class RedisServer:
    """A private redis-server on 127.0.0.1 and a free port; ``persistent``: append-only file in
    ``directory`` (survives a restart), else no persistence at all."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        self.binary = redis_binary()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        from mirage.serve.redis_store import wait_for

        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.url)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes its append-only file and exits
            self.proc.wait(30)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def stored(config: ServeConfig, read):
    """``read(quotas, audit)`` on the service's stores as they are on disk."""
    from mirage.serve.audit import AuditLog
    from mirage.serve.quotas import QuotaStore

    quotas, audit = QuotaStore(config.storage.database), AuditLog(config.audit_path)
    try:
        return read(quotas, audit)
    finally:
        quotas.close()
        audit.close()


def stored_counts(config: ServeConfig) -> tuple[dict, tuple[int, int]]:
    """(per-client (queries, requests) used, (audit rows, audited queries)) as stored on disk."""
    return stored(config, lambda quotas, audit: (quotas.usage(), audit.count()))


def body(x: torch.Tensor, **overrides) -> dict:
    """An OIP v2 inference request body for images ``x`` (tensor fields overridable)."""
    tensor = {
        "name": "images",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.reshape(-1).tolist(),
    }
    tensor.update(overrides)
    return {"inputs": [tensor]}


def auth(name: str) -> dict:
    """The Authorization header of client ``name``."""
    return {"Authorization": f"Bearer {KEYS.get(name, f'key-{name}')}"}
