"""Training-time defenses on ``fmnist``: InI and DP-SGD victims against Knockoff
(MNIST-digit pool and in-distribution Fashion-MNIST pool) and JBDA, next to the plain victim;
and the per-query cost of the InI victim against the plain one (same architecture, same run).

Reduced settings for a shared 2-core CPU (stated in every record):

* InI: fine-tunes the cached plain victim (``init="victim"``) for ``--ini-epochs`` epochs on a
  ``--ini-train`` subset of the 60k training images, official loss weights (β 0, γ 0.3, δ 1,
  ε_g 1000, PCGrad), patch-shuffled Fashion-MNIST as D_ood, a student updated once per step.
  The paper trains 50 epochs from scratch.
* DP-SGD: ``--dp-train`` training images, ``--dp-epochs`` epochs, C = 1, σ in ``--noise``.
* Clones: MAD recipe (SGD lr 0.1, momentum 0.5, step decay) for ``--epochs`` epochs (paper 30);
  JBDA's per-round substitutes train ``--sub-epochs`` epochs. Budgets: Knockoff 5k queries,
  JBDA 3.2k (100 seeds, 5 doubling rounds); the MAD paper uses 50k.

Appends one JSON line per finished run to ``results/training_defenses/fmnist.jsonl`` and skips
runs already there, so an interrupted run resumes::

    MIRAGE_PROGRESS=0 nohup .venv/bin/python benchmarks/training_defenses_fmnist.py --part ini \\
        > results/training_defenses/ini.log 2>&1 &
    MIRAGE_PROGRESS=0 nohup .venv/bin/python benchmarks/training_defenses_fmnist.py \\
        --part plain dpsgd > results/training_defenses/plain_dpsgd.log 2>&1 &
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
from mirage.api import InProcessAPI, accuracy, clean_posteriors
from mirage.attacks import CloneSpec, create_attack
from mirage.attacks.clone import recipe
from mirage.attacks.pools import attack_data
from mirage.data import load_dataset
from mirage.scenarios import get_scenario
from mirage.training.dpsgd import DPSGD_TRAINING, DpsgdConfig
from mirage.training.ini import INI_VICTIM_TRAINING, IniConfig
from mirage.training.registry import get_defended_victim

log = logging.getLogger("training_defenses_fmnist")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "training_defenses" / "fmnist.jsonl"

# label: (scenario, attack, budget, attack params)
ATTACKS: dict[str, tuple[str, str, int, dict]] = {
    "knockoff-mnist": ("fmnist", "knockoff", 5_000, {}),
    "knockoff-fmnist-id": ("fmnist-id", "knockoff", 5_000, {}),
    "jbda": ("fmnist", "jbda", 3_200, {"rounds": 5}),
}


def victims(args) -> dict[str, tuple[str, dict]]:
    """label -> (method, params) of the victims this run covers."""
    out: dict[str, tuple[str, dict]] = {}
    if "plain" in args.part:
        out["plain"] = ("none", {})
    if "ini" in args.part:
        ini = IniConfig(
            init="victim",
            num_train=args.ini_train,
            training=INI_VICTIM_TRAINING.model_copy(
                update={"epochs": args.ini_epochs, "lr": args.ini_lr}
            ),
        )
        out["ini"] = ("ini", ini.model_dump(mode="json"))
    if "dpsgd" in args.part:
        for sigma in args.noise:
            dp = DpsgdConfig(
                noise_multiplier=sigma,
                num_train=args.dp_train,
                training=DPSGD_TRAINING.model_copy(update={"epochs": args.dp_epochs}),
            )
            out[f"dpsgd-{sigma:g}"] = ("dpsgd", dp.model_dump(mode="json"))
    return out


def done(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        clean_posteriors(model, x)
        best = min(best, time.perf_counter() - start)
    return best


def overhead_record(plain, ini, repeats: int = 20) -> dict:
    """Per-query cost of the InI victim vs the plain one: best-of-``repeats`` forward time at
    batch sizes 1, 32, 256, interleaved in the same process."""
    test = load_dataset("fmnist").test.images
    rows = {}
    for batch in (1, 32, 256):
        x = test[:batch]
        forward_seconds(plain, x, 2), forward_seconds(ini, x, 2)
        p, i = forward_seconds(plain, x, repeats), forward_seconds(ini, x, repeats)
        rows[str(batch)] = {"plain_seconds": p, "ini_seconds": i, "ratio": i / p}
    return rows


def versions() -> dict:
    return {
        "mirage": mirage.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", nargs="+", default=["plain", "ini", "dpsgd"], choices=["plain", "ini", "dpsgd"]
    )
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument(
        "--dp-attacks",
        nargs="*",
        default=["knockoff-mnist", "knockoff-fmnist-id"],
        choices=list(ATTACKS),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sub-epochs", type=int, default=5)
    parser.add_argument("--ini-epochs", type=int, default=2)
    parser.add_argument("--ini-train", type=int, default=6_400)
    parser.add_argument("--ini-lr", type=float, default=0.05)
    parser.add_argument("--noise", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    parser.add_argument("--dp-train", type=int, default=10_000)
    parser.add_argument("--dp-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    test = load_dataset("fmnist").test
    training = recipe("mad").model_copy(update={"epochs": args.epochs})

    def append(record: dict) -> None:
        record.update(versions=versions(), finished=datetime.now(UTC).isoformat(timespec="seconds"))
        with open(args.results, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    trained = {}
    for victim_label, (method, params) in victims(args).items():
        start = time.perf_counter()
        model, card, cached = get_defended_victim(
            get_scenario("fmnist"), method, params, show_progress=False
        )
        trained[victim_label] = (method, params, model, card)
        log.info(
            "victim %s: test accuracy %.4f (%s, %.0fs)",
            victim_label,
            card.test_accuracy,
            "cached" if cached else "trained",
            time.perf_counter() - start,
        )
        key = f"victim|{victim_label}|{json.dumps(params, sort_keys=True)}"
        if key not in done(args.results):
            extra = {
                k: card.training.get(k)
                for k in ("epsilon", "delta", "steps", "student_test_accuracy", "history")
                if k in card.training
            }
            append(
                {
                    "key": key,
                    "kind": "victim",
                    "victim": victim_label,
                    "method": method,
                    "params": params,
                    "test_accuracy": accuracy(model, test),
                    "train_seconds": card.train_seconds,
                    **extra,
                }
            )
        if method == "ini":
            key = f"overhead|{victim_label}|{json.dumps(params, sort_keys=True)}"
            if key not in done(args.results):
                plain, _, _ = get_defended_victim(
                    get_scenario("fmnist"), "none", show_progress=False
                )
                append(
                    {
                        "key": key,
                        "kind": "overhead",
                        "victim": victim_label,
                        "batches": overhead_record(plain, model),
                    }
                )
    # attacks after every victim is trained, attack-major: each attack covers all victims early
    for label, (scenario_name, attack_name, budget, attack_params) in ATTACKS.items():
        for victim_label, (method, params, model, card) in trained.items():
            if label not in (args.dp_attacks if method == "dpsgd" else args.attacks):
                continue
            attack_params = {
                **attack_params,
                **({"substitute_epochs": args.sub_epochs} if "jb" in attack_name else {}),
            }
            key = (
                f"attack|{victim_label}|{json.dumps(params, sort_keys=True)}|{label}|{args.seed}|"
                f"{args.epochs}|{json.dumps(attack_params, sort_keys=True)}"
            )
            if key in done(args.results):
                log.info("skip %s / %s (done)", victim_label, label)
                continue
            start = time.perf_counter()
            scenario = get_scenario(scenario_name)
            api = InProcessAPI(model, None, query_budget=budget)
            result = create_attack(attack_name, **attack_params).run(
                api,
                budget,
                attack_data(scenario, attack_name),
                CloneSpec.like(card, training=training),
                seed=args.seed,
            )
            record = {
                "key": key,
                "kind": "attack",
                "victim": victim_label,
                "method": method,
                "params": params,
                "attack_label": label,
                "scenario": scenario_name,
                "attack": attack_name,
                "attack_params": attack_params,
                "budget": budget,
                "seed": args.seed,
                "victim_accuracy": accuracy(model, test),
                "clone_accuracy": accuracy(result.clone, test),
                "clone_training": training.model_dump(),
                **result.as_dict(),
            }
            append(record)
            log.info(
                "%s / %s: clone %.4f (victim %.4f), %.0fs",
                victim_label,
                label,
                record["clone_accuracy"],
                record["victim_accuracy"],
                time.perf_counter() - start,
            )


if __name__ == "__main__":
    main()
