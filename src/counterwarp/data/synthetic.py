"""Synthetic T1 cohorts with a known morphological effect and its ground truth.

Every subject is the MNI152 T1 template that ships with nilearn (brain-masked, no
download), resampled to a small grid, then:

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

All deformations are pull-backs ``x'(p) = x(p + u(p))`` (see ``METHOD.md``), built as
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
are left in place, the manifest is authoritative):

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
- ``truth/brain_mask.nii.gz``: the template brain mask on the grid (uint8).
- ``cohort.json``: every parameter, the spec, grid spacing and affine.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from counterwarp._io import save_nifti_atomic, write_json_atomic, write_text_atomic
from counterwarp.errors import CounterwarpError

__all__ = [
    "CORONAL_SLICE_Y_MM",
    "EffectRegion",
    "EffectSpec",
    "SyntheticGrid",
    "default_effect_spec",
    "effect_deformation",
    "effect_velocity",
    "integrate_velocity",
    "load_effect_spec",
    "make_grid",
    "region_label_map",
    "synth",
]

DEFAULT_SHAPE_3D: tuple[int, int, int] = (32, 32, 32)
DEFAULT_SHAPE_2D: tuple[int, int] = (64, 64)
#: MNI y (mm) of the coronal slice used by ``dim=2``.
CORONAL_SLICE_Y_MM = -22.0
#: Smallest allowed grid size along any axis (voxels).
MIN_SIZE = 8

# Bump of a region: 1 inside the ellipsoid (normalised radius r <= 1), a raised-cosine
# taper down to 0 at r = TAPER_OUTER. The surrounding tissue in the taper absorbs the
# volume change (it is compressed around a growing region, stretched around a shrinking one).
TAPER_OUTER = 1.8
SCALING_SQUARING_STEPS = 7
BRAIN_MARGIN_MM = 4.0

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


# --------------------------------------------------------------------------- effect spec


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise CounterwarpError(
            f"{what} must be three numbers (x, y, z in mm), got {value!r}"
        ) from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise CounterwarpError(
            f"{what} must be three finite numbers (x, y, z in mm), got {value!r}"
        )
    return values  # type: ignore[return-value]


@dataclass
class EffectRegion:
    """One ellipsoidal region of the disease effect, in MNI mm.

    Attributes:
        name: a unique, non-empty name (e.g. ``"left_hippocampus"``).
        center_mm: ``(x, y, z)`` centre in MNI mm.
        radii_mm: ``(rx, ry, rz)`` semi-axes in mm (positive). Inside the ellipsoid the
            anatomy is scaled about the centre; a smooth taper out to ``TAPER_OUTER`` times
            the radii blends the deformation into the surrounding tissue.
        log_volume_change: natural-log volume change inside the ellipsoid at unit severity
            and ``effect`` (``> 0`` grows, ``< 0`` shrinks; ``log 2`` doubles the volume).
    """

    name: str
    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    log_volume_change: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise CounterwarpError(
                f"effect region name must be a non-empty string, got {self.name!r}"
            )
        label = f"effect region {self.name!r}"
        self.center_mm = _triple(self.center_mm, f"{label}: center_mm")
        self.radii_mm = _triple(self.radii_mm, f"{label}: radii_mm")
        if any(r <= 0 for r in self.radii_mm):
            raise CounterwarpError(f"{label}: radii_mm must be positive, got {self.radii_mm}")
        try:
            lvc = float(self.log_volume_change)
        except (TypeError, ValueError):
            raise CounterwarpError(
                f"{label}: log_volume_change must be a number, got {self.log_volume_change!r}"
            ) from None
        if not math.isfinite(lvc) or abs(lvc) > 3.0:
            raise CounterwarpError(
                f"{label}: log_volume_change must be finite and within [-3, 3] (natural log; "
                f"0.7 roughly doubles the volume), got {self.log_volume_change!r}"
            )
        self.log_volume_change = lvc

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with keys ``name, center_mm, radii_mm, log_volume_change``."""
        return {
            "name": self.name,
            "center_mm": list(self.center_mm),
            "radii_mm": list(self.radii_mm),
            "log_volume_change": self.log_volume_change,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EffectRegion:
        """Build from a dict as written by :meth:`to_dict`; unknown keys are refused."""
        if not isinstance(data, Mapping):
            raise CounterwarpError(f"an effect region must be a JSON object, got {data!r}")
        keys = {"name", "center_mm", "radii_mm", "log_volume_change"}
        missing = keys - set(data)
        extra = set(data) - keys
        if missing or extra:
            raise CounterwarpError(
                f"effect region {data.get('name', '?')!r}: missing keys {sorted(missing)}, "
                f"unknown keys {sorted(extra)}; expected exactly {sorted(keys)}"
            )
        return cls(
            name=data["name"],
            center_mm=data["center_mm"],
            radii_mm=data["radii_mm"],
            log_volume_change=data["log_volume_change"],
        )


@dataclass
class EffectSpec:
    """A declarative disease effect: a list of :class:`EffectRegion` (at least one).

    JSON form: ``{"regions": [{"name": ..., "center_mm": [x, y, z], "radii_mm": [rx, ry,
    rz], "log_volume_change": v}, ...]}``.
    """

    regions: list[EffectRegion] = field(default_factory=list)

    def __post_init__(self) -> None:
        regions = list(self.regions)
        if not regions:
            raise CounterwarpError("the effect spec needs at least one region under 'regions'")
        converted = []
        for region in regions:
            if isinstance(region, Mapping):
                region = EffectRegion.from_dict(region)
            if not isinstance(region, EffectRegion):
                raise CounterwarpError(f"effect spec regions must be EffectRegion, got {region!r}")
            converted.append(region)
        names = [r.name for r in converted]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise CounterwarpError(f"effect region names must be unique; repeated: {duplicates}")
        self.regions = converted

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict ``{"regions": [...]}``."""
        return {"regions": [r.to_dict() for r in self.regions]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EffectSpec:
        """Build from ``{"regions": [...]}``."""
        if not isinstance(data, Mapping) or "regions" not in data:
            raise CounterwarpError(
                "an effect spec must be a JSON object with a 'regions' list, e.g. "
                '{"regions": [{"name": "left_ventricle", "center_mm": [-13, -12, 13], '
                '"radii_mm": [10, 30, 13], "log_volume_change": 0.6}]}'
            )
        extra = set(data) - {"regions"}
        if extra:
            raise CounterwarpError(f"effect spec: unknown keys {sorted(extra)}; only 'regions'")
        if not isinstance(data["regions"], Sequence) or isinstance(data["regions"], str):
            raise CounterwarpError("effect spec: 'regions' must be a list of region objects")
        return cls(regions=[EffectRegion.from_dict(r) for r in data["regions"]])

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> EffectSpec:
        """Read a spec from a JSON file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise CounterwarpError(f"cannot read effect spec {path}: {error}") from error
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CounterwarpError(f"effect spec {path} is not valid JSON: {error}") from error
        try:
            return cls.from_dict(data)
        except CounterwarpError as error:
            raise CounterwarpError(f"effect spec {path}: {error}") from error


def default_effect_spec() -> EffectSpec:
    """Ventricles grow, hippocampi shrink (MNI152 coordinates, generous ellipsoids).

    Each ventricle ellipsoid encloses the whole lateral ventricle of the MNI152 2009 template
    (frontal horn to atrium, x 2..28, y -48..26, z 2..28 mm); each hippocampus ellipsoid
    encloses the hippocampus and its temporal horn. The template's ventricles are thin
    (a few mm), so at 32^3 (about 6 mm voxels) what a classifier sees is mostly the
    ventricles' walls moving outwards; the regions are large so that this motion is several
    mm. At unit severity and effect the anatomy inside the ventricle ellipsoids grows by
    ``exp(0.8) = 2.2x`` and inside the hippocampus ellipsoids shrinks to
    ``exp(-0.45) = 0.64x`` (the integrated field's mean inside the regions is a little
    smaller in magnitude, see ``effect_regions.csv``). The hippocampal change is small in
    voxels at 32^3 and hard to see; the ventricular one is clearly visible.
    """
    return EffectSpec(
        regions=[
            EffectRegion("left_lateral_ventricle", (-14.0, -12.0, 14.0), (14.0, 38.0, 15.0), 0.8),
            EffectRegion("right_lateral_ventricle", (14.0, -12.0, 14.0), (14.0, 38.0, 15.0), 0.8),
            EffectRegion("left_hippocampus", (-27.0, -22.0, -14.0), (10.0, 20.0, 10.0), -0.45),
            EffectRegion("right_hippocampus", (27.0, -22.0, -14.0), (10.0, 20.0, 10.0), -0.45),
        ]
    )


def load_effect_spec(
    spec: EffectSpec | Mapping[str, Any] | str | os.PathLike[str] | None,
) -> EffectSpec:
    """Return an :class:`EffectSpec` from None (the default), a spec, a dict or a JSON path."""
    if spec is None:
        return default_effect_spec()
    if isinstance(spec, EffectSpec):
        return EffectSpec(regions=list(spec.regions))
    if isinstance(spec, Mapping):
        return EffectSpec.from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        return EffectSpec.from_json(spec)
    raise CounterwarpError(
        f"effect_spec must be None, an EffectSpec or a path to a JSON file, got {spec!r}"
    )


# --------------------------------------------------------------------------- grids


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
def _mni_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    _, mask, affine = _mni_arrays()
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


# --------------------------------------------------------------------------- deformations


def _bump(r: np.ndarray) -> np.ndarray:
    """1 for r <= 1, raised cosine to 0 at r = TAPER_OUTER, 0 beyond."""
    t = np.clip((r - 1.0) / (TAPER_OUTER - 1.0), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def _normalised_radius(region: EffectRegion, mm: np.ndarray) -> np.ndarray:
    """Ellipsoidal radius of mm points ``(3, ...)`` (1 on the region's surface)."""
    centre = np.asarray(region.center_mm).reshape((3,) + (1,) * (mm.ndim - 1))
    radii = np.asarray(region.radii_mm).reshape((3,) + (1,) * (mm.ndim - 1))
    return np.sqrt((((mm - centre) / radii) ** 2).sum(axis=0))


def region_label_map(spec: EffectSpec, grid: SyntheticGrid, extent: float = 1.0) -> np.ndarray:
    """Label map ``(*shape)`` int16: 0 outside, ``i`` inside the ``i``-th region (1-based).

    Args:
        spec: the effect regions.
        grid: the image grid.
        extent: radius multiplier; 1 gives the ellipsoids themselves, ``TAPER_OUTER`` the
            whole support of each region's deformation (including the surrounding tissue that
            absorbs the change; a growing structure's walls move out into it).

    Where ellipsoids overlap the region whose normalised radius is smallest wins.
    """
    if not extent > 0:
        raise CounterwarpError(f"extent must be positive, got {extent!r}")
    mm = grid.mm_coordinates()
    radii = np.stack([_normalised_radius(region, mm) for region in spec.regions])
    labels = (np.argmin(radii, axis=0) + 1).astype(np.int16)
    labels[radii.min(axis=0) > extent] = 0
    return labels


def _scaling_velocity(
    centre_mm: Sequence[float], weight: np.ndarray, lvc: float, grid: SyntheticGrid
) -> np.ndarray:
    """Velocity ``(d, *shape)`` (voxels) whose flow scales the anatomy about ``centre_mm``.

    Where ``weight == 1`` the time-1 pull-back map is ``p -> c + exp(-lvc / d) (p - c)``,
    i.e. a log volume change ``lvc`` of the anatomy.
    """
    d = grid.dim
    centre = grid.mm_to_voxels(centre_mm).reshape((d,) + (1,) * d)
    return -(lvc / d) * weight[None] * (grid.voxel_coordinates() - centre)


def effect_velocity(spec: EffectSpec, grid: SyntheticGrid, scale: float = 1.0) -> np.ndarray:
    """Stationary velocity field ``(d, *shape)`` in voxels of the disease effect.

    Each region contributes a scaling about its centre, weighted by a smooth bump (1 inside
    the ellipsoid, 0 beyond ``TAPER_OUTER`` radii); contributions add. ``scale``
    (``severity * effect``) multiplies every region's log volume change.
    """
    mm = grid.mm_coordinates()
    velocity = np.zeros((grid.dim, *grid.shape))
    for region in spec.regions:
        weight = _bump(_normalised_radius(region, mm))
        lvc = scale * region.log_volume_change
        velocity += _scaling_velocity(region.center_mm, weight, lvc, grid)
    return velocity


def integrate_velocity(velocity: np.ndarray, steps: int = SCALING_SQUARING_STEPS) -> np.ndarray:
    """Pull-back displacement ``exp(v)`` of a stationary velocity field, scaling and squaring.

    Same algorithm as :class:`monai.networks.blocks.DVF2DDF` (``u <- u + u o (Id + u)``,
    ``steps`` times, starting from ``v / 2**steps``), written directly on
    ``torch.nn.functional.grid_sample`` in float64 with a cached identity grid, because
    MONAI 1.6's ``Warp`` rebuilds its reference grid on every call (10x slower here).

    Args:
        velocity: ``(d, *spatial)`` stationary velocity field in voxels (d = 2 or 3);
            channel ``i`` moves along spatial dim ``i``.
        steps: number of squarings.

    Returns:
        ``(d, *spatial)`` float64 displacement in voxels (border padding at the grid edge).
    """
    import torch
    from torch.nn.functional import grid_sample

    d = velocity.shape[0]
    spatial = tuple(velocity.shape[1:])
    if d not in (2, 3) or len(spatial) != d:
        raise CounterwarpError(
            f"velocity must have shape (d, *spatial) with d = 2 or 3, got {velocity.shape}"
        )
    identity, scale = _normalised_identity(spatial)
    ddf = torch.from_numpy(np.ascontiguousarray(velocity, dtype=np.float64))[None] / 2**steps
    with torch.no_grad(), _single_thread():
        for _ in range(steps):
            # grid_sample wants (B, *spatial, d) with the last axis in reversed (x = last) order
            offset = (ddf * scale).movedim(1, -1).flip(-1)
            moved = grid_sample(
                ddf, identity + offset, mode="bilinear", padding_mode="border", align_corners=True
            )
            ddf = ddf + moved
    return ddf[0].numpy()


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread: on these small grids threads only contend (10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@lru_cache(maxsize=8)
def _normalised_identity(spatial: tuple[int, ...]) -> tuple[Any, Any]:
    """Identity grid for ``grid_sample`` (``(1, *spatial, d)``) and voxel -> [-1, 1] scales."""
    import torch

    axes = [torch.linspace(-1.0, 1.0, n, dtype=torch.float64) for n in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flip(-1)[None]
    scale = torch.tensor([2.0 / (n - 1) for n in spatial], dtype=torch.float64)
    return grid, scale.view(1, -1, *([1] * len(spatial)))


def _log_volume_change(displacement: np.ndarray) -> np.ndarray:
    import torch

    from counterwarp.geometry.volume import log_volume_change

    with torch.no_grad(), _single_thread():
        lvc = log_volume_change(torch.from_numpy(np.ascontiguousarray(displacement))[None])
    return lvc[0].numpy()


def effect_deformation(
    spec: EffectSpec, grid: SyntheticGrid, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Pull-back displacement of the disease effect and its true log volume change.

    Args:
        spec: the effect regions.
        grid: the image grid.
        scale: ``severity * effect`` (0 gives the identity).

    Returns:
        ``(displacement, log_volume_change)``: ``(d, *shape)`` float64 in voxels, and
        ``(*shape)`` float64 natural-log volume change of the anatomy (growth positive),
        ``-log det(I + grad u)``, exact in the space of the deformed image.
    """
    if scale == 0:
        zeros = np.zeros(grid.shape)
        return np.zeros((grid.dim, *grid.shape)), zeros
    displacement = integrate_velocity(effect_velocity(spec, grid, scale))
    return displacement, _log_volume_change(displacement)


def _sample(
    field: np.ndarray, points: np.ndarray, order: int = 1, cval: float | None = None
) -> np.ndarray:
    """Sample ``field`` (``(*spatial)``) at voxel points ``(d, *out)``."""
    mode = "nearest" if cval is None else "constant"
    return ndimage.map_coordinates(
        field, points, order=order, mode=mode, cval=0.0 if cval is None else cval
    )


def _compose(points: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """``points + u(points)``: points ``(d, *shape)`` in voxels, ``u`` ``(d, *shape)``."""
    moved = np.empty_like(points)
    for i in range(points.shape[0]):
        moved[i] = points[i] + _sample(displacement[i], points)
    return moved


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit RMS, ``shape``."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return noise / max(float(np.sqrt(np.mean(noise**2))), 1e-12)


# --------------------------------------------------------------------------- the template


class _Template:
    """The MNI152 template prepared for sampling at a grid's resolution."""

    def __init__(self, grid: SyntheticGrid) -> None:
        data, mask, affine = _mni_arrays()
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
        intensity = _sample(self.data, src, order=1, cval=0.0).reshape(shape)
        inside = _sample(self.mask, src, order=1, cval=0.0).reshape(shape) >= 0.5
        return intensity, inside


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
    years = max(0.0, age - AGE_RANGE[0])
    mm = grid.mm_coordinates()
    velocity = _scaling_velocity(
        brain_centre_mm, np.ones(grid.shape), AGE_BRAIN_LVC_PER_YEAR * years, grid
    )
    for region in default_effect_spec().regions[:2]:  # the lateral ventricles
        weight = _bump(_normalised_radius(region, mm))
        lvc = AGE_VENTRICLE_LVC_PER_YEAR * years
        velocity += _scaling_velocity(region.center_mm, weight, lvc, grid)
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

    Returns:
        Path of ``out/manifest.csv``. See the module docstring for every file written.
    """
    from tqdm.auto import tqdm

    from counterwarp import __version__

    n, fraction, strength, seed = _check_arguments(n, diseased_fraction, effect, seed)
    spec = load_effect_spec(effect_spec)
    grid = make_grid(shape, dim)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"output {out} exists and is not a folder; choose another --out")
    template = _Template(grid)
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
    truth_dir = out / "truth"
    save_nifti_atomic(truth_dir / "effect_log_volume_change.nii.gz", _nifti(unit_truth, grid))
    save_nifti_atomic(truth_dir / "effect_regions.nii.gz", _nifti(regions, grid, np.int16))
    save_nifti_atomic(truth_dir / "brain_mask.nii.gz", _nifti(brain, grid, np.uint8))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["label", "name", "log_volume_change", "mean_true_log_volume_change"])
    for index, region in enumerate(spec.regions, start=1):
        inside = regions == index
        mean = float(unit_truth[inside].mean()) if inside.any() else float("nan")
        writer.writerow([index, region.name, region.log_volume_change, f"{mean:.6f}"])
    write_text_atomic(truth_dir / "effect_regions.csv", table.getvalue())

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
        points = identity + integrate_velocity(warp_velocity)  # phi_s(p)
        if label and severity * strength > 0:
            disease_disp, disease_truth = effect_deformation(spec, grid, severity * strength)
            truth = _sample(disease_truth, points)
            points = _compose(points, disease_disp)  # phi_d(phi_s(p))
        else:
            truth = np.zeros(grid.shape)
        intensity, inside = template.sample(points)
        signal = intensity * bias
        image = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2) * inside

        save_nifti_atomic(out / "images" / f"{subject}.nii.gz", _nifti(image, grid))
        save_nifti_atomic(truth_dir / f"{subject}_log_volume_change.nii.gz", _nifti(truth, grid))
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
            "template": "MNI152 T1 2 mm (nilearn), brain-masked",
        },
        "truth": "log volume change of the anatomy (natural log, growth positive) caused by "
        "the disease effect, in each subject's image space; age effect excluded",
    }
    write_json_atomic(out / "cohort.json", cohort)
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["path", "label", "subject", "severity", "age"])
    writer.writerows(rows)
    return write_text_atomic(out / "manifest.csv", manifest.getvalue())
