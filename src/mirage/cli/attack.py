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
    scenario: Annotated[str, typer.Option(help="scenario (fmnist, fmnist-id, mnist, digits, ...)")] = "fmnist",
    attack_name: Annotated[str, typer.Option("--attack", help="attack name (see `mirage attacks`)")] = "knockoff",
    defense: Annotated[str, typer.Option(help="defense name (see `mirage defenses`)")] = "none",
    epsilon: Annotated[float | None, typer.Option(help="the defense's L1 budget, if it has one")] = None,
    param: Annotated[list[str], typer.Option("--param", "-p", help="defense parameter key=value (repeatable)")] = [],  # noqa: B006
    attack_param: Annotated[list[str], typer.Option("--attack-param", "-a",
                                                    help="attack parameter key=value (repeatable), "
                                                         "e.g. hard_labels=true, repeats=2")] = [],  # noqa: B006
    budget: Annotated[int, typer.Option(help="query budget")] = 10_000,
    epochs: Annotated[int, typer.Option(help="clone training epochs")] = 30,
    recipe_name: Annotated[str, typer.Option("--recipe", help="clone recipe: mad or grad2")] = "grad2",
    seed: Annotated[int, typer.Option(help="attack seed")] = 0,
    eval_size: Annotated[int | None, typer.Option(help="evaluate on the first N test images")] = None,
    variant: Annotated[str | None, typer.Option(
        help="an attacker of the suite: soft, hard-label, averaging, restorer, noise-robust "
             "(the restorer is told the defense's name and public parameters)")] = None,
) -> None:
    """Run one attack against a scenario's victim behind a defense; print clone accuracy, defender
    accuracy, effective L1 and queries spent."""
    from mirage.api import InProcessAPI, accuracy, defended_accuracy
    from mirage.attacks import CloneSpec, create_attack, variant_params
    from mirage.attacks.clone import recipe
    from mirage.attacks.pools import attack_data
    from mirage.attacks.restorer import tell_restorer
    from mirage.bench.defenses import build_defense
    from mirage.data import load_dataset
    from mirage.scenarios import get_scenario
    from mirage.training.victim import get_victim

    chosen = get_scenario(scenario)
    victim, card, _ = get_victim(chosen)
    test = load_dataset(chosen.victim_dataset, chosen.data_root).test
    if eval_size is not None:
        test = test.subset(slice(0, eval_size))
    defense_params = parse_params(param)
    if epsilon is not None:
        defense_params["epsilon"] = epsilon
    try:
        # surrogates (GRAD²: distilled, cached) and detectors are resolved as in the benchmark
        served = build_defense(defense, defense_params, chosen, victim, card)
        attack_params = parse_params(attack_param)
        if variant is not None:
            attack_params = {**variant_params(variant), **attack_params}
        stealer = create_attack(attack_name, **tell_restorer(attack_params, defense, defense_params))
        training = recipe(recipe_name).model_copy(update={"epochs": epochs})
    except (KeyError, ValueError) as error:
        raise typer.BadParameter(str(error)) from error
    api = InProcessAPI(victim, served)
    result = stealer.run(api, budget, attack_data(chosen, attack_name),
                         CloneSpec.like(card, training=training), seed=seed)
    utility = defended_accuracy(victim, served, test)
    table = Table("quantity", "value", title=f"{attack_name} vs {served!r} on {chosen.name}")
    table.add_row("clone accuracy", f"{accuracy(result.clone, test):.4f}")
    table.add_row("victim accuracy (clean)", f"{utility.clean_accuracy:.4f}")
    table.add_row("defender accuracy", f"{utility.defended_accuracy:.4f}")
    l1 = "unknown" if result.effective_l1 is None else f"{result.effective_l1:.4f}"
    table.add_row("effective L1 (attacker's queries)", l1)
    table.add_row("effective L1 (test set)", f"{utility.effective_l1:.4f}")
    table.add_row("queries spent / budget", f"{result.queries} / {result.budget}")
    table.add_row("transfer set size", str(result.transfer_size))
    table.add_row("attack wall time", f"{result.wall_seconds:.1f}s")
    console.print(table)


@app.command("attacks")
def attacks() -> None:
    """List the registered attacks and their parameters."""
    from mirage.attacks import ATTACKS, Countermeasures

    table = Table("name", "parameters", "summary")
    shared = set(Countermeasures.model_fields)
    for name in sorted(ATTACKS):
        entry = ATTACKS[name]
        fields = ", ".join(f"{k}={f.default!r}" for k, f in entry.params.model_fields.items() if k not in shared)
        table.add_row(name, fields, entry.summary)
    console.print(table)
    console.print("every attack also takes the countermeasures: " + ", ".join(sorted(shared)))
    from mirage.attacks import ATTACKER_SUITE

    suite = Table("variant (--variant)", "switches", title="the attacker suite a defense is judged by")
    for name, switches in ATTACKER_SUITE.items():
        suite.add_row(name, ", ".join(f"{k}={v!r}" for k, v in switches.items()) or "–")
    console.print(suite)
