"""The MNI152 template (from nilearn, no download) and the grids synthetic cohorts live on.

3D grids have isotropic voxels and RAS-aligned axes (axis 0 = x left->right, 1 = y
posterior->anterior, 2 = z inferior->superior), sized so that the whole brain mask fits with a
small margin and centred on the brain's bounding box; the affine maps voxel indices to MNI mm.
2D grids are one coronal slice at ``y = CORONAL_SLICE_Y_MM``, of shape ``(X, Z)``, whose 4x4
affine maps ``(i, j, 0)`` to ``(x, y0, z)`` mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from counterwarp.errors import CounterwarpError
from counterwarp.limits import check_grid

__all__ = [
    "CORONAL_SLICE_Y_MM",
    "DEFAULT_SHAPE_2D",
    "DEFAULT_SHAPE_3D",
    "MIN_SIZE",
    "SyntheticGrid",
    "Template",
    "make_grid",
    "mni_arrays",
    "sample_at",
]

DEFAULT_SHAPE_3D: tuple[int, int, int] = (32, 32, 32)
DEFAULT_SHAPE_2D: tuple[int, int] = (64, 64)
#: MNI y (mm) of the coronal slice used by ``dim=2``.
CORONAL_SLICE_Y_MM = -22.0
#: Smallest allowed grid size along any axis (voxels).
MIN_SIZE = 8
BRAIN_MARGIN_MM = 4.0


@dataclass(frozen=True)
class SyntheticGrid:
    """The image grid of a cohort.

    Attributes:
        shape: ``(X, Y, Z)`` for 3D or ``(X, Z)`` for a 2D coronal slice, voxels.
        affine: ``(4, 4)`` voxel-index -> MNI mm matrix (for 2D, ``(i, j, 0) -> (x, y0, z)``).
        spacing_mm: isotropic voxel size in mm.
    """

    shape: tuple[int, ...]
    affine: np.ndarray
    spacing_mm: float

    @property
    def dim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.shape)

    def voxel_coordinates(self) -> np.ndarray:
        """Voxel index of every grid point, ``(d, *shape)`` float64."""
        axes = [np.arange(n, dtype=np.float64) for n in self.shape]
        return np.stack(np.meshgrid(*axes, indexing="ij"))

    def voxels_to_mm(self, voxels: np.ndarray) -> np.ndarray:
        """Map voxel coordinates ``(d, ...)`` to MNI mm ``(3, ...)``."""
        d = self.dim
        flat = voxels.reshape(d, -1)
        mm = self.affine[:3, :d] @ flat + self.affine[:3, 3:4]
        return mm.reshape((3, *voxels.shape[1:]))

    def mm_to_voxels(self, mm: Sequence[float]) -> np.ndarray:
        """Map one MNI point ``(x, y, z)`` to its (in-plane) voxel coordinates ``(d,)``."""
        point = np.append(np.asarray(mm, dtype=np.float64), 1.0)
        return (np.linalg.inv(self.affine) @ point)[: self.dim]

    def mm_coordinates(self) -> np.ndarray:
        """MNI mm of every grid point, ``(3, *shape)``."""
        return self.voxels_to_mm(self.voxel_coordinates())


@lru_cache(maxsize=1)
def mni_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI152 2 mm T1 template (float32, masked), brain mask (float32 0/1) and affine."""
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    mask_img = datasets.load_mni152_brain_mask(resolution=2)
    mask = (np.asarray(mask_img.get_fdata()) > 0.5).astype(np.float32)
    data = np.asarray(template.get_fdata(), dtype=np.float32) * mask
    return data, mask, np.asarray(template.affine, dtype=np.float64)


def _check_shape(shape: Sequence[int] | None, dim: int) -> tuple[int, ...]:
    if dim not in (2, 3):
        raise CounterwarpError(f"dim must be 2 (one coronal slice) or 3 (volumes), got {dim!r}")
    if shape is None:
        return DEFAULT_SHAPE_3D if dim == 3 else DEFAULT_SHAPE_2D
    try:
        values = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise CounterwarpError(
            f"shape must be a sequence of {dim} integers, got {shape!r}"
        ) from None
    if any(int(s) != s for s in shape):
        raise CounterwarpError(f"shape must hold integers, got {shape!r}")
    if len(values) != dim:
        raise CounterwarpError(
            f"shape {values} has {len(values)} dimensions but dim={dim}; give {dim} sizes "
            f"(e.g. {DEFAULT_SHAPE_3D if dim == 3 else DEFAULT_SHAPE_2D}) or change dim"
        )
    if any(s < MIN_SIZE for s in values):
        raise CounterwarpError(
            f"shape {values}: every size must be at least {MIN_SIZE} voxels to hold a brain"
        )
    check_grid(values, f"--shape {' '.join(str(s) for s in values)}", bytes_per_voxel=64)
    return values


