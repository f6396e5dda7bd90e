"""Defender-side surrogates for GRAD² (docs/design.md §grad2-surrogate).

Kinds:
- ``distilled``: same architecture as the victim, trained on the victim's clean posteriors over
  query-like data (the scenario's query pool, without the victim's test split) and **stopped early**
  — epoch E of an N-epoch cosine schedule (default 10 of 50): a partly trained model resembles the
  attacker's clone better than a converged one.
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
from mirage.api import PredictionAPI, accuracy, clean_posteriors
from mirage.data import load_dataset
from mirage.data.base import channel_stats
from mirage.models import (
    ImageClassifier,
    ModelCard,
    ModelNotPrepared,
    create_model,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
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

SURROGATE_TRAINING = TrainConfig(
    epochs=50,
    batch_size=128,
    lr=0.05,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="cosine",
    seed=1,
)


class SurrogateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["distilled", "random", "defender"] = "distilled"
    stop_epoch: int = Field(10, ge=0, description="E: stop after this many epochs")
    training: TrainConfig = Field(
        SURROGATE_TRAINING, description="N = training.epochs sets the schedule"
    )
    num_queries: int | None = Field(
        None, ge=1, description="pool images to distil on (all if None)"
    )
    checkpoints: int = Field(1, ge=1, description="snapshots from the last epochs (ensemble)")
    architecture: str | None = None

    @model_validator(mode="after")
    def _epochs(self) -> SurrogateConfig:
        if self.stop_epoch > self.training.epochs:
            raise ValueError(
                f"stop_epoch {self.stop_epoch} exceeds the schedule's {self.training.epochs} epochs"
            )
        if self.kind != "random" and self.checkpoints > max(self.stop_epoch, 1):
            raise ValueError("cannot keep more checkpoints than trained epochs")
        return self


def train_early_stopped(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    config: TrainConfig,
    stop_epoch: int,
    keep_last: int = 1,
) -> tuple[list[dict[str, Tensor]], float]:
    """Train with ``config``'s N-epoch schedule but stop after ``stop_epoch`` epochs; return the
    state dicts after the last ``keep_last`` epochs (oldest first) and the wall time."""
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
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
            loss = soft_cross_entropy(model(x.to(device)), targets[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log.info(
            "surrogate epoch %d/%d (of %d): loss %.4f",
            epoch + 1,
            stop_epoch,
            config.epochs,
            loss.item(),
        )
        if epoch >= stop_epoch - keep_last:
            snapshots.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    model.eval()
    if not snapshots:
        snapshots.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return snapshots, time.perf_counter() - start


def surrogate_dir(
    scenario: Scenario, config: SurrogateConfig, victim_card: ModelCard, models: Path | None = None
) -> Path:
    # "pool": distillation data = scenarios.query_pool (before, in-distribution scenarios
    # also distilled on the victim's test split); a new value retires surrogates cached before.
    key = config_key(
        "surrogate",
        {
            "scenario": scenario.model_dump(),
            "config": config.model_dump(),
            "victim_created": victim_card.created,
            "pool": "query_pool",
        },
    )
    return (models or paths.models_dir()) / "surrogates" / f"{scenario.name}-{config.kind}-{key}"


def train_surrogate(
    scenario: Scenario, victim: nn.Module, victim_card: ModelCard, config: SurrogateConfig
) -> list[tuple[ImageClassifier, ModelCard]]:
    """Train the surrogate(s) described by ``config`` for ``scenario`` (no caching)."""
    data = load_dataset(scenario.victim_dataset, scenario.data_root)
    architecture = config.architecture or scenario.architecture
    torch.manual_seed(config.training.seed)
    model = create_model(
        architecture,
        data.input_shape,
        data.num_classes,
        data.mean,
        data.std,
        **scenario.arch_kwargs,
    )
    if config.kind == "random":
        images = targets = None
        snapshots, seconds = [{k: v.detach().clone() for k, v in model.state_dict().items()}], 0.0
    else:
        if config.kind == "distilled":
            images = query_pool(
                scenario
            ).images  # never the victim's test split (the evaluation set)
            if config.num_queries is not None:
                pick = torch.randperm(
                    len(images), generator=torch.Generator().manual_seed(config.training.seed)
                )
                images = images[pick[: config.num_queries]]
            targets = clean_posteriors(victim, images)
        else:
            images, targets = data.train.images, data.train.labels
        snapshots, seconds = train_early_stopped(
            model, images, targets, config.training, config.stop_epoch, config.checkpoints
        )
    members = []
    for state in snapshots:
        member = create_model(
            architecture,
            data.input_shape,
            data.num_classes,
            data.mean,
            data.std,
            **scenario.arch_kwargs,
        )
        member.load_state_dict(state)
        member.eval()
        card = ModelCard(
            architecture=architecture,
            arch_kwargs=scenario.arch_kwargs,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            mean=data.mean,
            std=data.std,
            dataset=scenario.victim_dataset,
            test_accuracy=accuracy(member, data.test),
            seed=config.training.seed,
            training={"surrogate": config.model_dump(mode="json")},
            train_seconds=seconds,
        )
        members.append((member, card))
    return members


def get_surrogate(
    scenario: Scenario,
    victim: nn.Module,
    victim_card: ModelCard,
    config: SurrogateConfig | None = None,
    *,
    retrain: bool = False,
    models: Path | None = None,
    train: bool = True,
) -> tuple[list[nn.Module], list[ModelCard], bool]:
    """Return ``(members, cards, from_cache)``; one member unless ``config.checkpoints`` > 1;
    kept under ``models`` (default :func:`mirage.paths.models_dir`); ``train=False`` refuses to
    train what is not kept (:class:`~mirage.models.ModelNotPrepared`)."""
    config = config or SurrogateConfig()
    directory = surrogate_dir(scenario, config, victim_card, models)
    member_dirs = [
        directory / f"member-{i}"
        for i in range(config.checkpoints if config.kind != "random" else 1)
    ]
    if not retrain and all(has_checkpoint(d) for d in member_dirs):
        loaded = [load_checkpoint(d) for d in member_dirs]
        return [m for m, _ in loaded], [c for _, c in loaded], True
    if not train:
        raise ModelNotPrepared(
            f"the {config.kind} surrogate of scenario {scenario.name}", directory
        )
    log.warning(
        "no cached %s surrogate for scenario %s in %s: training it now (%d of %d epochs)",
        config.kind,
        scenario.name,
        directory.parent,
        config.stop_epoch,
        config.training.epochs,
    )
    members = train_surrogate(scenario, victim, victim_card, config)
    for (model, card), d in zip(members, member_dirs, strict=True):
        save_checkpoint(model, card, d)
    log.info(
        "surrogate %s/%s: test accuracy %s -> %s",
        scenario.name,
        config.kind,
        [round(c.test_accuracy or 0, 4) for _, c in members],
        directory,
    )
    return [m for m, _ in members], [c for _, c in members], False


def architecture_for(input_shape: tuple[int, ...]) -> str:
    """The registered architecture mirage builds to imitate a model of this input, whether a
    surrogate of a user's model (:func:`distil_surrogate`) or a clone (docs/design.md
    §grad2-surrogate): LeNet up to 32×32 pixels, the compact VGG above."""
    return "lenet" if max(input_shape[1:]) <= 32 else "vgg"


def distil_surrogate(
    model: nn.Module | PredictionAPI,
    images: Tensor,
    *,
    architecture: str | None = None,
    config: SurrogateConfig | None = None,
    holdout: float = 0.1,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> list[tuple[ImageClassifier, ModelCard]]:
    """A GRAD²/MAD surrogate of any model, from its answers on the defender's own unlabelled
    ``images`` (N, C, H, W) in [0, 1] (docs/design.md §grad2-surrogate).

    ``model``: a module mapping images to logits (mirage's, a ``.pt2`` or ONNX file loaded with
    :func:`mirage.models.formats.load_model_file`, the user's own), or a prediction API answering
    probabilities (:class:`~mirage.api.InProcessAPI`, or :class:`~mirage.serve.HTTPPredictionAPI`
    for an Open Inference Protocol endpoint: black-box, each image one query). The surrogate is
    ``architecture`` (default :func:`architecture_for` the input), normalised by the images' own
    channel statistics, trained on the answers to all but a ``holdout`` share of the images, early
    stopped as ``config`` says (the ``distilled`` kind's recipe); each member's card records its
    top-1 agreement with the model on the held-out images as ``test_accuracy``. It trains on
    ``device`` (:func:`mirage.devices.resolve_device`) and is returned on the CPU."""
    from mirage.devices import resolve_device

    device = resolve_device(device)
    config = config or SurrogateConfig()
    if images.ndim != 4 or not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError("images must be a finite (N, C, H, W) tensor in [0, 1]")
    if not 0 < holdout < 1 or len(images) < 10:
        raise ValueError("distil on at least 10 images, holding out a share in (0, 1) of them")
    architecture = architecture or architecture_for(tuple(images.shape[1:]))
    targets = _answers(model, images, batch_size)
    order = torch.randperm(
        len(images), generator=torch.Generator().manual_seed(config.training.seed)
    )
    held = order[: max(1, round(holdout * len(images)))]
    train = order[len(held) :]
    if config.num_queries is not None:
        train = train[: config.num_queries]
    input_shape, num_classes = tuple(images.shape[1:]), targets.shape[1]
    mean, std = channel_stats(images[train])
    torch.manual_seed(config.training.seed)
    student = create_model(architecture, input_shape, num_classes, mean, std).to(device)
    snapshots, seconds = train_early_stopped(
        student,
        images[train],
        targets[train],
        config.training,
        config.stop_epoch,
        config.checkpoints,
    )
    members, agreements = [], []
    for state in snapshots:
        member = create_model(architecture, input_shape, num_classes, mean, std)
        member.load_state_dict(state)
        member.eval()
        agreement = float(
            (clean_posteriors(member, images[held]).argmax(1) == targets[held].argmax(1))
            .float()
            .mean()
        )
        card = ModelCard(
            architecture=architecture,
            input_shape=input_shape,
            num_classes=num_classes,
            mean=mean,
            std=std,
            dataset="",
            test_accuracy=agreement,
            seed=config.training.seed,
            training={
                "surrogate": config.model_dump(mode="json"),
                "distilled_on": len(train),
                "agreement_on": len(held),
                "source": type(model).__name__,
            },
            train_seconds=seconds,
        )
        members.append((member, card))
        agreements.append(agreement)
    log.info(
        "distilled a %s surrogate on %d answers: top-1 agreement %s on %d held-out images",
        architecture,
        len(train),
        [round(a, 4) for a in agreements],
        len(held),
    )
    return members


def _answers(model: nn.Module | PredictionAPI, images: Tensor, batch_size: int) -> Tensor:
    """The model's probabilities (N, K) for ``images``: softmax of a module's logits, or what a
    prediction API answers (checked to be probability vectors)."""
    if isinstance(model, nn.Module):
        return clean_posteriors(model, images, batch_size=batch_size)
    answers = torch.cat([model.query(chunk).float().cpu() for chunk in images.split(batch_size)])
    if (
        answers.ndim != 2
        or not torch.isfinite(answers).all()
        or (answers.sum(1) - 1).abs().max() > 1e-3
    ):
        raise ValueError("the prediction API did not answer a probability vector per image")
    return answers
