"""Defender-side surrogates for GRAD² (docs/design.md §grad2-surrogate).

Kinds:
- ``distilled``: same architecture as the victim, trained on the victim's clean posteriors over
  query-like data (the scenario's query pool, without the victim's test split) and **stopped early** — epoch E of an N-epoch cosine
  schedule (default 10 of 50): a partly trained model resembles the attacker's clone better than
  a converged one.
- ``random``: randomly initialised (transfers badly; kept as the paper's baseline).
- ``defender``: trained on the defender's own labelled training data, same early stop.

``checkpoints`` > 1 keeps snapshots from the last epochs of the run; GRAD² samples one per
scoring batch. Trained surrogates are cached under ``$MIRAGE_MODELS/surrogates/<key>/`` keyed by
``config_key`` of the whole configuration, like victims.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mirage import paths
from mirage.api import accuracy, clean_posteriors
from mirage.data import load_dataset
from mirage.models import ModelCard, create_model, has_checkpoint, load_checkpoint, save_checkpoint
from mirage.models.fit import (
    TrainConfig,
    make_optimizer,
    make_schedule,
    random_shift,
    soft_cross_entropy,
)
from mirage.scenarios import Scenario, query_pool
from mirage.training.victim import config_key

log = logging.getLogger(__name__)

SURROGATE_TRAINING = TrainConfig(epochs=50, batch_size=128, lr=0.05, momentum=0.9, nesterov=True,
                                 weight_decay=5e-4, schedule="cosine", seed=1)


class SurrogateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["distilled", "random", "defender"] = "distilled"
    stop_epoch: int = Field(10, ge=0, description="E: stop after this many epochs")
    training: TrainConfig = Field(SURROGATE_TRAINING, description="N = training.epochs sets the schedule")
    num_queries: int | None = Field(None, ge=1, description="pool images to distil on (all if None)")
    checkpoints: int = Field(1, ge=1, description="snapshots from the last epochs (ensemble)")
    architecture: str | None = None

    @model_validator(mode="after")
    def _epochs(self) -> SurrogateConfig:
        if self.stop_epoch > self.training.epochs:
            raise ValueError(f"stop_epoch {self.stop_epoch} exceeds the schedule's {self.training.epochs} epochs")
        if self.kind != "random" and self.checkpoints > max(self.stop_epoch, 1):
            raise ValueError("cannot keep more checkpoints than trained epochs")
        return self


def train_early_stopped(model: nn.Module, images: Tensor, targets: Tensor, config: TrainConfig,
                        stop_epoch: int, keep_last: int = 1) -> tuple[list[dict[str, Tensor]], float]:
    """Train with ``config``'s N-epoch schedule but stop after ``stop_epoch`` epochs; return the
    state dicts after the last ``keep_last`` epochs (oldest first) and the wall time."""
    generator = torch.Generator().manual_seed(config.seed)
    steps = -(-len(images) // config.batch_size)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config, config.epochs * steps)
    snapshots, start = [], time.perf_counter()
    model.train()
    for epoch in range(stop_epoch):
        for index in torch.randperm(len(images), generator=generator).split(config.batch_size):
            x = images[index]
            if config.augment:
                x = random_shift(x, generator)
            loss = soft_cross_entropy(model(x), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log.info("surrogate epoch %d/%d (of %d): loss %.4f", epoch + 1, stop_epoch, config.epochs, loss.item())
        if epoch >= stop_epoch - keep_last:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model.eval()
    if not snapshots:
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return snapshots, time.perf_counter() - start


def surrogate_dir(scenario: Scenario, config: SurrogateConfig, victim_card: ModelCard) -> Path:
    # "pool": distillation data = scenarios.query_pool (before, in-distribution scenarios
    # also distilled on the victim's test split); a new value retires surrogates cached before.
    key = config_key("surrogate", {"scenario": scenario.model_dump(), "config": config.model_dump(),
                                   "victim_created": victim_card.created, "pool": "query_pool"})
    return paths.models_dir() / "surrogates" / f"{scenario.name}-{config.kind}-{key}"


def train_surrogate(scenario: Scenario, victim: nn.Module, victim_card: ModelCard,
                    config: SurrogateConfig) -> list[tuple[nn.Module, ModelCard]]:
    """Train the surrogate(s) described by ``config`` for ``scenario`` (no caching)."""
    data = load_dataset(scenario.victim_dataset, scenario.data_root)
    architecture = config.architecture or scenario.architecture
    torch.manual_seed(config.training.seed)
    model = create_model(architecture, data.input_shape, data.num_classes, data.mean, data.std,
                         **scenario.arch_kwargs)
    if config.kind == "random":
        images = targets = None
        snapshots, seconds = [{k: v.detach().clone() for k, v in model.state_dict().items()}], 0.0
    else:
        if config.kind == "distilled":
            images = query_pool(scenario).images  # never the victim's test split (the evaluation set)
            if config.num_queries is not None:
                pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.training.seed))
                images = images[pick[:config.num_queries]]
            targets = clean_posteriors(victim, images)
        else:
            images, targets = data.train.images, data.train.labels
        snapshots, seconds = train_early_stopped(model, images, targets, config.training,
                                                 config.stop_epoch, config.checkpoints)
    members = []
    for state in snapshots:
        member = create_model(architecture, data.input_shape, data.num_classes, data.mean, data.std,
                              **scenario.arch_kwargs)
        member.load_state_dict(state)
        member.eval()
        card = ModelCard(architecture=architecture, arch_kwargs=scenario.arch_kwargs,
                         input_shape=data.input_shape, num_classes=data.num_classes, mean=data.mean,
                         std=data.std, dataset=scenario.victim_dataset,
                         test_accuracy=accuracy(member, data.test), seed=config.training.seed,
                         training={"surrogate": config.model_dump(mode="json")}, train_seconds=seconds)
        members.append((member, card))
    return members


def get_surrogate(scenario: Scenario, victim: nn.Module, victim_card: ModelCard,
                  config: SurrogateConfig | None = None, *, retrain: bool = False
                  ) -> tuple[list[nn.Module], list[ModelCard], bool]:
    """Return ``(members, cards, from_cache)``; one member unless ``config.checkpoints`` > 1."""
    config = config or SurrogateConfig()
    directory = surrogate_dir(scenario, config, victim_card)
    member_dirs = [directory / f"member-{i}" for i in range(config.checkpoints if config.kind != "random" else 1)]
    if not retrain and all(has_checkpoint(d) for d in member_dirs):
        loaded = [load_checkpoint(d) for d in member_dirs]
        return [m for m, _ in loaded], [c for _, c in loaded], True
    members = train_surrogate(scenario, victim, victim_card, config)
    for (model, card), d in zip(members, member_dirs, strict=True):
        save_checkpoint(model, card, d)
    log.info("surrogate %s/%s: test accuracy %s -> %s", scenario.name, config.kind,
             [round(c.test_accuracy or 0, 4) for _, c in members], directory)
    return [m for m, _ in members], [c for _, c in members], False
