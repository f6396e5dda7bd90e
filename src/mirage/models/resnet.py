"""CIFAR-style ResNet (He et al., 2016, section 4.2): 3 stages of basic blocks, depth 6n+2."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mirage.models.base import ImageClassifier


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The residual branch's identity, or a strided 1×1 projection where the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(ImageClassifier):
    def __init__(
        self, input_shape, num_classes, mean, std, *, depth: int = 20, width: int = 16
    ) -> None:
        super().__init__(input_shape, num_classes, mean, std)
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        layers: list[nn.Module] = [
            nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        channels = width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self._finish()


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 with a 4× wider output (He et al., 2016, section 4.1, ResNet-50)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class StagedResNet(ImageClassifier):
    """The ImageNet ResNets' four stages (64, 128, 256, 512 channels × ``width``/64) on a CIFAR stem
    (one 3×3 convolution, no max pool), as CIFAR-10 papers use them: ``blocks`` per stage of
    ``block`` (basic: ResNet-18 = (2, 2, 2, 2); bottleneck: ResNet-50 = (3, 4, 6, 3))."""

    def __init__(
        self,
        input_shape,
        num_classes,
        mean,
        std,
        *,
        blocks: tuple[int, ...],
        block: str,
        width: int = 64,
    ) -> None:
        super().__init__(input_shape, num_classes, mean, std)
        layers: list[nn.Module] = [
            nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        channels = width
        for stage, count in enumerate(blocks):
            stage_width = width * 2**stage
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                if block == "bottleneck":
                    layers.append(Bottleneck(channels, stage_width, stride))
                    channels = stage_width * Bottleneck.expansion
                else:
                    layers.append(BasicBlock(channels, stage_width, stride))
                    channels = stage_width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self._finish()


class ResNet18(StagedResNet):
    """ResNet-18 for small images: basic blocks (2, 2, 2, 2)."""

    def __init__(self, input_shape, num_classes, mean, std, *, width: int = 64) -> None:
        super().__init__(
            input_shape, num_classes, mean, std, blocks=(2, 2, 2, 2), block="basic", width=width
        )


class ResNet50(StagedResNet):
    """ResNet-50 for small images: bottleneck blocks (3, 4, 6, 3)."""

    def __init__(self, input_shape, num_classes, mean, std, *, width: int = 64) -> None:
        super().__init__(
            input_shape,
            num_classes,
            mean,
            std,
            blocks=(3, 4, 6, 3),
            block="bottleneck",
            width=width,
        )
