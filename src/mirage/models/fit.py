"""Supervised training shared by victims, surrogates and clones.

Targets are either integer labels (B,) or probability rows (B, K); both use the soft-label
cross-entropy ``−Σ_k t_k log p_θ(k|x)`` (hard labels as one-hot). Recipes (docs/design.md
§clone): MAD-style SGD (lr 0.1, momentum 0.5) or GRAD²-style Nesterov (momentum 0.9, wd 5e-4,
cosine).

Why here, in ``mirage.models``: this is how *a model* is fitted to (images, targets) pairs, and it
needs nothing but torch and :mod:`mirage.progress`. Everything above uses it — a scenario names
its victim's :class:`TrainConfig`, GRAD²'s targets use :func:`soft_cross_entropy`, the attacker's
clone uses the recipes and :func:`fit`, :mod:`mirage.training` builds victims and surrogates on
:func:`train_loop` — so it has to sit below all of them, and ``models`` is the lowest layer that
is about models at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mirage.progress import progress_bar

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(30, ge=0)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    augment: bool = False
    seed: int = 0


MAD_RECIPE = TrainConfig(
    epochs=30, lr=0.1, momentum=0.5, nesterov=False, weight_decay=5e-4, schedule="step"
)
GRAD2_RECIPE = TrainConfig(
    epochs=30, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine"
)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of −Σ_k t_k log softmax(logits)_k; integer targets mean one-hot."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def random_shift(x: Tensor, generator: torch.Generator, pad: int = 2) -> Tensor:
    """Augmentation: translate each image by up to ``pad`` pixels in each direction (zero fill)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    rows = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator) + torch.arange(h)
    cols = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator) + torch.arange(w)
    batch = torch.arange(b).view(b, 1, 1)
    index = (batch, rows.view(b, h, 1).to(x.device), cols.view(b, 1, w).to(x.device))
    return padded[index].permute(0, 3, 1, 2).contiguous()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(steps * 2 // 3, 1), gamma=0.1
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def train_loop(
    model: nn.Module,
    n: int,
    config: TrainConfig,
    batch_loss: Callable[[Tensor, torch.Generator], Tensor],
    *,
    description: str = "training",
    show_progress: bool = True,
) -> dict[str, float]:
    """The shared optimisation loop: ``config.epochs`` seeded passes over ``n`` items in
    batches; ``batch_loss(index, generator)`` returns the loss of one batch of item indices.
    Returns the final loss and the wall time."""
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = -(-n // config.batch_size)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config, config.epochs * steps_per_epoch)
    model.train()
    start, last_loss = time.perf_counter(), float("nan")
    with progress_bar(
        description, total=config.epochs * steps_per_epoch, enabled=show_progress
    ) as advance:
        for _ in range(config.epochs):
            for index in torch.randperm(n, generator=generator).split(config.batch_size):
                loss = batch_loss(index, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                last_loss = loss.detach().item()
                advance(1, loss=last_loss)
    model.eval()
    return {"final_loss": last_loss, "seconds": time.perf_counter() - start}


def fit(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    config: TrainConfig,
    *,
    loss: Callable[[Tensor, Tensor], Tensor] = soft_cross_entropy,
    description: str = "training",
    show_progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place on (images, targets) minimising ``loss(logits, targets)`` (default:
    the soft-label cross-entropy); returns the final loss and the wall time.

    Deterministic given ``config.seed`` (shuffling and augmentation use their own generator).
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    if len(images) == 0:
        raise ValueError("cannot train on an empty set")
    device = next(model.parameters()).device

    def batch_loss(index: Tensor, generator: torch.Generator) -> Tensor:
        x = images[index]
        if config.augment:
            x = random_shift(x, generator)
        return loss(model(x.to(device)), targets[index].to(device))

    return train_loop(
        model, len(images), config, batch_loss, description=description, show_progress=show_progress
    )
