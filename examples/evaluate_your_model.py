"""Evaluate your own model with mirage: your CNN, your image folder, GRAD² built from your data,
judged by the attacker suite against the undefended model, and the verdict.

    python examples/evaluate_your_model.py            # 5,000 queries per attacker, the full suite
    python examples/evaluate_your_model.py --quick    # what CI runs: 3 attackers, 1,500 queries

The images stand in for yours: Fashion-MNIST written as 28×28 grayscale PNGs into two folders,
one to train the model, one (held out from its training) for mirage. Nothing here is mirage's
own model or recipe: the network has batch norm and trains with Adam.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import mirage
from mirage.attacks.clone import recipe
from mirage.data import load_dataset
from mirage.data.folders import load_image_folder


class MyNet(nn.Module):
    """Your classifier: any module from images (B, 1, 28, 28) in [0, 1] to logits."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 7 * 7, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def write_folder(
    root: Path, images: torch.Tensor, labels: torch.Tensor, classes: list[str]
) -> Path:
    """``root/<class>/<i>.png``, 8-bit grayscale: how a user's data usually arrives."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / classes[int(label)].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(folder / f"{i}.png")
    return root


def train(net: nn.Module, folder: Path, epochs: int) -> nn.Module:
    data = load_image_folder(folder, test_fraction=0.0).train
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    torch.manual_seed(0)
    for _ in range(epochs):
        net.train()
        for index in torch.randperm(len(data)).split(128):
            loss = F.cross_entropy(net(data.images[index]), data.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 attackers, 1,500 queries, short clone training"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    fmnist = load_dataset("fmnist")
    n_train, n_eval = (6000, 3000) if args.quick else (20000, 10000)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_folder = write_folder(
            root / "train",
            fmnist.train.images[:n_train],
            fmnist.train.labels[:n_train],
            fmnist.classes,
        )
        eval_folder = write_folder(
            root / "eval", fmnist.test.images[:n_eval], fmnist.test.labels[:n_eval], fmnist.classes
        )
        net = train(MyNet(), train_folder, epochs=2 if args.quick else 5)
        print(f"your model trained ({time.perf_counter() - start:.0f} s)")

        report = mirage.evaluate(
            net,
            eval_folder,
            "grad2",
            params={
                "epsilon": 0.5,
                "target": "unlearn",
                "preserve_top1": True,
            },  # GRAD² unlearn-top1
            attackers=("soft", "hard-label", "averaging")
            if args.quick
            else mirage.bench.evaluation.DEFAULT_ATTACKERS,
            budget=1500 if args.quick else 5000,
            clone_training=recipe("grad2").model_copy(update={"epochs": 8})
            if args.quick
            else "grad2",
            seeds=(0,) if args.quick else (0, 1, 2),
        )
    print(report.report())
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
