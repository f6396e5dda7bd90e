"""Why GRAD²'s all-ones target sharpens the answers on a LeNet.

``grad2_budget_use.py`` (beside this script) found that the all-ones target's best-scoring class is
the victim's top-1 for most queries, so the exact LP step only sharpens the answer. This script asks
what in the target and the network makes it so. For each target v it measures, on ``--queries``
pool images with the full sweep's pinned surrogate (``--models``):

- ``best_is_top1``: share of queries whose highest score a_ik is the surrogate's top-1 class;
- ``corr_logits``: mean over queries of the Pearson correlation between a_i and the surrogate's
  logits z_i (1.0 means ``a`` is a temperature change: the clone is only told to be surer);
- ``effective_l1``: the L1 GRAD² actually spends at ``--epsilon`` on these queries.

and, because a is linear in v, the same for v restricted to each parameter tensor (``layers``):
which layer's part of the all-ones direction drives the scores, and how much of them it makes
(``share``: ‖a restricted to that tensor‖ / Σ over tensors, a_i centred per row)::

    .venv/bin/python experiments/grad2_sharpening/grad2_target_geometry.py \\
        --json results/grad2/target_geometry.json
"""

from __future__ import annotations

import json
import logging

import torch
from grad2_budget_use import pool_sample, pool_sample_parser
from torch import Tensor, nn

from mirage.defenses.grad2.scores import Direction, jvp_scores
from mirage.defenses.grad2.targets import all_ones, max_norm, min_ip, random_direction
from mirage.defenses.redirect import redirect
from mirage.training.resolve import DefenseSpec, resolve_defense

log = logging.getLogger("grad2_target_geometry")


def row_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` -> (B,)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def describe(scores: Tensor, logits: Tensor, clean: Tensor, epsilon: float) -> dict[str, float]:
    served = redirect(clean, scores, epsilon)
    return {
        "best_is_top1": float((scores.argmax(1) == logits.argmax(1)).float().mean()),
        "corr_logits": float(row_correlation(scores, logits).mean()),
        "effective_l1": float((served - clean).abs().sum(1).mean()),
    }


def restricted(v: Direction, name: str) -> Direction:
    return {
        key: (t if key == name else torch.zeros(t.shape, dtype=t.dtype)) for key, t in v.items()
    }


def measure(surrogate: nn.Module, x: Tensor, clean: Tensor, epsilon: float, seeds: int) -> dict:
    with torch.no_grad():
        logits = surrogate(x)
    targets = {"all-ones": all_ones(surrogate), "max-norm": max_norm(surrogate)}
    targets.update({f"random-{s}": random_direction(surrogate, s) for s in range(seeds)})
    out: dict = {"targets": {}, "layers": {}}
    for name, v in targets.items():
        out["targets"][name] = describe(jvp_scores(surrogate, x, v), logits, clean, epsilon)
    min_ip_scores = torch.cat(
        [
            jvp_scores(surrogate, xb, min_ip(surrogate, xb, pb))
            for xb, pb in zip(x.split(256), clean.split(256), strict=True)
        ]
    )
    out["targets"]["min-ip"] = describe(min_ip_scores, logits, clean, epsilon)
    ones = {key: t.contiguous() for key, t in all_ones(surrogate).items()}
    per_layer = {key: jvp_scores(surrogate, x, restricted(ones, key)) for key in ones}
    norms = {key: float((s - s.mean(1, keepdim=True)).norm()) for key, s in per_layer.items()}
    total = sum(norms.values())
    for key, s in per_layer.items():
        row = describe(s, logits, clean, epsilon) if norms[key] > 0 else {}
        out["layers"][key] = {"share": norms[key] / total, **row}
    return out


def main() -> None:
    parser = pool_sample_parser(__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--random-seeds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    report = {
        "torch": torch.__version__,
        "epsilon": args.epsilon,
        "queries": args.queries,
        "scenarios": {},
    }
    for name in args.scenarios:
        scenario, victim, card, x, clean = pool_sample(name, args.queries, args.models)
        spec = DefenseSpec(name="grad2", params={"epsilon": args.epsilon, "target": "all-ones"})
        defense = resolve_defense(spec, scenario, victim, card)
        result = measure(defense.surrogates[0], x, clean, args.epsilon, args.random_seeds)
        report["scenarios"][name] = result
        for group in ("targets", "layers"):
            for key, row in result[group].items():
                log.info(
                    "%-9s %-7s %-14s %s",
                    name,
                    group,
                    key,
                    " ".join(f"{k} {v:.3f}" for k, v in row.items()),
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
