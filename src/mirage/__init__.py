"""mirage: defenses against model stealing for classifiers behind prediction APIs.

One import is enough (docs/design.md §protect)::

    import mirage

    api = mirage.protect(model, "grad2", epsilon=0.5, surrogate=surrogate)
    served = api.predict(x)

The public API is exported here lazily: ``import mirage`` loads nothing but this file, and each
name below is imported on first use (docs/design.md §layers: the exports are the top layer,
``__version__`` the bottom one).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

__version__ = "0.2.0"

__all__ = [
    "DefenseSpec",
    "Evidence",
    "InProcessAPI",
    "Protected",
    "WatermarkConfig",
    "__version__",
    "api",
    "attacks",
    "bench",
    "create_attack",
    "create_defense",
    "create_model",
    "defenses",
    "derive_key",
    "distil_surrogate",
    "evaluate",
    "get_scenario",
    "list_attacks",
    "list_defenses",
    "load_checkpoint",
    "load_images",
    "models",
    "name_the_thief",
    "ownership",
    "protect",
    "resolve_defense",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    module: ModuleType
    package: ModuleType
    match name:
        case "protect" | "Protected":
            from mirage import protection as module
        case "create_defense" | "list_defenses":
            from mirage import defenses as module
        case "create_attack" | "list_attacks":
            from mirage import attacks as module
        case "InProcessAPI":
            from mirage import api as module
        case "get_scenario":
            from mirage import scenarios as module
        case "create_model" | "load_checkpoint" | "save_checkpoint":
            from mirage import models as module
        case "DefenseSpec" | "resolve_defense":
            from mirage.training import resolve as module
        case "Evidence" | "WatermarkConfig" | "derive_key" | "name_the_thief":
            from mirage import ownership as module
        case "evaluate":  # anything a user brings (docs/design.md §evaluate)
            from mirage.bench.evaluation import evaluate_model

            globals()[name] = evaluate_model
            return evaluate_model
        case "distil_surrogate":
            from mirage.training import surrogate as module
        case "load_images":
            from mirage.data import folders as module
        case "api":
            import mirage.api as package

            return package
        case "attacks":
            import mirage.attacks as package

            return package
        case "bench":
            import mirage.bench as package

            return package
        case "defenses":
            import mirage.defenses as package

            return package
        case "models":
            import mirage.models as package

            return package
        case "ownership":
            import mirage.ownership as package

            return package
        case _:
            raise AttributeError(f"module 'mirage' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
