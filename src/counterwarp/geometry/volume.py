"""Volume change of a deformation: Jacobian determinants, log volume change, folding.

Conventions (shared with :mod:`monai.networks.blocks.Warp` and the rest of counterwarp):

- A displacement field ``u`` is a tensor of shape ``(B, d, *spatial)`` with ``d`` = 2 or 3
  spatial dimensions; channel ``i`` moves along spatial dimension ``i`` of the tensor
  (dimension ``2 + i`` of ``u``). It is in voxels unless ``spacing`` says otherwise.
- Resampling is a *pull-back*: the warped image is ``y(p) = x(p + u(p))``.
- ``det(I + grad u)`` at ``p`` is the volume of the input region that lands in a unit
  volume around output point ``p``. If it is larger than 1, more anatomy is squeezed into
  the same space: the anatomy *shrinks*. :func:`log_volume_change` therefore reports
  ``-log det(I + grad u)`` so that, as users read maps, growth is positive and shrinkage is
  negative (see ``docs/method.md``, "Sign convention").

Derivatives are central differences (``torch.gradient``, one-sided first-order differences
at the borders of the grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from counterwarp.errors import CounterwarpError

__all__ = [
    "DEFAULT_EPS",
    "folding_fraction",
    "jacobian_determinant",
    "jacobian_matrix",
    "log_volume_change",
]

#: Determinants below this value are clamped before taking a logarithm. Folded voxels
#: (``det <= 0``) thus get a large but finite value; count them with
#: :func:`folding_fraction`.
DEFAULT_EPS = 1e-6


def _check_displacement(displacement: Tensor, name: str = "displacement") -> int:
    """Validate a displacement tensor ``(B, d, *spatial)`` and return ``d``."""
    if not isinstance(displacement, Tensor):
        raise CounterwarpError(
            f"{name} must be a torch.Tensor of shape (B, d, *spatial), got "
            f"{type(displacement).__name__}; convert numpy arrays with torch.from_numpy"
        )
    if displacement.ndim < 3:
        raise CounterwarpError(
            f"{name} must have shape (B, d, *spatial), got {tuple(displacement.shape)}; "
            "add a batch dimension with .unsqueeze(0)"
        )
    dim = displacement.shape[1]
    if dim not in (1, 2, 3) or displacement.ndim != dim + 2:
        raise CounterwarpError(
            f"{name} has shape {tuple(displacement.shape)}: channel count {dim} must equal "
            f"the number of spatial dimensions {displacement.ndim - 2} (1, 2 or 3)"
        )
    if any(size < 2 for size in displacement.shape[2:]):
        raise CounterwarpError(
            f"{name} has spatial shape {tuple(displacement.shape[2:])}: every spatial "
            "dimension needs at least 2 voxels to take derivatives"
        )
    if not displacement.is_floating_point():
        raise CounterwarpError(f"{name} must be a floating-point tensor, got {displacement.dtype}")
    return dim


def _check_spacing(spacing: Sequence[float] | None, dim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    values = tuple(float(s) for s in spacing)
    if len(values) != dim or any(not s > 0 for s in values):
        raise CounterwarpError(
            f"spacing must hold {dim} positive voxel sizes (mm), one per spatial dimension, "
            f"got {spacing!r}"
        )
    return values


def jacobian_matrix(displacement: Tensor, spacing: Sequence[float] | None = None) -> Tensor:
    """Jacobian matrix ``I + grad u`` of the map ``p -> p + u(p)``.

    Args:
        displacement: ``(B, d, *spatial)`` displacement ``u``. In voxels when ``spacing`` is
            None; in mm when ``spacing`` is given (channel ``i`` in mm along spatial dim ``i``).
        spacing: None, or the voxel size in mm along each of the ``d`` spatial dimensions.
            Only for displacements given in mm: derivatives are then taken per mm. For a
            displacement in voxels leave it None (derivatives per voxel): the determinant is
            the same either way because the spacing cancels.

    Returns:
        ``(B, *spatial, d, d)`` tensor ``J`` with ``J[..., i, j] = delta_ij + du_i/dx_j``
        (dimensionless), same dtype and device as ``displacement``.
    """
    dim = _check_displacement(displacement)
    steps = _check_spacing(spacing, dim)
    spatial_dims = tuple(range(1, dim + 1))
    rows = []
    for i in range(dim):
        component = displacement[:, i]
        if steps is None:
            grads = torch.gradient(component, dim=spatial_dims, edge_order=1)
        else:
            grads = torch.gradient(component, spacing=steps, dim=spatial_dims, edge_order=1)
        rows.append(torch.stack(grads, dim=-1))
    jac = torch.stack(rows, dim=-2)
    eye = torch.eye(dim, dtype=jac.dtype, device=jac.device)
    return jac + eye


def jacobian_determinant(displacement: Tensor, spacing: Sequence[float] | None = None) -> Tensor:
    """Jacobian determinant ``det(I + grad u)`` of the map ``p -> p + u(p)``.

    Args:
        displacement: ``(B, d, *spatial)`` displacement ``u`` (d = 2 or 3; 1 also works).
            In voxels when ``spacing`` is None, in mm when ``spacing`` is given.
        spacing: None, or voxel size in mm per spatial dimension, only for displacements in
            mm (see :func:`jacobian_matrix`).

    Returns:
        ``(B, *spatial)`` determinant (dimensionless). For a pull-back warp
        ``y(p) = x(p + u(p))`` a value above 1 means the anatomy at ``p`` *shrank*.
    """
    jac = jacobian_matrix(displacement, spacing)
    dim = jac.shape[-1]
    if dim == 1:
        return jac[..., 0, 0]
    if dim == 2:
        return jac[..., 0, 0] * jac[..., 1, 1] - jac[..., 0, 1] * jac[..., 1, 0]
    a, b, c = jac[..., 0, 0], jac[..., 0, 1], jac[..., 0, 2]
    d, e, f = jac[..., 1, 0], jac[..., 1, 1], jac[..., 1, 2]
    g, h, k = jac[..., 2, 0], jac[..., 2, 1], jac[..., 2, 2]
    return a * (e * k - f * h) - b * (d * k - f * g) + c * (d * h - e * g)


def log_volume_change(
    displacement: Tensor,
    inverse_displacement: Tensor | None = None,
    spacing: Sequence[float] | None = None,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Log volume change of the *anatomy* under a pull-back warp; growth is positive.

    For the warp ``y(p) = x(p + u(p))``:

    - without ``inverse_displacement``: ``-log det(I + grad u)(p)``. This is exact at the
      *output* (warped-image) point ``p``: it is the log ratio of the volume the anatomy at
      ``p`` occupies in ``y`` to the volume it occupied in ``x``. Read at the same grid point
      of the *input* image it is correct to first order in ``u``.
    - with ``inverse_displacement`` ``w`` (the inverse map ``q -> q + w(q)`` of
      ``p -> p + u(p)``, e.g. ``exp(-v)`` when ``u = exp(v)`` for a stationary velocity
      field ``v``): ``log det(I + grad w)(q)``, exact at the *input*-image point ``q``.
      ``displacement`` is then only used to check shapes.

    Determinants are clamped to ``eps`` before the logarithm; count folded voxels with
    :func:`folding_fraction`.

    Args:
        displacement: ``(B, d, *spatial)`` pull-back displacement, voxels (or mm with
            ``spacing``).
        inverse_displacement: optional ``(B, d, *spatial)`` inverse displacement, same units.
        spacing: None, or voxel size in mm per spatial dim, only for displacements in mm.
        eps: smallest determinant used in the logarithm (positive).

    Returns:
        ``(B, *spatial)`` natural-log volume change (0 = no change, ``log 2`` = doubled).
    """
    if not eps > 0:
        raise CounterwarpError(f"eps must be positive, got {eps!r}")
    _check_displacement(displacement)
    if inverse_displacement is None:
        det = jacobian_determinant(displacement, spacing)
        return -torch.log(torch.clamp(det, min=eps))
    _check_displacement(inverse_displacement, "inverse_displacement")
    if inverse_displacement.shape != displacement.shape:
        raise CounterwarpError(
            f"inverse_displacement has shape {tuple(inverse_displacement.shape)} but "
            f"displacement has {tuple(displacement.shape)}; they must match"
        )
    det = jacobian_determinant(inverse_displacement, spacing)
    return torch.log(torch.clamp(det, min=eps))


