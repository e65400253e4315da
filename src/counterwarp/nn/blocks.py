"""The simulator U-Net's building blocks: down and up levels, the conditional bottleneck.

Each block takes the spatial dimension (2 or 3) as an argument and the direction ``c``
(``(B,)``, +-1) with its input, since every convolution is a conditional one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from counterwarp.nn.condconv import CondConv

_BATCHNORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
UPSAMPLE_MODE = {2: "bilinear", 3: "trilinear"}
_LEAK = 0.1


def num_levels(input_shape: tuple[int, ...], max_levels: int) -> int:
    """Number of 2x poolings the U-Net applies to an image of ``input_shape``.

    The largest ``n <= max_levels`` with every ``size % 2**n == 0`` and ``size // 2**n >= 2``.
    """
    n = 0
    while n < max_levels:
        step = 2 ** (n + 1)
        if not all(s % step == 0 and s // step >= 2 for s in input_shape):
            break
        n += 1
    return n


NORMS = ("batch", "group")


def make_norm(kind: str, channels: int, dim: int) -> nn.Module:
    """BatchNorm (the paper's) or GroupNorm (4 groups; same in training and evaluation)."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 4), channels)
    return _BATCHNORM[dim](channels)


class DownBlock(nn.Module):
    """Norm, LeakyReLU(0.1), MaxPool(2), CondConv: ``(B, C_in, *S) -> (B, C_out, *S/2)``."""

    def __init__(
        self, in_channels: int, out_channels: int, dim: int, norm: str = "batch",
        **condconv: Any,
    ) -> None:
        super().__init__()
        self.norm = make_norm(norm, in_channels, dim)
        self.act = nn.LeakyReLU(_LEAK)
        self.pool = _MAXPOOL[dim](2)
        self.conv = CondConv(in_channels, out_channels, dim=dim, **condconv)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(self.act(self.norm(x))), condition)


class UpBlock(nn.Module):
    """CondConv, Norm, LeakyReLU(0.1), Upsample(2): ``(B, C_in, *S) -> (B, C_out, *2S)``."""

    def __init__(
        self, in_channels: int, out_channels: int, dim: int, norm: str = "batch",
        **condconv: Any,
    ) -> None:
        super().__init__()
        self.conv = CondConv(in_channels, out_channels, dim=dim, **condconv)
        self.norm = make_norm(norm, out_channels, dim)
        self.act = nn.LeakyReLU(_LEAK)
        self.up = nn.Upsample(scale_factor=2, mode=UPSAMPLE_MODE[dim], align_corners=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.norm(self.conv(x, condition))))


class ConditionalBottleneck(nn.Module):
    """Fully connected bottleneck that mixes in the condition.

    ``(B, C, *S) -> flatten -> FC -> (B, latent) -> ReLU -> concat c -> FC -> (B, C, *S)``.
    """

    def __init__(self, channels: int, spatial_shape: tuple[int, ...], latent_dim: int) -> None:
        super().__init__()
        self.shape = (channels, *spatial_shape)
        flat = channels * math.prod(spatial_shape)
        self.encode = nn.Linear(flat, latent_dim)
        self.act = nn.ReLU()
        self.decode = nn.Linear(latent_dim + 1, flat)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, *S)``; ``condition``: ``(B,)``. Returns ``(B, C, *S)``."""
        z = self.act(self.encode(x.flatten(1)))
        z = torch.cat([z, condition[:, None].to(z.dtype)], dim=1)
        return self.decode(z).reshape(x.shape[0], *self.shape)
