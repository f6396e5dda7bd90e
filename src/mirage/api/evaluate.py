"""What a benign user gets from a defended model: defender accuracy and the L1 it costs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mirage.api.inprocess import InProcessAPI, clean_posteriors
from mirage.data.base import ImageData
from mirage.defenses.base import Defense


@dataclass(frozen=True)
class DefendedAccuracy:
    clean_accuracy: float
    defended_accuracy: float
    effective_l1: float
    top1_agreement: float


def accuracy(model: nn.Module, data: ImageData, *, batch_size: int = 1024) -> float:
    """Plain test accuracy of ``model`` on ``data``."""
    predictions = clean_posteriors(model, data.images, batch_size=batch_size).argmax(1)
    return float((predictions == data.labels).float().mean())


def defended_accuracy(
    model: nn.Module, defense: Defense | None, data: ImageData, *, batch_size: int = 256
) -> DefendedAccuracy:
    """Accuracy of argmax ỹ on ``data`` answered through ``defense`` (no query budget)."""
    api = InProcessAPI(model, defense, batch_size=batch_size)
    served = api.query(data.images)
    return DefendedAccuracy(
        clean_accuracy=accuracy(model, data),
        defended_accuracy=float((served.argmax(1) == data.labels).float().mean()),
        effective_l1=api.ledger.effective_l1,
        top1_agreement=api.ledger.top1_agreement,
    )
