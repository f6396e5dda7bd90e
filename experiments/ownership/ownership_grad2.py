"""Ownership's second mechanism: does GRAD²'s reprogramming reach a hard-label clone once its budget
lets the redirection move the top-1, and at what cost to the defender, beside the keyed watermark?

GRAD² with the ``watermark`` target (docs/design.md §grad2-targets: the clone's gradient redirected
toward a behaviour set, the first 20 training images of class 1 labelled 8) answers every query
within an L1 budget ε. At ε = 0.5 the top-1 rarely moves, so a hard-label thief sees the
victim's labels; at ε = 2 (the whole simplex) the redirection may put any label on top. Per
scenario and ε: the defender's accuracy and how many answers' top-1 moved (test set, thief's
pool), then Knockoff 15k through the defense by the soft and the hard-label thief (the
worst_case profile's clone recipe, seed 0), each clone tested with
``mirage.ownership.behaviour`` (the behaviour's log-likelihood against undefended clones, soft
and hard-label, of ``--null-seeds`` seeds; a Student-t p-value) and its match rate on the
behaviour set. The keyed watermark's figures for the same thieves are in ownership.jsonl. One
JSON line per entry of results/ownership/grad2_reprogramming.jsonl; a re-run skips what is there.

    python experiments/ownership/ownership_grad2.py --scenario mnist --scenario fmnist-id
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _harness
from _harness import REPO, provenance

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from mirage import paths
from mirage.api import InProcessAPI
from mirage.api.evaluate import accuracy, defended_accuracy
from mirage.attacks import CloneSpec, create_attack
from mirage.attacks.countermeasures import variant_params
from mirage.attacks.pools import attack_data
from mirage.bench.config import load_config
from mirage.data import load_dataset
from mirage.defenses import create_defense
from mirage.models.base import clean_posteriors
from mirage.ownership.behaviour import verify
from mirage.scenarios import get_scenario, query_pool
from mirage.training.resolve import DefenseSpec, resolve_params
from mirage.training.victim import get_victim

log = logging.getLogger("ownership_grad2")
BEHAVIOUR = {"source_class": 1, "target_class": 8, "size": 20}
THIEVES = ("soft", "hard-label")
BUDGET = 15000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--scenario", action="append", default=None)
    parser.add_argument("--epsilon", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "results" / "ownership" / "grad2_reprogramming.jsonl"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--null-seeds", type=int, default=3, help="undefended clones per thief for the null"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    done = set()
    if args.out.exists():
        done = {(r["scenario"], r["epsilon"], r["entry"]) for r in map(json.loads, args.out.open())}

    def record(scenario: str, epsilon: float | None, entry: str, make) -> None:
        if (scenario, epsilon, entry) in done:
            return
        start = time.perf_counter()
        row = {
            "scenario": scenario,
            "epsilon": epsilon,
            "entry": entry,
            **make(),
            "seconds": round(time.perf_counter() - start, 1),
            "provenance": provenance(args),
        }
        with args.out.open("a") as out:
            out.write(json.dumps(row) + "\n")
        log.info(
            "%s ε=%s %s: %s",
            scenario,
            epsilon,
            entry,
            {k: v for k, v in row.items() if k not in ("provenance", "null")},
        )

    for name in args.scenario or ["mnist"]:
        run_scenario(name, args.epsilon, args.null_seeds, record)


def run_scenario(name: str, epsilons: list[float], null_seeds: int, record) -> None:
    """The null clones of one scenario, then every ε's defender entry and thieves."""
    scenario = get_scenario(name)
    victim, card, _ = get_victim(scenario)
    test = load_dataset(scenario.victim_dataset).test
    pool = query_pool(scenario).images[:BUDGET]
    clone_spec = CloneSpec.like(card, training=load_config("worst_case").clone_training)
    data = attack_data(scenario, "knockoff")
    own_clones = None if paths.clones_dir() is None else paths.clones_dir() / "ownership"

    def steal(defense, variant: str, seed: int, clones):
        attack = create_attack("knockoff", **variant_params(variant))
        return attack.run(
            InProcessAPI(victim, defense),
            BUDGET,
            data,
            clone_spec.model_copy(update={"cache": clones}),
            seed=seed,
        )

    # the sweeps' clone cache: undefended clones are shared
    null = [
        steal(None, variant, seed, paths.clones_dir()).clone
        for seed in range(null_seeds)
        for variant in THIEVES
    ]
    # the surrogate and the behaviour set do not depend on ε: resolved once
    spec = DefenseSpec.from_params("grad2", {"target": "watermark", "watermark": BEHAVIOUR})
    resolved = resolve_params(spec, scenario, victim, card)
    x_w, y_w = resolved["watermark_x"], resolved["watermark_y"]
    null_match = [verify(m, [n for n in null if n is not m], x_w, y_w).match_rate for m in null]

    def at(epsilon: float) -> None:
        params = {**resolved, "epsilon": epsilon}

        def defender() -> dict:
            served = defended_accuracy(victim, create_defense("grad2", **params), test)
            clean = clean_posteriors(victim, pool, batch_size=1024).argmax(1)
            moved = (
                InProcessAPI(victim, create_defense("grad2", **params)).query(pool).argmax(1)
                != clean
            )
            return {
                "clean_accuracy": served.clean_accuracy,
                "defended_accuracy": served.defended_accuracy,
                "cost_points": 100 * (served.clean_accuracy - served.defended_accuracy),
                "test_top1_moved": 1 - served.top1_agreement,
                "pool_top1_moved": float(moved.float().mean()),
                "effective_l1": served.effective_l1,
            }

        def thief(variant: str) -> dict:
            result = steal(create_defense("grad2", **params), variant, 0, own_clones)
            tested = verify(result.clone, null, x_w, y_w)
            return {
                "clone_accuracy": accuracy(result.clone, test),
                "statistic": tested.statistic,
                "match_rate": tested.match_rate,
                "p_value": tested.p_value,
                "empirical_p_value": tested.empirical_p_value,
                "null": {"statistics": list(tested.clean_statistics), "match_rates": null_match},
            }

        record(name, epsilon, "defender", defender)
        for variant in THIEVES:
            record(name, epsilon, f"knockoff/{variant}", lambda variant=variant: thief(variant))

    for epsilon in epsilons:
        at(epsilon)


if __name__ == "__main__":
    main()
