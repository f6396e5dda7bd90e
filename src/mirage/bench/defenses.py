"""Build a registered defense for a scenario, resolving what it needs from the defender's side
(surrogates) from cached, config-keyed training.

In a sweep config a surrogate is declarative: ``surrogate = "distilled" | "random" | "defender"``
plus optional ``surrogate_config = {stop_epoch = 10, checkpoints = 3, ...}`` (see
:class:`mirage.training.surrogate.SurrogateConfig`); the resolver trains or loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from mirage.defenses import Defense, create_defense
from mirage.models import ModelCard
from mirage.scenarios import ReferenceSet, Scenario, defender_sample

Resolver = Callable[[dict[str, Any], Scenario, nn.Module, ModelCard], dict[str, Any]]


def surrogate_resolver(default_kind: str | None) -> Resolver:
    """Replace ``surrogate``/``surrogate_config`` by the trained model (or ensemble list); with
    no ``surrogate`` given and no default kind, the defense's own default applies."""

    def resolve(params: dict[str, Any], scenario: Scenario, victim: nn.Module, card: ModelCard) -> dict[str, Any]:
        from mirage.training.surrogate import SurrogateConfig, get_surrogate

        kind = params.pop("surrogate", default_kind)
        if kind is None or isinstance(kind, nn.Module):
            if kind is not None:
                params["surrogate"] = kind
            return params
        config = SurrogateConfig(kind=kind, **params.pop("surrogate_config", {}))
        members, _, _ = get_surrogate(scenario, victim, card, config)
        params["surrogate"] = members if len(members) > 1 else members[0]
        return params

    return resolve


def misinformation_resolver(params: dict[str, Any], scenario: Scenario, victim: nn.Module,
                            card: ModelCard) -> dict[str, Any]:
    """Adaptive misinformation: supply the cached OE detector and misinformation model."""
    from mirage.training.misinformation_models import (
        MisinformationConfig,
        get_misinformation_models,
    )

    config = MisinformationConfig(**params.pop("models_config", {}))
    if "oe_model" not in params or "misinformation_model" not in params:
        params["oe_model"], params["misinformation_model"] = get_misinformation_models(scenario, config)
    return params


distilled_surrogate_resolver = surrogate_resolver("distilled")


def grad2_resolver(params: dict[str, Any], scenario: Scenario, victim: nn.Module,
                   card: ModelCard) -> dict[str, Any]:
    """GRAD²: its distilled surrogate and, for ``target = "unlearn"``, a reference set drawn from
    the defender's own labelled training data (``reference = {size = 512, seed = 0}``)."""
    params = distilled_surrogate_resolver(params, scenario, victim, card)
    reference = params.pop("reference", {})
    if reference and params.get("target") != "unlearn":
        raise ValueError("reference is the reference set of target='unlearn' only")
    if params.get("target") == "unlearn" and params.get("reference_x") is None:
        picked = defender_sample(scenario, ReferenceSet.model_validate(reference))
        params["reference_x"], params["reference_y"] = picked.images, picked.labels
    return params


RESOLVERS: dict[str, Resolver] = {
    "adaptive_misinformation": misinformation_resolver,
    "grad2": grad2_resolver,
    "mad": surrogate_resolver(None),
    "mad_argmax": surrogate_resolver(None),
}


def build_defense(name: str, params: dict[str, Any], scenario: Scenario, victim: nn.Module,
                  card: ModelCard) -> Defense:
    """``create_defense(name, **params)`` after the defense's resolver (if any) has replaced
    declarative parameters (e.g. ``surrogate = "distilled"``) by the objects they name."""
    resolver = RESOLVERS.get(name)
    resolved = resolver(dict(params), scenario, victim, card) if resolver else dict(params)
    return create_defense(name, **resolved)
