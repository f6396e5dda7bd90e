"""Victim-side training for Adaptive Misinformation (Kariyappa & Qureshi, "Defending Against Model
Stealing Attacks with Adaptive Misinformation", CVPR 2020; docs/design.md §adaptive-misinformation).

- :func:`train_outlier_exposure` — Outlier Exposure (Hendrycks, Mazeika, Dietterich, ICLR 2019,
  eq. 1): cross-entropy on in-distribution data plus λ times the cross-entropy of outlier images
  to the uniform distribution, E_out[−(1/K) Σ_k log p_k(x)], so the max-softmax score
  s(x) = max_k p_k(x) separates in- from out-of-distribution queries.
- :func:`train_misinformation` — the misinformation model F̂, trained to put little mass on the
  correct class: minimise E[−log(1 − p_y(x))] (Kariyappa & Qureshi, section 4.2).
- :func:`max_softmax` — the OOD score s(x) (B,).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mirage.models.fit import TrainConfig, fit, random_shift, train_loop


def outlier_exposure_loss(
    logits_in: Tensor, labels: Tensor, logits_out: Tensor, weight: float
) -> Tensor:
    """CE(in) + λ·CE(out, uniform). logits: (B, K), (M, K); labels: (B,)."""
    uniform_ce = -torch.log_softmax(logits_out, dim=1).mean(dim=1).mean()
    return nn.functional.cross_entropy(logits_in, labels) + weight * uniform_ce


def misinformation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean −log(1 − p_y), computed stably as logsumexp(z) − logsumexp(z without class y)."""
    others = logits.scatter(1, labels.unsqueeze(1), float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)).mean()


def train_outlier_exposure(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    outliers: Tensor,
    config: TrainConfig,
    *,
    weight: float = 0.5,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place with Outlier Exposure. ``images``: (N, C, H, W) in [0, 1],
    ``labels``: (N,) int, ``outliers``: (M, C, H, W) auxiliary outlier images; every step pairs
    a batch of in-distribution images with an equally large random batch of outliers."""
    if len(images) != len(labels) or len(images) == 0 or len(outliers) == 0:
        raise ValueError("need equally many images and labels, and at least one outlier")
    device = next(model.parameters()).device

    def step(index: Tensor, generator: torch.Generator) -> Tensor:
        pick = torch.randint(0, len(outliers), (len(index),), generator=generator)
        x_in, x_out = images[index], outliers[pick]
        if config.augment:
            x_in, x_out = random_shift(x_in, generator), random_shift(x_out, generator)
        logits = model(torch.cat([x_in, x_out]).to(device))
        return outlier_exposure_loss(
            logits[: len(index)], labels[index].to(device), logits[len(index) :], weight
        )

    return train_loop(
        model,
        len(images),
        config,
        step,
        description="outlier exposure",
        show_progress=show_progress,
    )


def train_misinformation(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: TrainConfig,
    *,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` in place to minimise −log(1 − p_y): the misinformation model F̂."""
    return fit(
        model,
        images,
        labels,
        config,
        loss=misinformation_loss,
        description="misinformation",
        show_progress=show_progress,
    )


@torch.no_grad()
def max_softmax(model: nn.Module, x: Tensor) -> Tensor:
    """OOD score s(x) = max_k softmax(model(x))_k, (B,); high means in-distribution."""
    return torch.softmax(model(x), dim=1).max(dim=1).values
