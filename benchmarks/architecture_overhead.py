"""Per-query cost of the query-time defenses on LeNet, ResNet-18, ResNet-50 and a small ViT, as a
ratio to the undefended forward, at several batch sizes (docs/design.md §overhead).

Per architecture, the victim and the surrogate are two random initialisations of the same
network (timing does not depend on the weights; batch norm in eval mode): LeNet on 1×28×28,
ResNet-18, ResNet-50 (CIFAR stem) and ViT (patch 4, width 192, depth 6, 3 heads) on 3×32×32,
K = 10. Contenders, timed round-robin in one process so a busy machine slows all alike, ratios
the medians of per-repeat ratios to the undefended forward:

- ``undefended``: victim forward + softmax;
- ``grad2``: + GRAD² (all-ones target, ε 0.5) through the surrogate's fused forward-mode scores;
- ``mad``: + MAD on the surrogate's last layer (``layers="last"``, the serving mode);
- ``grad2_gated``: + GRAD² gated on the victim's max softmax (``msp``, τ 0.5: every query takes
  one branch or the other, so the cost is the gate's plus GRAD²'s).

::

    MIRAGE_PROGRESS=0 .venv/bin/python benchmarks/architecture_overhead.py \\
        --json results/grad2/architecture_overhead.json
"""

from __future__ import annotations

import logging

import torch

from mirage.defenses import create_defense
from mirage.models import create_model

from _harness import parser, round_robin, write_json

log = logging.getLogger("architecture_overhead")
ARCHITECTURES = {
    "lenet": ((1, 28, 28), {}),
    "resnet18": ((3, 32, 32), {}),
    "resnet50": ((3, 32, 32), {}),
    "vit": ((3, 32, 32), {}),
}
K = 10


def build(name: str, seed: int) -> torch.nn.Module:
    shape, kwargs = ARCHITECTURES[name]
    torch.manual_seed(seed)
    channels = shape[0]
    return create_model(name, shape, K, (0.5,) * channels, (0.25,) * channels, **kwargs).eval()


def main() -> None:
    arguments = parser(__doc__, repeats=5, batches=[1, 32, 256])
    arguments.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    args = arguments.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.architectures:
        victim, surrogate = build(name, 0), build(name, 1)
        shape = ARCHITECTURES[name][0]
        defenses = {
            "grad2": create_defense("grad2", epsilon=args.epsilon, surrogate=surrogate),
            "mad": create_defense("mad", epsilon=args.epsilon, surrogate=surrogate, layers="last"),
            "grad2_gated": create_defense(
                "grad2_gated", epsilon_low=args.epsilon, surrogate=surrogate, gate_score="msp"
            ),
        }
        for b in args.batches:
            x = torch.rand(b, *shape, generator=torch.Generator().manual_seed(b))

            def undefended(x=x, victim=victim):
                with torch.no_grad():
                    return torch.softmax(victim(x), 1)

            fns = {"undefended": undefended}
            for label, defense in defenses.items():
                fns[label] = lambda d=defense, x=x: d(x, undefended(x))
            timed = round_robin(fns, args.repeats, inner=max(1, 32 // b))
            row = {"architecture": name, "batch": b, "undefended_ms": 1e3 * timed["undefended"]}
            row.update({f"{label}_over_undefended": timed[f"{label}_ratio"] for label in defenses})
            rows.append(row)
            log.info(
                "%-9s B=%-4d undefended %9.2f ms | %s",
                name,
                b,
                row["undefended_ms"],
                " | ".join(f"{label} {row[f'{label}_over_undefended']:.2f}x" for label in defenses),
            )
    write_json(args.json, {"threads": args.threads, "epsilon": args.epsilon, "rows": rows}, args)


if __name__ == "__main__":
    main()
