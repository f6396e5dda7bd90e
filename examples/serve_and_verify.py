"""Serve your model with ownership evidence, then show that a stolen copy came through one API key.

    python examples/serve_and_verify.py

1. Your model: a small CNN trained on scikit-learn's 8×8 digits, saved with ``torch.export``.
2. ``mirage serve`` for it with ``[ownership]``: every client's answers carry a watermark keyed
   to that client, and the queries that carried it are kept as evidence (docs/design.md
   §ownership).
3. A thief, alice, takes hard labels for every training image over HTTP with her own code, and
   trains a clone that memorises them. An honest user, bob, sends a few requests.
4. ``mirage verify`` on alice's clone names alice's key. On a model trained on the true labels it
   names nobody.

The watermark here (half the buckets, a small margin) suits a demonstration on 1,437 small images:
it changes many answers. Production settings and what they cost are in results/ownership/.

What this does and does not show: this thief memorises its transfer set (150 epochs). A thief
whose ordinary recipe (early stopping, augmentation) ignores a minority of odd labels, and who
queries the victim's own data, is not named in distribution. See results/ownership/README.md,
section 3, "Thieves mirage did not write".
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import httpx
import torch
from torch import nn
from typer.testing import CliRunner

from mirage.cli import app
from mirage.data import load_dataset
from mirage.serve.app import create_app
from mirage.serve.auth import new_key
from mirage.serve.config import ServeConfig
from mirage.serve.runner import ServerThread


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 10),
    )


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int) -> nn.Module:
    """Adam on (images, labels); used for your model, the thief's clone and the innocent alike."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(images)).split(128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    return model.eval()


def export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), path)
    return path


def hard_labels(url: str, key: str, images: torch.Tensor) -> torch.Tensor:
    """The thief's own client: 64 images per OIP V2 request, the argmax of each answer."""
    labels = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        for chunk in images.split(64):
            body = {
                "inputs": [
                    {
                        "name": "images",
                        "shape": list(chunk.shape),
                        "datatype": "FP32",
                        "data": chunk.flatten().tolist(),
                    }
                ]
            }
            reply = http.post("/v2/models/digits/infer", json=body, timeout=30)
            reply.raise_for_status()
            output = reply.json()["outputs"][0]
            labels.append(torch.tensor(output["data"]).view(output["shape"]).argmax(1))
    return torch.cat(labels)


def verify(config: Path, suspect: Path) -> dict[str, dict]:
    """``mirage verify --config … --suspect … --json``, by client."""
    result = CliRunner().invoke(
        app, ["verify", "--config", str(config), "--suspect", str(suspect), "--json"]
    )
    if result.exit_code != 0:
        raise RuntimeError(result.output)
    return {test["client"]: test for test in json.loads(result.output)}


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    digits = load_dataset("digits")
    images, labels = digits.train.images.float(), digits.train.labels
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        yours = export(train(small_cnn(), images, labels, epochs=30), images[:2], work / "net.pt2")
        # an example's secret; yours comes from a secret store, never from the config
        os.environ.setdefault("MIRAGE_OWNERSHIP_SECRET", "example-secret-not-for-production")
        alice_key, alice_digest = new_key()
        bob_key, bob_digest = new_key()
        config = ServeConfig.model_validate(
            {
                "model": {"name": "digits", "path": str(yours)},
                "defense": {"name": "none"},
                "storage": {"database": str(work / "serve.sqlite")},
                "ownership": {
                    "evidence": str(work / "evidence.sqlite"),
                    "watermark": {"bucket_fraction": 0.5, "margin": 0.1},
                },
                "clients": [
                    {"name": "alice", "key_sha256": alice_digest, "quota": 10_000},
                    {"name": "bob", "key_sha256": bob_digest, "quota": 10_000},
                ],
            }
        )
        config_path = work / "serve.json"
        config_path.write_text(config.model_dump_json())
        with ServerThread(create_app(config)) as url:
            stolen = hard_labels(url, alice_key, images)
            hard_labels(url, bob_key, images[:100])
        print(f"alice took {len(stolen)} hard labels; bob sent 100 images")

        torch.manual_seed(1)
        clone = export(train(small_cnn(), images, stolen, epochs=150), images[:2], work / "c.pt2")
        torch.manual_seed(2)
        innocent = export(
            train(small_cnn(), images, labels, epochs=150), images[:2], work / "i.pt2"
        )
        for name, suspect in (("alice's clone", clone), ("a model of the true labels", innocent)):
            tests = verify(config_path, suspect)
            named = sorted(client for client, test in tests.items() if test["named"])
            detail = ", ".join(
                f"{client} p={test['corrected_p_value']:.2g}" for client, test in tests.items()
            )
            print(f"{name}: named {named or 'nobody'} ({detail})")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
