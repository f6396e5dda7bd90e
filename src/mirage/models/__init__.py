"""Model architectures by name and their checkpoints."""

from __future__ import annotations

from collections.abc import Sequence

from mirage.models.base import ImageClassifier, Normalize
from mirage.models.checkpoints import (
    ModelCard,
    ModelNotPrepared,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    tensor_digest,
    weights_fingerprint,
)
from mirage.models.lenet import LeNet
from mirage.models.resnet import ResNet, ResNet18, ResNet50
from mirage.models.vgg import CompactVGG
from mirage.models.vit import ViT
from mirage.registry import UnknownNameError

MODELS: dict[str, type[ImageClassifier]] = {
    "lenet": LeNet,
    "vgg": CompactVGG,
    "resnet": ResNet,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "vit": ViT,
}


def create_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    **kwargs,
) -> ImageClassifier:
    if name not in MODELS:
        raise UnknownNameError("architecture", name, MODELS)
    return MODELS[name](tuple(input_shape), num_classes, tuple(mean), tuple(std), **kwargs)


__all__ = [
    "MODELS",
    "CompactVGG",
    "ImageClassifier",
    "LeNet",
    "ModelCard",
    "ModelNotPrepared",
    "Normalize",
    "ResNet",
    "create_model",
    "has_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "tensor_digest",
    "weights_fingerprint",
]
