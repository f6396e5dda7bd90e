"""Where GRAD²'s L1 budget goes, per scenario (why GRAD² does what it does).

The redirection step (exact LP) moves probability mass towards the classes of highest score
a_k. When that class is already the victim's top-1, the step can add at most 1 − y_top to it,
so the L1 actually spent is at most 2 (1 − y_top) whatever ε is, and the answer only gets
sharper — closer to the hard label the attacker could have had anyway. This script measures
it on ``--queries`` images of each scenario's query pool, with the models of the full sweep
(``--models``, default results/models) and GRAD² exactly as the sweep builds it::

    .venv/bin/python experiments/grad2_sharpening/grad2_budget_use.py \\
        --json results/grad2/budget_use.json

Per (scenario, ε): mean effective L1, share of queries whose highest-score class is the
victim's top-1, mean top-1 mass before and after, share of answers whose top-1 mass grew, and
the defender's top-1 agreement on these queries.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from mirage.api import clean_posteriors
from mirage.models import ModelCard
from mirage.scenarios import Scenario, get_scenario, query_pool
from mirage.training.resolve import DefenseSpec, resolve_defense
from mirage.training.victim import get_victim

log = logging.getLogger("grad2_budget_use")


def pool_sample_parser(description: str) -> argparse.ArgumentParser:
    """The options every GRAD² analysis on a sample of the pool shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--scenarios", nargs="+", default=["fmnist-id", "fmnist"])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--models", type=Path, default=Path("results/models"))
    parser.add_argument("--json", type=Path, default=None)
    return parser


def pool_sample(
    name: str, queries: int, models: Path
) -> tuple[Scenario, nn.Module, ModelCard, Tensor, Tensor]:
    """Scenario ``name``'s pinned victim (from ``models``), ``queries`` seeded pool images and
    their clean posteriors."""
    os.environ["MIRAGE_MODELS"] = str(models.resolve())  # the sweep's pinned models
    scenario = get_scenario(name)
    victim, card, cached = get_victim(scenario, show_progress=False)
    if not cached:
        log.warning("%s: no pinned victim in %s, trained one", name, models)
    pool = query_pool(scenario)
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:queries]
    x = pool.images[pick]
    return scenario, victim, card, x, clean_posteriors(victim, x)


def main() -> None:
    parser = pool_sample_parser(__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 1.5])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = []
    for name in args.scenarios:
        scenario, victim, card, x, clean = pool_sample(name, args.queries, args.models)
        top = clean.argmax(1)
        top_mass = clean.gather(1, top[:, None]).squeeze(1)
        for epsilon in args.epsilons:
            spec = DefenseSpec(name="grad2", params={"epsilon": epsilon, "target": "all-ones"})
            defense = resolve_defense(spec, scenario, victim, card)
            scores = defense.scores(x, clean)
            served = defense(x, clean)
            served_top_mass = served.gather(1, top[:, None]).squeeze(1)
            row = {
                "scenario": name,
                "epsilon": epsilon,
                "queries": len(x),
                "effective_l1": float((served - clean).abs().sum(1).mean()),
                "best_score_is_top1": float((scores.argmax(1) == top).float().mean()),
                "top1_mass_clean": float(top_mass.mean()),
                "top1_mass_served": float(served_top_mass.mean()),
                "top1_mass_grew": float((served_top_mass > top_mass + 1e-6).float().mean()),
                "top1_kept": float((served.argmax(1) == top).float().mean()),
            }
            log.info(
                "%-9s ε=%-4g L1 %.3f | best score = top-1 %.2f "
                "| top-1 mass %.3f -> %.3f (grew %.2f) | top-1 kept %.3f",
                name,
                epsilon,
                row["effective_l1"],
                row["best_score_is_top1"],
                row["top1_mass_clean"],
                row["top1_mass_served"],
                row["top1_mass_grew"],
                row["top1_kept"],
            )
            rows.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
