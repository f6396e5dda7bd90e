"""Per-query cost of ``grad2_gated`` against the undefended forward of the same victim, at batch
1, 32 and 256, measured round-robin in one process and one run (ratios only).

The pinned ``mnist`` victim and its distilled surrogate (results/models/), the gate of
``experiments/grad2_gated/config.toml`` (negative energy, τ at 0.2 % benign false positives).
Batches: benign (MNIST test images, almost all below the gate's τ: top-1-keeping branch),
attacker (the Fashion-MNIST Knockoff pool, ~86 % above it: label-changing branch) and plain GRAD²
unlearn-top1 at ε = 1 for comparison::

    .venv/bin/python benchmarks/grad2_gated_overhead.py --json results/ood_gate/gated_overhead.json
"""

from __future__ import annotations

import os

import torch

from _harness import REPO, parser, round_robin, write_json

os.environ.setdefault("MIRAGE_MODELS", str(REPO / "results" / "models"))

from mirage.api import clean_posteriors
from mirage.data import load_dataset
from mirage.scenarios import get_scenario, query_pool
from mirage.training.resolve import DefenseSpec, resolve_defense, resolve_victims

GATED = {
    "target": "unlearn",
    "epsilon_low": 1.0,
    "epsilon_high": 2.0,
    "gate": {"score": "neg-energy", "benign_fpr": 0.002},
}


def main() -> None:
    args = parser(__doc__, repeats=9, batches=[1, 32, 256]).parse_args()
    torch.set_num_threads(args.threads)
    scenario = get_scenario("mnist")
    gated_spec = DefenseSpec.from_params("grad2_gated", GATED)
    victims = resolve_victims(gated_spec, scenario)
    victim = victims.plain
    gated = resolve_defense(gated_spec, scenario, victim, victims.card)
    plain = resolve_defense(
        DefenseSpec.from_params(
            "grad2", {"target": "unlearn", "epsilon": 1.0, "preserve_top1": True}
        ),
        scenario,
        victim,
        victims.card,
    )
    sources = {"benign": load_dataset("mnist").test.images, "attacker": query_pool(scenario).images}
    rows = []
    for batch in args.batches:
        for name, images in sources.items():
            x = images[:batch]
            calls = {
                "undefended": lambda x=x: clean_posteriors(victim, x),
                "grad2_gated": lambda x=x: gated(x, clean_posteriors(victim, x)),
                "grad2_unlearn_top1": lambda x=x: plain(x, clean_posteriors(victim, x)),
            }
            timing = round_robin(calls, args.repeats, inner=max(1, 64 // batch))
            flagged = float(gated.attacker_like(x, clean_posteriors(victim, x)).float().mean())
            row = {
                "batch": batch,
                "queries": name,
                "above_gate": round(flagged, 3),
                **{k: round(v, 3) for k, v in timing.items() if k.endswith("_ratio")},
            }
            rows.append(row)
            print(row, flush=True)
    write_json(args.json, {"rows": rows, "gated_params": GATED, "tau": gated.params.tau}, args)


if __name__ == "__main__":
    main()
