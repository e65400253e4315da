"""Warping images with dense displacement fields, and integrating velocity fields.

Conventions (shared by the whole package, checked by ``tests/test_simulator_net.py``):

- A displacement ``u`` has shape ``(B, d, *S)`` with ``d = len(S)``, in voxels; channel ``i``
  moves along spatial axis ``i`` of the tensor (axis ``2 + i`` of ``(B, C, *S)``).
- Warping is a *pull-back*: ``y(p) = image(p + u(p))`` (MONAI ``Warp`` semantics).
- Samples that fall outside the field of view read 0 (``padding_mode="zeros"``). Images are
  z-scored with background 0 and displacements are 0 outside the image, so zero padding is
  the exact continuation of both; ``"border"`` would instead smear the outermost slice
  inwards whenever a field pulls from outside the field of view.

Both layers come from MONAI: :class:`monai.networks.blocks.Warp` and
:class:`monai.networks.blocks.DVF2DDF` (scaling and squaring). Instances are cached per
setting because they hold no parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from monai.networks.blocks import DVF2DDF, Warp

from counterwarp.errors import CounterwarpError

MODES: tuple[str, ...] = ("bilinear", "nearest", "bicubic")
PADDING_MODES: tuple[str, ...] = ("zeros", "border", "reflection")

_Layer = TypeVar("_Layer")
_WARPS: dict[tuple[str, str], Warp] = {}
_INTEGRATORS: dict[tuple[int, str], DVF2DDF] = {}


def _quiet_build(factory: Callable[[], _Layer]) -> _Layer:
    """Build a MONAI layer without its 'Using PyTorch native grid_sample' notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*native grid_sample.*")
        return factory()


def _fresh_reference_grid(layer: Warp, like: torch.Tensor) -> None:
    """Drop MONAI's cached reference grid if it lives on another device or dtype.

    ``Warp`` caches its voxel grid keyed by shape only; after moving a model to a GPU (or to
    float64) the stale grid would be reused.
    """
    grid = layer.ref_grid
    if grid is not None and (grid.device != like.device or grid.dtype != like.dtype):
        layer.ref_grid = None


def _check_field(image: torch.Tensor, displacement: torch.Tensor) -> None:
    d = image.ndim - 2
    if d not in (2, 3):
        raise CounterwarpError(
            f"warp: image must be (B, C, H, W) or (B, C, D, H, W), got {tuple(image.shape)}."
        )
    expected = (image.shape[0], d, *image.shape[2:])
    if tuple(displacement.shape) != expected:
        raise CounterwarpError(
            f"warp: displacement must have shape {expected} for an image of shape "
            f"{tuple(image.shape)}, got {tuple(displacement.shape)}."
        )


def warp(
    image: torch.Tensor,
    displacement: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Pull-back warp ``y(p) = image(p + u(p))``.

    Args:
        image: ``(B, C, *S)`` image(s), ``len(S)`` in {2, 3}.
        displacement: ``(B, d, *S)`` displacement ``u`` in voxels, ``d = len(S)``; channel
            ``i`` moves along spatial axis ``i``.
        mode: interpolation, ``"bilinear"`` (trilinear in 3D; differentiable in ``u``),
            ``"nearest"`` (for label maps) or ``"bicubic"`` (2D only).
        padding_mode: value read outside the field of view: ``"zeros"`` (default; images are
            z-scored with background 0), ``"border"`` or ``"reflection"``.

    Returns:
        ``(B, C, *S)`` warped image, in ``displacement``'s dtype if that is wider.
    """
    if mode not in MODES:
        raise CounterwarpError(f"warp: mode must be one of {MODES}, got {mode!r}.")
    if padding_mode not in PADDING_MODES:
        raise CounterwarpError(
            f"warp: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}."
        )
    _check_field(image, displacement)
    key = (mode, padding_mode)
    layer = _WARPS.get(key)
    if layer is None:
        layer = _WARPS[key] = _quiet_build(lambda: Warp(mode=mode, padding_mode=padding_mode))
    _fresh_reference_grid(layer, displacement)
    dtype = torch.promote_types(image.dtype, displacement.dtype)
    return layer(image.to(dtype), displacement.to(dtype))


def integrate_velocity(
    velocity: torch.Tensor, num_steps: int = 7, padding_mode: str = "zeros"
) -> torch.Tensor:
    """Exponentiate a stationary velocity field by scaling and squaring.

    Args:
        velocity: ``(B, d, *S)`` stationary velocity field ``v`` in voxels.
        num_steps: number of squarings (the field is first divided by ``2**num_steps``).
        padding_mode: value of the field read outside the field of view during the
            squarings: ``"zeros"`` (default; fields are 0 outside the image) or ``"border"``
            (the outermost slice continues, for fields that do not vanish at the edge, like
            the synthetic cohorts' random subject warps).

    Returns:
        ``(B, d, *S)`` displacement of ``exp(v)`` in voxels (same conventions as
        :func:`warp`), in ``velocity``'s dtype. ``integrate_velocity(-v)`` is the
        displacement of the inverse map.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise CounterwarpError(f"num_steps must be a positive integer, got {num_steps!r}.")
    if padding_mode not in PADDING_MODES:
        raise CounterwarpError(
            f"integrate_velocity: padding_mode must be one of {PADDING_MODES}, got "
            f"{padding_mode!r}."
        )
    key = (num_steps, padding_mode)
    layer = _INTEGRATORS.get(key)
    if layer is None:
        layer = _INTEGRATORS[key] = _quiet_build(
            lambda: DVF2DDF(num_steps=num_steps, padding_mode=padding_mode)
        )
    _fresh_reference_grid(layer.warp_layer, velocity)
    return layer(velocity)
