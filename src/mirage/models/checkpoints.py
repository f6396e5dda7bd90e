"""Checkpoints: weights as safetensors plus a JSON model card saying how to rebuild them."""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

import mirage
from mirage.models.base import ImageClassifier

WEIGHTS, CARD = "model.safetensors", "card.json"


class ModelCard(BaseModel):
    architecture: str
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str = ""
    test_accuracy: float | None = None
    seed: int | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    train_seconds: float | None = None
    versions: dict[str, str] = Field(
        default_factory=lambda: {
            "mirage": mirage.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    )
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the model's state dict: names, dtypes, shapes and values.
    Tells whether two results came from the very same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values (exact: equal digests, equal tensors)."""
    value = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{value.dtype}:{tuple(value.shape)}:".encode())
    digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_from_card(card: ModelCard) -> ImageClassifier:
    from mirage.models import create_model

    return create_model(
        card.architecture,
        card.input_shape,
        card.num_classes,
        card.mean,
        card.std,
        **card.arch_kwargs,
    )


def save_checkpoint(model: ImageClassifier, card: ModelCard, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``card.json``; the card is written last so its presence
    means the checkpoint is complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    tmp = directory / (CARD + ".tmp")
    tmp.write_text(json.dumps(card.model_dump(mode="json"), indent=2))
    tmp.replace(directory / CARD)
    return directory


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[ImageClassifier, ModelCard]:
    directory = Path(directory)
    if not (directory / CARD).is_file() or not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"{directory}: no complete checkpoint ({WEIGHTS} + {CARD})")
    card = ModelCard.model_validate_json((directory / CARD).read_text())
    model = build_from_card(card)
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model.to(device).eval(), card


def has_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / CARD).is_file() and (directory / WEIGHTS).is_file()


class ModelNotPrepared(FileNotFoundError):
    """A trained model (victim, surrogate, detector) that is not in the model store, asked for
    where nothing may train (the service: ``mirage prepare`` trains and keeps it first)."""

    def __init__(self, what: str, directory: Path | str) -> None:
        super().__init__(
            f"{what} is not trained yet (looked in {directory}); the service never trains: run "
            "`mirage prepare --config <the serve config>` once, or point MIRAGE_MODELS at trained "
            "models (the sweeps' are pinned in results/models)"
        )
