"""Target directions v of GRAD² (docs/design.md §grad2-targets): where in parameter space the
defender pushes the clone. Each builder returns a dict ``{parameter name: tensor}`` shaped like the
surrogate's ``named_parameters()``.

- ``all-ones``: v = 1, the same fixed direction for every query — perturbations add up over the
  attacker's training (the *coordinated* defense, the default).
- ``min-ip``: v = −g(y), against the clean batch gradient (uncoordinated, untargeted).
- ``watermark``: v = ∇_θ (1/M) Σ_w log p_θ(y_w|x_w) for a behaviour set {(x_w, y_w)} — the clone
  learns that behaviour (reprogramming; verified later by :mod:`mirage.ownership.behaviour`).
- ``unlearn``: v = −∇_θ (1/M) Σ_m log p_θ(y_m|x_m) on a labelled reference set of the defender's
  own data — one fixed direction (coordinated, like all-ones) that lowers the likelihood of the
  true labels (untargeted, like min-ip). mirage's, not the paper's: on a LeNet the all-ones
  target is nearly the surrogate's confidence direction (its scores correlate 0.96 with the
  logits, ``experiments/grad2_sharpening/grad2_target_geometry.py``), so it only sharpens the
  answers.
- ``max-norm``: v = θ; ``random``: seeded Gaussian; ``vector``: any user-supplied flat vector.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mirage.defenses.grad2.scores import Direction
from mirage.models.fit import soft_cross_entropy

TargetName = Literal["all-ones", "min-ip", "watermark", "unlearn", "max-norm", "random", "vector"]
BATCH_DEPENDENT = {"min-ip"}


def all_ones(model: nn.Module) -> Direction:
    """v = 1 as broadcast scalars (no memory; lets the fused JVP use its all-ones shortcut)."""
    return {
        name: torch.ones((), dtype=p.dtype, device=p.device).expand(p.shape)
        for name, p in model.named_parameters()
    }


def max_norm(model: nn.Module) -> Direction:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def random_direction(model: nn.Module, seed: int) -> Direction:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        for name, p in model.named_parameters()
    }


def from_vector(model: nn.Module, vector: Tensor) -> Direction:
    """Split a flat (P,) vector into per-parameter tensors (``named_parameters`` order)."""
    total = sum(p.numel() for p in model.parameters())
    vector = torch.as_tensor(vector)
    if vector.ndim != 1 or vector.numel() != total:
        raise ValueError(f"target vector must have shape ({total},), got {tuple(vector.shape)}")
    if not torch.isfinite(vector).all():
        raise ValueError("target vector contains NaN or infinite values")
    pieces = vector.split([p.numel() for p in model.parameters()])
    return {
        name: piece.reshape(p.shape).to(p)
        for (name, p), piece in zip(model.named_parameters(), pieces, strict=True)
    }


def log_likelihood_gradient(model: nn.Module, x: Tensor, targets: Tensor) -> Direction:
    """∇_θ (1/N) Σ_i Σ_k t_ik log p_θ(k|x_i) (integer labels mean one-hot): the attacker's
    ascent direction g(t) on a batch, or a behaviour's direction for a watermark."""
    named = [(name, p) for name, p in model.named_parameters()]
    with torch.enable_grad():
        objective = -soft_cross_entropy(model(x), targets)
        grads = torch.autograd.grad(objective, [p for _, p in named], allow_unused=True)
    return {
        name: (g if g is not None else torch.zeros_like(p)).detach()
        for (name, p), g in zip(named, grads, strict=True)
    }


def min_ip(model: nn.Module, x: Tensor, probs: Tensor) -> Direction:
    """v = −g(y): oppose what the clean answers ``probs`` (N, K) would teach on ``x``."""
    gradient = log_likelihood_gradient(model, x, probs.to(next(model.parameters())))
    return {name: -g for name, g in gradient.items()}


def watermark(model: nn.Module, x_w: Tensor, y_w: Tensor) -> Direction:
    """v = ∇_θ mean log p_θ(y_w|x_w) for the behaviour set ``x_w`` (M, C, H, W), ``y_w`` (M,)."""
    if len(x_w) == 0 or len(x_w) != len(y_w):
        raise ValueError("the watermark set needs as many labels as images (at least one)")
    return log_likelihood_gradient(model, x_w, torch.as_tensor(y_w))


def unlearn(model: nn.Module, x_ref: Tensor, y_ref: Tensor) -> Direction:
    """v = −∇_θ mean log p_θ(y_ref|x_ref): the fixed direction that unlearns a reference set
    ``x_ref`` (M, C, H, W) with its true labels ``y_ref`` (M,)."""
    if len(x_ref) == 0 or len(x_ref) != len(y_ref):
        raise ValueError("the reference set needs as many labels as images (at least one)")
    return {
        name: -g
        for name, g in log_likelihood_gradient(model, x_ref, torch.as_tensor(y_ref)).items()
    }


def static_target(
    name: TargetName,
    model: nn.Module,
    *,
    seed: int = 0,
    vector: Tensor | None = None,
    watermark_x: Tensor | None = None,
    watermark_y: Tensor | None = None,
    reference_x: Tensor | None = None,
    reference_y: Tensor | None = None,
) -> Direction:
    """Build a target that does not depend on the query batch."""
    if name == "all-ones":
        return all_ones(model)
    if name == "max-norm":
        return max_norm(model)
    if name == "random":
        return random_direction(model, seed)
    if name == "vector":
        if vector is None:
            raise ValueError("target 'vector' needs target_vector")
        return from_vector(model, vector)
    if name == "watermark":
        if watermark_x is None or watermark_y is None:
            raise ValueError("target 'watermark' needs watermark_x and watermark_y")
        return watermark(model, watermark_x, watermark_y)
    if name == "unlearn":
        if reference_x is None or reference_y is None:
            raise ValueError("target 'unlearn' needs reference_x and reference_y")
        return unlearn(model, reference_x, reference_y)
    raise ValueError(f"target {name!r} depends on the batch or is unknown")


def behaviour_accuracy(model: nn.Module, x_w: Tensor, y_w: Tensor) -> float:
    """Fraction of the behaviour set on which ``model`` predicts ``y_w`` (for reports)."""
    with torch.no_grad():
        return (model(x_w).argmax(1) == y_w).float().mean().item()


__all__ = [
    "BATCH_DEPENDENT",
    "TargetName",
    "all_ones",
    "behaviour_accuracy",
    "from_vector",
    "log_likelihood_gradient",
    "max_norm",
    "min_ip",
    "random_direction",
    "static_target",
    "unlearn",
    "watermark",
]
