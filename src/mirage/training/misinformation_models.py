"""Cached defender-side models for Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020):
the outlier-exposure detector (s(x) = max softmax) and the misinformation model F̂.

Outliers for OE must not be the attacker's pool (that would be fitting the test). They are the
victim's own training images with their 4×4 patches shuffled (:func:`mirage.training.ini.
patch_shuffle`): natural image statistics, no class structure — the same choice InI uses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mirage import paths
from mirage.data import load_dataset
from mirage.models import (
    ImageClassifier,
    ModelCard,
    ModelNotPrepared,
    create_model,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mirage.models.fit import TrainConfig
from mirage.scenarios import Scenario
from mirage.training.victim import config_key


class MisinformationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    training: TrainConfig = TrainConfig(epochs=5, batch_size=128, lr=0.05, seed=0)
    oe_weight: float = Field(0.5, ge=0)
    patch_grid: int = Field(4, ge=2)


def _fresh(scenario: Scenario, seed: int) -> ImageClassifier:
    data = load_dataset(scenario.victim_dataset, scenario.data_root)
    torch.manual_seed(seed)
    return create_model(
        scenario.architecture,
        data.input_shape,
        data.num_classes,
        data.mean,
        data.std,
        **scenario.arch_kwargs,
    )


def get_misinformation_models(
    scenario: Scenario,
    config: MisinformationConfig | None = None,
    *,
    models: Path | None = None,
    train: bool = True,
) -> tuple[nn.Module, nn.Module]:
    """``(oe_model, misinformation_model)`` for the scenario, trained once and kept under
    ``models`` (default :func:`mirage.paths.models_dir`); ``train=False`` refuses to train them
    (:class:`~mirage.models.ModelNotPrepared`)."""
    from mirage.training.ini import patch_shuffle
    from mirage.training.outlier_exposure import train_misinformation, train_outlier_exposure

    config = config or MisinformationConfig()
    key = config_key(
        "adaptive-misinformation",
        {"scenario": scenario.model_dump(mode="json"), "config": config.model_dump(mode="json")},
    )
    root = (models or paths.models_dir()) / "adaptive_misinformation" / f"{scenario.name}-{key}"
    if has_checkpoint(root / "oe") and has_checkpoint(root / "mis"):
        return load_checkpoint(root / "oe")[0], load_checkpoint(root / "mis")[0]
    if not train:
        raise ModelNotPrepared(f"the misinformation detector of scenario {scenario.name}", root)
    data = load_dataset(scenario.victim_dataset, scenario.data_root)
    generator = torch.Generator().manual_seed(config.training.seed)
    outliers = patch_shuffle(data.train.images, config.patch_grid, generator)
    trained = {}
    for name in ("oe", "mis"):
        model = _fresh(scenario, config.training.seed)
        if name == "oe":
            train_outlier_exposure(
                model,
                data.train.images,
                data.train.labels,
                outliers,
                config.training,
                weight=config.oe_weight,
            )
        else:
            train_misinformation(model, data.train.images, data.train.labels, config.training)
        card = ModelCard(
            architecture=scenario.architecture,
            arch_kwargs=scenario.arch_kwargs,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            mean=data.mean,
            std=data.std,
            dataset=scenario.victim_dataset,
            seed=config.training.seed,
            training={"adaptive_misinformation": name, **config.model_dump(mode="json")},
        )
        save_checkpoint(model.eval(), card, root / name)
        trained[name] = model.eval()
    return trained["oe"], trained["mis"]
