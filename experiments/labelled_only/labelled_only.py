"""The reference for an attacker that holds labelled images of the task: a clone trained on the
label-aligning attacker's 100 labelled images alone (``mirage.scenarios.attacker_labels``, the
victim's training split), with no query at all, in the worst_case clone recipe at each of
``--epochs``. No answer policy can take this accuracy away from such an attacker.

    python experiments/labelled_only/labelled_only.py --json results/worst_case/labelled_only.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _harness
from _harness import REPO, parser, write_json

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from mirage.api.evaluate import accuracy
from mirage.attacks import CloneSpec
from mirage.attacks.clone import train_clone
from mirage.data import load_dataset
from mirage.scenarios import attacker_labels, get_scenario
from mirage.training.victim import get_victim


def main() -> None:
    args_parser = parser(
        __doc__, threads=True, output_default=REPO / "results" / "worst_case" / "labelled_only.json"
    )
    args_parser.add_argument("--scenario", default="mnist")
    args_parser.add_argument("--labelled", type=int, default=100)
    args_parser.add_argument("--epochs", type=int, nargs="+", default=[30, 300])
    args_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = args_parser.parse_args()
    torch.set_num_threads(args.threads)
    scenario = get_scenario(args.scenario)
    _, card, _ = get_victim(scenario)
    test = load_dataset(scenario.victim_dataset, scenario.data_root).test
    out: dict = {"scenario": args.scenario, "labelled": args.labelled, "clone_accuracy": {}}
    for epochs in args.epochs:
        for seed in args.seeds:
            labelled = attacker_labels(scenario, args.labelled, seed)
            spec = CloneSpec.like(card)
            spec = spec.model_copy(
                update={
                    "training": spec.training.model_copy(update={"seed": seed, "epochs": epochs})
                }
            )
            targets = torch.nn.functional.one_hot(labelled.labels, card.num_classes).float()
            model, _ = train_clone(spec, labelled.images, targets, card.num_classes)
            out["clone_accuracy"][f"epochs={epochs},seed={seed}"] = accuracy(model, test)
            print(epochs, seed, out["clone_accuracy"][f"epochs={epochs},seed={seed}"], flush=True)
    write_json(args.json, out, args)


if __name__ == "__main__":
    main()
