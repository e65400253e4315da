"""The anatomies a synthetic cohort can be built from: the MNI152 template or Colin27.

- ``"mni152"`` (the default): the smooth MNI152 2009 T1 template (2 mm) that ships with
  nilearn, brain-masked (:func:`counterwarp.data.template.mni_arrays`).
- ``"colin27"``: one real individual, the Colin27 single-subject T1 (1 mm, 181 x 217 x 181,
  RAS, registered to MNI space), skull-stripped (``ch2bet.nii.gz`` of Debian's
  ``mricron-data``; the folder is ``$COUNTERWARP_MRICRON_DIR`` when that variable is set,
  else ``/usr/share/mricron/templates``). Its brain mask is the largest connected component
  of the non-zero voxels; its intensities are scaled so that the brain's 99.9th percentile
  equals the MNI152 template's (about 0.93), so the generator's noise and bias settings mean
  the same for both.

Both live in MNI mm, so the cohort grid (:func:`counterwarp.data.template.make_grid`, built
from the MNI152 mask) and the effect regions (MNI mm) are the same for either; each anatomy
is sampled in world coordinates through its own affine.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from counterwarp.data.template import mni_arrays
from counterwarp.errors import CounterwarpError

__all__ = [
    "ANATOMIES",
    "COLIN27_FILE",
    "DEFAULT_ANATOMY",
    "MRICRON_DIR",
    "MRICRON_DIR_ENV",
    "anatomy_arrays",
    "anatomy_description",
    "check_anatomy",
    "colin27_path",
]

#: The anatomies :func:`counterwarp.data.synthetic.synth` accepts.
ANATOMIES: tuple[str, ...] = ("mni152", "colin27")
DEFAULT_ANATOMY = "mni152"
#: Environment variable naming the folder that holds ``ch2bet.nii.gz``.
MRICRON_DIR_ENV = "COUNTERWARP_MRICRON_DIR"
#: Where Debian's ``mricron-data`` installs its templates.
MRICRON_DIR = Path("/usr/share/mricron/templates")
COLIN27_FILE = "ch2bet.nii.gz"
#: Percentile (of brain voxels) matched between Colin27 and the MNI152 template.
INTENSITY_PERCENTILE = 99.9
#: Largest allowed distance (mm) between a face of Colin27's brain bounding box and the
#: MNI152 brain's (Colin27 as shipped: 5 mm, at the inferior face).
MAX_BOX_OFFSET_MM = 15.0


def check_anatomy(anatomy: str) -> str:
    """``anatomy`` if it is one of :data:`ANATOMIES`; a :class:`CounterwarpError` otherwise."""
    if not isinstance(anatomy, str) or anatomy not in ANATOMIES:
        raise CounterwarpError(
            f"anatomy must be one of {', '.join(ANATOMIES)}, got {anatomy!r}"
        )
    return anatomy


def colin27_path() -> Path:
    """Path of Colin27's ``ch2bet.nii.gz``; a one-line error naming the fix when missing."""
    folder_env = os.environ.get(MRICRON_DIR_ENV, "").strip()
    folder = Path(folder_env) if folder_env else MRICRON_DIR
    path = folder / COLIN27_FILE
    if not path.is_file():
        where = f"${MRICRON_DIR_ENV}={folder_env}" if folder_env else str(folder)
        raise CounterwarpError(
            f"the colin27 anatomy needs {COLIN27_FILE}, not found in {where}: install it "
            f"with `apt-get install mricron-data`, or set {MRICRON_DIR_ENV} to the folder "
            f"that holds {COLIN27_FILE}"
        )
    return path


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean ``mask`` ``(X, Y, Z)``, holes filled."""
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def _brain_box_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World bounding box ``(2, 3)`` (low, high; mm) of a mask ``(X, Y, Z)``."""
    corners = np.array([np.argwhere(mask).min(axis=0), np.argwhere(mask).max(axis=0)])
    mm = corners @ affine[:3, :3].T + affine[:3, 3]
    return np.sort(mm, axis=0)


