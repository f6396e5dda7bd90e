"""The thief who knows ``tie_gap`` (and ``sharpen``) and drops every answer the
watermark could have carried.

Answer buckets (docs/design.md §ownership) relabel only near-ties: a carried answer is a
near-tie ``q`` (``q₁ − q₂ ≤ g``) with its top swapped, then ``(1 − s)·q + s·e_top`` with
``sharpen`` = s. A Kerckhoffs thief told g and s undoes the sharpening of every answer,
``q = (ỹ − s·e_top) / (1 − s)``, and drops the answers for which that is a posterior whose top
two are within g: none of the answers it keeps was carried (natural answers of that shape go
too). It queries 15k pool images through alice's key with its own code (no attack class), trains
``ownership.py``'s clone on what it kept, and is tested like every thief. Printed and appended to
results/ownership/tie_dropper.jsonl: the clone's accuracy, the answers kept, the test.

    python experiments/ownership/ownership_tie_dropper.py --scenario mnist --seed 0 \\
        --watermark '{"buckets":"answer","bucket_fraction":1.0,"tie_gap":0.3}'
"""

from __future__ import annotations

import argparse
import json

import ownership
import torch

from mirage.api import InProcessAPI
from mirage.attacks.clone import train_clone
from mirage.attacks.pools import attack_data
from mirage.ownership import WatermarkConfig


def could_be_carried(served: torch.Tensor, config: WatermarkConfig) -> torch.Tensor:
    """(B,) bool: the answers the near-tie gate could have produced (``served`` (B, K))."""
    share = config.sharpen
    top = served.argmax(1)
    q = served.clone()
    q[torch.arange(len(q)), top] -= share
    q = q / (1 - share)
    two = q.topk(2, dim=1).values
    return (q.min(1).values >= -1e-6) & (two[:, 0] - two[:, 1] <= config.tie_gap + 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--scenario", default="mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--watermark", default='{"buckets":"answer","bucket_fraction":1.0,"tie_gap":0.3}'
    )
    parser.add_argument(
        "--out", default=str(ownership.REPO / "results" / "ownership" / "tie_dropper.jsonl")
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = WatermarkConfig.model_validate_json(args.watermark)
    if config.tie_gap is None:
        raise SystemExit("the dropper needs a watermark with tie_gap")
    run = ownership.Run(
        argparse.Namespace(watermark=args.watermark, attack="knockoff", budget=None),
        args.scenario,
        args.seed,
    )
    soft = run.steal("alice", "soft", "alice/knockoff soft")
    pool = attack_data(run.scenario, "knockoff").images
    images = pool[
        torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))[: run.budget]
    ]
    api = InProcessAPI(run.victim, run.defense("alice", "alice/tie-dropper"), client="alice")
    served = torch.cat([api.query(chunk) for chunk in images.split(500)])
    keep = ~could_be_carried(served, config)
    clone_spec = run.clone_spec.model_copy(
        update={"training": run.clone_spec.training.model_copy(update={"seed": args.seed})}
    )
    clone, _ = train_clone(
        clone_spec, images[keep], served[keep], run.card.num_classes, description="tie-dropper"
    )
    row = {
        "scenario": args.scenario,
        "seed": args.seed,
        "watermark": config.model_dump_json(),
        "queries": len(images),
        "kept": int(keep.sum()),
        "soft": run.entry(soft.clone, "alice"),
        "tie-dropper": run.entry(clone.eval(), "alice"),
        "provenance": ownership.provenance(args),
    }
    with open(args.out, "a") as out:
        out.write(json.dumps(row) + "\n")
    for name, own in (("soft", "alice/knockoff soft"), ("tie-dropper", "alice/tie-dropper")):
        test = row[name]["tests"][own]
        print(
            f"{name}: clone accuracy {row[name]['clone_accuracy']:.4f}, p {test['p_value']:.2g}, "
            f"named {row[name]['named_thief']}"
        )
    print(f"the dropper kept {row['kept']} of {row['queries']} answers")


if __name__ == "__main__":
    main()
