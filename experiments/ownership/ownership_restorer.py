"""Which answers does the restorer (attacks/restorer.py) undo on a watermarked API?

Runs alice's restorer thief of ownership.py (beside this script; its clone from the cache) with a
spy on ``restore_answers``, then splits the top-1 changes it made by whether the answer carried the
watermark and, if so, whether its feature shadow (shadow 0) trained on that image. A restorer
that undid only the images its shadow never saw would be weakened by memorisation; one that
undoes carried answers either way is cleaning labels.

    python experiments/ownership/ownership_restorer.py --scenario mnist \\
        --watermark '{"bucket_fraction":0.5,"density_cap":1e-4}'
"""

from __future__ import annotations

import argparse
import json

import ownership
import torch

import mirage.attacks.restorer as restorer_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--scenario", default="mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--watermark", default="{}")
    args = parser.parse_args()
    torch.set_num_threads(2)
    captured = {}
    original = restorer_module.restore_answers

    def spy(config, clone, images, answers, num_classes, *, seed):
        restored, stats = original(config, clone, images, answers, num_classes, seed=seed)
        captured.update(
            images=images,
            answers=restorer_module.training_targets(answers),
            restored=restored,
            seed=seed,
        )
        return restored, stats

    restorer_module.restore_answers = spy
    run = ownership.Run(
        argparse.Namespace(watermark=args.watermark, attack="knockoff", budget=None),
        args.scenario,
        args.seed,
    )
    run.steal("alice", "restorer", "alice/knockoff restorer")
    images, answers, restored = captured["images"], captured["answers"], captured["restored"]
    # shadow 0's half, as restore_answers draws it
    order = torch.randperm(
        len(images), generator=torch.Generator().manual_seed(captured["seed"] + 4241)
    )
    trained = torch.zeros(len(images), dtype=torch.bool)
    trained[order[: len(images) // 2]] = True
    carried = run.carried(run.watermarks["alice"], images)
    changed = restored.argmax(1) != answers.argmax(1)
    out = {}
    for name, rows in (
        ("carried, in shadow 0's half", carried & trained),
        ("carried, not in it", carried & ~trained),
        ("not carried", ~carried),
    ):
        out[name] = {
            "answers": int(rows.sum()),
            "top1_changed": round(float(changed[rows].float().mean()), 3),
        }
    print(
        json.dumps(
            {"scenario": args.scenario, "seed": args.seed, "watermark": args.watermark, **out}
        )
    )


if __name__ == "__main__":
    main()
