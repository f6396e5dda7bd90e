"""A compact VGG (Simonyan & Zisserman, 2015): 3x3 conv blocks with batch norm, global pooling."""

from __future__ import annotations

from torch import nn

from mirage.models.base import ImageClassifier

CONFIGS: dict[str, list[int | str]] = {
    "vgg-s": [32, "M", 64, "M", 128, 128, "M"],
    "vgg-m": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"],
}


class CompactVGG(ImageClassifier):
    def __init__(self, input_shape, num_classes, mean, std, *, config: str = "vgg-s") -> None:
        super().__init__(input_shape, num_classes, mean, std)
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for item in CONFIGS[config]:
            if isinstance(item, str):  # "M"
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self._finish()
