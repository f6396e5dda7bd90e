"""The prediction-API interface attacks talk to (docs/design.md §prediction-api), and its
accounting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


class QueryBudgetExceeded(RuntimeError):
    """The request would take the client past its query budget; nothing was answered or spent."""


class QueryRefused(RuntimeError):
    """The API refuses this client (e.g. its query stream raised a detector's alarm)."""


@runtime_checkable
class PredictionAPI(Protocol):
    """What an attacker sees: images in, (possibly perturbed) probability rows out."""

    num_classes: int
    input_shape: tuple[int, int, int]

    def query(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) images in [0, 1] -> (B, K) served probabilities. Counts B queries."""
        ...

    @property
    def queries_used(self) -> int: ...

    @property
    def query_budget(self) -> int | None: ...


@dataclass
class QueryLedger:
    """Running totals of what was served: queries, L1 distance to the clean answers, top-1 kept,
    and the time spent in the model and in the defense."""

    queries: int = 0
    l1_sum: float = 0.0
    top1_kept: int = 0
    model_seconds: float = 0.0
    defense_seconds: float = 0.0

    def record(self, clean: Tensor, served: Tensor) -> None:
        self.queries += clean.shape[0]
        self.l1_sum += float((served - clean).abs().sum())
        self.top1_kept += int((served.argmax(1) == clean.argmax(1)).sum())

    @property
    def effective_l1(self) -> float:
        """Mean ‖ỹ − y‖₁ actually served."""
        return self.l1_sum / self.queries if self.queries else 0.0

    @property
    def top1_agreement(self) -> float:
        return self.top1_kept / self.queries if self.queries else 1.0

    def as_dict(self) -> dict[str, float]:
        return {
            "queries": self.queries,
            "effective_l1": self.effective_l1,
            "top1_agreement": self.top1_agreement,
            "model_seconds": self.model_seconds,
            "defense_seconds": self.defense_seconds,
        }


def check_images(x: Tensor, input_shape: tuple[int, ...], *, max_batch: int | None = None) -> None:
    """Raise ``ValueError`` unless x is a non-empty float (B, *input_shape) batch in [0, 1]."""
    if not isinstance(x, Tensor):
        raise ValueError(f"queries must be a torch.Tensor, got {type(x).__name__}")  # noqa: TRY004
    if x.ndim != 1 + len(input_shape) or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"queries must have shape (B, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError("empty batch of queries")
    if max_batch is not None and x.shape[0] > max_batch:
        raise ValueError(f"batch of {x.shape[0]} exceeds the limit of {max_batch}")
    if not x.is_floating_point():
        raise ValueError(f"queries must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("queries contain NaN or infinite values")
    if x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise ValueError("query pixels must lie in [0, 1]")
