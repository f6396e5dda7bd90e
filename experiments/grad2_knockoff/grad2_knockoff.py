"""GRAD² against a Knockoff-style attack on the Fashion-MNIST scenario.

The attacker samples ``--queries`` images from the MNIST-digit pool (train + test), queries the
LeNet victim through the defense, and trains a LeNet clone on the served posteriors with
``fit`` and ``GRAD2_RECIPE`` (``--epochs``). Runs: undefended (several seeds; these clean clones
are also the null for watermark verification), GRAD² all-ones (coordinated) at ε, GRAD² all-ones
argmax-preserving, and GRAD² watermark (behaviour: ``--watermark-size`` Fashion-MNIST training
images of class ``--wm-source`` labelled ``--wm-target``). Reports clone accuracy, the defender's
accuracy under each defense, and the verification statistic / p-value of every clone against the
clean clones (leave-one-out for the clean ones). Writes JSON to ``--out``::

    MIRAGE_PROGRESS=0 nohup .venv/bin/python experiments/grad2_knockoff/grad2_knockoff.py \\
        > results/grad2/knockoff.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from mirage.api import InProcessAPI, accuracy, defended_accuracy
from mirage.data import load_dataset
from mirage.defenses import create_defense
from mirage.models import create_model
from mirage.models.fit import GRAD2_RECIPE, fit
from mirage.ownership.behaviour import verify
from mirage.scenarios import get_scenario
from mirage.training.surrogate import SurrogateConfig, get_surrogate
from mirage.training.victim import get_victim

log = logging.getLogger("grad2_knockoff")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--clean-seeds", type=int, default=5)
    parser.add_argument("--defended-seeds", type=int, default=2)
    parser.add_argument("--watermark-size", type=int, default=20)
    parser.add_argument("--wm-source", type=int, default=1)
    parser.add_argument("--wm-target", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results/grad2/knockoff.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)

    scenario = get_scenario("fmnist")
    victim, card, _ = get_victim(scenario)
    data = load_dataset("fmnist")
    pool = load_dataset("mnist")
    pool_images = torch.cat([pool.train.images, pool.test.images])
    surrogates, surrogate_cards, cached = get_surrogate(scenario, victim, card, SurrogateConfig())
    surrogate = surrogates[0]
    log.info(
        "victim acc %.4f; surrogate (distilled, epoch 10 of 50, cached=%s) acc %.4f",
        card.test_accuracy,
        cached,
        surrogate_cards[0].test_accuracy,
    )

    source = (data.train.labels == args.wm_source).nonzero().squeeze(1)[: args.watermark_size]
    x_w = data.train.images[source]
    y_w = torch.full((len(x_w),), args.wm_target, dtype=torch.int64)
    eps = args.epsilon
    defenses = {
        "none": (lambda: None, args.clean_seeds),
        "grad2-all-ones": (
            lambda: create_defense("grad2", epsilon=eps, surrogate=surrogate, batch_size=128),
            args.defended_seeds,
        ),
        "grad2-all-ones-top1": (
            lambda: create_defense(
                "grad2", epsilon=eps, surrogate=surrogate, batch_size=128, preserve_top1=True
            ),
            1,
        ),
        "grad2-watermark": (
            lambda: create_defense(
                "grad2",
                epsilon=eps,
                surrogate=surrogate,
                batch_size=128,
                target="watermark",
                watermark_x=x_w,
                watermark_y=y_w,
            ),
            args.defended_seeds,
        ),
    }
    runs, clones = [], {}
    for label, (make, seeds) in defenses.items():
        defense = make()
        defender = defended_accuracy(victim, defense, data.test) if defense is not None else None
        for seed in range(seeds):
            pick = torch.randperm(len(pool_images), generator=torch.Generator().manual_seed(seed))[
                : args.queries
            ]
            api = InProcessAPI(victim, make(), query_budget=args.queries, batch_size=128)
            start = time.perf_counter()
            served = api.query(pool_images[pick])
            query_seconds = time.perf_counter() - start
            torch.manual_seed(1000 + seed)
            clone = create_model("lenet", data.input_shape, data.num_classes, data.mean, data.std)
            fit(
                clone,
                pool_images[pick],
                served,
                GRAD2_RECIPE.model_copy(update={"epochs": args.epochs, "seed": seed}),
                show_progress=False,
            )
            clones[(label, seed)] = clone
            run = {
                "defense": label,
                "seed": seed,
                "clone_accuracy": accuracy(clone, data.test),
                "effective_l1": api.ledger.effective_l1,
                "query_seconds": query_seconds,
                "defender_accuracy": defender.defended_accuracy if defender else card.test_accuracy,
                "victim_accuracy": card.test_accuracy,
            }
            log.info("%s", run)
            runs.append(run)
    clean_keys = [k for k in clones if k[0] == "none"]
    for run in runs:
        key = (run["defense"], run["seed"])
        null = [clones[k] for k in clean_keys if k != key]
        result = verify(clones[key], null, x_w, y_w)
        run["verification"] = {
            "statistic": result.statistic,
            "match_rate": result.match_rate,
            "t": result.t,
            "p_value": result.p_value,
            "empirical_p_value": result.empirical_p_value,
            "null_mean": sum(result.clean_statistics) / len(result.clean_statistics),
        }
        log.info(
            "verify %s seed %d: stat %.3f (null mean %.3f) match %.2f p %.3g",
            *key,
            result.statistic,
            run["verification"]["null_mean"],
            result.match_rate,
            result.p_value,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "surrogate_accuracy": surrogate_cards[0].test_accuracy,
                "runs": runs,
            },
            indent=2,
        )
    )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
