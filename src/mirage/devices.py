"""Which device trains and computes: ``cpu``, ``cuda`` (``cuda:N``) or ``mps``, from an argument,
else ``$MIRAGE_DEVICE``, else the CPU (docs/design.md §devices). A device that is not present is a
clear error before anything runs, never a silent fall-back."""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)

KINDS = ("cpu", "cuda", "mps")


def device_available(kind: str) -> bool:
    """Whether this machine has a device of ``kind``."""
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return kind == "cpu"


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``name``, or ``$MIRAGE_DEVICE``, or ``cpu``, checked to be present here."""
    chosen = name if name is not None else os.environ.get("MIRAGE_DEVICE") or "cpu"
    try:
        device = torch.device(chosen)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"unknown device {str(chosen)!r}: use one of {', '.join(KINDS)} (cuda:N for a GPU)"
        ) from None
    if device.type not in KINDS:
        raise ValueError(f"device {device} is not supported: use one of {', '.join(KINDS)}")
    if not device_available(device.type):
        raise ValueError(
            f"device {device} was asked for (argument or MIRAGE_DEVICE) but this machine has none"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise ValueError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def on_device(model: nn.Module, device: torch.device | None) -> nn.Module:
    """The module that computes ``model``'s forward pass on ``device``: ``model`` itself on the CPU
    (or with no device given), else a copy on the device in eval mode, so whatever else shares
    ``model`` (a defense's parts, computed on the CPU) keeps it where it was. A module without
    parameters (an ONNX session) runs where its runtime runs."""
    if device is None or device.type == "cpu":
        return model
    if next(model.parameters(), None) is None:
        log.warning(
            "%s has no parameters to move: it runs where its runtime runs, not on %s",
            type(model).__name__,
            device,
        )
        return model
    return copy.deepcopy(model).to(device).eval()
