"""Inference-time defenses. Every module and subpackage here registers its defenses on import:
``grad2`` (GRAD² and its gated form, docs/design.md §grad2) and ``mad`` (MAD and MAD-argmax,
docs/design.md §mad) are subpackages; the others are one module each.

``create_defense(name, **params)`` builds one; ``list_defenses()`` lists them; ``redirect`` is the
exact redirection solver.
"""

from __future__ import annotations

import importlib
import pkgutil

from mirage.defenses.base import (
    DEFENSES,
    Defense,
    DefenseContract,
    DefenseInvariantError,
    DefenseParams,
    check_probs,
    create_defense,
    list_defenses,
    register_defense,
)
from mirage.defenses.redirect import redirect

_NOT_DEFENSES = {"base", "redirect"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_DEFENSES and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseContract",
    "DefenseInvariantError",
    "DefenseParams",
    "check_probs",
    "create_defense",
    "list_defenses",
    "redirect",
    "register_defense",
]
