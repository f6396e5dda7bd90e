"""Issue 17: the thief who knows ``tie_gap`` and drops every answer the watermark could carry.

Answer buckets (docs/design.md §ownership) relabel only near-ties, ``p₁ − p₂ ≤ g``, and a
near-tie's top probability is at most (1 + g) / 2. A Kerckhoffs thief told g trains its clone
only on the answers above that (the ``min_confidence`` countermeasure at (1 + g) / 2): none of
them was carried, so its clone never sees a keyed label. This measures what it pays for that:
its clone's accuracy against the soft thief's, and the test against alice's key.

    python benchmarks/ownership_tie_dropper.py --scenario mnist --seed 0 \\
        --watermark '{"buckets":"answer","bucket_fraction":1.0,"tie_gap":0.3}'
"""

from __future__ import annotations

import argparse
import json

import ownership
import torch

from mirage.ownership import WatermarkConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--scenario", default="mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--watermark", default='{"buckets":"answer","bucket_fraction":1.0,"tie_gap":0.3}')
    parser.add_argument("--out", default=str(ownership.REPO / "results" / "ownership" / "session13_tie_dropper.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = WatermarkConfig.model_validate_json(args.watermark)
    if config.tie_gap is None:
        raise SystemExit("the dropper needs a watermark with tie_gap")
    threshold = (1 + config.tie_gap) / 2
    run = ownership.Run(argparse.Namespace(watermark=args.watermark, attack="knockoff", budget=None),
                        args.scenario, args.seed)
    soft = run.steal("alice", "soft", "alice/knockoff soft")
    dropper = run.steal("alice", None, "alice/knockoff tie-dropper", min_confidence=threshold)
    row = {"scenario": args.scenario, "seed": args.seed, "watermark": config.model_dump_json(),
           "min_confidence": threshold,
           "soft": run.entry(soft.clone, "alice"), "tie-dropper": run.entry(dropper.clone, "alice"),
           "provenance": ownership.provenance(args)}
    with open(args.out, "a") as out:
        out.write(json.dumps(row) + "\n")
    for name in ("soft", "tie-dropper"):
        own = row[name]["tests"][f"alice/knockoff {name}"]
        print(f"{name}: clone accuracy {row[name]['clone_accuracy']:.4f}, p {own['p_value']:.2g}, "
              f"named {row[name]['named_thief']}")


if __name__ == "__main__":
    main()
