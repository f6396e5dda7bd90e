"""Train a scenario's victim, or reuse the cached checkpoint trained with the same config."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from mirage import paths
from mirage.api.evaluate import accuracy
from mirage.data import DatasetSplits, load_dataset
from mirage.models import (
    ImageClassifier,
    ModelCard,
    ModelNotPrepared,
    create_model,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mirage.models.fit import TrainConfig, fit
from mirage.scenarios import Scenario

log = logging.getLogger(__name__)


def config_key(kind: str, config: dict) -> str:
    """Stable short hash of a JSON-able config: the cache key of a trained model."""
    blob = json.dumps({"kind": kind, **config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def victim_dir(scenario: Scenario, models: Path | None = None) -> Path:
    """Where ``scenario``'s victim is kept under ``models`` (default
    :func:`mirage.paths.models_dir`)."""
    config = {
        "dataset": scenario.victim_dataset,
        "architecture": scenario.architecture,
        "arch_kwargs": scenario.arch_kwargs,
        "training": scenario.victim_training.model_dump(),
        "data_root": scenario.data_root,
    }
    return (
        (models or paths.models_dir())
        / "victims"
        / f"{scenario.victim_dataset}-{scenario.architecture}-{config_key('victim', config)}"
    )


def train_model(
    architecture: str,
    arch_kwargs: dict,
    dataset: str,
    training: TrainConfig,
    *,
    data_root: str | None = None,
    description: str = "victim",
    show_progress: bool = True,
    device: str | None = None,
) -> tuple[ImageClassifier, ModelCard]:
    """Train a fresh model on a registered dataset's training split and evaluate it on its test
    split (:func:`train_classifier`)."""
    return train_classifier(
        architecture,
        arch_kwargs,
        load_dataset(dataset, data_root),
        training,
        dataset=dataset,
        description=description,
        show_progress=show_progress,
        device=device,
    )


def train_classifier(
    architecture: str,
    arch_kwargs: dict,
    data: DatasetSplits,
    training: TrainConfig,
    *,
    dataset: str,
    description: str = "victim",
    show_progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[ImageClassifier, ModelCard]:
    """Train a fresh ``architecture`` on ``data``'s training split with ``training`` and evaluate
    it on its test split; its card names ``dataset``. It trains on ``device``
    (:func:`mirage.devices.resolve_device`: the argument, ``$MIRAGE_DEVICE`` or the CPU) and is
    returned on the CPU, in eval mode."""
    from mirage.devices import resolve_device

    device = resolve_device(device)
    torch.manual_seed(training.seed)
    model = create_model(
        architecture, data.input_shape, data.num_classes, data.mean, data.std, **arch_kwargs
    )
    stats = fit(
        model.to(device),
        data.train.images,
        data.train.labels,
        training,
        description=description,
        show_progress=show_progress,
    )
    model = model.cpu().eval()
    card = ModelCard(
        architecture=architecture,
        arch_kwargs=arch_kwargs,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
        dataset=dataset,
        test_accuracy=accuracy(model, data.test),
        seed=training.seed,
        training=training.model_dump(),
        train_seconds=stats["seconds"],
    )
    return model, card


def get_victim(
    scenario: Scenario,
    *,
    retrain: bool = False,
    show_progress: bool = True,
    models: Path | None = None,
    train: bool = True,
) -> tuple[ImageClassifier, ModelCard, bool]:
    """Return ``(model, card, from_cache)`` for the scenario's victim, kept under ``models``
    (default :func:`mirage.paths.models_dir`); one not kept yet is trained, or with ``train=False``
    refused (:class:`~mirage.models.ModelNotPrepared`)."""
    directory = victim_dir(scenario, models)
    if has_checkpoint(directory) and not retrain:
        model, card = load_checkpoint(directory)
        return model, card, True
    if not train:
        raise ModelNotPrepared(f"the victim of scenario {scenario.name}", directory)
    log.warning(
        "no cached victim for scenario %s in %s: training it now (%s, %d epochs; the progress bar "
        "shows the time left). MIRAGE_MODELS names another folder of trained models (the sweeps "
        "pin theirs in results/models)",
        scenario.name,
        directory.parent,
        scenario.architecture,
        scenario.victim_training.epochs,
    )
    model, card = train_model(
        scenario.architecture,
        scenario.arch_kwargs,
        scenario.victim_dataset,
        scenario.victim_training,
        data_root=scenario.data_root,
        description=f"victim {scenario.name}",
        show_progress=show_progress,
    )
    save_checkpoint(model, card, directory)
    log.info(
        "victim %s: test accuracy %.4f in %.0fs -> %s",
        scenario.name,
        card.test_accuracy,
        card.train_seconds,
        directory,
    )
    return model, card, False
