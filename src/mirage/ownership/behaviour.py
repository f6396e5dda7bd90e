"""Ownership verification for GRAD² watermarks / reprogramming (docs/design.md §verification).

A defender who served GRAD² answers with the ``watermark`` target steered clones towards a
behaviour {(x_w, y_w)}. To test a suspect model, compare its behaviour statistic — the mean
log-likelihood (1/M) Σ_w log p(y_w|x_w) — with the same statistic on independently trained
clean models (the null). The p-value is one-sided from a Student-t prediction interval built on
the n clean statistics: t = (s − mean) / (sd·√(1 + 1/n)), n − 1 degrees of freedom, so it is
honest with few clean models; the empirical rank p-value (1 + #{clean ≥ s}) / (n + 1) is reported
beside it. The match rate (fraction of x_w predicted as y_w) is reported for readability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn


@dataclass(frozen=True)
class Verification:
    statistic: float
    match_rate: float
    clean_statistics: tuple[float, ...]
    clean_match_rates: tuple[float, ...]
    t: float
    p_value: float
    empirical_p_value: float
    alpha: float

    @property
    def watermarked(self) -> bool:
        return self.p_value < self.alpha


def check_behaviour(x_w: Tensor, y_w: Tensor) -> None:
    if not isinstance(x_w, Tensor) or x_w.ndim != 4 or len(x_w) == 0:
        raise ValueError("x_w must be a non-empty (M, C, H, W) tensor")
    if not isinstance(y_w, Tensor) or y_w.shape != (len(x_w),) or y_w.is_floating_point():
        raise ValueError("y_w must be an integer (M,) tensor matching x_w")


@torch.no_grad()
def behaviour_statistics(model: nn.Module, x_w: Tensor, y_w: Tensor) -> tuple[float, float]:
    """(mean log p(y_w|x_w), match rate) of ``model`` on the behaviour set."""
    check_behaviour(x_w, y_w)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    log_p = F.log_softmax(model(x_w.to(device)), dim=1).cpu()
    model.train(was_training)
    return (
        log_p.gather(1, y_w.view(-1, 1)).mean().item(),
        (log_p.argmax(1) == y_w).float().mean().item(),
    )


def verify(
    suspect: nn.Module,
    clean_models: Sequence[nn.Module],
    x_w: Tensor,
    y_w: Tensor,
    *,
    alpha: float = 0.01,
) -> Verification:
    """Test whether ``suspect`` carries the behaviour more than the ≥ 2 ``clean_models`` do."""
    if len(clean_models) < 2:
        raise ValueError("need at least two clean models to estimate the null")
    if not 0 < alpha < 1:
        raise ValueError("alpha must lie in (0, 1)")
    statistic, match = behaviour_statistics(suspect, x_w, y_w)
    clean = [behaviour_statistics(m, x_w, y_w) for m in clean_models]
    values = torch.tensor([c[0] for c in clean], dtype=torch.float64)
    n = len(values)
    spread = max(values.std().item(), 1e-12) * math.sqrt(1 + 1 / n)
    t = (statistic - values.mean().item()) / spread
    return Verification(
        statistic=statistic,
        match_rate=match,
        clean_statistics=tuple(values.tolist()),
        clean_match_rates=tuple(c[1] for c in clean),
        t=t,
        p_value=float(stats.t.sf(t, df=n - 1)),
        empirical_p_value=(1 + int((values >= statistic).sum())) / (n + 1),
        alpha=alpha,
    )
