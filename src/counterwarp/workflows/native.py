"""``explain --native``: a prepared subject's explanation mapped back into its native scan.

``counterwarp prepare`` writes, per subject, the model-ready image in MNI152 space and the
affine ``A`` (ITK ``.tfm``, LPS mm) that maps an MNI152 point to the native scan's point.
``explain`` makes, in MNI152 space, the pull-back field ``D(q) = q + d(q)``:
``simulated(q) = prepared(D(q))``. Since ``prepared(q) = native(A(q))``, the same
simulation seen in the native scan is ``native(A(D(A^-1(p))))``: the native scan (at its
own resolution, skull and all) resampled through the composite ``A o D o A^-1``. Written
into the explain folder, per subject and direction (BIDS ``space-T1w``: the subject's own
T1w space):

- ``<id>_space-T1w_desc-<direction>_simulated.nii.gz``: the native scan through that
  composite (linear), its own intensities, grid and affine;
- ``<id>_space-T1w_desc-<direction>_xfm.nii.gz``: the composite as an ITK / ANTs
  displacement field on the native grid (LPS mm), ``T(p) - p``;
- ``<id>_space-T1w_desc-<direction>_logjac.nii.gz``: the log volume change at ``A^-1(p)``
  (an affine change of coordinates leaves a Jacobian determinant unchanged), 0 outside the
  brain (the prepared image's non-zero voxels, mapped back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from counterwarp._io import save_nifti_atomic
from counterwarp.errors import CounterwarpError
from counterwarp.geometry.itk_field import itk_field_image
from counterwarp.prepare.register import read_transform, to_native, to_sitk

__all__ = ["NATIVE_COLUMNS", "native_name", "native_pair", "write_native_outputs"]

#: The manifest columns ``prepare`` writes that ``--native`` needs (relative to the CSV).
NATIVE_COLUMNS = ("native_path", "transform")


def native_name(id_: str, direction: str, kind: str) -> str:
    """``<id_>_space-T1w_desc-<direction>_<kind>.nii.gz`` (kind: simulated, logjac, xfm)."""
    return f"{id_}_space-T1w_desc-{direction}_{kind}.nii.gz"


def native_pair(extras: dict[str, str], manifest_folder: Path, where: str
                ) -> tuple[Path, Path]:
    """The native scan and transform a prepared manifest's row names (resolved against the
    manifest's folder); a clear error when the row has none."""
    missing = [name for name in NATIVE_COLUMNS if not extras.get(name)]
    if missing:
        raise CounterwarpError(
            f"{where}: --native needs the columns {', '.join(NATIVE_COLUMNS)} that "
            "`counterwarp prepare` writes; explain a prepared manifest, or leave --native out"
        )
    paths = tuple((manifest_folder / extras[name]).resolve() for name in NATIVE_COLUMNS)
    for path in paths:
        if not path.is_file():
            raise CounterwarpError(f"{where}: {path} not found (moved since prepare?)")
    return paths[0], paths[1]


def _field_transform(field: Any):  # -> SimpleITK.DisplacementFieldTransform
    """A SimpleITK displacement-field transform from an ANTs-style field image (LPS mm,
    ``(X, Y, Z, 1, 3)``) on a 3D grid."""
    import nibabel as nib
    import SimpleITK as sitk

    vectors = np.asarray(field.dataobj, dtype=np.float64)[..., 0, :]  # (X, Y, Z, 3)
    grid = to_sitk(nib.Nifti1Image(np.zeros(vectors.shape[:3], np.float32), field.affine))
    image = sitk.GetImageFromArray(np.ascontiguousarray(vectors.transpose(2, 1, 0, 3)),
                                   isVector=True)
    image.CopyInformation(grid)
    return sitk.DisplacementFieldTransform(image)


def write_native_outputs(
    out: Path, id_: str, direction: str, maps: Any, prepared_path: Path, native_path: Path,
    transform_path: Path,
) -> list[Path]:
    """Write one explanation's native-space images (see the module doc); their paths.

    Args:
        out: the explain folder.
        id_: the output id.
        direction: ``"inject"`` or ``"remove"``.
        maps: the explanation on the prepared image's grid
            (:class:`~counterwarp.workflows.explain.InputGridMaps`).
        prepared_path: the prepared image explained (its non-zero voxels: the brain).
        native_path: the subject's native scan.
        transform_path: its ``*_from-T1w_to-MNI152_mode-image_xfm.tfm``.
    """
    import nibabel as nib
    import SimpleITK as sitk

    if len(maps.log_volume_change.shape) != 3:
        raise CounterwarpError(f"{native_path}: --native needs 3D images")
    native = nib.load(str(native_path))
    forward = read_transform(transform_path)  # MNI152 -> native
    composite = sitk.CompositeTransform(3)  # applied last-added first: A^-1, then D, then A
    composite.AddTransform(forward)
    composite.AddTransform(_field_transform(maps.field))
    composite.AddTransform(forward.GetInverse())
    reference = to_sitk(nib.Nifti1Image(np.zeros(native.shape[:3], np.float32), native.affine))
    moving = to_sitk(nib.Nifti1Image(
        np.asarray(native.dataobj, np.float32).reshape(native.shape[:3]), native.affine))
    simulated = sitk.Resample(moving, reference, composite, sitk.sitkLinear, 0.0,
                              sitk.sitkFloat32)
    displacement = sitk.TransformToDisplacementField(
        composite, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection(),
    )
    lps = sitk.GetArrayFromImage(displacement).transpose(2, 1, 0, 3)  # (X, Y, Z, 3)
    prepared = nib.load(str(prepared_path))
    inside = (np.asarray(prepared.dataobj) != 0).astype(np.float32)
    brain = np.asarray(to_native(nib.Nifti1Image(inside, prepared.affine), transform_path,
                                 native).dataobj) >= 0.5
    logjac = np.asarray(to_native(maps.log_volume_change, transform_path, native).dataobj)
    images = {
        "simulated": nib.Nifti1Image(
            sitk.GetArrayFromImage(simulated).transpose(2, 1, 0).astype(np.float32),
            native.affine),
        "xfm": itk_field_image(lps.astype(np.float32), native.affine, 3),
        "logjac": nib.Nifti1Image(np.where(brain, logjac, 0.0).astype(np.float32),
                                  native.affine),
    }
    written = []
    for kind, image in images.items():
        written.append(save_nifti_atomic(out / native_name(id_, direction, kind), image))
    return written