def folding_fraction(
    displacement: Tensor,
    mask: Tensor | None = None,
    spacing: Sequence[float] | None = None,
) -> Tensor:
    """Share of voxels where the map ``p -> p + u(p)`` folds (``det(I + grad u) <= 0``).

    Args:
        displacement: ``(B, d, *spatial)`` displacement (voxels, or mm with ``spacing``).
        mask: optional boolean (or 0/1) mask of the voxels to count, shape ``(*spatial)``,
            ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        spacing: None, or voxel size in mm per spatial dim, only for displacements in mm.

    Returns:
        ``(B,)`` fraction in [0, 1] (float, same dtype as ``displacement``); 0 where a
        subject's mask is empty.
    """
    det = jacobian_determinant(displacement, spacing)
    folded = (det <= 0).to(det.dtype)
    spatial = tuple(det.shape[1:])
    if mask is None:
        weights = torch.ones_like(det)
    else:
        mask = torch.as_tensor(mask, device=det.device)
        if tuple(mask.shape) == spatial:
            mask = mask.unsqueeze(0)
        elif mask.ndim == det.ndim + 1 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if tuple(mask.shape[1:]) != spatial or mask.shape[0] not in (1, det.shape[0]):
            raise CounterwarpError(
                f"mask has shape {tuple(mask.shape)}; expected {spatial}, "
                f"{(det.shape[0], *spatial)} or {(det.shape[0], 1, *spatial)}"
            )
        weights = (mask != 0).to(det.dtype).expand_as(det)
    reduce = tuple(range(1, det.ndim))
    count = (folded * weights).sum(dim=reduce)
    total = weights.sum(dim=reduce)
    return torch.where(total > 0, count / total.clamp(min=1), torch.zeros_like(count))
