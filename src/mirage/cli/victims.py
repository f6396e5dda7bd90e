"""Commands about victims and the registry: ``train-victim``, ``defenses``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mirage.cli.app import app, console


@app.command("train-victim")
def train_victim(
    scenario: Annotated[
        str, typer.Option(help="scenario name (fmnist, fmnist-id, mnist, ...)")
    ] = "fmnist",
    retrain: Annotated[bool, typer.Option(help="ignore the cached checkpoint")] = False,
    data_root: Annotated[str | None, typer.Option(help="directory of the victim's dataset")] = None,
) -> None:
    """Train (or reuse the cached) victim of a scenario and print its test accuracy.

    Example: mirage train-victim --scenario digits"""
    from mirage.scenarios import get_scenario
    from mirage.training.victim import get_victim, victim_dir

    chosen = get_scenario(scenario, **({"data_root": data_root} if data_root else {}))
    _, card, cached = get_victim(chosen, retrain=retrain)
    source = "cached" if cached else "trained"
    console.print(
        f"victim [bold]{chosen.name}[/] ({card.architecture} on {card.dataset}, {source}): "
        f"test accuracy [bold]{card.test_accuracy:.4f}[/], "
        f"train time {card.train_seconds:.0f}s, seed {card.seed}"
    )
    console.print(f"checkpoint: {victim_dir(chosen)}")


@app.command("defenses")
def defenses() -> None:
    """List the registered defenses, their parameters and what they promise.

    Example: mirage defenses"""
    from mirage.defenses import DEFENSES

    table = Table("name", "parameters", "contract (default parameters)", "summary")
    for name in sorted(DEFENSES):
        entry = DEFENSES[name]
        fields = ", ".join(f"{k}={default_of(f)}" for k, f in entry.params.model_fields.items())
        table.add_row(name, fields, describe_contract(entry.contract), entry.summary)
    console.print(table)


def default_of(field) -> str:
    """A parameter's default as the listings show it: its repr, or ``required`` when it has none
    (pydantic's ``PydanticUndefined``)."""
    return "required" if field.is_required() else repr(field.get_default(call_default_factory=True))


def describe_contract(contract) -> str:
    """``DefenseContract`` in a few words: ``needs x, keeps top-1, L1 ≤ 0.5, stateful``."""
    words = [
        word
        for flag, word in (
            (contract.needs_input, "needs x"),
            (contract.truncating, "truncating"),
            (contract.keeps_top1, "keeps top-1"),
        )
        if flag
    ]
    if contract.budget is not None:
        words.append(f"{contract.norm.upper()} ≤ {contract.budget:g}")
    words.append("stateful" if contract.stateful else "stateless")
    return ", ".join(words)
