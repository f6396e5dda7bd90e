"""RobustBench-style evaluation of a defense *instance* (docs/design.md §protect): one run of the
protocol (docs/design.md §protocol) on a scenario's victim, without a sweep, a run id or a cache
of answers::

    import mirage

    defense = mirage.create_defense("grad2", epsilon=0.5, surrogate=surrogate)
    result = mirage.bench.evaluate(defense, scenario="fmnist", attack="knockoff", budget=10_000)
    result.clone_accuracy, result.defender_accuracy

The victim is the scenario's (trained or loaded from the cache) unless ``victim`` is given; the
attacker's data, clone and recipe are the protocol's (:func:`mirage.attacks.pools.attack_data`,
:meth:`mirage.attacks.CloneSpec.like`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mirage.api import InProcessAPI, accuracy, defended_accuracy
from mirage.attacks import CloneSpec, create_attack
from mirage.attacks.pools import attack_data
from mirage.data import load_dataset
from mirage.defenses import Defense
from mirage.models import ModelCard
from mirage.models.fit import TrainConfig
from mirage.scenarios import Scenario, get_scenario
from mirage.training.resolve import DefenseSpec, resolve_victims


@dataclass(frozen=True)
class Evaluation:
    """What one run measured: the clone's and the defended API's test accuracy (``eval_size``
    test images for the defender), the undefended victim's, and what the answers cost in L1."""

    clone_accuracy: float
    defender_accuracy: float
    victim_accuracy: float
    defender_l1: float
    effective_l1: float | None
    queries: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(defense: Defense | None, *, scenario: str | Scenario = "digits", attack: str = "knockoff",
             budget: int = 1000, seed: int = 0, attack_params: dict[str, Any] | None = None,
             clone_training: TrainConfig | str = "grad2", eval_size: int | None = None,
             victim: nn.Module | None = None, card: ModelCard | None = None) -> Evaluation:
    """Attack ``scenario``'s victim behind ``defense`` (``None``: undefended) with ``attack`` and
    ``budget`` queries, seeded by ``seed``; the defender's accuracy is measured on a copy of the
    defense as it was before the attack (a stateful defense's answers do not depend on it)."""
    scenario = get_scenario(scenario) if isinstance(scenario, str) else scenario
    if victim is None:
        victims = resolve_victims(DefenseSpec(), scenario)
        victim, card = victims.served, victims.card
    elif card is None:
        raise ValueError("a given victim needs its card (the clone is built like it)")
    test = load_dataset(scenario.victim_dataset, scenario.data_root).test
    if eval_size is not None:
        test = test.subset(torch.arange(min(eval_size, len(test))))
    defender = defended_accuracy(victim, copy.deepcopy(defense), test)
    clone_spec = CloneSpec.like(card, training=clone_training)
    result = create_attack(attack, **(attack_params or {})).run(
        InProcessAPI(victim, defense), budget, attack_data(scenario, attack), clone_spec, seed=seed)
    full_test = load_dataset(scenario.victim_dataset, scenario.data_root).test
    return Evaluation(clone_accuracy=accuracy(result.clone, full_test),
                      defender_accuracy=defender.defended_accuracy, victim_accuracy=defender.clean_accuracy,
                      defender_l1=defender.effective_l1, effective_l1=result.effective_l1,
                      queries=result.queries)
