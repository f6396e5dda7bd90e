"""``mirage evaluate``: judge your own model and data against the attacker suite (docs/design.md
§evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mirage.cli.app import app, console
from mirage.cli.attack import parse_params


@app.command("evaluate")
def evaluate_command(
    model: Annotated[Path, typer.Option(help="your model: .pt2, .onnx, .safetensors (with --class) or a mirage "
                                             "checkpoint directory")],
    data: Annotated[Path, typer.Option(help="your labelled images: root/<class>/<image> (own size and channels)")],
    defense: Annotated[str, typer.Option(help="the defense to judge against the undefended model")] = "grad2",
    param: Annotated[list[str], typer.Option("--param", "-p", help="defense parameter key=value (repeatable)")]
    = [],  # noqa: B006
    class_path: Annotated[str | None, typer.Option("--class", help="a state dict's module, 'package.module:Class'")]
    = None,
    attack: Annotated[str, typer.Option(help="knockoff (the pool) or jbda, jb-self, jb-top3 (seed images)")]
    = "knockoff",
    attackers: Annotated[str, typer.Option(help="comma-separated attackers of the suite (mirage attacks)")]
    = "soft,hard-label,averaging,restorer,noise-robust",
    budget: Annotated[int, typer.Option(help="queries per attacker")] = 2000,
    seeds: Annotated[str, typer.Option(help="comma-separated seeds (3 or more for a verdict under 2 points)")] = "0",
    report: Annotated[Path | None, typer.Option(help="write the Markdown report here")] = None,
) -> None:
    """Attack your model, undefended and behind DEFENSE, with every attacker, and say whether the
    defense helps (the worst-case verdict of the sweeps).

    Example: mirage evaluate --model net.pt2 --data my-images/ --defense grad2 -p epsilon=0.5 -p target=unlearn
    """
    from mirage.bench.evaluation import evaluate_model
    from mirage.data.folders import load_image_folder
    from mirage.models.formats import format_of, load_model_file

    images = load_image_folder(data, test_fraction=0.0)
    net, _ = load_model_file(format_of(model), model, input_shape=images.train.input_shape, class_path=class_path)
    result = evaluate_model(net, images, defense, params=parse_params(param), attack=attack,
                            attackers=tuple(a.strip() for a in attackers.split(",") if a.strip()), budget=budget,
                            seeds=tuple(int(s) for s in seeds.split(",")))
    text = result.report()
    if report is not None:
        report.write_text(text)
    console.print(text, markup=False)
