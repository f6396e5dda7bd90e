"""Training-time defenses by name (docs/design.md §training-defenses): the victim itself differs,
the query-time defense is ``none``. The benchmark sweeps them next to the inference-time defenses::

    model, card, cached = get_defended_victim(
        get_scenario("fmnist"), "dpsgd", {"noise_multiplier": 1.0}
    )

Registered like the query-time defenses, in a :class:`mirage.registry.Registry` with typed
parameters: ``none`` (the plain victim of :func:`mirage.training.victim.get_victim`), ``ini``
(:mod:`mirage.training.ini`) and ``dpsgd`` (:mod:`mirage.training.dpsgd`). Trained victims are
cached under ``$MIRAGE_MODELS/victims/<dataset>-<arch>-<method>-<key>/`` where ``key`` is
``config_key`` of the scenario's victim settings plus the method's full, validated config.
"""

from __future__ import annotations

import abc
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from mirage import paths
from mirage.models import (
    ImageClassifier,
    ModelCard,
    ModelNotPrepared,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mirage.registry import Registry
from mirage.scenarios import Scenario
from mirage.training.dpsgd import DpsgdConfig, train_dpsgd_victim
from mirage.training.ini import IniConfig, train_ini_victim
from mirage.training.victim import config_key, get_victim, train_model

log = logging.getLogger(__name__)


class NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


C = TypeVar("C", bound=BaseModel)


class TrainingDefense(abc.ABC, Generic[C]):
    """A training-time defense: the scenario's victim, trained differently. Registered by name
    with typed parameters like the query-time defenses (:class:`mirage.registry.Registry`),
    generic in their type ``C``."""

    name: ClassVar[str] = ""
    params_type: ClassVar[type[BaseModel]] = NoConfig

    def __init__(self, params: C) -> None:
        self.params = params

    @abc.abstractmethod
    def train(
        self,
        scenario: Scenario,
        *,
        show_progress: bool = True,
        models: Path | None = None,
        progress_dir: Path | None = None,
    ) -> tuple[ImageClassifier, ModelCard]:
        """Train the defended victim (no caching: :func:`get_defended_victim` caches); a model it
        starts from (the plain victim) is kept under ``models``; a training that can resume keeps
        its progress in ``progress_dir`` (deleted once the victim is saved)."""


_REGISTRY: Registry[TrainingDefense] = Registry("training-time defense")
TRAINING_DEFENSES = _REGISTRY.entries


def register_training_defense(
    name: str, *, params: type[BaseModel] = NoConfig
) -> Callable[[type[TrainingDefense]], type[TrainingDefense]]:
    """Class decorator: add a training-time defense to the registry under ``name``."""
    return _REGISTRY.register(name, params)


@register_training_defense("none")
class PlainVictim(TrainingDefense[NoConfig]):
    """The plain victim."""

    def train(
        self,
        scenario: Scenario,
        *,
        show_progress: bool = True,
        models: Path | None = None,
        progress_dir: Path | None = None,
    ) -> tuple[ImageClassifier, ModelCard]:
        return train_model(
            scenario.architecture,
            scenario.arch_kwargs,
            scenario.victim_dataset,
            scenario.victim_training,
            data_root=scenario.data_root,
            description=f"victim {scenario.name}",
            show_progress=show_progress,
        )


@register_training_defense("ini", params=IniConfig)
class Ini(TrainingDefense[IniConfig]):
    """InI: joint training against a student clone (Guo et al. 2023)."""

    def train(
        self,
        scenario: Scenario,
        *,
        show_progress: bool = True,
        models: Path | None = None,
        progress_dir: Path | None = None,
    ) -> tuple[ImageClassifier, ModelCard]:
        return train_ini_victim(
            scenario,
            self.params,
            show_progress=show_progress,
            models=models,
            progress_file=None if progress_dir is None else progress_dir / "ini-progress.pt",
        )


@register_training_defense("dpsgd", params=DpsgdConfig)
class Dpsgd(TrainingDefense[DpsgdConfig]):
    """DP-SGD with Opacus (Abadi et al. 2016)."""

    def train(
        self,
        scenario: Scenario,
        *,
        show_progress: bool = True,
        models: Path | None = None,
        progress_dir: Path | None = None,
    ) -> tuple[ImageClassifier, ModelCard]:
        return train_dpsgd_victim(scenario, self.params, show_progress=show_progress)


def list_training_defenses() -> list[str]:
    return _REGISTRY.names()


def is_training_time(name: str) -> bool:
    """Whether ``name`` is a training-time defense other than ``none`` (which is the plain victim
    of either registry)."""
    return name != "none" and name in _REGISTRY


def resolve_config(method: str, params: BaseModel | dict[str, Any] | None = None) -> BaseModel:
    """Validate ``params`` for ``method``; an unknown method raises
    :class:`~mirage.registry.UnknownNameError`, unknown keys a pydantic ``ValidationError`` (both
    ``ValueError``)."""
    entry = _REGISTRY.get(method)
    if isinstance(params, entry.params):
        return params
    if isinstance(params, BaseModel):
        raise TypeError(f"{method} takes {entry.params.__name__}, got {type(params).__name__}")
    return entry.params(**(params or {}))


def defended_victim_dir(
    scenario: Scenario, method: str, config: BaseModel, models: Path | None = None
) -> Path:
    key = config_key(
        f"victim-{method}",
        {
            "dataset": scenario.victim_dataset,
            "architecture": scenario.architecture,
            "arch_kwargs": scenario.arch_kwargs,
            "data_root": scenario.data_root,
            # init="victim" starts from the plain victim, whose recipe is the scenario's
            "plain_training": scenario.victim_training.model_dump(),
            "config": config.model_dump(mode="json"),
        },
    )
    return (
        (models or paths.models_dir())
        / "victims"
        / f"{scenario.victim_dataset}-{scenario.architecture}-{method}-{key}"
    )


def get_defended_victim(
    scenario: Scenario,
    method: str,
    params: BaseModel | dict[str, Any] | None = None,
    *,
    retrain: bool = False,
    show_progress: bool = True,
    models: Path | None = None,
    train: bool = True,
) -> tuple[ImageClassifier, ModelCard, bool]:
    """Return ``(model, card, from_cache)``: the scenario's victim trained with ``method``, kept
    under ``models`` (default :func:`mirage.paths.models_dir`); ``train=False`` refuses to train
    one that is not kept (:class:`~mirage.models.ModelNotPrepared`)."""
    config = resolve_config(method, params)
    if method == "none":
        return get_victim(
            scenario, retrain=retrain, show_progress=show_progress, models=models, train=train
        )
    directory = defended_victim_dir(scenario, method, config, models)
    if has_checkpoint(directory) and not retrain:
        model, card = load_checkpoint(directory)
        return model, card, True
    if not train:
        raise ModelNotPrepared(f"the {method} victim of scenario {scenario.name}", directory)
    progress_dir = directory.with_name(directory.name + ".progress")
    model, card = (
        _REGISTRY.get(method)
        .cls(config)
        .train(scenario, show_progress=show_progress, models=models, progress_dir=progress_dir)
    )
    save_checkpoint(model, card, directory)
    shutil.rmtree(progress_dir, ignore_errors=True)
    log.info(
        "%s victim %s: test accuracy %.4f in %.0fs -> %s",
        method,
        scenario.name,
        card.test_accuracy,
        card.train_seconds,
        directory,
    )
    return model, card, False
