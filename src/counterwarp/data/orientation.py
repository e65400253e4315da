"""Reorienting a 3D image to the axis codes a classifier was trained in, and back.

nibabel's orientation transforms do the work: ``io_orientation`` reads where each array
axis of a file points from its affine, ``ornt_transform`` maps it to the wanted codes,
``apply_orientation`` permutes and flips the array (no interpolation), ``inv_ornt_aff``
gives the new affine, so world coordinates are unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from counterwarp.errors import CounterwarpError


def reorient(
    values: np.ndarray, affine: np.ndarray, codes: str, path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``values`` (3D) reoriented to axis ``codes``: (array, its affine, the transform)."""
    from nibabel import orientations

    if values.ndim != 3:
        raise CounterwarpError(
            f"{path}: the classifier's contract names an orientation ({codes}), which only "
            "3D images have; give 3D images or set orientation to null"
        )
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt(tuple(codes))
    )
    oriented = np.ascontiguousarray(orientations.apply_orientation(values, transform))
    new_affine = affine @ orientations.inv_ornt_aff(transform, values.shape)
    return oriented, new_affine, transform


def to_file_grid(values: np.ndarray, loaded: Any) -> np.ndarray:
    """A model-grid map resampled to the file's (reoriented) grid, then put back in the
    file's own axis order."""
    from nibabel import orientations

    from counterwarp.data.preprocess import resample_linear

    if loaded.orientation is None:
        return resample_linear(values, loaded.native_shape)

    oriented_shape = orientations.apply_orientation(
        np.empty(loaded.native_shape, dtype=np.uint8), loaded.orientation
    ).shape
    resampled = resample_linear(values, tuple(int(n) for n in oriented_shape))
    back = inverse_orientation(loaded.orientation)
    return np.ascontiguousarray(orientations.apply_orientation(resampled, back))


def inverse_orientation(transform: np.ndarray) -> np.ndarray:
    """The orientation transform undoing ``transform`` (file axes -> model axes)."""
    inverse = np.empty_like(transform)
    for source_axis, (target_axis, flip) in enumerate(transform):
        inverse[int(target_axis)] = (source_axis, flip)
    return inverse
