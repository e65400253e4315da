"""Native-looking scans with a known affine, to measure registration (tests, benchmarks).

:func:`native_like` moves an image already in MNI152-like space (nilearn's template,
Colin27) by a known random rigid + scale transform and stores it the way a scanner might:
other axis codes (``PIR``, ``LAS`` ...), anisotropic voxels and a field of view cut at the
bottom (the neck). It is built with scipy alone, never ITK, so the LPS / RAS handling of
:mod:`counterwarp.prepare.register` is tested against an independent construction.
:func:`registration_error` compares an estimated transform with the known one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class NativeScan:
    """A simulated native scan.

    Attributes:
        image: nibabel image on the native grid (axis codes, voxel sizes, cropped FOV).
        matrix: ``(4, 4)`` RAS mm map from the source image's world to the native world
            (``p_native = matrix @ p_source``).
    """

    image: Any
    matrix: np.ndarray


def random_matrix(
    rng: np.random.Generator, rotation_deg: float = 10.0, scale: float = 0.08,
    shift_mm: float = 10.0,
) -> np.ndarray:
    """A random ``(4, 4)`` rigid + per-axis scale matrix: rotations uniform in
    ``+-rotation_deg`` about x, y, z, scales in ``1 +- scale``, shifts in ``+-shift_mm``."""
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_euler("xyz", rng.uniform(-rotation_deg, rotation_deg, 3),
                                   degrees=True).as_matrix()
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(1.0 + rng.uniform(-scale, scale, 3))
    matrix[:3, 3] = rng.uniform(-shift_mm, shift_mm, 3)
    return matrix


def grid_affine(codes: str, voxel_size: Sequence[float], shape: Sequence[int],
                centre: np.ndarray) -> np.ndarray:
    """The RAS affine of a grid whose axes point along ``codes`` (e.g. ``"PIR"``), with
    ``voxel_size`` mm and ``shape`` voxels, centred on ``centre`` (RAS mm)."""
    from nibabel import orientations

    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, (world, flip) in enumerate(orientations.axcodes2ornt(tuple(codes))):
        affine[int(world), axis] = flip * float(voxel_size[axis])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape, float) - 1) / 2)
    return affine


def native_like(
    source: Any, seed: int, *, codes: str = "PIR", voxel_size: Sequence[float] = (1.0, 1.0, 1.2),
    crop_mm: float = 10.0, order: int = 1, matrix: np.ndarray | None = None, **random: float,
) -> NativeScan:
    """``source`` moved by a known random transform onto a reoriented, cropped grid.

    Args:
        source: nibabel image ``(X, Y, Z)`` (its world: RAS mm).
        seed: seed of the random transform (:func:`random_matrix`, ``random`` its options).
        codes: axis codes of the native grid.
        voxel_size: native voxel sizes (mm) along the native axes.
        crop_mm: field of view removed at the inferior end (mm).
        order: interpolation order (0 for masks).
        matrix: a given transform instead of a random one.

    Returns:
        a :class:`NativeScan`; voxels outside the source are 0.
    """
    import nibabel as nib
    from scipy import ndimage

    if matrix is None:
        matrix = random_matrix(np.random.default_rng(seed), **random)
    shape_in = np.asarray(source.shape[:3])
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (
        shape_in - 1)
    world = corners @ source.affine[:3, :3].T + source.affine[:3, 3]
    moved = world @ matrix[:3, :3].T + matrix[:3, 3]
    low, high = moved.min(0), moved.max(0)
    low[2] += crop_mm
    from nibabel import orientations

    world_axis = orientations.axcodes2ornt(tuple(codes))[:, 0].astype(int)
    extent = (high - low)[world_axis] / np.asarray(voxel_size, dtype=np.float64)
    shape = tuple(int(np.ceil(e)) + 1 for e in extent)
    affine = grid_affine(codes, voxel_size, shape, (low + high) / 2)
    to_source = np.linalg.inv(source.affine) @ np.linalg.inv(matrix) @ affine
    voxels = np.indices(shape).reshape(3, -1).astype(np.float64)
    coords = to_source[:3, :3] @ voxels + to_source[:3, 3:]
    values = ndimage.map_coordinates(np.asarray(source.get_fdata(), np.float32), coords,
                                     order=order, mode="constant", cval=0.0)
    dtype = np.float32 if order else np.asarray(source.dataobj).dtype
    image = nib.Nifti1Image(values.reshape(shape).astype(dtype), affine)
    return NativeScan(image, matrix)


def brain_points(mask: Any) -> np.ndarray:
    """``(N, 3)`` RAS mm centres of the non-zero voxels of a nibabel mask."""
    voxels = np.argwhere(np.asarray(mask.dataobj) > 0).astype(np.float64)
    return voxels @ mask.affine[:3, :3].T + mask.affine[:3, 3]


def registration_error(
    estimated: np.ndarray, truth: np.ndarray, points: np.ndarray
) -> tuple[float, float]:
    """``(mean, max)`` distance in mm between two ``(4, 4)`` RAS maps over ``(N, 3)``
    points (e.g. :func:`brain_points` of the template brain)."""
    difference = (estimated - truth)[:3]
    distance = np.linalg.norm(points @ difference[:, :3].T + difference[:, 3], axis=1)
    return float(distance.mean()), float(distance.max())
