"""Sweep defenses over your own data: a folder of your labelled images becomes a scenario of a
sweep config (`[user_scenarios.<name>]`), crossed with a grid of defenses, the attacker suite and
three seeds; the sweep resumes where it stopped and ends in the report and the verdict.

    python examples/sweep_your_data.py --out my-sweep/           # Knockoff 2,000 queries per run
    python examples/sweep_your_data.py --out my-sweep/ --quick   # what CI runs: 300 queries

The images stand in for yours: scikit-learn's 8×8 digits written as grayscale PNGs into
`<out>/images/<class>/`. No model is given, so mirage trains a victim of its standard family on
the non-test share of the images and keeps it with the sweep (`models_dir`). The same config runs
from the command line: `mirage bench run --config <out>/sweep.toml`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from mirage.bench.config import load_config
from mirage.bench.report import build_report
from mirage.bench.results import ResultStore
from mirage.bench.summary import verdict, verdict_advice, worst_case_points
from mirage.bench.sweep import run_sweep
from mirage.data import load_dataset

CONFIG = """name = "my-digits"
scenarios = ["my-digits"]
seeds = [0, 1, 2]
models_dir = "models"                 # the trained victim and surrogate, kept with the results
clone_training = {{ epochs = {epochs}, batch_size = 64 }}

[user_scenarios.my-digits]
data = "images"                       # root/<class>/<image>: your labelled images
# model = "net.pt2"                   # your model (.pt2, .onnx, .safetensors + model_class)
# pool = "their-images"               # the attacker's own unlabelled images

[[defenses]]
name = "none"

[[defenses]]
name = "grad2"
label = "grad2-unlearn-top1"
params = {{ target = "unlearn", preserve_top1 = true, surrogate = "distilled" }}
grid = {{ epsilon = [0.5, 1.0] }}

[[defenses]]
name = "reverse_sigmoid"
grid = {{ beta = [0.3] }}

[[attacks]]
name = "knockoff"
budget = {budget}
variants = ["soft", "hard-label", "averaging"]
"""


def write_images(root: Path) -> int:
    """The digits as 8×8 grayscale PNGs under ``root/<class>/``; returns how many."""
    digits = load_dataset("digits")
    images = np.concatenate([digits.train.images.numpy(), digits.test.images.numpy()])
    labels = np.concatenate([digits.train.labels.numpy(), digits.test.labels.numpy()])
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).round().astype(np.uint8), mode="L").save(
            folder / f"{index}.png"
        )
    return len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("my-sweep"))
    parser.add_argument("--quick", action="store_true", help="300 queries, 2 clone epochs (CI)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not (args.out / "images").is_dir():
        print(f"wrote {write_images(args.out / 'images')} images to {args.out / 'images'}")
    budget, epochs = (300, 2) if args.quick else (2000, 30)
    (args.out / "sweep.toml").write_text(CONFIG.format(budget=budget, epochs=epochs))

    config = load_config(args.out / "sweep.toml")
    results = args.out / "results.jsonl"
    status = run_sweep(config, results, executor="inline", show_progress=not args.quick)
    print(f"{status.done}/{status.total} runs -> {results}")
    print(f"report: {build_report(config, results, args.out)}")
    suites = {a.display: tuple(sorted(a.variants)) for a in config.attacks if a.variants}
    for row in verdict(worst_case_points(ResultStore(results).read(), suites)):
        print(verdict_advice(row))


if __name__ == "__main__":
    main()
