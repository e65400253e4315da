"""Affine registration of a native scan to the MNI152 brain template, with SimpleITK.

Spaces and conventions
----------------------
- nibabel images carry a ``(4, 4)`` voxel-to-world affine in **RAS** mm (x to the right,
  y anterior, z superior); ITK's physical space is **LPS** mm (x to the left, y posterior).
  :func:`to_sitk` / :func:`from_sitk` convert between the two exactly:
  ``affine_lps = diag(-1, -1, 1, 1) @ affine_ras``, the ITK origin is its last column, the
  spacing its column norms, the direction its normalised columns. An ITK index ``(i, j, k)``
  is the nibabel voxel ``(i, j, k)`` (``sitk.GetArrayFromImage`` returns ``(k, j, i)``
  order, hence the transposes).
- The **transform** (:func:`register_affine`, written by :func:`write_transform` as an ITK
  ``.tfm``) is an ``AffineTransform`` that maps a point of **MNI152 space to the native
  scan**, both in LPS mm: ``p_native = A (p_mni - c) + c + t``. It is what ITK/ANTs
  resampling needs to bring the native scan INTO template space (``antsApplyTransforms -i
  native -r template -t xfm``), the convention of fMRIPrep's ``from-T1w_to-MNI152..._mode-
  image_xfm`` files. Its inverse maps MNI152 back to native (:func:`to_native`).
  :func:`transform_matrix_ras` gives the same map as a ``(4, 4)`` RAS matrix.
- The template is nilearn's MNI152 (2009) T1 and brain mask, shipped inside nilearn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from counterwarp._io import atomic_path
from counterwarp.errors import CounterwarpError

#: nibabel RAS <-> ITK LPS: flip x and y.
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Resolution (mm) of the template the scans are registered to (nilearn ships 1 and 2 mm).
REGISTRATION_RESOLUTION = 2
#: The stages, levels and optimiser settings, recorded in prepare.json.
REGISTRATION_SETTINGS: dict[str, Any] = {
    "library": "SimpleITK",
    "metric": "Mattes mutual information, 32 bins, 25% random samples (seed 0) in the "
              "template brain mask dilated by 4 mm",
    "initialisation": "centred transform initializer, image moments (centres of mass)",
    "stages": ["rigid (Euler3D)", "affine (12 parameters)"],
    "levels": "shrink 4, 2, 1 of the 2 mm template; Gaussian smoothing 4, 2, 0 mm",
    "optimiser": "regular step gradient descent, scales from physical shift",
}
INTERPOLATIONS = ("linear", "nearest")


def to_sitk(image: Any) -> Any:
    """A 3D nibabel image as a SimpleITK image in LPS space (same voxels, same world).

    Args:
        image: nibabel image of shape ``(X, Y, Z)`` (trailing singleton axes allowed) with
            a rotation-and-zoom affine (RAS mm). A sheared affine is refused.

    Returns:
        ``SimpleITK.Image`` (float32, or the input's integer type), index ``(i, j, k)`` =
        voxel ``(i, j, k)``.
    """
    import SimpleITK as sitk

    values = np.asarray(image.dataobj)
    while values.ndim > 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise CounterwarpError(f"expected a 3D image, got shape {tuple(image.shape)}")
    if not np.issubdtype(values.dtype, np.integer):
        values = values.astype(np.float32)
    lps = _FLIP @ np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise CounterwarpError(
            "the image's affine has a shear, which ITK images cannot hold; resample it to a "
            "non-sheared grid first (e.g. nilearn.image.resample_img)"
        )
    result = sitk.GetImageFromArray(np.ascontiguousarray(values.transpose(2, 1, 0)))
    result.SetSpacing([float(s) for s in spacing])
    result.SetOrigin([float(o) for o in lps[:3, 3]])
    result.SetDirection([float(d) for d in direction.ravel()])
    return result


def from_sitk(image: Any, dtype: Any = np.float32, affine: np.ndarray | None = None) -> Any:
    """A SimpleITK image as a nibabel ``Nifti1Image`` (RAS affine, voxel ``(i, j, k)``).

    ``affine``: the exact RAS affine to write (the grid's own, to avoid float round trips);
    default: the one computed from the image's origin, spacing and direction.
    """
    import nibabel as nib
    import SimpleITK as sitk

    values = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(dtype, copy=False)
    affine = _sitk_affine(image) if affine is None else np.asarray(affine, dtype=np.float64)
    return nib.Nifti1Image(np.ascontiguousarray(values), affine)


def _sitk_affine(image: Any) -> np.ndarray:
    """The ``(4, 4)`` RAS voxel-to-world affine of a SimpleITK image (mm)."""
    lps = np.eye(4)
    direction = np.reshape(image.GetDirection(), (3, 3))
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return _FLIP @ lps


def _grid_image(shape: tuple[int, int, int], affine: np.ndarray) -> Any:
    """An empty SimpleITK image on the grid ``shape`` (voxels) with RAS ``affine``."""
    import nibabel as nib

    return to_sitk(nib.Nifti1Image(np.zeros(shape, dtype=np.float32), affine))


@dataclass(frozen=True)
class Template:
    """The MNI152 brain template on one of nilearn's grids.

    Attributes:
        brain: ``(X, Y, Z)`` T1 intensities times the brain mask, float32 nibabel image.
        mask: ``(X, Y, Z)`` uint8 brain mask (1 inside), same grid.
        resolution: voxel size in mm (1 or 2).
    """

    brain: Any
    mask: Any
    resolution: int


def load_template(resolution: int = REGISTRATION_RESOLUTION) -> Template:
    """nilearn's MNI152 T1 template and brain mask at ``resolution`` mm (no download)."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=resolution)
    mask = np.asarray(load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    brain = np.where(mask, np.asarray(t1.get_fdata(), np.float32), 0).astype(np.float32)
    return Template(
        brain=nib.Nifti1Image(brain, t1.affine),
        mask=nib.Nifti1Image(mask.astype(np.uint8), t1.affine),
        resolution=resolution,
    )


@dataclass
class Registration:
    """The result of :func:`register_affine`.

    Attributes:
        transform: ``SimpleITK.AffineTransform`` mapping MNI152 LPS mm -> native LPS mm.
        metric: final Mattes mutual information (negative; lower is better).
        iterations: optimiser iterations of the last stage, last level.
        seconds: wall time of the registration.
        stop: the optimiser's reason for stopping (last stage).
    """

    transform: Any
    metric: float
    iterations: int
    seconds: float
    stop: str


def _method(fixed_mask: Any, iterations: int) -> Any:
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, 0)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
        relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([4.0, 2.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def register_affine(
    brain: Any, template: Template | None = None, *, iterations: int = 200
) -> Registration:
    """Register a skull-stripped native scan to the MNI152 brain: rigid, then affine.

    Args:
        brain: nibabel image ``(X, Y, Z)``, any orientation and voxel size; zero outside the
            brain.
        template: the fixed image (default :func:`load_template` at 2 mm).
        iterations: the most optimiser iterations per level and stage.

    Returns:
        a :class:`Registration` whose transform maps MNI152 -> native (LPS mm).
    """
    import SimpleITK as sitk

    started = time.perf_counter()
    template = template or load_template()
    fixed = sitk.Cast(to_sitk(template.brain), sitk.sitkFloat32)
    moving = sitk.Cast(to_sitk(brain), sitk.sitkFloat32)
    mask = sitk.BinaryDilate(to_sitk(template.mask), [max(1, round(4 / template.resolution))] * 3)
    try:
        rigid = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        method = _method(mask, iterations)
        method.SetInitialTransform(rigid, inPlace=True)
        method.Execute(fixed, moving)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        method = _method(mask, iterations)
        method.SetInitialTransform(affine, inPlace=True)
        method.Execute(fixed, moving)
    except RuntimeError as error:
        raise CounterwarpError(
            f"the registration to MNI152 failed ({str(error).strip().splitlines()[-1]}); "
            "check that the scan is a T1 brain (skull-stripped, or use --skull-strip deepbet)"
        ) from None
    return Registration(
        transform=affine, metric=float(method.GetMetricValue()),
        iterations=int(method.GetOptimizerIteration()),
        seconds=time.perf_counter() - started, stop=method.GetOptimizerStopConditionDescription(),
    )


def transform_matrix_ras(transform: Any) -> np.ndarray:
    """The ``(4, 4)`` matrix of an ITK affine (or rigid) transform, acting on RAS mm points.

    ITK transforms act on LPS points: ``p' = A (p - c) + c + t``. The returned ``M`` maps
    a RAS point ``q`` (homogeneous) to ``M @ q``, the same map seen in RAS.
    """
    matrix = np.reshape(transform.GetMatrix(), (3, 3))
    center = np.asarray(transform.GetCenter())
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = np.asarray(transform.GetTranslation()) + center - matrix @ center
    return _FLIP @ lps @ _FLIP


def write_transform(transform: Any, path: str | Path) -> Path:
    """Write an ITK transform (``.tfm`` text) to ``path`` atomically."""
    import SimpleITK as sitk

    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return Path(path)


def read_transform(path: str | Path) -> Any:
    """Read an affine ITK transform file as a ``SimpleITK.AffineTransform``."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise CounterwarpError(f"transform file not found: {path}")
    try:
        transform = sitk.ReadTransform(str(path))
        if transform.GetName() == "CompositeTransform":
            transform = sitk.CompositeTransform(transform).GetNthTransform(0)
        return sitk.AffineTransform(transform)
    except RuntimeError as error:
        raise CounterwarpError(
            f"{path}: not an affine ITK transform ({str(error).strip().splitlines()[-1]}); "
            "give the *_xfm.tfm file that prepare wrote"
        ) from None


def _interpolator(interpolation: str) -> Any:
    import SimpleITK as sitk

    if interpolation not in INTERPOLATIONS:
        raise CounterwarpError(
            f"interpolation {interpolation!r}: use one of {', '.join(INTERPOLATIONS)}"
        )
    return sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor


def to_template_grid(
    image: Any, transform: Any, shape: tuple[int, int, int], affine: np.ndarray, *,
    interpolation: str = "linear", smooth: bool = True,
) -> Any:
    """Resample a native image onto a grid in MNI152 space through ``transform``.

    Args:
        image: native nibabel image ``(X, Y, Z)``.
        transform: MNI152 -> native ITK transform (:func:`register_affine`).
        shape: target grid in voxels.
        affine: ``(4, 4)`` RAS voxel-to-world affine of the target grid (mm).
        interpolation: ``"linear"`` (float32 result) or ``"nearest"`` (input's type).
        smooth: with linear interpolation onto a coarser grid, first smooth the native image
            with a Gaussian of ``sigma = (target voxel - native voxel) / 2`` mm (the rule
            of :func:`counterwarp.data.preprocess.resample_linear`), against aliasing.

    Returns:
        nibabel image of ``shape`` with ``affine``, zero outside the native field of view.
    """
    import SimpleITK as sitk

    moving = to_sitk(image)
    target = float(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).max())
    native = float(min(moving.GetSpacing()))
    if interpolation == "linear" and smooth and target > native:
        moving = sitk.SmoothingRecursiveGaussian(
            sitk.Cast(moving, sitk.sitkFloat32), (target - native) / 2.0
        )
    out_type = sitk.sitkFloat32 if interpolation == "linear" else moving.GetPixelID()
    resampled = sitk.Resample(
        moving, _grid_image(shape, affine), transform, _interpolator(interpolation), 0.0,
        out_type,
    )
    dtype = np.float32 if interpolation == "linear" else np.asarray(image.dataobj).dtype
    return from_sitk(resampled, dtype, affine)


def to_native(
    image: Any, transform_path: str | Path, native_reference: Any,
    interpolation: str = "linear",
) -> Any:
    """Map an image on the prepared grid (MNI152 space) back into the native scan's space.

    Args:
        image: nibabel image ``(X, Y, Z)`` in MNI152 space, e.g. a map on the model grid
            written with the prepared image's affine.
        transform_path: the subject's ``*_from-T1w_to-MNI152_mode-image_xfm.tfm``.
        native_reference: the native scan (nibabel image or path): its grid and affine.
        interpolation: ``"linear"`` (float32) or ``"nearest"`` (masks, labels; keeps the
            type).

    Returns:
        nibabel image with the native scan's shape and affine; zero where the native grid
        falls outside ``image``.
    """
    import nibabel as nib
    import SimpleITK as sitk

    if isinstance(native_reference, (str, Path)):
        native_reference = nib.load(str(native_reference))
    inverse = read_transform(transform_path).GetInverse()
    moving = to_sitk(image)
    out_type = sitk.sitkFloat32 if interpolation == "linear" else moving.GetPixelID()
    reference = _grid_image(tuple(native_reference.shape[:3]), native_reference.affine)
    resampled = sitk.Resample(
        moving, reference, inverse, _interpolator(interpolation), 0.0, out_type
    )
    dtype = np.float32 if interpolation == "linear" else np.asarray(image.dataobj).dtype
    return from_sitk(resampled, dtype, native_reference.affine)
