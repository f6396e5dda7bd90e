"""Model-stealing attacks (docs/design.md §attacks). Every attack module here registers itself on
import.

``create_attack(name, **params)`` builds one; ``list_attacks()`` lists them. ``CloneSpec`` says how
the clone is built and trained; :mod:`mirage.attacks.countermeasures` lists the switches every
attack accepts, :mod:`mirage.attacks.streams` the decoys and keys of a detector's attacker.
:mod:`mirage.attacks.art` (imported on demand) adapts an API to the adversarial-robustness-toolbox.
"""

from __future__ import annotations

import importlib
import pkgutil

from mirage.attacks.base import (
    ATTACKS,
    Attack,
    AttackParams,
    AttackResult,
    BudgetExhausted,
    QueryClient,
    StolenModel,
    create_attack,
    list_attacks,
    register_attack,
)
from mirage.attacks.clone import CloneSpec, train_clone, training_targets
from mirage.attacks.countermeasures import (
    ATTACKER_SUITE,
    Countermeasures,
    RestorerConfig,
    variant_params,
)

_NOT_ATTACKS = {"base", "clone", "countermeasures", "art", "pools", "restorer", "streams"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_ATTACKS and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ATTACKER_SUITE",
    "ATTACKS",
    "Attack",
    "AttackParams",
    "AttackResult",
    "BudgetExhausted",
    "CloneSpec",
    "Countermeasures",
    "QueryClient",
    "RestorerConfig",
    "StolenModel",
    "create_attack",
    "list_attacks",
    "register_attack",
    "train_clone",
    "training_targets",
    "variant_params",
]
