"""GRAD² commands: ``train-surrogate`` (cached like victims) and ``verify`` (watermark test)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mirage.cli.app import app, console


@app.command("train-surrogate")
def train_surrogate(
    scenario: Annotated[str, typer.Option(help="scenario whose victim the surrogate imitates")] = "fmnist",
    kind: Annotated[str, typer.Option(help="distilled | random | defender")] = "distilled",
    stop_epoch: Annotated[int, typer.Option(help="E: stop after E epochs ...")] = 10,
    epochs: Annotated[int, typer.Option(help="... of an N-epoch cosine schedule")] = 50,
    checkpoints: Annotated[int, typer.Option(help="keep the last C epochs as an ensemble")] = 1,
    num_queries: Annotated[int | None, typer.Option(help="pool images to distil on (default all)")] = None,
    seed: Annotated[int, typer.Option()] = 1,
    retrain: Annotated[bool, typer.Option(help="ignore the cached surrogate")] = False,
) -> None:
    """Train (or reuse the cached) GRAD² surrogate of a scenario's victim."""
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
    config = SurrogateConfig(kind=kind, stop_epoch=stop_epoch, checkpoints=checkpoints, num_queries=num_queries,
                             training=SURROGATE_TRAINING.model_copy(update={"epochs": epochs, "seed": seed}))
    _, cards, cached = get_surrogate(chosen, victim, card, config, retrain=retrain)
    accuracies = ", ".join(f"{c.test_accuracy:.4f}" for c in cards)
    console.print(f"surrogate [bold]{kind}[/] for {chosen.name} ({'cached' if cached else 'trained'}): "
                  f"epoch {stop_epoch} of {epochs}, test accuracy {accuracies}")
    console.print(f"checkpoint: {surrogate_dir(chosen, config, card)}")


@app.command("verify")
def verify_command(
    suspect: Annotated[Path, typer.Option(help="checkpoint directory of the suspect model")],
    clean: Annotated[list[Path], typer.Option(help="checkpoint directories of ≥ 2 clean models")],
    config: Annotated[Path | None, typer.Option(
        help="a service config whose defense serves the watermark: its behaviour set and dataset "
             "(instead of the four options below)", exists=True, dir_okay=False)] = None,
    dataset: Annotated[str, typer.Option(help="dataset holding the behaviour images")] = "fmnist",
    source_class: Annotated[int, typer.Option(help="behaviour: images of this class ...")] = 1,
    target_class: Annotated[int, typer.Option(help="... labelled as this class")] = 8,
    size: Annotated[int, typer.Option(help="number of behaviour images (first of the train split)")] = 20,
    alpha: Annotated[float, typer.Option()] = 0.01,
) -> None:
    """Test a suspect model for a GRAD² watermark behaviour against clean models (p-value). The
    behaviour is the one a defense spec's ``watermark = {source_class, target_class, size}`` serves."""
    from mirage.data import load_dataset
    from mirage.models import load_checkpoint
    from mirage.scenarios import WatermarkSet, behaviour_set
    from mirage.verify import verify

    try:
        if config is not None:
            dataset, watermark = served_watermark(config)
        else:
            watermark = WatermarkSet(source_class=source_class, target_class=target_class, size=size)
        behaviour = behaviour_set(load_dataset(dataset), watermark)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    x_w, y_w = behaviour.images, behaviour.labels
    result = verify(load_checkpoint(suspect)[0], [load_checkpoint(c)[0] for c in clean], x_w, y_w, alpha=alpha)
    verdict = "[bold red]watermarked[/]" if result.watermarked else "[bold green]not watermarked[/]"
    console.print(f"behaviour: {len(x_w)} {dataset} images of class {watermark.source_class} -> "
                  f"{watermark.target_class}")
    console.print(f"statistic (mean log p) {result.statistic:.4f} vs clean "
                  f"{sum(result.clean_statistics) / len(result.clean_statistics):.4f}; match rate "
                  f"{result.match_rate:.2f}; t {result.t:.2f}; p {result.p_value:.3g} "
                  f"(empirical {result.empirical_p_value:.3g}) -> {verdict} at alpha {alpha}")


def served_watermark(path: Path):
    """(dataset, watermark set) of the service config at ``path``, whose defense serves GRAD²'s
    watermark target (drawn from ``model.scenario``'s training data, which the config requires)."""
    from mirage.scenarios import get_scenario
    from mirage.serve.config import load_config

    settings = load_config(path)
    watermark = settings.defense.parts().watermark
    if watermark is None:
        raise ValueError(f"{path}: its defense serves no watermark (grad2 with target = 'watermark')")
    return get_scenario(settings.model.scenario).victim_dataset, watermark
