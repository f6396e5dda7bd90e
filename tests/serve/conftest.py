"""A tiny digits LeNet (random weights, saved with save_checkpoint) served on a loopback port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mirage.models import ModelCard, create_model, save_checkpoint
from mirage.serve.auth import hash_key
from mirage.serve.config import ServeConfig

os.environ.setdefault("MIRAGE_PROGRESS", "0")

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789", "carol": "key-carol-0123456789"}
METRICS_KEY = "key-metrics-0123456789"


def tiny_checkpoint(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = create_model("lenet", INPUT_SHAPE, NUM_CLASSES, (0.3,), (0.3,))
    card = ModelCard(architecture="lenet", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES,
                     mean=(0.3,), std=(0.3,), dataset="digits", seed=seed)
    return save_checkpoint(model, card, directory)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {"victim": tiny_checkpoint(root / "victim", 0), "surrogate": tiny_checkpoint(root / "surrogate", 1)}


def make_config(tmp: Path, checkpoints: dict[str, Path], *, defense: dict | None = None,
                clients: list[dict] | None = None, limits: dict | None = None,
                access: dict | None = None, storage: dict | None = None) -> ServeConfig:
    if clients is None:
        clients = [{"name": "alice", "quota": 1000}, {"name": "bob", "quota": 1000},
                   {"name": "carol", "quota": 5, "rate": 1.0, "burst": 3}]
    raw = {
        "model": {"name": "digits", "checkpoint": str(checkpoints["victim"])},
        "defense": defense or {"name": "none"},
        "limits": {"max_batch": 64, "max_payload_bytes": 200_000, **(limits or {})},
        "storage": {"database": str(tmp / "serve.sqlite"), **(storage or {})},
        "access": {"metrics_key_sha256": hash_key(METRICS_KEY), **(access or {})},
        "clients": [{"key_sha256": hash_key(c.pop("key", KEYS.get(c["name"], f"key-{c['name']}"))), **c}
                    for c in (dict(c) for c in clients)],
    }
    return ServeConfig.model_validate(raw)


def grad2_defense(checkpoints: dict[str, Path]) -> dict:
    return {"name": "grad2", "params": {"epsilon": 0.5, "target": "all-ones"},
            "surrogate": str(checkpoints["surrogate"])}
