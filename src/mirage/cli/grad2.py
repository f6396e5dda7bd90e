"""GRAD² commands: ``train-surrogate`` (cached like victims) and ``distil-surrogate`` (from any
model on the user's own images)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mirage.cli.app import app, console
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


@app.command("train-surrogate")
def train_surrogate(
    scenario: Annotated[
        str, typer.Option(help="scenario whose victim the surrogate imitates")
    ] = "fmnist",
    kind: Annotated[str, typer.Option(help="distilled | random | defender")] = "distilled",
    stop_epoch: Annotated[int, typer.Option(help="E: stop after E epochs ...")] = 10,
    epochs: Annotated[int, typer.Option(help="... of an N-epoch cosine schedule")] = 50,
    checkpoints: Annotated[int, typer.Option(help="keep the last C epochs as an ensemble")] = 1,
    num_queries: Annotated[
        int | None, typer.Option(help="pool images to distil on (default all)")
    ] = None,
    seed: Annotated[int, typer.Option()] = 1,
    retrain: Annotated[bool, typer.Option(help="ignore the cached surrogate")] = False,
) -> None:
    """Train (or reuse the cached) GRAD² surrogate of a scenario's victim.

    Example: mirage train-surrogate --scenario digits --kind distilled --stop-epoch 10 --epochs 50
    """
    from mirage.scenarios import get_scenario
    from mirage.training.surrogate import (
        SURROGATE_TRAINING,
        SurrogateConfig,
        get_surrogate,
        surrogate_dir,
    )
    from mirage.training.victim import get_victim

    chosen = get_scenario(scenario)
    victim, card, _ = get_victim(chosen)
    config = SurrogateConfig(
        kind=kind,
        stop_epoch=stop_epoch,
        checkpoints=checkpoints,
        num_queries=num_queries,
        training=SURROGATE_TRAINING.model_copy(update={"epochs": epochs, "seed": seed}),
    )
    _, cards, cached = get_surrogate(chosen, victim, card, config, retrain=retrain)
    accuracies = ", ".join(f"{c.test_accuracy:.4f}" for c in cards)
    console.print(
        f"surrogate [bold]{kind}[/] for {chosen.name} ({'cached' if cached else 'trained'}): "
        f"epoch {stop_epoch} of {epochs}, test accuracy {accuracies}"
    )
    console.print(f"checkpoint: {surrogate_dir(chosen, config, card)}")


@app.command("distil-surrogate")
def distil_surrogate_command(
    images: Annotated[
        Path,
        typer.Option(
            help="the defender's own unlabelled images: a folder (any tree of image "
            "files) or a .npy array (N, C, H, W) in [0, 1] or uint8"
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(help="the checkpoint directory to write (a member-i/ per snapshot if more)"),
    ],
    model: ModelFile = None,
    class_path: ClassPath = None,
    url: EndpointUrl = None,
    model_name: EndpointModel = None,
    key_env: KeyEnv = DEFAULT_KEY_ENV,
    architecture: Annotated[
        str | None, typer.Option(help="lenet | vgg | resnet (default: by input size)")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="resize the images (default: their own size)")
    ] = None,
    channels: Annotated[
        int | None, typer.Option(help="1 or 3 (default: 1 if every image is grayscale)")
    ] = None,
    stop_epoch: Annotated[int, typer.Option(help="E: stop after E epochs ...")] = 10,
    epochs: Annotated[int, typer.Option(help="... of an N-epoch cosine schedule")] = 50,
    checkpoints: Annotated[int, typer.Option(help="keep the last C epochs as an ensemble")] = 1,
    seed: Annotated[int, typer.Option()] = 1,
    device: Annotated[
        str | None,
        typer.Option(help="where it trains: cpu, cuda, mps (default: $MIRAGE_DEVICE, else cpu)"),
    ] = None,
) -> None:
    """Distil a GRAD²/MAD surrogate from any model on your own unlabelled images, so the service
    can defend a model mirage did not train: serve it with \\[defense] surrogate = "OUT".

    Example: mirage distil-surrogate --model net.onnx --images my-images/ --out surrogate/
    """
    from mirage.data.folders import load_images
    from mirage.models import save_checkpoint
    from mirage.training.surrogate import SURROGATE_TRAINING, SurrogateConfig, distil_surrogate

    if (model is None) == (url is None):
        raise typer.BadParameter("give exactly one of --model (a file) and --url (an endpoint)")
    pixels = load_images(images, image_size=image_size, channels=channels)
    config = SurrogateConfig(
        stop_epoch=stop_epoch,
        checkpoints=checkpoints,
        training=SURROGATE_TRAINING.model_copy(update={"epochs": epochs, "seed": seed}),
    )
    if model is not None:
        source = model_file(model, class_path, pixels.shape[1:])
        members = distil_surrogate(
            source, pixels, architecture=architecture, config=config, device=device
        )
    else:
        assert url is not None  # exactly one of model and url, checked above
        with endpoint(url, model_name, key_env) as api:
            members = distil_surrogate(
                api, pixels, architecture=architecture, config=config, device=device
            )
    dirs = [out] if len(members) == 1 else [out / f"member-{i}" for i in range(len(members))]
    for (member, card), directory in zip(members, dirs, strict=True):
        save_checkpoint(member, card, directory)
    agreements = ", ".join(f"{card.test_accuracy:.4f}" for _, card in members)
    console.print(
        f"surrogate [bold]{members[0][1].architecture}[/] distilled on {len(pixels)} images: top-1 "
        f"agreement with the model {agreements} on held-out images"
    )
    line = f'"{dirs[0]}"' if len(dirs) == 1 else "[" + ", ".join(f'"{d}"' for d in dirs) + "]"
    console.print(f"serve it with: \\[defense] surrogate = {line}")
