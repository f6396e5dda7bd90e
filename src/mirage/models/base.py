"""What every mirage classifier looks like: ``normalize -> body -> classifier``.

Inputs are images in [0, 1]; :class:`Normalize` applies the dataset's mean/std inside the model.
``body`` maps to a flat feature vector and ``classifier`` is the final ``nn.Linear`` — MAD's
``last``-layer defense and feature-space tools rely on that split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """Base class: subclasses build ``self.body`` (images -> (B, D)) and set ``feature_dim``."""

    body: nn.Module
    feature_dim: int

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        if len(mean) != input_shape[0] or len(std) != input_shape[0]:
            raise ValueError("mean/std must have one entry per input channel")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.normalize = Normalize(mean, std)

    def _finish(self) -> None:
        """Call at the end of a subclass ``__init__``: infers the feature size, adds the head."""
        training = self.body.training
        self.body.eval()  # a probe: batch norm neither learns from it nor needs a batch
        with torch.no_grad():
            self.feature_dim = int(self.body(torch.zeros(1, *self.input_shape)).shape[1])
        self.body.train(training)
        self.classifier = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@torch.no_grad()
def clean_posteriors(model: nn.Module, x: Tensor, *, batch_size: int = 1024) -> Tensor:
    """softmax(model(x)) in eval mode, chunked; returns CPU float32 (N, K)."""
    weight = next(model.parameters(), None)  # none in a wrapped ONNX session (§model-formats)
    device = weight.device if weight is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = [
            torch.softmax(model(chunk.to(device)).float(), dim=1).cpu()
            for chunk in x.split(batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(out)
