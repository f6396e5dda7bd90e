"""``mirage attack``: steal a scenario's (defended) victim with one attack and report the result;
``mirage attacks``: list the registered attacks."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from mirage.cli.app import app, console


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; values are parsed as JSON when they can be (numbers, booleans,
    lists), else kept as strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


@app.command("attack")
def attack(
    scenario: Annotated[
        str, typer.Option(help="scenario (fmnist, fmnist-id, mnist, digits, ...)")
    ] = "fmnist",
    attack_name: Annotated[
        str, typer.Option("--attack", help="attack name (see `mirage attacks`)")
    ] = "knockoff",
    defense: Annotated[str, typer.Option(help="defense name (see `mirage defenses`)")] = "none",
    epsilon: Annotated[
        float | None, typer.Option(help="the defense's L1 budget, if it has one")
    ] = None,
    param: Annotated[
        list[str], typer.Option("--param", "-p", help="defense parameter key=value (repeatable)")
    ] = [],  # noqa: B006
    attack_param: Annotated[
        list[str],
        typer.Option(
            "--attack-param",
            "-a",
            help="attack parameter key=value (repeatable), e.g. hard_labels=true, repeats=2",
        ),
    ] = [],  # noqa: B006
    budget: Annotated[int, typer.Option(help="query budget")] = 10_000,
    epochs: Annotated[int, typer.Option(help="clone training epochs")] = 30,
    recipe_name: Annotated[
        str, typer.Option("--recipe", help="clone recipe: mad or grad2")
    ] = "grad2",
    seed: Annotated[int, typer.Option(help="attack seed")] = 0,
    eval_size: Annotated[
        int | None,
        typer.Option(
            help="measure the defender's accuracy on the first N test images (the clone: on all)"
        ),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(
            help="an attacker of the suite: soft, hard-label, averaging, restorer, noise-robust, "
            "confident-only, mixing (30 % benign decoys), multi-key (4 API keys, in-process "
            "views), aligned (100 labelled images of the victim's training split) "
            "(`mirage attacks` lists their switches; the restorer is told the defense's name and "
            "public parameters)"
        ),
    ] = None,
) -> None:
    """Run one attack against a scenario's victim behind a defense (query-time, or a training-time
    victim) by the run protocol (docs/design.md §protocol); print clone accuracy, defender
    accuracy, effective L1 and queries spent.

    Example: mirage attack --scenario digits --defense grad2 --epsilon 0.5 -p surrogate=distilled
    --budget 2000 --variant hard-label"""
    from mirage.attacks import create_attack, variant_params
    from mirage.attacks.clone import recipe
    from mirage.bench.protocol import Stores, run_attack, scenario_context
    from mirage.scenarios import get_scenario
    from mirage.training.resolve import DefenseSpec

    chosen = get_scenario(scenario)
    defense_params = parse_params(param)
    if epsilon is not None:
        defense_params["epsilon"] = epsilon
    # the same declarative parts as a sweep's: surrogate = "distilled", reference, watermark, ...
    try:
        DefenseSpec.from_params(defense, defense_params)
        attack_params = parse_params(attack_param)
        if variant is not None:
            attack_params = {**variant_params(variant), **attack_params}
        training = recipe(recipe_name).model_copy(update={"epochs": epochs})
        create_attack(attack_name, **attack_params)  # checked before anything trains
    except (KeyError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    context = scenario_context(
        chosen,
        defense,
        defense_params,
        Stores.models_only(),
        clone_training=training,
        show_progress=True,
    )
    stolen = run_attack(context, attack_name, attack_params, budget, seed)
    defender = context.defender_metrics(eval_size)
    title = f"{attack_name} vs {defense} {context.defense!r} on {chosen.name}"
    table = Table("quantity", "value", title=title)
    for name, value in _rows(
        stolen.result, defender, stolen.clone["clone_accuracy"], context.training_time
    ):
        table.add_row(name, value)
    console.print(table)


def _rows(
    result, defender: dict[str, Any], clone_accuracy: float, training_time: bool
) -> list[tuple[str, str]]:
    """The report of ``mirage attack``; no L1 for a training-time defense, whose ledger compares
    the served victim with itself."""
    l1 = "unknown" if result.effective_l1 is None else f"{result.effective_l1:.4f}"
    return [
        ("clone accuracy", f"{clone_accuracy:.4f}"),
        ("victim accuracy (clean)", f"{defender['victim_accuracy']:.4f}"),
        ("defender accuracy", f"{defender['defender_accuracy']:.4f}"),
        *(
            []
            if training_time
            else [
                ("effective L1 (attacker's queries)", l1),
                ("effective L1 (test set)", f"{defender['defender_l1']:.4f}"),
            ]
        ),
        ("queries spent / budget", f"{result.queries} / {result.budget}"),
        *([("decoys sent", str(result.decoys))] if result.decoys else []),
        *(
            [("queries per API key", " / ".join(map(str, result.queries_per_key)))]
            if len(result.queries_per_key) > 1
            else []
        ),
        *[
            ("labels realigned", _alignment(step["alignment"]))
            for step in result.history[-1:]
            if "alignment" in step
        ],
        ("transfer set size", str(result.transfer_size)),
        ("attack wall time", f"{result.wall_seconds:.1f}s"),
    ]


def _alignment(report: dict) -> str:
    """The label-aligning attacker's outcome, for the report."""
    if "accuracy_after" not in report:
        return f"no (identity on {report['labelled']} labelled images)"
    return (
        f"{'yes' if report['kept'] else 'no'} (σ = {report['sigma']}: "
        f"{report['accuracy_before']:.2f} → {report['accuracy_after']:.2f} "
        f"on {report['labelled']} labelled)"
    )


@app.command("attacks")
def attacks() -> None:
    """List the registered attacks and their parameters, and the attacker suite.

    Example: mirage attacks"""
    from mirage.attacks import ATTACKS, Countermeasures
    from mirage.cli.victims import default_of

    table = Table("name", "parameters", "summary")
    shared = set(Countermeasures.model_fields)
    for name in sorted(ATTACKS):
        entry = ATTACKS[name]
        fields = ", ".join(
            f"{k}={default_of(f)}" for k, f in entry.params.model_fields.items() if k not in shared
        )
        table.add_row(name, fields, entry.summary)
    console.print(table)
    console.print("every attack also takes the countermeasures: " + ", ".join(sorted(shared)))
    from mirage.attacks import ATTACKER_SUITE

    suite = Table(
        "variant (--variant)", "switches", title="the attacker suite a defense is judged by"
    )
    for name, switches in ATTACKER_SUITE.items():
        suite.add_row(name, ", ".join(f"{k}={v!r}" for k, v in switches.items()) or "–")
    console.print(suite)
