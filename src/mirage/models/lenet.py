"""LeNet-5 as used by the MAD paper's MNIST/Fashion-MNIST victims (Orekondy et al., 2020):
conv5x5(20) - pool - conv5x5(50) - pool - fc(500) - fc(K).

Inputs smaller than 20 pixels (e.g. scikit-learn's 8x8 digits) get "same" padding so that the
two conv/pool stages still fit; 28x28 and larger use the original unpadded convolutions.
"""

from __future__ import annotations

from torch import nn

from mirage.models.base import ImageClassifier


class LeNet(ImageClassifier):
    def __init__(
        self, input_shape, num_classes, mean, std, *, width: int = 1, padding: int | None = None
    ) -> None:
        super().__init__(input_shape, num_classes, mean, std)
        channels = input_shape[0]
        if padding is None:
            padding = 2 if min(input_shape[1:]) < 20 else 0
        self.body = nn.Sequential(
            nn.Conv2d(channels, 20 * width, 5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20 * width, 50 * width, 5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.LazyLinear(500 * width),
            nn.ReLU(),
        )
        self._finish()
