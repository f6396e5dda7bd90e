"""Per-query cost of MAD vs the undefended victim and vs the original per-sample code.

Times, in one run and one process (``--threads`` intra-op threads; contenders timed round-robin,
ratios are medians of per-repeat ratios over ``--repeats``), for a
LeNet victim and a LeNet surrogate (1×28×28, K = 10, random weights: timing does not depend on
them):
- undefended: victim forward + softmax;
- floor: victim forward + surrogate forward (what any surrogate-based defense pays before its
  own arithmetic; at batch 1 two *different* networks cost more than one network twice, as their
  weights compete for the cache);
- MAD-last: victim forward + ``create_defense("mad", layers="last")`` (closed form, one extra
  surrogate forward, no backward);
- MAD-all: victim forward + ``create_defense("mad", layers="all")`` (one forward + one backward
  batched over the K classes, per-layer Gram products);
- the original method (``tests/oracles/mad_original.py``: per query, K ``autograd.grad`` calls and
  a Python vertex loop) at the batch sizes in ``--reference-batches`` (default 256), against the
  MAD defense call alone (both given the victim's posteriors).
``--json PATH`` writes the numbers::

    .venv/bin/python benchmarks/mad_overhead.py --json results/mad/overhead.json
"""

from __future__ import annotations

import logging

import torch

from mirage.defenses import create_defense
from mirage.models import create_model

import _harness
from _harness import parser, round_robin, write_json

_harness.use_test_oracles()
from oracles.mad_original import original_mad

log = logging.getLogger("mad_overhead")
SHAPE = (1, 28, 28)
TARGETS = {
    "mad_last_over_undefended": 2.2,
    "mad_all_over_undefended": 25.0,
    "original_over_mad_last": 20.0,
    "original_over_mad_all": 5.0,
}


def main() -> None:
    arguments = parser(__doc__, repeats=15, batches=[1, 32, 256])
    arguments.add_argument("--reference-batches", type=int, nargs="*", default=[256])
    arguments.add_argument("--classes", type=int, default=10)
    arguments.add_argument("--reference-repeats", type=int, default=3)
    args = arguments.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    k = args.classes
    torch.manual_seed(0)
    victim = create_model("lenet", SHAPE, k, (0.5,), (0.25,)).eval()
    surrogate = create_model("lenet", SHAPE, k, (0.5,), (0.25,)).eval()
    defenses = {
        layers: create_defense("mad", epsilon=args.epsilon, layers=layers, surrogate=surrogate)
        for layers in ("last", "all")
    }
    rows = []
    for b in args.batches:
        x = torch.rand(b, *SHAPE)

        def undefended(x=x):
            with torch.no_grad():
                return torch.softmax(victim(x), dim=1)

        def defended(defense, x=x):
            with torch.no_grad():
                probs = torch.softmax(victim(x), dim=1)
            return defense(x, probs)

        def floor(x=x):
            with torch.no_grad():
                return torch.softmax(victim(x), dim=1), surrogate(x)

        contenders = {"undefended": undefended, "floor": floor}
        contenders.update(
            {
                f"mad_{layers}": (lambda d=defense: defended(d))
                for layers, defense in defenses.items()
            }
        )
        result = round_robin(contenders, args.repeats, inner=max(1, 64 // b))
        row = {
            "K": k,
            "batch": b,
            "undefended_s": result["undefended"],
            "floor_s": result["floor"],
            "floor_over_undefended": result["floor_ratio"],
        }
        for layers in defenses:
            row[f"mad_{layers}_s"] = result[f"mad_{layers}"]
            row[f"mad_{layers}_over_undefended"] = result[f"mad_{layers}_ratio"]
        if b in args.reference_batches:
            probs = undefended()
            for layers, defense in defenses.items():

                def reference(layers=layers, x=x, probs=probs):
                    return original_mad(surrogate, x, probs, args.epsilon, layers=layers)

                pair = round_robin(
                    {"mad": lambda d=defense, x=x, probs=probs: d(x, probs), "original": reference},
                    args.reference_repeats,
                )
                row[f"original_{layers}_s"] = pair["original"]
                row[f"original_over_mad_{layers}"] = pair["original_ratio"]
                row[f"max_abs_diff_vs_original_{layers}"] = float(
                    (defense(x, probs) - reference()).abs().max()
                )
        for key in [name for name in row if name.endswith("_s")]:
            row[key.replace("_s", "_per_query_ms")] = 1e3 * row[key] / b
        log.info(
            "B=%-4d undefended %.4f ms/q | floor %.2fx | MAD-last %.2fx | MAD-all %.2fx%s",
            b,
            row["undefended_per_query_ms"],
            row["floor_over_undefended"],
            row["mad_last_over_undefended"],
            row["mad_all_over_undefended"],
            "".join(
                f" | original-{lay} {row[f'original_over_mad_{lay}']:.1f}x slower"
                for lay in defenses
                if f"original_over_mad_{lay}" in row
            ),
        )
        rows.append(row)
    checks = {
        name: {
            "target": target,
            "worst": max(r[name] for r in rows if name in r)
            if name.endswith("undefended")
            else min(r[name] for r in rows if name in r),
        }
        for name, target in TARGETS.items()
        if any(name in r for r in rows)
    }
    for name, check in checks.items():
        check["met"] = (
            (check["worst"] <= check["target"])
            if name.endswith("undefended")
            else (check["worst"] >= check["target"])
        )
        log.info(
            "%-28s worst %.2f  target %s%.1f  %s",
            name,
            check["worst"],
            "≤" if name.endswith("undefended") else "≥",
            check["target"],
            "met" if check["met"] else "MISSED",
        )
    write_json(
        args.json,
        {
            "threads": args.threads,
            "epsilon": args.epsilon,
            "torch": torch.__version__,
            "rows": rows,
            "targets": checks,
        },
        args,
    )


if __name__ == "__main__":
    main()
