"""Synthetic T1 cohorts with a known morphological effect and its ground truth.

Every subject is one anatomy, resampled to a small grid: by default (``anatomy="mni152"``)
the smooth MNI152 T1 template that ships with nilearn (brain-masked, no download); with
``anatomy="colin27"`` a real individual's brain, the skull-stripped Colin27 T1 of Debian's
``mricron-data`` (see :mod:`counterwarp.data.anatomy`). Both are in MNI space; the grid and
the effect regions (MNI mm) are the same for either. Then:

1. diseased subjects only: the *disease effect*, a diffeomorphic deformation built from an
   :class:`EffectSpec` (by default: lateral ventricles grow, hippocampi shrink), scaled by
   ``severity * effect``, applied in template space;
2. all subjects: an *age* effect, a confound unrelated to the label's definition (mild global
   brain shrinkage and slight ventricle growth that increase with age; diseased subjects are
   a little older on average), and a smooth random deformation (anatomical variability, a
   few mm); the two velocity fields are added and integrated into one subject map
   ``phi_s``;
3. a smooth multiplicative intensity bias field and Rician noise inside the brain; the
   background stays exactly 0, so z-scoring over non-zero voxels works.

All deformations are pull-backs ``x'(p) = x(p + u(p))`` (see ``docs/method.md``), built as
stationary velocity fields integrated by scaling and squaring (the algorithm of MONAI's
``DVF2DDF``), so they are diffeomorphic. The subject image is sampled *once* from the smoothed
template through the composition of the maps: ``x_s(p) = T(phi_d(phi_s(p)))``.

Ground truth: the disease effect's log volume change of the anatomy, growth positive,
computed from the actual integrated field as ``-log det(I + grad u_d)``, exact in the space
of the image it is applied to (:func:`counterwarp.geometry.volume.log_volume_change`). In a
subject's own image space it is ``truth_d(phi_s(p))`` (chain rule; exact up to linear
interpolation). Healthy subjects have an all-zero truth map. The age effect is *not* part of
the truth: it is not the disease.

Grids and images:

- 3D (default ``(32, 32, 32)``, any 3D shape): isotropic voxels, RAS-aligned axes
  (axis 0 = x left->right, 1 = y posterior->anterior, 2 = z inferior->superior), voxel size
  chosen so that the whole brain mask fits with a small margin, centred on the brain's
  bounding box. The affine maps voxel indices to MNI mm.
- 2D (default ``(64, 64)``): one coronal slice at ``y = CORONAL_SLICE_Y_MM`` (through the
  hippocampi and the bodies of the lateral ventricles), a 2D array of shape ``(X, Z)``:
  axis 0 = x (left->right), axis 1 = z (inferior->superior). It is saved as a 2D NIfTI whose
  4x4 affine maps ``(i, j, 0)`` to ``(x, y0, z)`` mm. To display: ``imshow(a.T,
  origin="lower")``. Deformations are in-plane.

Output folder layout (all files written atomically; an existing cohort in ``out`` is
overwritten file by file; files of an earlier, larger cohort that this run does not write
are left in place, the manifest is authoritative; a file that no counterwarp command wrote
into ``out`` is never replaced without ``overwrite=True``):

- ``images/<id>.nii.gz``: float32 image, ``id`` = ``sub-0001`` ...
- ``manifest.csv``: ``path,label,subject,severity,age`` (path relative to the manifest
  folder; label 0 healthy / 1 diseased; severity 0 for healthy; age in years).
- ``truth/<id>_log_volume_change.nii.gz``: float32 true log volume change in the subject's
  image space (natural log, growth positive; zero for healthy subjects). Not masked to the
  brain: restrict scoring to non-zero image voxels.
- ``truth/effect_log_volume_change.nii.gz``: the effect in template space at
  ``severity = 1`` times ``effect``.
- ``truth/effect_regions.nii.gz`` (int16; 0 outside, ``i`` = ``i``-th region of the spec,
  1-based) and ``truth/effect_regions.csv`` (``label,name,log_volume_change,
  mean_true_log_volume_change``: the spec's nominal value at unit severity and effect, and
  the mean of the template-space truth map inside the region).
- ``truth/brain_mask.nii.gz``: the anatomy's brain mask on the grid (uint8).
- ``cohort.json``: every parameter (``anatomy`` included), the spec, grid spacing and affine.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from counterwarp._io import (
    save_nifti_atomic,
    write_json_atomic,
    write_text_atomic,
    writing_folder,
)
from counterwarp._io.provenance import PROVENANCE_NAME, record
from counterwarp.data.anatomy import (
    DEFAULT_ANATOMY,
    anatomy_arrays,
    anatomy_description,
    check_anatomy,
)
from counterwarp.data.effects import (
    SCALING_SQUARING_STEPS,
    TAPER_OUTER,
    EffectSpec,
    bump,
    default_effect_spec,
    effect_deformation,
    integrate_velocity_array,
    load_effect_spec,
    normalised_radius,
    region_label_map,
    scaling_velocity,
)
from counterwarp.data.manifest import MANIFEST_NAME
from counterwarp.data.template import (
    CORONAL_SLICE_Y_MM,
    SyntheticGrid,
    Template,
    make_grid,
    sample_at,
)
from counterwarp.data.truth import (
    BRAIN_MASK_NAME,
    COHORT_NAME,
    EFFECT_NAME,
    REGIONS_NAME,
    REGIONS_TABLE_NAME,
    TRUTH_DIR,
    subject_truth_name,
)
from counterwarp.errors import CounterwarpError

__all__ = ["synth"]


SEVERITY_RANGE = (0.5, 1.5)
AGE_MEAN_HEALTHY = 68.0
AGE_MEAN_DISEASED = 72.0
AGE_SD = 6.0
AGE_RANGE = (55.0, 90.0)
#: Age confound, per year above AGE_RANGE[0]: log volume change of the whole brain and of
#: the lateral ventricles.
AGE_BRAIN_LVC_PER_YEAR = -0.002
AGE_VENTRICLE_LVC_PER_YEAR = 0.004

SUBJECT_WARP_RMS_MM = 2.5
SUBJECT_WARP_SMOOTH_MM = 24.0
BIAS_LOG_SD = 0.08
BIAS_SMOOTH_MM = 40.0
NOISE_SD = 0.02


def _compose(points: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """``points + u(points)``: points ``(d, *shape)`` in voxels, ``u`` ``(d, *shape)``."""
    moved = np.empty_like(points)
    for i in range(points.shape[0]):
        moved[i] = points[i] + sample_at(displacement[i], points)
    return moved


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit RMS, ``shape``."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return noise / max(float(np.sqrt(np.mean(noise**2))), 1e-12)



# --------------------------------------------------------------------------- the cohort


def _check_arguments(
    n: int, diseased_fraction: float, effect: float, seed: int
) -> tuple[int, float, float, int]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise CounterwarpError(f"n must be an integer >= 2 (one subject per group), got {n!r}")
    try:
        fraction = float(diseased_fraction)
    except (TypeError, ValueError):
        raise CounterwarpError(
            f"diseased_fraction must be a number, got {diseased_fraction!r}"
        ) from None
    if not 0.0 < fraction < 1.0:
        raise CounterwarpError(
            f"diseased_fraction must lie strictly between 0 and 1, got {diseased_fraction!r}"
        )
    try:
        strength = float(effect)
    except (TypeError, ValueError):
        raise CounterwarpError(f"effect must be a number, got {effect!r}") from None
    if not math.isfinite(strength) or strength < 0:
        raise CounterwarpError(
            f"effect must be a finite number >= 0 (1 = the spec's strength), got {effect!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CounterwarpError(f"seed must be a non-negative integer, got {seed!r}")
    return int(n), fraction, strength, int(seed)


def _age_velocity(age: float, grid: SyntheticGrid, brain_centre_mm: np.ndarray) -> np.ndarray:
    """Velocity ``(d, *shape)`` of the age confound: global shrinkage + ventricle growth."""
    return age_confound_velocity(max(0.0, age - AGE_RANGE[0]), grid, brain_centre_mm)


def age_confound_velocity(
    years: float, grid: SyntheticGrid, brain_centre_mm: np.ndarray, ventricles: bool = True
) -> np.ndarray:
    """Velocity ``(d, *shape)`` (voxels) of ``years`` of the age confound.

    The whole brain shrinks about ``brain_centre_mm`` (its outline moves inwards) by
    ``AGE_BRAIN_LVC_PER_YEAR`` per year and, with ``ventricles``, the lateral ventricles
    grow by ``AGE_VENTRICLE_LVC_PER_YEAR`` per year. Linear in ``years`` (negative years
    undo it).
    """
    velocity = scaling_velocity(
        brain_centre_mm, np.ones(grid.shape), AGE_BRAIN_LVC_PER_YEAR * years, grid
    )
    if ventricles:
        mm = grid.mm_coordinates()
        for region in default_effect_spec().regions[:2]:  # the lateral ventricles
            weight = bump(normalised_radius(region, mm))
            lvc = AGE_VENTRICLE_LVC_PER_YEAR * years
            velocity += scaling_velocity(region.center_mm, weight, lvc, grid)
    return velocity


def _nifti(data: np.ndarray, grid: SyntheticGrid, dtype: Any = np.float32) -> Any:
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), grid.affine)
    image.header.set_xyzt_units("mm")
    return image


def synth(
    out: str | os.PathLike[str],
    n: int = 200,
    shape: Sequence[int] | None = None,
    dim: int = 3,
    diseased_fraction: float = 0.5,
    effect: float = 1.0,
    seed: int = 0,
    effect_spec: EffectSpec | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    anatomy: str = DEFAULT_ANATOMY,
) -> Path:
    """Generate a synthetic cohort with ground-truth volume change; return the manifest path.

    Args:
        out: output folder (created; an existing cohort there is overwritten).
        n: number of subjects (>= 2). ``round(n * diseased_fraction)`` are diseased
            (at least one per group).
        shape: ``(X, Y, Z)`` for ``dim=3`` (default ``(32, 32, 32)``) or ``(X, Z)`` for
            ``dim=2`` (default ``(64, 64)``), voxels, each at least ``MIN_SIZE``.
        dim: 3 for volumes, 2 for one coronal slice at ``y = CORONAL_SLICE_Y_MM``.
        diseased_fraction: share of diseased subjects, strictly between 0 and 1.
        effect: multiplies the spec's log volume changes (0 = no effect, >= 0).
        seed: non-negative integer; the same seed gives identical files.
        effect_spec: None (:func:`default_effect_spec`), an :class:`EffectSpec`, a dict, or
            a path to a JSON file.
        progress: show a tqdm progress bar.
        overwrite: replace files in ``out`` that no counterwarp command wrote there
            (without it such a file is refused, and ``out`` is left as it was).
        anatomy: ``"mni152"`` (the nilearn MNI152 template, the default) or ``"colin27"``
            (the Colin27 skull-stripped T1: ``ch2bet.nii.gz`` in ``$COUNTERWARP_MRICRON_DIR``
            or ``/usr/share/mricron/templates``, from ``apt-get install mricron-data``).

    Returns:
        Path of ``out/manifest.csv``. See the module docstring for every file written.

    Writing holds ``out``'s lock (a second writer is refused). Files a previous ``synth``
    wrote into ``out`` are replaced; any other file that this cohort would replace is
    refused unless ``overwrite``. A failure while writing (a full disk, a refused file)
    removes what this call wrote and restores what it replaced.
    """
    n, fraction, strength, seed = _check_arguments(n, diseased_fraction, effect, seed)
    spec = load_effect_spec(effect_spec)
    grid = make_grid(shape, dim)
    arrays = anatomy_arrays(check_anatomy(anatomy))  # a missing file fails before writing
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"output {out} exists and is not a folder; choose another --out")
    with writing_folder(out, "a cohort", overwrite=overwrite,
                        hint="move it away, choose another --out, or pass --overwrite"):
        template = Template(grid, arrays)
        return _write_cohort(
            out, n, fraction, strength, seed, spec, grid, progress, template, anatomy
        )


def _write_cohort(
    out: Path, n: int, fraction: float, strength: float, seed: int, spec: EffectSpec,
    grid: SyntheticGrid, progress: bool, template: Template, anatomy: str,
) -> Path:
    """The body of :func:`synth` (arguments checked), run while holding ``out``'s lock."""
    from tqdm.auto import tqdm

    from counterwarp import __version__

    d = grid.dim
    width = max(4, len(str(n)))

    # cohort-level draws: who is diseased
    n_diseased = min(max(int(round(n * fraction)), 1), n - 1)
    cohort_rng = np.random.default_rng([seed])
    labels = np.zeros(n, dtype=np.int64)
    labels[cohort_rng.permutation(n)[:n_diseased]] = 1

    # template-space maps
    identity = grid.voxel_coordinates()
    _, brain = template.sample(identity)
    brain_centre_mm = grid.voxels_to_mm(np.argwhere(brain).mean(axis=0).reshape(d, 1))[:, 0]
    regions = region_label_map(spec, grid)
    if not (regions > 0).any():
        where = f"the coronal slice at y = {CORONAL_SLICE_Y_MM} mm" if d == 2 else "the grid"
        raise CounterwarpError(
            f"none of the effect regions {[r.name for r in spec.regions]} intersects {where}; "
            "move their center_mm into the brain" + (" or use dim=3" if d == 2 else "")
        )
    _, unit_truth = effect_deformation(spec, grid, strength)
    truth_dir = out / TRUTH_DIR
    save_nifti_atomic(truth_dir / EFFECT_NAME, _nifti(unit_truth, grid))
    save_nifti_atomic(truth_dir / REGIONS_NAME, _nifti(regions, grid, np.int16))
    save_nifti_atomic(truth_dir / BRAIN_MASK_NAME, _nifti(brain, grid, np.uint8))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["label", "name", "log_volume_change", "mean_true_log_volume_change"])
    for index, region in enumerate(spec.regions, start=1):
        inside = regions == index
        mean = float(unit_truth[inside].mean()) if inside.any() else float("nan")
        writer.writerow([index, region.name, region.log_volume_change, f"{mean:.6f}"])
    write_text_atomic(truth_dir / REGIONS_TABLE_NAME, table.getvalue())

    rows = []
    sigma_warp = SUBJECT_WARP_SMOOTH_MM / grid.spacing_mm
    sigma_bias = BIAS_SMOOTH_MM / grid.spacing_mm
    for index in tqdm(range(n), desc="synth", unit="subject", disable=not progress):
        subject = f"sub-{index + 1:0{width}d}"
        label = int(labels[index])
        rng = np.random.default_rng([seed, index + 1])
        severity = float(rng.uniform(*SEVERITY_RANGE)) if label else 0.0
        age_mean = AGE_MEAN_DISEASED if label else AGE_MEAN_HEALTHY
        age = float(np.clip(rng.normal(age_mean, AGE_SD), *AGE_RANGE))
        age = round(age, 1)

        warp_velocity = np.stack([_smooth_noise(rng, grid.shape, sigma_warp) for _ in range(d)])
        warp_velocity *= SUBJECT_WARP_RMS_MM / grid.spacing_mm
        bias = np.exp(BIAS_LOG_SD * _smooth_noise(rng, grid.shape, sigma_bias))
        noise = rng.normal(0.0, NOISE_SD, size=(2, *grid.shape))

        # age confound + anatomical variability: one velocity field, one map phi_s
        warp_velocity += _age_velocity(age, grid, brain_centre_mm)
        points = identity + integrate_velocity_array(warp_velocity)  # phi_s(p)
        if label and severity * strength > 0:
            disease_disp, disease_truth = effect_deformation(spec, grid, severity * strength)
            truth = sample_at(disease_truth, points)
            points = _compose(points, disease_disp)  # phi_d(phi_s(p))
        else:
            truth = np.zeros(grid.shape)
        intensity, inside = template.sample(points)
        signal = intensity * bias
        image = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2) * inside

        save_nifti_atomic(out / "images" / f"{subject}.nii.gz", _nifti(image, grid))
        save_nifti_atomic(truth_dir / subject_truth_name(subject), _nifti(truth, grid))
        rows.append([f"images/{subject}.nii.gz", label, subject, f"{severity:.6f}", f"{age:.1f}"])

    cohort = {
        "generator": "counterwarp.data.synthetic",
        "version": __version__,
        "n": n,
        "n_diseased": n_diseased,
        "dim": d,
        "shape": list(grid.shape),
        "diseased_fraction": fraction,
        "effect": strength,
        "seed": seed,
        "anatomy": anatomy,
        "spacing_mm": grid.spacing_mm,
        "affine": grid.affine.tolist(),
        "coronal_slice_y_mm": CORONAL_SLICE_Y_MM if d == 2 else None,
        "effect_spec": spec.to_dict(),
        "settings": {
            "severity_range": list(SEVERITY_RANGE),
            "age_mean_healthy": AGE_MEAN_HEALTHY,
            "age_mean_diseased": AGE_MEAN_DISEASED,
            "age_sd": AGE_SD,
            "age_range": list(AGE_RANGE),
            "age_brain_log_volume_change_per_year": AGE_BRAIN_LVC_PER_YEAR,
            "age_ventricle_log_volume_change_per_year": AGE_VENTRICLE_LVC_PER_YEAR,
            "subject_warp_rms_mm": SUBJECT_WARP_RMS_MM,
            "subject_warp_smooth_mm": SUBJECT_WARP_SMOOTH_MM,
            "bias_log_sd": BIAS_LOG_SD,
            "bias_smooth_mm": BIAS_SMOOTH_MM,
            "noise_sd": NOISE_SD,
            "taper_outer": TAPER_OUTER,
            "scaling_squaring_steps": SCALING_SQUARING_STEPS,
            "template": anatomy_description(anatomy),
        },
        "truth": "log volume change of the anatomy (natural log, growth positive) caused by "
        "the disease effect, in each subject's image space; age effect excluded",
    }
    write_json_atomic(out / COHORT_NAME, cohort)
    write_json_atomic(out / PROVENANCE_NAME, record(seed=seed, anatomy=anatomy))
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["path", "label", "subject", "severity", "age"])
    writer.writerows(rows)
    return write_text_atomic(out / MANIFEST_NAME, manifest.getvalue())
