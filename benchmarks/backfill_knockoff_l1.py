"""Restore the effective L1 of query-time runs recorded while ``probe_metrics`` took every run for a
training-time one and wrote 0 (``effective_l1_on`` = "256 pool images" on a query-time defense).

Undefended runs get 0 (exact on any queries). Knockoff's queries depend only on the pool and the
seed, so its attack's ledger is recomputed exactly: the same images, in the same requests of ``query_batch_size``, through a freshly built
defense. Records are marked ``"backfilled": ["effective_l1"]``; clone accuracies are untouched.

    python benchmarks/backfill_knockoff_l1.py results/ablation/headline_seeds_fmnist_id/results.jsonl \
        --models results/models
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mirage.api import InProcessAPI
from mirage.attacks import create_attack
from mirage.attacks.pools import attack_data
from mirage.bench.execute import _scenario, prepare_run, split_defense
from mirage.bench.results import ResultStore
from mirage.bench.runs import RunSpec
from mirage.bench.sweep import models_in


def knockoff_ledger_l1(spec: RunSpec) -> float:
    victims, defense = prepare_run(spec)
    attack = create_attack(spec.attack, **spec.attack_params)
    data = attack_data(_scenario((spec.scenario, spec.victim_epochs)), spec.attack)
    n = min(spec.budget, len(data))
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(spec.seed))[:n]
    api = InProcessAPI(victims.served, defense)
    for chunk in data.images[index].split(attack.params.query_batch_size):
        api.query(chunk)
    return api.ledger.effective_l1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--models", type=Path, required=True)
    args = parser.parse_args()
    records = ResultStore(args.results).read()
    changed = 0
    with models_in(args.models):
        for i, record in enumerate(records):
            spec = RunSpec.from_record(record)
            query_time = split_defense(spec.defense, spec.defense_params)[0][0] == "none"
            if not (query_time and record.get("effective_l1_on") == "256 pool images"):
                continue
            if spec.defense == "none":  # nothing perturbed: 0 on any queries, whatever the attack
                l1 = 0.0
            elif spec.attack == "knockoff" and spec.attack_params.get("repeats", 1) == 1:
                l1 = knockoff_ledger_l1(spec)
            else:
                print(f"{spec.describe()}: cannot recompute (not plain Knockoff); left as is")
                continue
            records[i] = {**record, "effective_l1": l1, "effective_l1_on": "queries",
                          "backfilled": sorted({*record.get("backfilled", []), "effective_l1"})}
            changed += 1
            print(f"{spec.describe()}: effective L1 {l1:.4f}")
    ResultStore(args.results).rewrite(records)
    print(f"backfilled {changed} of {len(records)} records")


if __name__ == "__main__":
    main()
