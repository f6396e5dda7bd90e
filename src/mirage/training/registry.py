"""Training-time defenses by name (docs/design.md §training-defenses): the victim itself differs,
the query-time defense is ``none``. The benchmark sweeps them next to the inference-time defenses::

    model, card, cached = get_defended_victim(get_scenario("fmnist"), "dpsgd", {"noise_multiplier": 1.0})

Registered: ``none`` (the plain victim of :func:`mirage.training.victim.get_victim`), ``ini``
(:mod:`mirage.training.ini`) and ``dpsgd`` (:mod:`mirage.training.dpsgd`). Trained victims are
cached under ``$MIRAGE_MODELS/victims/<dataset>-<arch>-<method>-<key>/`` where ``key`` is
``config_key`` of the scenario's victim settings plus the method's full, validated config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from mirage import paths
from mirage.models import (
    ImageClassifier,
    ModelCard,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mirage.registry import UnknownNameError
from mirage.scenarios import Scenario
from mirage.training.dpsgd import DpsgdConfig, train_dpsgd_victim
from mirage.training.ini import IniConfig, train_ini_victim
from mirage.training.victim import config_key, get_victim

log = logging.getLogger(__name__)


class NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class TrainingDefense:
    name: str
    params: type[BaseModel]
    train: Callable[..., tuple[ImageClassifier, ModelCard]] | None
    summary: str


TRAINING_DEFENSES: dict[str, TrainingDefense] = {
    "none": TrainingDefense("none", NoConfig, None, "the plain victim"),
    "ini": TrainingDefense("ini", IniConfig, train_ini_victim,
                           "InI: joint training against a student clone (Guo et al. 2023)"),
    "dpsgd": TrainingDefense("dpsgd", DpsgdConfig, train_dpsgd_victim,
                             "DP-SGD with Opacus (Abadi et al. 2016)"),
}


def list_training_defenses() -> list[str]:
    return sorted(TRAINING_DEFENSES)


def resolve_config(method: str, params: BaseModel | dict[str, Any] | None = None) -> BaseModel:
    """Validate ``params`` for ``method``; an unknown method raises
    :class:`~mirage.registry.UnknownNameError`, unknown keys a pydantic ``ValidationError`` (both
    ``ValueError``)."""
    if method not in TRAINING_DEFENSES:
        raise UnknownNameError("training-time defense", method, TRAINING_DEFENSES)
    entry = TRAINING_DEFENSES[method]
    if isinstance(params, entry.params):
        return params
    if isinstance(params, BaseModel):
        raise TypeError(f"{method} takes {entry.params.__name__}, got {type(params).__name__}")
    return entry.params(**(params or {}))


def defended_victim_dir(scenario: Scenario, method: str, config: BaseModel) -> Path:
    key = config_key(f"victim-{method}", {
        "dataset": scenario.victim_dataset, "architecture": scenario.architecture,
        "arch_kwargs": scenario.arch_kwargs, "data_root": scenario.data_root,
        # init="victim" starts from the plain victim, whose recipe is the scenario's
        "plain_training": scenario.victim_training.model_dump(),
        "config": config.model_dump(mode="json"),
    })
    return paths.models_dir() / "victims" / f"{scenario.victim_dataset}-{scenario.architecture}-{method}-{key}"


def get_defended_victim(scenario: Scenario, method: str, params: BaseModel | dict[str, Any] | None = None,
                        *, retrain: bool = False, show_progress: bool = True
                        ) -> tuple[ImageClassifier, ModelCard, bool]:
    """Return ``(model, card, from_cache)``: the scenario's victim trained with ``method``."""
    config = resolve_config(method, params)
    if method == "none":
        return get_victim(scenario, retrain=retrain, show_progress=show_progress)
    directory = defended_victim_dir(scenario, method, config)
    if has_checkpoint(directory) and not retrain:
        model, card = load_checkpoint(directory)
        return model, card, True
    model, card = TRAINING_DEFENSES[method].train(scenario, config, show_progress=show_progress)
    save_checkpoint(model, card, directory)
    log.info("%s victim %s: test accuracy %.4f in %.0fs -> %s", method, scenario.name,
             card.test_accuracy, card.train_seconds, directory)
    return model, card, False
