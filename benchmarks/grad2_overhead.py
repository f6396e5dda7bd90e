"""Per-query cost of GRAD² vs the undefended victim and vs the original code.

Times, in one run and one process (``--threads`` intra-op threads, best of ``--repeats``):
- undefended: victim forward + softmax;
- GRAD²: victim forward + ``create_defense("grad2", target="all-ones", surrogate=LeNet)`` —
  one forward-mode JVP through the full surrogate + the exact vectorised redirect;
- the original method (``tests/oracles/grad2_original.py``): double backward per batch of 32 and a
  per-row Python greedy loop;
- MAD, if registered, for side-by-side cost.
at batch 1, 32, 256 for K = 10 (LeNet, 1×28×28) and K = 100 (LeNet, 3×32×32). Weights are random
(network timing does not depend on them), but the victim's classifier is rescaled so its mean
top-1 probability is ``--top1`` (default 0.9, like a trained victim): the original's per-row
greedy loop runs longer on peaked posteriors, so near-uniform random outputs would flatter it.
``--json PATH`` writes the numbers::

    .venv/bin/python benchmarks/grad2_overhead.py --json results/grad2/overhead.json
"""

from __future__ import annotations

import logging

import torch

from mirage.defenses import DEFENSES, create_defense
from mirage.models import create_model

import _harness
from _harness import best_of, parser, write_json

_harness.use_test_oracles()
from oracles.grad2_original import original_grad2

log = logging.getLogger("grad2_overhead")
SETTINGS = {10: (1, 28, 28), 100: (3, 32, 32)}


@torch.no_grad()
def calibrate_confidence(victim: torch.nn.Module, x: torch.Tensor, target: float) -> float:
    """Scale the victim's classifier so its mean top-1 probability on ``x`` is ``target``."""
    weight, bias = victim.classifier.weight.clone(), victim.classifier.bias.clone()
    features = victim.features(x)
    lo, hi = -3.0, 6.0
    for _ in range(40):
        mid = (lo + hi) / 2
        logits = features @ (weight * 10**mid).T + bias * 10**mid
        lo, hi = (mid, hi) if torch.softmax(logits, 1).max(1).values.mean() < target else (lo, mid)
    victim.classifier.weight.copy_(weight * 10**lo)
    victim.classifier.bias.copy_(bias * 10**lo)
    return float(torch.softmax(victim(x), 1).max(1).values.mean())


def main() -> None:
    arguments = parser(__doc__, repeats=7, batches=[1, 32, 256])
    arguments.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    arguments.add_argument(
        "--top1", type=float, default=0.9, help="victim's mean top-1 probability"
    )
    args = arguments.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    rows = []
    for k in args.classes:
        shape = SETTINGS.get(k, (1, 28, 28))
        torch.manual_seed(0)
        victim = create_model("lenet", shape, k, (0.5,) * shape[0], (0.25,) * shape[0]).eval()
        peak = calibrate_confidence(victim, torch.rand(512, *shape), args.top1)
        surrogate = create_model("lenet", shape, k, (0.5,) * shape[0], (0.25,) * shape[0]).eval()
        grad2 = create_defense("grad2", epsilon=args.epsilon, surrogate=surrogate, batch_size=256)
        v_flat = torch.ones(sum(p.numel() for p in surrogate.parameters()))
        mad = None
        if "mad" in DEFENSES:
            try:
                mad = create_defense("mad", epsilon=args.epsilon, surrogate=surrogate)
            except Exception as error:  # noqa: BLE001 — report, don't hide: MAD's params may differ
                log.info("MAD not timed: %s", error)
        for b in args.batches:
            x = torch.rand(b, *shape)

            def undefended(victim=victim, x=x):
                with torch.no_grad():
                    return torch.softmax(victim(x), dim=1)

            def defended(defense=grad2, victim=victim, x=x):
                with torch.no_grad():
                    probs = torch.softmax(victim(x), dim=1)
                return defense(x, probs)

            def original(victim=victim, surrogate=surrogate, x=x, v_flat=v_flat):
                return original_grad2(x, victim, surrogate, v_flat, args.epsilon)

            with torch.no_grad():
                probs = torch.softmax(victim(x), dim=1)
            agreement = (
                (original_grad2(x, victim, surrogate, v_flat, args.epsilon) - grad2(x, probs))
                .abs()
                .max()
            )
            row = {
                "K": k,
                "batch": b,
                "victim_mean_top1": peak,
                "max_abs_diff_vs_original": float(agreement),
                "undefended_s": best_of(undefended, args.repeats),
                "grad2_s": best_of(defended, args.repeats),
                "original_s": best_of(original, max(3, args.repeats // 2)),
            }
            if mad is not None:
                row["mad_s"] = best_of(
                    lambda mad=mad, defended=defended: defended(mad), max(3, args.repeats // 2)
                )
            for key in [name for name in row if name.endswith("_s")]:
                row[key.replace("_s", "_per_query_ms")] = 1e3 * row[key] / b
            row["grad2_over_undefended"] = row["grad2_s"] / row["undefended_s"]
            row["original_over_grad2"] = row["original_s"] / row["grad2_s"]
            if mad is not None:
                row["mad_over_undefended"] = row["mad_s"] / row["undefended_s"]
            log.info(
                "K=%-4d B=%-4d undefended %.3f ms/q | grad2 %.3f ms/q (%.2fx) | original %.3f ms/q "
                "(grad2 %.1fx faster)%s",
                k,
                b,
                row["undefended_per_query_ms"],
                row["grad2_per_query_ms"],
                row["grad2_over_undefended"],
                row["original_per_query_ms"],
                row["original_over_grad2"],
                f" | mad {row['mad_over_undefended']:.2f}x" if mad is not None else "",
            )
            rows.append(row)
    write_json(
        args.json,
        {
            "threads": args.threads,
            "epsilon": args.epsilon,
            "torch": torch.__version__,
            "rows": rows,
        },
        args,
    )


if __name__ == "__main__":
    main()
