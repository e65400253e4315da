"""Training losses and field metrics for the simulator (plain callables).

All displacements are ``(B, d, *S)`` in voxels (channel ``i`` along spatial axis ``i``);
finite differences use unit voxel spacing. Sign convention of the logit shift: the
condition ``c = +1`` asks the classifier's logit to *rise* by the margin ("inject"),
``c = -1`` to *fall* by it ("remove"); see ``docs/method.md``.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss

from counterwarp.errors import CounterwarpError
from counterwarp.geometry.volume import jacobian_determinant

SmoothnessKind = Literal["l2", "l1", "bending"]
SMOOTHNESS_KINDS: tuple[str, ...] = ("l2", "l1", "bending")

_bending = BendingEnergyLoss(normalize=False, reduction="mean")


def _check_logits(
    logit_before: torch.Tensor, logit_after: torch.Tensor, condition: torch.Tensor
) -> None:
    if not (logit_before.shape == logit_after.shape == condition.shape) or logit_before.ndim != 1:
        raise CounterwarpError(
            "logit_before, logit_after and condition must all have shape (B,), got "
            f"{tuple(logit_before.shape)}, {tuple(logit_after.shape)}, {tuple(condition.shape)}."
        )


def logit_shift_loss(
    logit_before: torch.Tensor,
    logit_after: torch.Tensor,
    condition: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """Hinge on the classifier's logit shift: ``mean(relu(c * (f(x) - f(x')) + b))``.

    Zero for a sample once ``f(x') >= f(x) + b`` (``c = +1``, inject) or
    ``f(x') <= f(x) - b`` (``c = -1``, remove); positive and linear in the shortfall before.

    Args:
        logit_before: ``(B,)`` classifier logits of the original images ``f(x)``.
        logit_after: ``(B,)`` logits of the simulated images ``f(x')`` (carries the gradient).
        condition: ``(B,)`` directions in {-1, +1}.
        margin: ``b >= 0``, in logit units (scale it to the classifier's logit spread).

    Returns:
        Scalar loss.
    """
    _check_logits(logit_before, logit_after, condition)
    if margin < 0:
        raise CounterwarpError(f"logit shift margin must be >= 0, got {margin!r}.")
    c = condition.to(logit_after.dtype)
    return F.relu(c * (logit_before - logit_after) + margin).mean()


def moved_by_margin(
    logit_before: torch.Tensor,
    logit_after: torch.Tensor,
    condition: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """Whether each sample's logit moved by at least ``margin`` in the asked direction.

    Args:
        logit_before: ``(B,)`` logits ``f(x)``.
        logit_after: ``(B,)`` logits ``f(x')``.
        condition: ``(B,)`` directions in {-1, +1}.
        margin: ``b``, in logit units.

    Returns:
        ``(B,)`` bool: ``c * (f(x') - f(x)) >= b`` (where :func:`logit_shift_loss` is zero).
    """
    _check_logits(logit_before, logit_after, condition)
    c = condition.to(logit_after.dtype)
    return (c * (logit_after - logit_before)).detach() >= margin


def cycle_loss(
    image: torch.Tensor, cycled: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between the images and their round trip ``x' -> x''``.

    Args:
        image: ``(B, C, *S)`` original images ``x``.
        cycled: ``(B, C, *S)`` images warped there and back.
        mask: optional weights broadcastable to ``(B, C, *S)`` (e.g. a ``(B, 1, *S)`` brain
            mask); the loss is then the weighted mean ``sum(m * e^2) / sum(m)`` over the
            broadcast shape.

    Returns:
        Scalar loss (squared intensity units).
    """
    if image.shape != cycled.shape:
        raise CounterwarpError(
            f"cycle_loss: shapes differ, {tuple(image.shape)} vs {tuple(cycled.shape)}."
        )
    sq = (cycled - image) ** 2
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype).expand_as(sq)
    return (m * sq).sum() / m.sum().clamp_min(torch.finfo(sq.dtype).tiny)


def finite_differences(displacement: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences of a field along each spatial axis.

    Args:
        displacement: ``(B, d, *S)``.

    Returns:
        ``d`` tensors; entry ``j`` is ``u[..., p + e_j] - u[..., p]``, shape ``(B, d, *S)``
        with axis ``2 + j`` one shorter (voxels per voxel).
    """
    return [torch.diff(displacement, dim=2 + j) for j in range(displacement.ndim - 2)]


def _check_field(displacement: torch.Tensor, name: str) -> None:
    d = displacement.ndim - 2
    if d < 1 or displacement.shape[1] != d:
        raise CounterwarpError(
            f"{name}: expected a (B, d, *S) field with d = len(S), got {tuple(displacement.shape)}."
        )


def smoothness_loss(displacement: torch.Tensor, kind: SmoothnessKind = "l2") -> torch.Tensor:
    """Penalty on the spatial variation of a displacement field.

    - ``"l2"``: mean of squared forward differences, averaged over voxels, components and
      directions (VoxelMorph's ``Grad('l2')``). A linear field ``u(p) = A p`` gives
      ``||A||_F^2 / d^2``.
    - ``"l1"``: the same with absolute values (total-variation-like; tends to make thin
      shells at boundaries, see ``docs/method.md``).
    - ``"bending"``: bending energy, the mean over voxels and components of
      ``sum_jk (d^2 u / dp_j dp_k)^2`` (MONAI ``BendingEnergyLoss``, central differences,
      unit spacing; needs every spatial size > 2). Zero for any affine field.

    All three are zero for a constant (translation) field: pair them with
    :func:`displacement_magnitude_loss` to keep translations in check.

    Args:
        displacement: ``(B, d, *S)`` in voxels.
        kind: ``"l2"``, ``"l1"`` or ``"bending"``.

    Returns:
        Scalar loss.
    """
    if kind not in SMOOTHNESS_KINDS:
        raise CounterwarpError(f"smoothness kind must be one of {SMOOTHNESS_KINDS}, got {kind!r}.")
    _check_field(displacement, "smoothness_loss")
    if kind == "bending":
        with warnings.catch_warnings():  # MONAI 1.6 indexes with lists; harmless in torch 2.x
            warnings.filterwarnings("ignore", message=".*non-tuple sequence.*")
            return _bending(displacement)
    diffs = finite_differences(displacement)
    if kind == "l2":
        return torch.stack([(g**2).mean() for g in diffs]).mean()
    return torch.stack([g.abs().mean() for g in diffs]).mean()


def displacement_magnitude_loss(displacement: torch.Tensor) -> torch.Tensor:
    """``mean(u^2)`` over batch, components and voxels (squared voxels).

    Penalises translations and large moves that the smoothness terms leave free.

    Args:
        displacement: ``(B, d, *S)`` in voxels.
    """
    _check_field(displacement, "displacement_magnitude_loss")
    return (displacement**2).mean()


def folding_penalty(displacement: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """Penalty on near-singular or folding voxels: ``mean(relu(threshold - det(I + grad u)))``.

    Zero wherever the local volume ratio ``det(I + grad u)`` stays above ``threshold``, so it
    leaves moderate growth and shrinkage alone (the default 0.25 allows the anatomy to grow
    up to 4x) and only acts where the warp stretches a point over its neighbours or folds
    (``det <= 0``), which would otherwise dominate the log volume change maps.

    Args:
        displacement: ``(B, d, *S)`` in voxels.
        threshold: smallest determinant left unpenalised (dimensionless, > 0).

    Returns:
        Scalar loss (dimensionless).
    """
    _check_field(displacement, "folding_penalty")
    return torch.relu(threshold - jacobian_determinant(displacement)).mean()


@torch.no_grad()
def mean_abs_gradient(displacement: torch.Tensor) -> torch.Tensor:
    """Metric: mean ``|du_i / dp_j|`` over voxels, components ``i`` and directions ``j``.

    Forward differences, unit spacing (dimensionless, voxels per voxel); equals
    ``smoothness_loss(u, "l1")`` but carries no gradient.

    Args:
        displacement: ``(B, d, *S)`` in voxels.

    Returns:
        Scalar tensor, detached.
    """
    return smoothness_loss(displacement, "l1")
