"""Image loading and preprocessing: NIfTI file -> float32 array on the model grid, and back.

The model grid
--------------
Every image a classifier sees has one fixed spatial shape (``input_shape``). When a file's
own shape differs, :func:`load_volume` resamples it **linearly** to that shape
(:func:`scipy.ndimage.affine_transform`, order 1, voxel centres aligned, so the field of
view is kept and only the voxel size changes; when shrinking, a Gaussian prefilter with
``sigma = (factor - 1) / 2`` voxels limits aliasing). Nothing is cropped or padded: the
images are expected to be affinely aligned to a common space already (as in the paper),
so resampling keeps anatomy where it was. :func:`restore_to_input` undoes the resampling
(linear again), so any map computed on the model grid can be written with the input's
affine and overlaid on the input in a viewer. ``LoadedVolume.model_affine`` is the exact
voxel-to-world affine of the model grid, for writing maps without going back.

Axes
----
A 2D NIfTI (two axes) is a 2D image. Trailing singleton axes beyond the second are dropped
(``(X, Y, 1)`` is a 2D slice, ``(X, Y, Z, 1)`` a 3D volume); a non-singleton fourth axis
(time series, vector image) is refused, and so is a single-voxel axis among the spatial ones
(``(X, 1, Z)``: a one-voxel-thick slab, which the model grid would stretch into a volume).

Checked before any voxel is used
--------------------------------
:func:`image_spatial_shape` (the cheap check every command runs on all its inputs before
writing anything) and :func:`load_volume` run :mod:`counterwarp.data.checks` (gzip
integrity, data type, affine, declared size) besides the axes above.

Intensities
-----------
:func:`zscore_in_brain` z-scores over the non-zero ("brain") voxels and leaves the zero
background at 0, as the paper does for skull-stripped T1 images.
"""

from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from counterwarp._io import save_nifti_atomic
from counterwarp.data.checks import check_affine, check_dtype, check_size, verify_compressed_stream
from counterwarp.data.contract import Preprocessing, normalise_intensity
from counterwarp.data.orientation import reorient, to_file_grid
from counterwarp.errors import CounterwarpError
from counterwarp.limits import check_grid

PREPROCESSING_INFO: dict[str, str] = {
    "resample": "linear (scipy.ndimage, order 1, voxel centres aligned, Gaussian prefilter "
    "when shrinking) to input_shape",
    "intensity": "z-score over non-zero voxels, background stays 0",
    "axes": "trailing singleton axes dropped; 2 axes = 2D image, 3 axes = 3D volume",
}
"""Description of the preprocessing, stored in checkpoints so runs are self-describing."""


@dataclass
class LoadedVolume:
    """An image read from disk and resampled onto the model grid.

    Attributes:
        path: the file it came from (absolute).
        data: ``(*shape)`` float32 intensities on the model grid (not yet z-scored).
        affine: ``(4, 4)`` voxel-to-world affine of the ORIGINAL file (mm).
        original_shape: shape of the array stored in the file, singleton axes included.
        native_shape: spatial shape of the file after dropping trailing singleton axes.
        model_affine: ``(4, 4)`` voxel-to-world affine of the model grid (mm), i.e. of ``data``.
        orientation: nibabel orientation transform ``(3, 2)`` from the file's axes to the
            model's (see :class:`~counterwarp.data.contract.Preprocessing`), or None when
            the array was used as stored.
    """

    path: Path
    data: np.ndarray
    affine: np.ndarray
    original_shape: tuple[int, ...]
    native_shape: tuple[int, ...]
    model_affine: np.ndarray
    orientation: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of ``data`` (the model grid)."""
        return tuple(int(n) for n in self.data.shape)

    @property
    def resampled(self) -> bool:
        """True when the model grid differs from the file's grid."""
        return self.shape != self.native_shape


