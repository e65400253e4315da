"""Gaussian smoothing of dense fields."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of each channel of ``field`` (B, C, *S); sigma in voxels.

    Zero padding: a field that is zero outside the image stays consistent at the border.
    """
    dim = field.ndim - 2
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=field.dtype, device=field.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = field.shape[1]
    convolve = F.conv3d if dim == 3 else F.conv2d
    for axis in range(dim):
        shape = [1] * dim
        shape[axis] = -1
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, *([1] * dim))
        padding = [0] * dim
        padding[axis] = radius
        field = convolve(field, weight, padding=tuple(padding), groups=channels)
    return field
