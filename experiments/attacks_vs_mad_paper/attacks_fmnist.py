"""Attacks against the undefended Fashion-MNIST victim, to compare with the MAD paper's
Table 1 row "FashionMNIST (LeNet)": victim 92.0, jbda 38.7, jbself 45.8, jbtop3 68.7, knockoff 69.2
(all at 50K queries; knockoff's pool there is EMNIST).

Appends one JSON line per run to ``results/attacks/fmnist.jsonl`` and skips runs already there
(keyed by label, seed, clone recipe and epochs), so an interrupted run resumes::

    MIRAGE_PROGRESS=0 nohup .venv/bin/python experiments/attacks_vs_mad_paper/attacks_fmnist.py \\
        > results/attacks/fmnist.log 2>&1 &
    .venv/bin/python experiments/attacks_vs_mad_paper/attacks_fmnist.py \\
        --only knockoff-mnist --seeds 0 1

Clone training follows the MAD paper (SGD lr 0.1, momentum 0.5, 30 epochs, LeNet = the victim's
architecture); JBDA's per-round substitutes train 20 epochs (the official code's default).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

import mirage
from mirage.api import InProcessAPI, accuracy
from mirage.attacks import CloneSpec, create_attack
from mirage.attacks.clone import recipe
from mirage.attacks.pools import attack_data
from mirage.data import load_dataset
from mirage.scenarios import get_scenario
from mirage.training.victim import get_victim

log = logging.getLogger("attacks_fmnist")
RESULTS = Path(__file__).resolve().parents[2] / "results" / "attacks" / "fmnist.jsonl"

# label: (scenario, attack, budget, attack params)
RUNS: dict[str, tuple[str, str, int, dict]] = {
    "knockoff-mnist": ("fmnist", "knockoff", 10_000, {}),
    "knockoff-fmnist-id": ("fmnist-id", "knockoff", 10_000, {}),
    "jbda": ("fmnist", "jbda", 6_400, {"rounds": 6}),
    "jb-self": ("fmnist", "jb-self", 6_400, {"rounds": 6}),
    "jb-top3": ("fmnist", "jb-top3", 6_400, {"rounds": 6}),
    "knockoff-mnist-hard-label": ("fmnist", "knockoff", 10_000, {"hard_labels": True}),
    "knockoff-adaptive-mnist": ("fmnist", "knockoff-adaptive", 10_000, {}),
    "knockoff-fmnist-id-50k": ("fmnist-id", "knockoff", 50_000, {}),
    "jbda-25k": ("fmnist", "jbda", 25_600, {"rounds": 8}),
    "jb-top3-25k": ("fmnist", "jb-top3", 25_600, {"rounds": 4}),
    "knockoff-mnist-augment": ("fmnist", "knockoff", 10_000, {"augment": True}),
    # the adaptive bandit only matters when the budget is below the pool size (10k MNIST digits)
    "knockoff-mnist-3k": ("fmnist", "knockoff", 3_000, {}),
    "knockoff-adaptive-mnist-3k": ("fmnist", "knockoff-adaptive", 3_000, {}),
}


def done_keys(path: Path) -> set[tuple[str, int, str, int]]:
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            keys.add(
                (
                    record["label"],
                    record["seed"],
                    record["clone_recipe"],
                    record["clone_training"]["epochs"],
                )
            )
    return keys


def run_one(label: str, seed: int, epochs: int, recipe_name: str) -> dict:
    scenario_name, attack_name, budget, params = RUNS[label]
    scenario = get_scenario(scenario_name)
    victim, card, _ = get_victim(scenario)
    test = load_dataset(scenario.victim_dataset, scenario.data_root).test
    training = recipe(recipe_name).model_copy(update={"epochs": epochs})
    api = InProcessAPI(victim, None, query_budget=budget)
    attack = create_attack(attack_name, **params)
    result = attack.run(
        api,
        budget,
        attack_data(scenario, attack_name),
        CloneSpec.like(card, training=training),
        seed=seed,
    )
    return {
        "label": label,
        "seed": seed,
        "scenario": scenario_name,
        "attack": attack_name,
        "attack_params": params,
        "defense": "none",
        "budget": budget,
        "clone_accuracy": accuracy(result.clone, test),
        "victim_accuracy": accuracy(victim, test),
        **result.as_dict(),
        "history": result.history,
        "clone_recipe": recipe_name,
        "clone_training": training.model_dump(),
        "versions": {
            "mirage": mirage.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="run only these labels")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--recipe", default="mad", choices=["mad", "grad2"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for label in args.only or list(RUNS):
        for seed in args.seeds:
            if (label, seed, args.recipe, args.epochs) in done_keys(args.results):
                log.info("skip %s seed %d (already in %s)", label, seed, args.results)
                continue
            start = time.perf_counter()
            record = run_one(label, seed, args.epochs, args.recipe)
            with open(args.results, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.info(
                "%s seed %d: clone %.4f (victim %.4f), %d queries, %.0fs",
                label,
                seed,
                record["clone_accuracy"],
                record["victim_accuracy"],
                record["queries"],
                time.perf_counter() - start,
            )


if __name__ == "__main__":
    main()