def _spatial_shape(file_shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the second; refuse 1D and 4D+ images."""
    shape = tuple(int(n) for n in file_shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise CounterwarpError(
            f"{path}: image has shape {file_shape}, a 4D (or higher) image; counterwarp needs "
            "one 2D or 3D image per file. Split time series / multi-channel images first "
            "(e.g. fslsplit or nilearn.image.index_img)."
        )
    if len(shape) < 2:
        raise CounterwarpError(
            f"{path}: image has shape {file_shape}; counterwarp needs a 2D or 3D image."
        )
    thin = [axis for axis, n in enumerate(shape) if n == 1]
    if thin:
        raise CounterwarpError(
            f"{path}: image has shape {file_shape}; axis {thin[0]} is one voxel thick, so it "
            f"is not a {len(shape)}D image (the model grid would stretch that single "
            f"{'slice' if len(shape) == 3 else 'line'} across it). Give a full "
            f"{len(shape)}D image, or save a 2D slice with shape (X, Y) or (X, Y, 1)."
        )
    return shape


def resolve_image_path(path: str | os.PathLike[str]) -> Path:
    """The absolute, resolved path of an image; CounterwarpError for a symbolic-link loop."""
    path = Path(path).expanduser()
    try:
        return path.resolve()
    except (RuntimeError, OSError) as error:  # RuntimeError: "Symlink loop" (Python < 3.13)
        raise CounterwarpError(
            f"{path}: a symbolic-link loop (the link points back to itself, {error}); "
            "point it at the image file or list the file itself."
        ) from None


def _checked_image(path: Path):  # -> (nibabel SpatialImage, spatial shape)
    """Open ``path`` and run every check that needs no voxel data (see the module doc)."""
    image = _open_image(path)
    check_dtype(image, path)
    spatial = _spatial_shape(tuple(image.shape), path)
    check_size(image, path)
    check_affine(image, path)
    verify_compressed_stream(path)
    return image, spatial


def _open_image(path: Path):  # -> nibabel SpatialImage
    import nibabel as nib

    if not path.exists():
        if path.is_symlink():
            try:
                os.stat(path)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise CounterwarpError(
                        f"{path}: a symbolic-link loop ({error.strerror}); point the link at "
                        "the image file or give the file itself."
                    ) from None
            raise CounterwarpError(
                f"{path}: a symbolic link to a missing file ({os.readlink(path)}); fix the link "
                "or give the image file itself."
            )
        raise CounterwarpError(f"image file not found: {path}")
    if path.is_dir():
        raise CounterwarpError(f"{path} is a folder, expected a NIfTI file (.nii or .nii.gz)")
    if not path.is_file():  # a FIFO or device would block or stream forever
        raise CounterwarpError(f"{path} is not a regular file; give a NIfTI file (.nii / .nii.gz)")
    try:  # nibabel reports an unreadable file as "Could not read file"; say why
        with open(path, "rb"):
            pass
    except OSError as error:
        raise CounterwarpError(
            f"{path}: cannot open it ({error.strerror or error}); check that the file is "
            "readable by you."
        ) from error
    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises many types for bad files
        raise CounterwarpError(
            f"{path}: cannot read as a NIfTI image ({type(error).__name__}: {error}). "
            "Check that it is a .nii / .nii.gz file and that it is not truncated."
        ) from error


def image_spatial_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """Spatial shape of an image file, singleton axes dropped, after every check that needs
    no voxel data: header, data type, axes, declared size, affine, and the integrity of a
    compressed stream (decompressed once per file and process, nothing kept).

    Raises:
        CounterwarpError: unreadable file, not a 2D / 3D image, a one-voxel-thick axis,
            complex or RGB / vector data, a NaN / Inf / singular affine, a declared size
            beyond the voxel cap or the memory available, a corrupt gzip / bzip2 stream.
    """
    path = Path(path).expanduser()
    return _checked_image(path)[1]


def _check_shape_argument(shape: tuple[int, ...] | None, dim: int, path: Path) -> None:
    if shape is None:
        return
    if len(shape) != dim or any(int(n) < 1 for n in shape):
        raise CounterwarpError(
            f"{path}: the model grid {tuple(shape)} does not fit a {dim}D image; give "
            f"{len(shape)}D images like the ones the model was trained on, or train a model "
            f"for {dim}D images (`counterwarp train-classifier --shape "
            f"{' '.join(['32'] * dim)}`)."
        )


def _grid_transform(
    source_shape: tuple[int, ...], target_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis scale and offset mapping target voxel j to source coordinate scale*j + offset.

    Voxel centres are aligned so both grids cover the same field of view:
    ``i = (j + 0.5) * n_source / n_target - 0.5``.
    """
    scale = np.array(source_shape, dtype=np.float64) / np.array(target_shape, dtype=np.float64)
    offset = 0.5 * scale - 0.5
    return scale, offset


def resample_linear(array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Resample a ``(*source_shape)`` array linearly onto ``target_shape`` (same field of view).

    Shrinking axes are Gaussian-prefiltered with ``sigma = (factor - 1) / 2`` voxels.
    Returns a float32 array of shape ``target_shape``.
    """
    from scipy import ndimage

    source_shape = tuple(array.shape)
    target_shape = tuple(int(n) for n in target_shape)
    if source_shape == target_shape:
        return np.asarray(array, dtype=np.float32).copy()
    scale, offset = _grid_transform(source_shape, target_shape)
    values = np.asarray(array, dtype=np.float32)
    sigma = np.maximum((scale - 1.0) / 2.0, 0.0)
    if np.any(sigma > 0):
        values = ndimage.gaussian_filter(values, sigma=sigma, mode="nearest")
    resampled = ndimage.affine_transform(
        values, scale, offset=offset, output_shape=target_shape, order=1, mode="nearest"
    )
    return resampled.astype(np.float32, copy=False)


def _voxels(image, path: Path, native_shape: tuple[int, ...]) -> np.ndarray:
    """The voxels of an opened image as stored (scaling applied): ``(*native_shape)`` float32."""
    try:
        values = np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as error:
        raise CounterwarpError(
            f"{path}: cannot read the voxel data ({type(error).__name__}: {error}); "
            "the file is probably truncated or corrupt. Re-export or re-copy it."
        ) from error
    return values.reshape(native_shape)


def read_input_voxels(loaded: LoadedVolume) -> np.ndarray:
    """The input file's own voxels again: ``(*native_shape)`` float32 on the file's grid, at
    its own intensities (no reorientation, resampling or normalisation), for outputs that
    live on the input grid (``explain``'s simulated image and brain mask)."""
    return _voxels(_open_image(loaded.path), loaded.path, loaded.native_shape)


def load_volume(
    path: str | os.PathLike[str],
    shape: tuple[int, ...] | None = None,
    orientation: str | None = None,
) -> LoadedVolume:
    """Read a 2D / 3D NIfTI file, reorient it if asked, and resample it (linearly) to
    ``shape`` if given.

    Args:
        path: a ``.nii`` / ``.nii.gz`` file (anything nibabel reads as an image).
        shape: model grid ``(H, W)`` or ``(D, H, W)`` in voxels; None keeps the file's grid.
        orientation: axis codes (``"RAS"``) to reorient a 3D image to before resampling, so
            the model grid's axes point that way whatever the file's orientation; None
            keeps the array as stored.

    Returns:
        a :class:`LoadedVolume` whose ``data`` is float32 of ``shape`` (raw intensities).

    Raises:
        CounterwarpError: everything :func:`image_spatial_shape` refuses, NaN or Inf
            voxels, a constant image, or a ``shape`` of the wrong length or too large.
    """
    path = resolve_image_path(path)
    image, native_shape = _checked_image(path)
    original_shape = tuple(int(n) for n in image.shape)
    _check_shape_argument(shape, len(native_shape), path)
    if shape is not None:
        check_grid(shape, f"model grid {tuple(int(n) for n in shape)} for {path}",
                   fix="A run's grid comes from its classifier: retrain it on a smaller grid "
                   "(`counterwarp train-classifier --shape 64 64 64`).")
    values = _voxels(image, path, native_shape)
    n_nan = int(np.isnan(values).sum())
    if n_nan:
        raise CounterwarpError(
            f"{path}: {n_nan} NaN voxel(s). Replace them (e.g. with 0 outside the brain) "
            "before using this image."
        )
    n_inf = int(np.isinf(values).sum())
    if n_inf:
        raise CounterwarpError(
            f"{path}: {n_inf} infinite voxel(s). Fix the image (e.g. clip or set them to 0) "
            "before using it."
        )
    if float(values.max()) == float(values.min()):
        raise CounterwarpError(
            f"{path}: the image is constant (every voxel = {float(values.flat[0])}); "
            "it carries no anatomy. Check the file or remove it from the manifest."
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    grid_affine, transform = affine, None
    if orientation is not None:
        values, grid_affine, transform = reorient(values, affine, orientation, path)
    oriented_shape = tuple(int(n) for n in values.shape)
    target_shape = oriented_shape if shape is None else tuple(int(n) for n in shape)
    data = resample_linear(values, target_shape)
    dim = len(native_shape)
    scale, offset = _grid_transform(oriented_shape, target_shape)
    grid_to_file = np.eye(4)
    grid_to_file[:dim, :dim] = np.diag(scale)
    grid_to_file[:dim, 3] = offset
    model_affine = grid_affine @ grid_to_file
    return LoadedVolume(
        path=path,
        data=data,
        affine=affine,
        original_shape=original_shape,
        native_shape=native_shape,
        model_affine=model_affine,
        orientation=transform,
    )


def restore_to_input(array: np.ndarray | torch.Tensor, loaded: LoadedVolume) -> np.ndarray:
    """Map an array on the model grid back onto the original file's grid.

    Args:
        array: ``(*model_shape)`` scalar map, or ``(*model_shape, C)`` with a trailing
            channel axis (each channel is resampled separately; vector *values* are not
            rescaled, so a displacement in model voxels stays in model voxels).
        loaded: the :class:`LoadedVolume` the model input came from.

    Returns:
        float32 array of shape ``loaded.original_shape`` (or ``(*original_shape, C)``),
        aligned with ``loaded.affine``.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    values = np.asarray(array, dtype=np.float32)
    model_shape = loaded.shape
    if tuple(values.shape) == model_shape:
        restored = to_file_grid(values, loaded)
        return restored.reshape(loaded.original_shape)
    if values.ndim == len(model_shape) + 1 and tuple(values.shape[:-1]) == model_shape:
        channels = [to_file_grid(values[..., c], loaded) for c in range(values.shape[-1])]
        restored = np.stack(channels, axis=-1)
        return restored.reshape(*loaded.original_shape, values.shape[-1])
    raise CounterwarpError(
        f"array of shape {tuple(values.shape)} is not on the model grid {model_shape} "
        "(optionally with one trailing channel axis)"
    )


def save_on_input_grid(
    path: str | os.PathLike[str], array: np.ndarray | torch.Tensor, loaded: LoadedVolume
) -> Path:
    """Restore a model-grid map to the input grid and write it as NIfTI with the input's affine.

    Args:
        path: output file (``.nii.gz``), written atomically.
        array: ``(*model_shape)`` or ``(*model_shape, C)`` map.
        loaded: the :class:`LoadedVolume` of the input image.
    """
    import nibabel as nib

    restored = restore_to_input(array, loaded)
    return save_nifti_atomic(path, nib.Nifti1Image(restored, loaded.affine))


def zscore_in_brain(array: np.ndarray) -> np.ndarray:
    """Z-score the non-zero ("brain") voxels of an image; zero background stays 0.

    Args:
        array: ``(*shape)`` intensities (any real dtype).

    Returns:
        float32 array of the same shape: ``(x - mean) / std`` over voxels where ``x != 0``,
        and exactly 0 elsewhere. If the brain has zero variance the voxels are only centred;
        an all-zero image is returned as zeros.
    """
    values = np.asarray(array, dtype=np.float32)
    out = np.zeros_like(values)
    brain = values != 0
    if not brain.any():
        return out
    brain_values = values[brain].astype(np.float64)
    mean = float(brain_values.mean())
    std = float(brain_values.std())
    if not math.isfinite(std) or std <= 1e-12:
        std = 1.0
    out[brain] = ((brain_values - mean) / std).astype(np.float32)
    return out


def load_model_input(
    path: str | os.PathLike[str],
    shape: tuple[int, ...] | None = None,
    preprocessing: Preprocessing | None = None,
) -> tuple[torch.Tensor, LoadedVolume]:
    """Load one image exactly as the classifier saw its training images.

    Args:
        path: the image file.
        shape: model grid in voxels (None: the file's).
        preprocessing: orientation and intensity normalisation of the classifier's
            contract (default: as stored, z-scored over the brain).

    Returns:
        ``((1, *shape) float32 normalised tensor, LoadedVolume)``; pass the LoadedVolume to
        :func:`restore_to_input` / :func:`save_on_input_grid` to map results back.
    """
    preprocessing = preprocessing or Preprocessing()
    loaded = load_volume(path, shape, orientation=preprocessing.orientation)
    values = normalise_intensity(loaded.data, preprocessing.intensity)
    return torch.from_numpy(values).unsqueeze(0), loaded
