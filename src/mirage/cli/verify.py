"""``mirage verify``: is a suspect model stolen, and through which API key (the exact test of
:mod:`mirage.ownership`, docs/design.md §ownership), or does it carry GRAD²'s watermark behaviour
(:mod:`mirage.ownership.behaviour`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mirage.cli.app import app, console


# Help texts are rich markup: a literal square bracket is escaped (\\[ownership]), or rich eats it.
@app.command("verify")
def verify_command(
    suspect: Annotated[
        Path,
        typer.Option(
            help="the suspect model: a torch.export archive (.pt2), an ONNX file (.onnx) or a "
            "mirage checkpoint directory"
        ),
    ],
    clean: Annotated[
        list[Path] | None,
        typer.Option(
            help="GRAD² soft-label test: checkpoint directories of ≥ 2 clean models (without "
            "them: the ownership test of --config's \\[ownership] keys)"
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="the service config: its \\[ownership] keys and evidence, or the GRAD² watermark "
            "its defense serves",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    dataset: Annotated[str, typer.Option(help="dataset holding the behaviour images")] = "fmnist",
    source_class: Annotated[int, typer.Option(help="behaviour: images of this class ...")] = 1,
    target_class: Annotated[int, typer.Option(help="... labelled as this class")] = 8,
    size: Annotated[
        int, typer.Option(help="number of behaviour images (first of the train split)")
    ] = 20,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="significance (default 1e-6 for the ownership test, after correcting for every "
            "client; 0.01 for the GRAD² test)"
        ),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option(
            help="clients believed one party, comma-separated (e.g. one account's keys): one more "
            "test of their pooled evidence; repeatable"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Is a suspect model stolen, and through which API key? Without --clean: the exact test of
    every client's keyed watermark of a service config's \\[ownership] (docs/design.md
    §ownership). With --clean: the GRAD² soft-label behaviour test against clean models.

    Example: mirage verify --suspect stolen.pt2 --config serve.toml --group alice,alice-2"""
    from mirage.models.formats import format_of, load_model_file

    try:
        model = load_model_file(format_of(suspect), suspect)[0]
    except (OSError, ValueError, RuntimeError) as error:
        raise typer.BadParameter(
            f"cannot load the suspect {suspect}: {error}", param_hint="--suspect"
        ) from error
    if not clean:
        groups = [g.split(",") for g in group or []]
        _verify_ownership(model, config, 1e-6 if alpha is None else alpha, groups, as_json)
        return
    _verify_behaviour(
        model,
        clean,
        config,
        dataset,
        source_class,
        target_class,
        size,
        0.01 if alpha is None else alpha,
        as_json,
    )


def _verify_ownership(
    model, config: Path | None, alpha: float, groups: list[list[str]], as_json: bool
) -> None:
    import json

    from mirage.ownership import EvidenceStore, verify_clients
    from mirage.serve.config import load_config

    if config is None:
        raise typer.BadParameter(
            "the ownership test needs --config (a service config with [ownership])"
        )
    served = load_config(config)
    if served.ownership is None:
        raise typer.BadParameter(
            f"{config} has no [ownership] section (or give --clean for the GRAD² test)"
        )
    try:
        secret = served.ownership.secret()
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--config") from error
    if not served.ownership.evidence.exists():
        raise typer.BadParameter(
            f"no evidence at {served.ownership.evidence}: the service has not answered yet"
        )
    evidence = EvidenceStore(served.ownership.evidence, served.ownership.max_items)
    try:
        tests = verify_clients(
            model,
            secret,
            [c.name for c in served.clients],
            served.ownership.watermark,
            evidence,
            groups=groups,
            alpha=alpha,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    finally:
        evidence.close()
    if as_json:
        print(json.dumps([{**t.__dict__, "named": t.named} for t in tests], indent=2))
        return
    for t in tests:
        verdict = "[bold red]named[/]" if t.named else "not named"
        console.print(
            f"{t.client}: {t.images} evidence images in {t.buckets} buckets; argmax matches "
            f"{t.matches} ({t.expected:.1f} by chance, p {t.match_p_value:.3g}); probability "
            f"score p {t.probability_p_value:.3g}; rank score {t.score} ({t.expected_score:.1f} "
            f"by chance): p {t.p_value:.3g}, corrected "
            f"for {len(tests)} tests {t.corrected_p_value:.3g} -> {verdict} at alpha {alpha:g}"
        )


def _verify_behaviour(
    model,
    clean: list[Path],
    config: Path | None,
    dataset: str,
    source_class: int,
    target_class: int,
    size: int,
    alpha: float,
    as_json: bool,
) -> None:
    import json

    from mirage.data import load_dataset
    from mirage.models import load_checkpoint
    from mirage.ownership.behaviour import verify
    from mirage.scenarios import WatermarkSet, behaviour_set

    try:
        if config is not None:
            dataset, watermark = served_watermark(config)
        else:
            watermark = WatermarkSet(
                source_class=source_class, target_class=target_class, size=size
            )
        behaviour = behaviour_set(load_dataset(dataset), watermark)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    x_w, y_w = behaviour.images, behaviour.labels
    result = verify(model, [load_checkpoint(c)[0] for c in clean], x_w, y_w, alpha=alpha)
    if as_json:
        print(json.dumps({**result.__dict__, "watermarked": result.watermarked}, indent=2))
        return
    verdict = "[bold red]watermarked[/]" if result.watermarked else "[bold green]not watermarked[/]"
    console.print(
        f"behaviour: {len(x_w)} {dataset} images of class {watermark.source_class} -> "
        f"{watermark.target_class}"
    )
    console.print(
        f"statistic (mean log p) {result.statistic:.4f} vs clean "
        f"{sum(result.clean_statistics) / len(result.clean_statistics):.4f}; match rate "
        f"{result.match_rate:.2f}; t {result.t:.2f}; p {result.p_value:.3g} "
        f"(empirical {result.empirical_p_value:.3g}) -> {verdict} at alpha {alpha}"
    )


def served_watermark(path: Path):
    """(dataset, watermark set) of the service config at ``path``, whose defense serves GRAD²'s
    watermark target (drawn from ``model.scenario``'s training data, which the config requires)."""
    from mirage.scenarios import get_scenario
    from mirage.serve.config import load_config

    settings = load_config(path)
    watermark = settings.defense.parts().watermark
    if watermark is None:
        raise ValueError(
            f"{path}: its defense serves no watermark (grad2 with target = 'watermark')"
        )
    if settings.model.scenario is None:
        raise ValueError(f"{path}: its watermark set is drawn from model.scenario's data: give one")
    return get_scenario(settings.model.scenario).victim_dataset, watermark
