"""Per-query cost of GRAD² and MAD on a user's own LeNet-like module vs mirage's LeNet
(docs/design.md §any-module).

Three victim/surrogate pairs of the same network (conv5x5(20)-pool-conv5x5(50)-pool-fc(500)-fc(K),
1×28×28, K = 10, random weights): mirage's ``LeNet``; ``UserLeNet``, the same layers behind a
hand-written ``forward`` (functional ReLU and max-pool, ``torch.flatten``, normalisation as
arithmetic), which GRAD² reaches through its ``torch.fx`` graph and MAD through a forward hook; and
the same as a plain ``nn.Sequential``. Per batch size, the undefended forward, GRAD² (all-ones
target) and MAD (``layers="last"``) are timed round-robin in one process, and the ratios are
medians of per-repeat ratios to the undefended forward of the same pair::

    .venv/bin/python benchmarks/byo_overhead.py --json /tmp/byo_overhead.json
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mirage.defenses import create_defense
from mirage.models import create_model

from _harness import parser, round_robin, write_json

log = logging.getLogger("byo_overhead")
SHAPE, K = (1, 28, 28), 10


class UserLeNet(nn.Module):
    def __init__(self, k: int = K) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(50 * 4 * 4, 500), nn.Linear(500, k)

    def forward(self, x):
        x = (x - 0.5) / 0.25
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def user_sequential(k: int = K) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, k),
    )


def build(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mirage":
        return create_model("lenet", SHAPE, K, (0.5,), (0.25,)).eval()
    return (UserLeNet() if kind == "user" else user_sequential()).eval()


def main() -> None:
    arguments = parser(__doc__, repeats=15, batches=[1, 32, 256])
    arguments.add_argument("--kinds", nargs="+", default=["mirage", "user", "sequential"])
    arguments.add_argument(
        "--with-jvp",
        action="store_true",
        help="also time GRAD² by torch.func.jvp through the whole surrogate (the route a "
        "user's module took before it was walked through its fx graph)",
    )
    args = arguments.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    rows = []
    for b in args.batches:
        x = torch.rand(b, *SHAPE)
        fns = {}
        for kind in args.kinds:
            victim, surrogate = build(kind, 0), build(kind, 1)
            grad2 = create_defense("grad2", epsilon=args.epsilon, surrogate=surrogate)
            mad = create_defense("mad", epsilon=args.epsilon, surrogate=surrogate)

            def undefended(victim=victim, x=x):
                with torch.no_grad():
                    return torch.softmax(victim(x), 1)

            def defended(defense, victim=victim, x=x):
                with torch.no_grad():
                    probs = torch.softmax(victim(x), 1)
                return defense(x, probs)

            fns[f"{kind}_undefended"] = undefended
            fns[f"{kind}_grad2"] = lambda d=defended, g=grad2: d(g)
            fns[f"{kind}_mad"] = lambda d=defended, m=mad: d(m)
            if args.with_jvp:
                jvp = create_defense(
                    "grad2", epsilon=args.epsilon, surrogate=surrogate, score_method="jvp"
                )
                fns[f"{kind}_grad2_jvp"] = lambda d=defended, g=jvp: d(g)
        inner = max(1, 64 // b)
        timed = round_robin(fns, args.repeats, inner=inner)
        for kind in args.kinds:
            base = timed[f"{kind}_undefended_ratio"]
            row = {
                "batch": b,
                "kind": kind,
                "undefended_ms": 1e3 * timed[f"{kind}_undefended"],
                "grad2_over_undefended": timed[f"{kind}_grad2_ratio"] / base,
                "mad_over_undefended": timed[f"{kind}_mad_ratio"] / base,
            }
            if args.with_jvp:
                row["grad2_jvp_over_undefended"] = timed[f"{kind}_grad2_jvp_ratio"] / base
            log.info(
                "B=%-4d %-10s undefended %.3f ms | grad2 %.2fx | mad %.2fx%s",
                b,
                kind,
                row["undefended_ms"],
                row["grad2_over_undefended"],
                row["mad_over_undefended"],
                f" | grad2 by jvp {row['grad2_jvp_over_undefended']:.2f}x" if args.with_jvp else "",
            )
            rows.append(row)
    write_json(args.json, {"threads": args.threads, "epsilon": args.epsilon, "rows": rows}, args)


if __name__ == "__main__":
    main()
