"""Knockoff through the HTTP client against a GRAD²-defended ``mirage serve`` vs in-process:
same victim, surrogate, defense, pool, budget and seed — the clones should match.

Starts ``mirage serve`` as a subprocess on 127.0.0.1 (Fashion-MNIST LeNet victim, GRAD² all-ones
at ε with the scenario's distilled surrogate), runs ``create_attack("knockoff")`` once on an
:class:`~mirage.api.InProcessAPI` and once on an :class:`~mirage.serve.HTTPPredictionAPI`, and
reports both clone accuracies, the largest difference between the answers served to a probe
client over HTTP and in-process, and the queries the server charged. Writes JSON to ``--out``::

    MIRAGE_PROGRESS=0 .venv/bin/python experiments/serve_knockoff_parity/serve_knockoff_parity.py \\
        --out results/serve/knockoff_parity.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _harness
from mirage.api import InProcessAPI, accuracy
from mirage.attacks import CloneSpec, create_attack
from mirage.attacks.pools import attack_data
from mirage.data import load_dataset
from mirage.defenses import create_defense
from mirage.scenarios import get_scenario
from mirage.serve import HTTPPredictionAPI
from mirage.training.surrogate import SurrogateConfig, get_surrogate
from mirage.training.victim import get_victim

from _harness import start_mirage_server

log = logging.getLogger("serve_knockoff_parity")
KEYS = {"attacker": "mk_parity_attacker", "probe": "mk_parity_probe"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument(
        "--epochs", type=int, default=10, help="clone training epochs (GRAD2 recipe otherwise)"
    )
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", type=int, default=1024, help="images compared answer by answer")
    parser.add_argument("--out", type=Path, default=Path("results/serve/knockoff_parity.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    scenario = get_scenario("fmnist")
    victim, card, _ = get_victim(scenario)
    surrogate = get_surrogate(scenario, victim, card, SurrogateConfig())[0][0]
    test = load_dataset(scenario.victim_dataset).test
    pool = attack_data(scenario, "knockoff")
    clone = CloneSpec.like(card)
    clone = clone.model_copy(
        update={"training": clone.training.model_copy(update={"epochs": args.epochs})}
    )
    params = {"epsilon": args.epsilon, "target": "all-ones", "batch_size": 256}

    def defense():
        return create_defense("grad2", surrogate=surrogate, **params)

    start = time.perf_counter()
    local_api = InProcessAPI(victim, defense(), query_budget=args.budget, batch_size=256)
    local = create_attack("knockoff").run(local_api, args.budget, pool, clone, seed=args.seed)
    local_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "model": {"name": "fmnist", "scenario": "fmnist"},
            "defense": {"name": "grad2", "params": params, "surrogate": "distilled"},
            "limits": {"max_batch": 256},
            "storage": {"database": str(Path(tmp) / "parity.sqlite")},
            "clients": [
                {
                    "name": name,
                    "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                    "quota": args.budget if name == "attacker" else None,
                }
                for name, key in KEYS.items()
            ],
        }
        proc, url = start_mirage_server(config, Path(tmp), "grad2", timeout=300.0)
        try:
            start = time.perf_counter()
            with HTTPPredictionAPI(url, "fmnist", KEYS["attacker"]) as http_api:
                remote = create_attack("knockoff").run(
                    http_api, args.budget, pool, clone, seed=args.seed
                )
                charged = http_api.queries_used
            remote_seconds = time.perf_counter() - start
            probe = pool.images[
                torch.randperm(len(pool), generator=torch.Generator().manual_seed(123))[
                    : args.probe
                ]
            ]
            with HTTPPredictionAPI(url, "fmnist", KEYS["probe"]) as probe_api:
                served_http = probe_api.query(probe)
            served_local = InProcessAPI(victim, defense(), batch_size=256).query(probe)
        finally:
            proc.terminate()
            proc.wait(30)
    report = {
        "budget": args.budget,
        "epochs": args.epochs,
        "epsilon": args.epsilon,
        "seed": args.seed,
        "victim_accuracy": card.test_accuracy,
        "clone_accuracy_inprocess": accuracy(local.clone, test),
        "clone_accuracy_http": accuracy(remote.clone, test),
        "queries_inprocess": local.queries,
        "queries_http": remote.queries,
        "server_charged": charged,
        "effective_l1_inprocess": local.effective_l1,
        "probe_max_abs_diff": float((served_http - served_local).abs().max()),
        "probe_images": args.probe,
        "seconds_inprocess": local_seconds,
        "seconds_http": remote_seconds,
    }
    log.info("%s", report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