def _check_mni_aligned(
    path: str, mask: np.ndarray, affine: np.ndarray, mni_mask: np.ndarray,
    mni_affine: np.ndarray,
) -> None:
    """Refuse an image whose brain is not where the MNI152 brain is (wrong file or affine):
    the effect regions are in MNI mm, so they would miss the anatomy."""
    off = np.abs(_brain_box_mm(mask, affine) - _brain_box_mm(mni_mask > 0, mni_affine))
    if off.max() > MAX_BOX_OFFSET_MM:
        raise CounterwarpError(
            f"{path}: its brain's bounding box is {off.max():.0f} mm from the MNI152 brain's "
            f"(at most {MAX_BOX_OFFSET_MM:g} mm allowed); it is not in MNI space, so the "
            "effect regions would miss its anatomy"
        )


@lru_cache(maxsize=2)
def _colin27_arrays(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colin27 read from ``path``: see :func:`anatomy_arrays` (cached per path)."""
    import nibabel as nib

    try:
        image = nib.load(path)
        raw = np.asarray(image.dataobj, dtype=np.float32)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # noqa: BLE001 - any read failure is a bad file
        raise CounterwarpError(
            f"{path}: cannot read it as NIfTI ({type(error).__name__}); reinstall "
            f"mricron-data or point {MRICRON_DIR_ENV} at a good copy"
        ) from None
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3 or not np.isfinite(raw).all():
        raise CounterwarpError(
            f"{path}: expected a finite 3D T1 image, got shape {raw.shape}; reinstall "
            "mricron-data"
        )
    mask = _largest_component(raw > 0)
    if mask.sum() < 1000:
        raise CounterwarpError(f"{path}: fewer than 1000 brain voxels; is it ch2bet.nii.gz?")

    mni_data, mni_mask, mni_affine = mni_arrays()
    _check_mni_aligned(path, mask, affine, mni_mask, mni_affine)
    target = float(np.percentile(mni_data[mni_mask > 0], INTENSITY_PERCENTILE))
    reference = float(np.percentile(raw[mask], INTENSITY_PERCENTILE))
    data = np.where(mask, raw * (target / max(reference, 1e-12)), 0.0).astype(np.float32)
    return data, mask.astype(np.float32), affine


def anatomy_arrays(anatomy: str = DEFAULT_ANATOMY) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The T1 image, brain mask and affine of an anatomy, for
    :class:`counterwarp.data.template.Template`.

    Args:
        anatomy: ``"mni152"`` or ``"colin27"``.

    Returns:
        ``(data, mask, affine)``: ``(X, Y, Z)`` float32 T1 intensity (zero outside the brain;
        MNI152 scale, brain median about 0.7), ``(X, Y, Z)`` float32 brain mask (0/1) and the
        ``(4, 4)`` voxel index -> MNI mm affine. MNI152: 99 x 117 x 95 at 2 mm; Colin27:
        181 x 217 x 181 at 1 mm.

    Raises:
        CounterwarpError: an unknown anatomy, or Colin27's file missing or unreadable.
    """
    if check_anatomy(anatomy) == "mni152":
        return mni_arrays()
    return _colin27_arrays(str(colin27_path()))


def anatomy_description(anatomy: str) -> str:
    """One line for ``cohort.json``: what the subjects' anatomy is (and, for Colin27, where
    it was read)."""
    if check_anatomy(anatomy) == "mni152":
        return "MNI152 T1 2 mm (nilearn), brain-masked"
    return (
        f"Colin27 single-subject T1 1 mm, skull-stripped ({colin27_path()}, mricron-data), "
        f"mask = largest non-zero component, intensity matched to MNI152 at the brain's "
        f"{INTENSITY_PERCENTILE:g}th percentile"
    )
