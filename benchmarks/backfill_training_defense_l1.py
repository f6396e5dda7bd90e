"""Recompute the plain-victim-relative metrics of training-time-defense runs recorded before
``execute_run`` measured them (their ledger compared the served victim with itself: L1 0).

For each ``ini`` / ``dpsgd`` record it recomputes, with the same functions a run now uses and the
pinned models, ``defender_l1`` / ``defender_top1_agreement`` (test set), ``effective_l1`` (the
run's 256 probe images) and ``angular_deviation``, marks the record ``"backfilled": [...]`` and
rewrites the file atomically. Clone accuracies are untouched (the attack does not depend on
these). Idempotent. Stop any sweep writing to the file first.

    python benchmarks/backfill_training_defense_l1.py results/full/results.jsonl --models results/models
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mirage.attacks import CloneSpec
from mirage.bench.execute import (
    _defender_metrics,
    _scenario,
    prepare_run,
    probe_images,
    probe_metrics,
)
from mirage.bench.results import ResultStore
from mirage.bench.runs import RunSpec
from mirage.bench.sweep import models_in
from mirage.training.registry import list_training_defenses

FIELDS = ("defender_l1", "defender_top1_agreement", "effective_l1", "angular_deviation")


def backfill(record: dict) -> dict:
    spec = RunSpec.from_record(record)
    key = (spec.scenario, spec.victim_epochs)
    victims, defense = prepare_run(spec)
    card = victims.card
    defender = _defender_metrics(key, spec.defense, json.dumps(spec.defense_params, sort_keys=True),
                                 spec.eval_size)
    fresh = CloneSpec.like(card, training=spec.clone_training).build(card.input_shape, card.num_classes)
    probe = probe_images(_scenario(key), spec.seed)
    probes = probe_metrics(victims, defense, fresh, probe)
    return {**record, "defender_l1": defender["defender_l1"],
            "defender_top1_agreement": defender["defender_top1_agreement"],
            "effective_l1": probes["effective_l1"], "effective_l1_on": f"{len(probe)} pool images",
            "angular_deviation": probes["angular_deviation"], "backfilled": list(FIELDS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--models", type=Path, required=True, help="the sweep's pinned models_dir")
    args = parser.parse_args()
    training = set(list_training_defenses()) - {"none"}
    records = ResultStore(args.results).read()
    changed = 0
    with models_in(args.models):
        for i, record in enumerate(records):
            if record.get("defense") in training and "backfilled" not in record:
                records[i] = backfill(record)
                changed += 1
                print(f"{record['scenario']} {record['attack_label']} {record['defense']} "
                      f"{record['defense_params'].get('noise_multiplier', '')}: effective L1 "
                      f"{records[i]['effective_l1']:.3f}, defender L1 {records[i]['defender_l1']:.3f}, "
                      f"top-1 agreement {records[i]['defender_top1_agreement']:.3f}")
    ResultStore(args.results).rewrite(records)
    print(f"backfilled {changed} of {len(records)} records")


if __name__ == "__main__":
    main()
