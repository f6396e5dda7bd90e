"""A small Vision Transformer (Dosovitskiy et al., ICLR 2021) for small images: non-overlapping
patches embedded by a strided convolution, a class token and learned positions, pre-norm
transformer blocks (multi-head self-attention and a GELU MLP, each with a residual add), and the
class token's final layer norm as the features the linear head reads."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mirage.models.base import ImageClassifier


class Attention(nn.Module):
    """Multi-head self-attention written out (softmax(QKᵀ/√d) V per head, then a projection): plain
    matrix products that forward-mode differentiation, and so GRAD²'s scores, go through
    (``nn.MultiheadAttention``'s fused kernel has no forward-mode derivative)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads must divide the width {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.projection = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, dim = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax(q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5, dim=-1)
        return self.projection((weights @ v).transpose(1, 2).reshape(b, t, dim))


class Block(nn.Module):
    """x + MSA(LN(x)), then x + MLP(LN(x)) (the paper's eq. 2-3)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Tokens(nn.Module):
    """Images (B, C, H, W) → tokens (B, 1 + N, dim): the class token, then one per patch, plus
    their learned positions."""

    def __init__(self, channels: int, size: tuple[int, int], patch: int, dim: int) -> None:
        super().__init__()
        if size[0] % patch or size[1] % patch:
            raise ValueError(f"the patch size {patch} must divide the image size {size}")
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        patches = (size[0] // patch) * (size[1] // patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, 1 + patches, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], dim=1) + self.position


class ClassToken(nn.Module):
    """Tokens (B, T, dim) → the class token's features (B, dim), after the final layer norm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x[:, 0])


class ViT(ImageClassifier):
    """ViT for small images; the defaults (patch 4, dim 192, depth 6, 3 heads) are a ViT-Tiny
    width at half its depth, a common CIFAR-10 setting."""

    def __init__(
        self,
        input_shape,
        num_classes,
        mean,
        std,
        *,
        patch: int = 4,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__(input_shape, num_classes, mean, std)
        channels, height, width = self.input_shape
        self.body = nn.Sequential(
            Tokens(channels, (height, width), patch, dim),
            *(Block(dim, heads, mlp_ratio) for _ in range(depth)),
            ClassToken(dim),
        )
        self._finish()
