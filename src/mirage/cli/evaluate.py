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
    data: Annotated[Path, typer.Option(help="your labelled images: root/<class>/<image> (own size and channels)")],
    model: Annotated[Path | None, typer.Option(help="your model: .pt2, .onnx, .safetensors (with --class) or a mirage "
                                                    "checkpoint directory (with --url: the undefended baseline)")]
    = None,
    url: Annotated[str | None, typer.Option(help="… or a served Open Inference Protocol endpoint, judged black-box "
                                                 "as it answers (every query charged to the key)")] = None,
    model_name: Annotated[str | None, typer.Option(help="the endpoint's model name")] = None,
    key_env: Annotated[str, typer.Option(help="environment variable holding the endpoint's API key")]
    = "MIRAGE_API_KEY",
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
    pool: Annotated[Path | None, typer.Option(help="the attacker's own unlabelled images (a folder or .npy): an "
                                                   "out-of-distribution attacker (default: a share of --data)")]
    = None,
    report: Annotated[Path | None, typer.Option(help="write the Markdown report here")] = None,
    device: Annotated[str | None, typer.Option(help="where clones and the surrogate train: cpu, cuda, mps "
                                                    "(default: $MIRAGE_DEVICE, else cpu)")] = None,
) -> None:
    """Attack your model, undefended and behind DEFENSE, with every attacker, and say whether the
    defense helps (the worst-case verdict of the sweeps).

    Examples: mirage evaluate --model net.pt2 --data my-images/ --defense grad2 -p epsilon=0.5 -p target=unlearn
              mirage evaluate --url http://127.0.0.1:8000 --model-name mine --data my-images/ --model net.pt2
    """
    import os

    from mirage.bench.evaluation import evaluate_model
    from mirage.data.folders import load_image_folder
    from mirage.models.formats import format_of, load_model_file

    if model is None and url is None:
        raise typer.BadParameter("give --model (a file), --url (an endpoint), or both (the model as the baseline)")
    images = load_image_folder(data, test_fraction=0.0)
    net = None if model is None else load_model_file(format_of(model), model, input_shape=images.train.input_shape,
                                                     class_path=class_path)[0]
    common = {"attack": attack, "attackers": tuple(a.strip() for a in attackers.split(",") if a.strip()),
              "budget": budget, "seeds": tuple(int(s) for s in seeds.split(",")), "device": device, "pool": pool}
    if url is None:
        result = evaluate_model(net, images, defense, params=parse_params(param), **common)
    else:
        from mirage.serve import HTTPPredictionAPI

        if model_name is None or not os.environ.get(key_env):
            raise typer.BadParameter(f"--url needs --model-name and the API key in ${key_env}")
        with HTTPPredictionAPI(url, model_name, os.environ[key_env]) as api:
            result = evaluate_model(api, images, baseline=net, **common)
    text = result.report()
    if report is not None:
        report.write_text(text)
    console.print(text, markup=False)
