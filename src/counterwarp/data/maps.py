"""Reading per-subject maps that are already in one space, and atlases on their grid.

A folder of NIfTI maps (e.g. an ``explain`` output of template-space images, or maps warped
with ANTs / FSL) is one space when every map has the same shape and affine; an atlas is an
integer label image, resampled (nearest) onto the maps' grid when it lies on another one,
with an optional ``label,name`` CSV.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from counterwarp.data.derivatives import output_stem_suffix
from counterwarp.data.manifest import nifti_stem
from counterwarp.errors import CounterwarpError

__all__ = ["AFFINE_TOLERANCE_MM", "load_atlas", "load_map_folder", "read_atlas_names"]

#: Largest affine difference (mm) between maps that still lie on one grid.
AFFINE_TOLERANCE_MM = 1e-3


def read_atlas_names(path: str | Path) -> dict[int, str]:
    """``label -> name`` from a CSV with (at least) columns ``label,name``."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = set(reader.fieldnames or ())
            if not {"label", "name"} <= fields:
                raise CounterwarpError(
                    f"{path}: an atlas names CSV needs columns 'label,name', found "
                    f"{sorted(fields) or 'no header'}"
                )
            names: dict[int, str] = {}
            for line, row in enumerate(reader, start=2):
                try:
                    names[int(float(row["label"]))] = str(row["name"]).strip()
                except (TypeError, ValueError):
                    raise CounterwarpError(
                        f"{path}, line {line}: label {row['label']!r} is not an integer"
                    ) from None
    except OSError as error:
        raise CounterwarpError(f"cannot read atlas names {path}: {error}") from None
    return names


def _is_nifti(path: Path) -> bool:
    return path.is_file() and (path.name.endswith(".nii") or path.name.endswith(".nii.gz"))


def load_map_folder(
    maps_dir: str | Path, direction: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a folder of per-subject maps that are already in one space.

    When the folder holds files named ``*_desc-<direction>_logjac.nii[.gz]`` (as
    ``counterwarp explain`` writes them, :mod:`counterwarp.data.derivatives`) only those are
    read; otherwise every NIfTI file.

    Returns:
        ``(maps (N, *S) float64, affine (4, 4), ids)``, files in sorted order.

    Raises:
        CounterwarpError: no folder, fewer than 2 maps, an unreadable file, or maps whose
            shapes or affines differ (they are then not in one space).
    """
    folder = Path(maps_dir).expanduser()
    if not folder.is_dir():
        raise CounterwarpError(f"--maps {folder}: not a folder of NIfTI maps")
    files = sorted(p for p in folder.iterdir() if _is_nifti(p))
    if direction is not None:
        ending = output_stem_suffix(direction, "logjac")
        named = [p for p in files if nifti_stem(p).endswith(ending)]
        if named:
            files = named
    if len(files) < 2:
        raise CounterwarpError(
            f"--maps {folder}: found {len(files)} NIfTI map(s); a group analysis needs at "
            f"least 2"
        )
    arrays: list[np.ndarray] = []
    affine: np.ndarray | None = None
    for path in files:
        try:
            image = nib.load(str(path))
            data = np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float64)
        except Exception as error:  # noqa: BLE001 - any reading failure is a bad file
            raise CounterwarpError(f"{path}: cannot be read as NIfTI ({error})") from None
        while data.ndim > 2 and data.shape[-1] == 1:
            data = data[..., 0]
        if not arrays:
            affine = np.asarray(image.affine, dtype=np.float64)
        else:
            if data.shape != arrays[0].shape:
                raise CounterwarpError(
                    f"--maps: {path.name} has shape {data.shape} but {files[0].name} has "
                    f"{arrays[0].shape}; all maps must be registered to one grid (same shape "
                    f"and affine)"
                )
            if not np.allclose(image.affine, affine, atol=AFFINE_TOLERANCE_MM):
                raise CounterwarpError(
                    f"--maps: {path.name} has another affine than {files[0].name}; all maps "
                    f"must be registered to one grid (same shape and affine)"
                )
        if data.ndim not in (2, 3):
            raise CounterwarpError(
                f"--maps: {path.name} has shape {data.shape}; expected scalar 2D or 3D maps "
                f"(log volume change), not vector or 4D images"
            )
        arrays.append(data)
    assert affine is not None
    return np.stack(arrays), affine, [nifti_stem(p) for p in files]


def load_atlas(
    atlas: str | Path, shape: tuple[int, ...], affine: np.ndarray
) -> np.ndarray:
    """Integer label image on the maps' grid (3D atlases on another grid: nearest resampling)."""
    path = Path(atlas).expanduser()
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata())
    except Exception as error:  # noqa: BLE001 - any reading failure is a bad file
        raise CounterwarpError(f"--atlas {path}: cannot be read as NIfTI ({error})") from None
    while data.ndim > len(shape) and data.shape[-1] == 1:
        data = data[..., 0]
    same_grid = data.shape == shape and np.allclose(image.affine, affine, atol=1e-3)
    if not same_grid:
        if data.ndim != 3 or len(shape) != 3:
            raise CounterwarpError(
                f"--atlas {path}: shape {data.shape} differs from the maps' {shape}; give a "
                f"label image on the maps' grid"
            )
        from nilearn.image import resample_img

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resampled = resample_img(
                nib.Nifti1Image(data.astype(np.float32), image.affine), target_affine=affine,
                target_shape=shape, interpolation="nearest", force_resample=True,
                copy_header=True,
            )
        data = np.asarray(resampled.get_fdata())
    if not np.all(np.mod(data, 1) == 0):
        raise CounterwarpError(f"--atlas {path}: not a label image (non-integer values)")
    return data.astype(np.int64)
