"""Which device trains and computes: ``cpu``, ``cuda`` (``cuda:N``) or ``mps``, from an argument,
else ``$MIRAGE_DEVICE``, else the CPU (docs/design.md §devices). A device that is not present is a
clear error before anything runs, never a silent fall-back."""

from __future__ import annotations

import os

import torch

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
        raise ValueError(f"unknown device {str(chosen)!r}: use one of {', '.join(KINDS)} (cuda:N for a GPU)") from None
    if device.type not in KINDS:
        raise ValueError(f"device {device} is not supported: use one of {', '.join(KINDS)}")
    if not device_available(device.type):
        raise ValueError(f"device {device} was asked for (argument or MIRAGE_DEVICE) but this machine has none")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