def make_grid(shape: Sequence[int] | None = None, dim: int = 3) -> SyntheticGrid:
    """The grid on which a cohort is generated.

    Isotropic voxels, sized so that the MNI152 brain mask (for ``dim=2``: its coronal slice
    at ``CORONAL_SLICE_Y_MM``) fits with a ``BRAIN_MARGIN_MM`` margin, centred on the mask's
    bounding box.

    Args:
        shape: ``(X, Y, Z)`` (``dim=3``) or ``(X, Z)`` (``dim=2``) in voxels; None for the
            default ``(32, 32, 32)`` / ``(64, 64)``.
        dim: 2 or 3.
    """
    shape = _check_shape(shape, dim)
    _, mask, affine = mni_arrays()
    ijk = np.argwhere(mask > 0).astype(np.float64)
    mm = ijk @ affine[:3, :3].T + affine[:3, 3]
    if dim == 2:
        near = np.abs(mm[:, 1] - CORONAL_SLICE_Y_MM) <= 1.0
        mm = mm[near]
    voxel = float(np.max(np.abs(np.diag(affine[:3, :3]))))
    low = mm.min(axis=0) - voxel / 2 - BRAIN_MARGIN_MM
    high = mm.max(axis=0) + voxel / 2 + BRAIN_MARGIN_MM
    centre = (low + high) / 2
    axes = (0, 1, 2) if dim == 3 else (0, 2)
    spacing = max((high[a] - low[a]) / n for a, n in zip(axes, shape, strict=True))
    out = np.eye(4)
    out[:3, :3] = 0.0
    for column, axis in enumerate(axes):
        out[axis, column] = spacing
    if dim == 2:
        out[1, 2] = spacing  # the implicit third voxel axis runs along y
        centre[1] = CORONAL_SLICE_Y_MM
    half = np.array([(n - 1) / 2 for n in shape])
    out[:3, 3] = centre - out[:3, :dim] @ half
    return SyntheticGrid(shape=shape, affine=out, spacing_mm=float(spacing))


def sample_at(
    field: np.ndarray, points: np.ndarray, order: int = 1, cval: float | None = None
) -> np.ndarray:
    """Sample ``field`` (``(*spatial)``) at voxel points ``(d, *out)``."""
    mode = "nearest" if cval is None else "constant"
    return ndimage.map_coordinates(
        field, points, order=order, mode=mode, cval=0.0 if cval is None else cval
    )


class Template:
    """An anatomy (by default the MNI152 template) prepared for sampling at a grid's
    resolution.

    Args:
        grid: the cohort grid (voxel -> MNI mm).
        arrays: ``(data, mask, affine)``: ``(X, Y, Z)`` T1 intensity, ``(X, Y, Z)`` brain
            mask (0/1) and the ``(4, 4)`` voxel -> MNI mm affine of the anatomy (see
            :func:`counterwarp.data.anatomy.anatomy_arrays`); None for :func:`mni_arrays`.

    Both are smoothed (mask-normalised) against aliasing when the grid is coarser than the
    anatomy's voxels, and sampled in world (MNI mm) coordinates.
    """

    def __init__(
        self,
        grid: SyntheticGrid,
        arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        data, mask, affine = mni_arrays() if arrays is None else arrays
        source_voxel = float(np.max(np.abs(np.diag(affine[:3, :3]))))
        sigma = max(0.0, (grid.spacing_mm / source_voxel - 1.0) / 2.0)  # anti-aliasing
        if sigma > 0:
            weight = ndimage.gaussian_filter(mask, sigma)
            smooth = ndimage.gaussian_filter(data, sigma)
            data = np.where(weight > 1e-3, smooth / np.maximum(weight, 1e-3), 0.0)
            mask = weight
        self.data = np.asarray(data, dtype=np.float64)
        self.mask = np.asarray(mask, dtype=np.float64)
        self.inverse_affine = np.linalg.inv(affine)
        self.grid = grid

    def sample(self, voxels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Template intensity and brain mask (bool) at grid voxel points ``(d, *shape)``."""
        mm = self.grid.voxels_to_mm(voxels).reshape(3, -1)
        src = self.inverse_affine[:3, :3] @ mm + self.inverse_affine[:3, 3:4]
        shape = voxels.shape[1:]
        intensity = sample_at(self.data, src, order=1, cval=0.0).reshape(shape)
        inside = sample_at(self.mask, src, order=1, cval=0.0).reshape(shape) >= 0.5
        return intensity, inside
