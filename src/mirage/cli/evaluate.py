"""``mirage evaluate``: judge your own model and data against the attacker suite (docs/design.md
§evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mirage.cli.app import app, console
from mirage.cli.attack import parse_params
from mirage.cli.sources import (
    DEFAULT_KEY_ENV,
    ClassPath,
    EndpointModel,
    EndpointUrl,
    KeyEnv,
    ModelFile,
    endpoint,
    model_file,
)


@app.command("evaluate")
def evaluate_command(
    data: Annotated[
        Path,
        typer.Option(help="your labelled images: root/<class>/<image> (own size and channels)"),
    ],
    model: ModelFile = None,
    url: EndpointUrl = None,
    model_name: EndpointModel = None,
    key_env: KeyEnv = DEFAULT_KEY_ENV,
    defense: Annotated[
        str, typer.Option(help="the defense to judge against the undefended model")
    ] = "grad2",
    param: Annotated[
        list[str], typer.Option("--param", "-p", help="defense parameter key=value (repeatable)")
    ] = [],  # noqa: B006
    class_path: ClassPath = None,
    attack: Annotated[
        str, typer.Option(help="knockoff (the pool) or jbda, jb-self, jb-top3 (seed images)")
    ] = "knockoff",
    attackers: Annotated[
        str, typer.Option(help="comma-separated attackers of the suite (mirage attacks)")
    ] = "soft,hard-label,averaging,restorer,noise-robust",
    budget: Annotated[int, typer.Option(help="queries per attacker")] = 2000,
    seeds: Annotated[
        str,
        typer.Option(help="comma-separated seeds (a defense is recommended only on 3 or more)"),
    ] = "0,1,2",
    pool: Annotated[
        Path | None,
        typer.Option(
            help="the attacker's own unlabelled images (a folder or .npy): an "
            "out-of-distribution attacker (default: a share of --data)"
        ),
    ] = None,
    report: Annotated[Path | None, typer.Option(help="write the Markdown report here")] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="where clones and the surrogate train: cpu, cuda, mps "
            "(default: $MIRAGE_DEVICE, else cpu)"
        ),
    ] = None,
) -> None:
    """Attack your model, undefended and behind DEFENSE, with every attacker, and say whether the
    defense helps (the worst-case verdict of the sweeps). With --url the endpoint is judged
    black-box as it answers, and --model, if given, is its undefended baseline.

    Examples: mirage evaluate --model net.pt2 --data my-images/ --defense grad2 \\
                  -p epsilon=0.5 -p target=unlearn
              mirage evaluate --url http://127.0.0.1:8000 --model-name mine --data my-images/ \\
                  --model net.pt2
    """
    from mirage.bench.evaluation import evaluate_model
    from mirage.data.folders import load_image_folder

    if model is None and url is None:
        raise typer.BadParameter(
            "give --model (a file), --url (an endpoint), or both (the model as the baseline)"
        )
    images = load_image_folder(data, test_fraction=0.0)
    net = None if model is None else model_file(model, class_path, images.train.input_shape)
    common: dict[str, Any] = {
        "attack": attack,
        "attackers": tuple(a.strip() for a in attackers.split(",") if a.strip()),
        "budget": budget,
        "seeds": tuple(int(s) for s in seeds.split(",")),
        "device": device,
        "pool": pool,
    }
    if url is None:
        result = evaluate_model(net, images, defense, params=parse_params(param), **common)
    else:
        with endpoint(url, model_name, key_env) as api:
            result = evaluate_model(api, images, baseline=net, **common)
    text = result.report()
    if report is not None:
        report.write_text(text)
    console.print(text, markup=False)
