"""Clone training (docs/design.md §clone): how the attacker builds and trains F_A on its transfer
set.

Recipes on top of :func:`mirage.models.fit.fit`, soft-label cross-entropy by default:

* ``mad``: SGD, lr 0.1, momentum 0.5, wd 5e-4, step decay — the MAD paper's attacker
  (Orekondy et al., ICLR 2020, section 5.1: "SGD (LR=0.1) with momentum (0.5) for 30 epochs").
* ``grad2``: SGD with Nesterov momentum 0.9, wd 5e-4, cosine schedule — the GRAD² attacker.

Answers of truncating defenses (top-k without renormalisation, rounding) are rows that sum to
less than 1, as a real API would serve them. The attacker renormalises each row before training
(:func:`training_targets`) — the natural reading of a truncated posterior, and what makes the
soft-label cross-entropy a proper cross-entropy again. A row that is all zeros (everything
rounded away) carries no information and becomes uniform.

``restarts = n`` trains n clones (training seeds s, s+1, …) and keeps the one that fits the
transfer set best (lowest soft cross-entropy on it) — what an attacker does when a training run
stalls, using nothing but its own data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mirage.models import ImageClassifier, ModelCard, create_model
from mirage.models.fit import GRAD2_RECIPE, MAD_RECIPE, TrainConfig, fit, soft_cross_entropy
from mirage.registry import UnknownNameError

RECIPES: dict[str, TrainConfig] = {"mad": MAD_RECIPE, "grad2": GRAD2_RECIPE}


class CloneSpec(BaseModel):
    """How to build and train the clone: architecture, its preprocessing, and the recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str = "lenet"
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    training: TrainConfig = GRAD2_RECIPE
    restarts: int = Field(1, ge=1, description="clones trained (seeds s, s+1, …); the best fit is kept")

    @classmethod
    def like(cls, card: ModelCard, *, training: TrainConfig | str = "grad2") -> CloneSpec:
        """Same architecture and preprocessing as the victim (the protocol's default attacker)."""
        return cls(architecture=card.architecture, arch_kwargs=dict(card.arch_kwargs),
                   mean=tuple(card.mean), std=tuple(card.std), training=recipe(training))

    def build(self, input_shape: Sequence[int], num_classes: int) -> ImageClassifier:
        """A freshly initialised clone, seeded by ``training.seed`` (global RNG left untouched)."""
        channels = input_shape[0]
        mean = self.mean if len(self.mean) == channels else (self.mean[0],) * channels
        std = self.std if len(self.std) == channels else (self.std[0],) * channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.training.seed)
            return create_model(self.architecture, input_shape, num_classes, mean, std,
                                **self.arch_kwargs)


def recipe(name_or_config: TrainConfig | str) -> TrainConfig:
    if isinstance(name_or_config, TrainConfig):
        return name_or_config
    if name_or_config not in RECIPES:
        raise UnknownNameError("clone recipe", name_or_config, RECIPES)
    return RECIPES[name_or_config]


def training_targets(answers: Tensor) -> Tensor:
    """answers: (N, K) served rows (possibly summing to < 1) -> (N, K) rows on the simplex.

    Negative entries (float noise) are clipped; each row is divided by its sum; an all-zero row
    becomes uniform.
    """
    if answers.ndim != 2:
        raise ValueError(f"answers must be (N, K), got {tuple(answers.shape)}")
    if not torch.isfinite(answers).all():
        raise ValueError("answers contain NaN or infinite values")
    rows = answers.clamp_min(0).float()
    sums = rows.sum(dim=1, keepdim=True)
    uniform = torch.full_like(rows, 1.0 / rows.shape[1])
    return torch.where(sums > 0, rows / sums.clamp_min(torch.finfo(rows.dtype).tiny), uniform)


def train_clone(spec: CloneSpec, images: Tensor, answers: Tensor, num_classes: int, *,
                epochs: int | None = None, description: str = "clone",
                show_progress: bool = True) -> tuple[ImageClassifier, dict[str, float]]:
    """Build a fresh clone and fit it on (images (N, C, H, W), answers (N, K)).

    ``epochs`` overrides the recipe's (JBDA's per-round substitutes train shorter). With
    ``spec.restarts > 1`` the clone with the lowest ``transfer_loss`` (soft cross-entropy on the
    whole transfer set) is returned; its stats say which ``restart`` it was.
    """
    config = spec.training if epochs is None else spec.training.model_copy(update={"epochs": epochs})
    targets = training_targets(answers)
    candidates = []
    for restart in range(spec.restarts):
        attempt = spec.model_copy(update={"training": config.model_copy(update={"seed": config.seed + restart})})
        model = attempt.build(images.shape[1:], num_classes)
        stats = fit(model, images, targets, attempt.training, description=description,
                    show_progress=show_progress)
        stats.update(transfer_loss=transfer_loss(model, images, targets), restart=restart)
        candidates.append((model, stats))
    return min(candidates, key=lambda c: c[1]["transfer_loss"] if math.isfinite(c[1]["transfer_loss"]) else math.inf)


@torch.no_grad()
def transfer_loss(model: nn.Module, images: Tensor, targets: Tensor, batch_size: int = 1024) -> float:
    """Mean soft cross-entropy of ``model`` on (images, target rows)."""
    device = next(model.parameters()).device
    total = 0.0
    for x, t in zip(images.split(batch_size), targets.split(batch_size), strict=True):
        total += float(soft_cross_entropy(model(x.to(device)), t.to(device))) * len(x)
    return total / len(images)
