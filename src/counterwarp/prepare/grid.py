"""The model grid in MNI152 space: a box around the template's brain, isotropic voxels.

The box is the bounding box of nilearn's 1 mm MNI152 brain mask (voxel edges, not centres)
plus ``margin`` mm on every side: 153 x 189 x 163 mm with the default 4 mm. Then

- ``shape`` only: the voxel size is the smallest that fits the box in ``shape``,
  ``max(extent / shape)``; the grid is centred on the box (other axes get room to spare).
  ``(32, 32, 32)`` gives 5.91 mm voxels.
- ``voxel_size`` only: ``shape = ceil(extent / voxel_size)`` per axis, centred on the box.
- both: ``shape`` voxels of ``voxel_size`` mm centred on the box (too small a grid cuts
  the brain; :attr:`ModelGrid.brain_inside` says how much of it the grid holds).
- neither: 1 mm voxels, the shape derived as above.

Axes are RAS (axis 0 left -> right, 1 posterior -> anterior, 2 inferior -> superior).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from counterwarp.errors import CounterwarpError
from counterwarp.limits import check_grid

#: Margin (mm) added around the template brain's bounding box.
MARGIN_MM = 4.0


@dataclass(frozen=True)
class ModelGrid:
    """A grid in MNI152 space.

    Attributes:
        shape: ``(X, Y, Z)`` voxels.
        voxel_size: isotropic voxel size, mm.
        affine: ``(4, 4)`` RAS voxel-to-world affine (mm).
        brain_inside: share of the template brain's volume inside the grid (0..1).
    """

    shape: tuple[int, int, int]
    voxel_size: float
    affine: np.ndarray
    brain_inside: float


@lru_cache(maxsize=1)
def brain_box() -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` RAS mm corners of the 1 mm MNI152 brain mask's bounding box."""
    from nilearn.datasets import load_mni152_brain_mask

    mask = load_mni152_brain_mask(resolution=1)
    voxels = np.argwhere(np.asarray(mask.dataobj) > 0)
    affine = np.asarray(mask.affine, dtype=np.float64)
    corners = np.array([voxels.min(0) - 0.5, voxels.max(0) + 0.5], dtype=np.float64)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(0), world.max(0)


def _checked(value: Sequence[int] | None, voxel_size: float | None) -> None:
    if value is not None and (len(value) != 3 or any(int(n) < 2 for n in value)):
        raise CounterwarpError(
            f"--shape {' '.join(str(n) for n in value)}: give three sizes of at least 2 "
            "voxels (e.g. --shape 32 32 32)"
        )
    if voxel_size is not None and not (math.isfinite(voxel_size) and voxel_size > 0):
        raise CounterwarpError(
            f"--voxel-size {voxel_size}: give a positive size in mm (e.g. --voxel-size 2)"
        )


def model_grid(
    shape: Sequence[int] | None = (32, 32, 32), voxel_size: float | None = None,
    margin: float = MARGIN_MM,
) -> ModelGrid:
    """The model grid for ``shape`` (voxels) and / or ``voxel_size`` (mm), see the module doc.

    Raises:
        CounterwarpError: a shape that is not three sizes >= 2, a non-positive voxel size,
            or a grid too large for the memory limits.
    """
    _checked(shape, voxel_size)
    low, high = brain_box()
    low, high = low - margin, high + margin
    extent = high - low
    if shape is None:
        size = 1.0 if voxel_size is None else float(voxel_size)
        dims = tuple(int(math.ceil(e / size - 1e-6)) for e in extent)
    else:
        dims = tuple(int(n) for n in shape)
        size = float(voxel_size) if voxel_size is not None else float(max(extent / dims))
    check_grid(dims, f"model grid {dims}", fix="choose a smaller --shape or larger "
               "--voxel-size")
    centre = (low + high) / 2
    affine = np.diag([size, size, size, 1.0])
    affine[:3, 3] = centre - size * (np.array(dims) - 1) / 2
    grid_low = centre - size * np.array(dims) / 2
    grid_high = centre + size * np.array(dims) / 2
    inner = np.clip(np.minimum(grid_high, high - margin) - np.maximum(grid_low, low + margin),
                    0, None)
    inside = float(np.prod(inner) / np.prod(extent - 2 * margin))
    return ModelGrid((dims[0], dims[1], dims[2]), size, affine, inside)
