"""``mirage train-victim-defended``: train (or reuse) a victim with a training-time defense."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from mirage.cli.app import app, console


@app.command("train-victim-defended")
def train_victim_defended(
    scenario: Annotated[
        str, typer.Option(help="scenario name (fmnist, mnist, digits, ...)")
    ] = "fmnist",
    method: Annotated[str, typer.Option(help="training-time defense: ini, dpsgd or none")] = "ini",
    noise: Annotated[float | None, typer.Option(help="DP-SGD noise multiplier σ")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=VALUE config entry (VALUE as JSON, e.g. gamma=0.3, init='\"victim\"'); "
            "repeatable"
        ),
    ] = None,
    retrain: Annotated[bool, typer.Option(help="ignore the cached checkpoint")] = False,
) -> None:
    """Train the scenario's victim with InI or DP-SGD (cached by config) and print its accuracy.

    Example: mirage train-victim-defended --scenario digits --method dpsgd --noise 1.0"""
    from mirage.scenarios import get_scenario
    from mirage.training.registry import defended_victim_dir, get_defended_victim, resolve_config

    params: dict = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--param expects KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    if noise is not None:
        if method != "dpsgd":
            raise typer.BadParameter("--noise applies to --method dpsgd only")
        params["noise_multiplier"] = noise
    chosen = get_scenario(scenario)
    try:
        config = resolve_config(method, params)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    _, card, cached = get_defended_victim(chosen, method, config, retrain=retrain)
    extra = (
        f", ε = {card.training['epsilon']:.3f} (δ = {card.training['delta']:g})"
        if method == "dpsgd"
        else ""
    )
    console.print(
        f"{method} victim [bold]{chosen.name}[/] ({'cached' if cached else 'trained'}): "
        f"test accuracy [bold]{card.test_accuracy:.4f}[/]{extra}"
    )
    if method != "none":
        console.print(f"checkpoint: {defended_victim_dir(chosen, method, config)}")
