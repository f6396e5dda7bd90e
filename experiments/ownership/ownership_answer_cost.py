"""What a watermark costs a benign user who reads the probabilities, not only the label
(no clone).

Per scenario and watermark, on the victim's test set through three keys: top-1 accuracy, the
negative log-likelihood of the true class, the Brier score, the expected calibration error (15
equal-width bins of the top probability), the mean L1 distance between the served and the clean
answer, and the share of answers the watermark changed (each layer's share for a stack). A
keyed runner-up (``place = "second"``) keeps every top-1 but moves ``sharpen`` of each carried
answer's mass; this is the price a benign user sees.

    python experiments/ownership/ownership_answer_cost.py    # results/ownership/answer_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _harness
from _harness import REPO, provenance

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from mirage.data import load_dataset
from mirage.models.base import clean_posteriors
from mirage.ownership import derive_key, fourier_features, layered_watermarks, watermark_layers
from mirage.ownership.watermark import capped_layers
from mirage.scenarios import get_scenario
from mirage.training.victim import get_victim

SECRET = b"benchmark-secret-not-for-production/answer-cost"
WATERMARKS = {
    "fmnist-id": [
        [{"bucket_fraction": 1.0, "density_cap": 1e-4}],
        [{"buckets": "answer", "bucket_fraction": 1.0, "place": "second", "sharpen": 0.1}],
        [
            {"bucket_fraction": 1.0, "density_cap": 1e-4},
            {"buckets": "answer", "bucket_fraction": 1.0, "place": "second", "sharpen": 0.1},
        ],
    ],
    "mnist": [[{"buckets": "answer", "bucket_fraction": 1.0, "tie_gap": 0.3, "template": 0.9}]],
}


def answer_quality(answers: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """Top-1 accuracy, NLL of the true class, Brier score and expected calibration error."""
    top, predicted = answers.max(dim=1)
    right = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(top, edges[1:-1])
    ece = sum(
        float(
            (right[which == b].mean() - top[which == b].mean()).abs() * (which == b).float().mean()
        )
        for b in range(bins)
        if (which == b).any()
    )
    truth = torch.nn.functional.one_hot(labels, answers.shape[1]).float()
    return {
        "accuracy": float(right.mean()),
        "nll": float(-answers.gather(1, labels.unsqueeze(1)).clamp_min(1e-12).log().mean()),
        "brier": float(((answers - truth) ** 2).sum(1).mean()),
        "ece": ece,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "results" / "ownership" / "answer_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {}
    for name, configs in WATERMARKS.items():
        scenario = get_scenario(name)
        victim, card, _ = get_victim(scenario)
        data = load_dataset(scenario.victim_dataset)
        labels = torch.as_tensor(data.test.labels)
        clean = clean_posteriors(victim, data.test.images, batch_size=1024)
        rows = {"clean": answer_quality(clean, labels)}
        for config in configs:
            layers = watermark_layers(config)
            capped = capped_layers(layers)
            reference = fourier_features(data.train.images, capped[0]) if capped else None
            keys = []
            for client in ("alice", "bob", "carol"):
                watermarks = layered_watermarks(
                    derive_key(SECRET, client), client, layers, card.num_classes, reference
                )
                served, changed = clean, []
                for watermark in watermarks.values():
                    served, marks = watermark.apply(data.test.images, served)
                    changed.append(float(marks.carried.float().mean()))
                keys.append(
                    {
                        **answer_quality(served, labels),
                        "carried_layers": changed,
                        "mean_l1": float((served - clean).abs().sum(1).mean()),
                    }
                )
            label = json.dumps(config, separators=(",", ":"))
            rows[label] = {
                "keys": keys,
                **{
                    k: sum(key[k] for key in keys) / len(keys)
                    for k in ("accuracy", "nll", "brier", "ece", "mean_l1")
                },
            }
            print(name, label, {k: round(v, 4) for k, v in rows[label].items() if k != "keys"})
        print(name, "clean", {k: round(v, 4) for k, v in rows["clean"].items()})
        out[name] = rows
    with open(args.out, "w") as handle:
        json.dump({"scenarios": out, "provenance": provenance(args)}, handle, indent=2)


if __name__ == "__main__":
    main()
