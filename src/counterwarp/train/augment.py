"""Training-time augmentation of the classifier's batches (light, orientation-preserving)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from counterwarp.errors import CounterwarpError
from counterwarp.geometry.warp import warp

AUGMENTATION: dict[str, float] = {
    "max_shift": 0, "intensity_range": 0.1, "noise_std": 0.05, "deform_std": 0.0,
}
"""Default keyword arguments of :func:`augment_batch` during training (see module docstring)."""

def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    max_shift: int = 2,
    intensity_range: float = 0.1,
    noise_std: float = 0.05,
    deform_std: float = 0.0,
) -> torch.Tensor:
    """Light, orientation-preserving augmentation of a batch.

    Args:
        images: ``(B, 1, *spatial)`` z-scored images (background 0).
        generator: CPU generator for the random draws (reproducible).
        max_shift: largest translation in voxels per axis (integer shifts, zero fill).
        intensity_range: each image is scaled by a factor uniform in ``1 ± intensity_range``.
        noise_std: sd of Gaussian noise added to non-zero voxels (z-score units).
        deform_std: sd in voxels of a random smooth deformation (Gaussian noise on a grid
            4 voxels apart, interpolated linearly, applied as a pull-back warp); 0 turns it
            off. It teaches the classifier that warping and interpolation by themselves are
            not evidence of disease, so a simulator cannot move its logit by blurring.

    Returns:
        augmented ``(B, 1, *spatial)`` tensor on the device of ``images``.
    """
    batch, dim = images.shape[0], images.dim() - 2
    device = images.device
    scale = 1.0 + intensity_range * (2.0 * torch.rand(batch, generator=generator) - 1.0)
    out = images * scale.view(batch, *([1] * (dim + 1))).to(device)
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (batch, dim), generator=generator)
        padded = F.pad(out, [max_shift] * (2 * dim))
        spatial = images.shape[2:]
        shifted = []
        for b in range(batch):
            window = tuple(
                slice(max_shift - int(s), max_shift - int(s) + n)
                for s, n in zip(shifts[b], spatial, strict=True)
            )
            shifted.append(padded[(b, slice(None), *window)])
        out = torch.stack(shifted)
    if deform_std > 0:
        spatial = tuple(images.shape[2:])
        coarse = torch.randn(
            (batch, dim, *(max(2, n // 4) for n in spatial)), generator=generator
        )
        mode = "bilinear" if dim == 2 else "trilinear"
        field = F.interpolate(coarse, size=spatial, mode=mode, align_corners=True) * deform_std
        out = warp(out, field.to(device=device, dtype=out.dtype))
    if noise_std > 0:
        noise = torch.randn(out.shape, generator=generator).to(device) * noise_std
        out = out + noise * (out != 0)
    return out


def augmentation_settings(overrides: dict[str, float] | None) -> dict[str, Any]:
    """:data:`AUGMENTATION` with ``overrides``, checked; a CounterwarpError names a bad one."""
    settings: dict[str, Any] = {**AUGMENTATION, **(overrides or {})}
    unknown = sorted(set(settings) - set(AUGMENTATION))
    if unknown:
        raise CounterwarpError(
            f"unknown augmentation settings {unknown}; allowed: {sorted(AUGMENTATION)}"
        )
    max_shift = settings["max_shift"]
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise CounterwarpError(f"max_shift must be a non-negative integer, got {max_shift!r}")
    for name in ("intensity_range", "noise_std"):
        value = settings[name]
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise CounterwarpError(f"{name} must be a number in [0, 1), got {value!r}")
    deform = settings["deform_std"]
    if isinstance(deform, bool) or not isinstance(deform, (int, float)) or not 0 <= deform <= 5:
        raise CounterwarpError(f"deform_std must be a number of voxels in [0, 5], got {deform!r}")
    return settings
