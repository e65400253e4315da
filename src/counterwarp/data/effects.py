"""The disease effect of synthetic cohorts: its schema and the deformation it makes.

An :class:`EffectSpec` lists ellipsoidal regions, each with a log volume change (by default:
lateral ventricles grow, hippocampi shrink). Each region contributes a scaling of the anatomy
about its centre, weighted by a smooth bump (1 inside the ellipsoid, a raised-cosine taper to
0 at ``TAPER_OUTER`` radii, so the surrounding tissue absorbs the change); the contributions
add into one stationary velocity field, integrated by scaling and squaring into a
diffeomorphic pull-back displacement ``x'(p) = x(p + u(p))`` (see ``docs/method.md``). The
true log volume change of the anatomy is ``-log det(I + grad u)`` of the integrated field.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from counterwarp.data.template import SyntheticGrid
from counterwarp.errors import CounterwarpError

__all__ = [
    "SCALING_SQUARING_STEPS",
    "TAPER_OUTER",
    "EffectRegion",
    "EffectSpec",
    "default_effect_spec",
    "effect_deformation",
    "effect_velocity",
    "integrate_velocity_array",
    "load_effect_spec",
    "region_label_map",
]

# Bump of a region: 1 inside the ellipsoid (normalised radius r <= 1), a raised-cosine
# taper down to 0 at r = TAPER_OUTER. The surrounding tissue in the taper absorbs the
# volume change (it is compressed around a growing region, stretched around a shrinking one).
TAPER_OUTER = 1.8
SCALING_SQUARING_STEPS = 7


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
    """Return an :class:`EffectSpec` from None (the default), a spec, a dict, a JSON path or
    a built-in name.

    A string or path that names an existing file is read as JSON. One that does not, but
    equals the name of a built-in spec (see
    :func:`counterwarp.data.effect_library.builtin_effect_names`, e.g. ``"asymmetric"``),
    gives that built-in. Anything else is a missing file: the error names it and lists the
    built-in names.
    """
    if spec is None:
        return default_effect_spec()
    if isinstance(spec, EffectSpec):
        return EffectSpec(regions=list(spec.regions))
    if isinstance(spec, Mapping):
        return EffectSpec.from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        from counterwarp.data.effect_library import (  # lazy: effect_library imports us
            builtin_effect_names,
            builtin_effect_spec,
        )

        path = Path(spec)
        if path.exists():
            return EffectSpec.from_json(path)
        if os.fspath(spec) in builtin_effect_names():
            return builtin_effect_spec(os.fspath(spec))
        try:
            return EffectSpec.from_json(path)
        except CounterwarpError as error:
            raise CounterwarpError(
                f"{error}; not a built-in effect spec either (built-in: "
                f"{', '.join(builtin_effect_names())})"
            ) from error
    raise CounterwarpError(
        "effect_spec must be None, an EffectSpec, a path to a JSON file or a built-in name, "
        f"got {spec!r}"
    )


def bump(r: np.ndarray) -> np.ndarray:
    """1 for r <= 1, raised cosine to 0 at r = TAPER_OUTER, 0 beyond."""
    t = np.clip((r - 1.0) / (TAPER_OUTER - 1.0), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def normalised_radius(region: EffectRegion, mm: np.ndarray) -> np.ndarray:
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
    radii = np.stack([normalised_radius(region, mm) for region in spec.regions])
    labels = (np.argmin(radii, axis=0) + 1).astype(np.int16)
    labels[radii.min(axis=0) > extent] = 0
    return labels


def scaling_velocity(
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
        weight = bump(normalised_radius(region, mm))
        lvc = scale * region.log_volume_change
        velocity += scaling_velocity(region.center_mm, weight, lvc, grid)
    return velocity


def integrate_velocity_array(
    velocity: np.ndarray, steps: int = SCALING_SQUARING_STEPS
) -> np.ndarray:
    """:func:`counterwarp.geometry.warp.integrate_velocity` for one numpy field, in float64.

    Border padding (the outermost slice continues) rather than the networks' zero padding:
    the cohorts' random subject warps do not vanish at the grid edge, and the cohorts (and
    their truth) are defined with this continuation. Runs torch on one thread, which is
    faster on these small grids.

    Args:
        velocity: ``(d, *spatial)`` stationary velocity field in voxels (d = 2 or 3);
            channel ``i`` moves along spatial dim ``i``.
        steps: number of squarings.

    Returns:
        ``(d, *spatial)`` float64 pull-back displacement of ``exp(v)`` in voxels.
    """
    import torch

    from counterwarp.geometry.warp import integrate_velocity

    d = velocity.shape[0]
    spatial = tuple(velocity.shape[1:])
    if d not in (2, 3) or len(spatial) != d:
        raise CounterwarpError(
            f"velocity must have shape (d, *spatial) with d = 2 or 3, got {velocity.shape}"
        )
    field = torch.from_numpy(np.ascontiguousarray(velocity, dtype=np.float64))[None]
    with torch.no_grad(), single_thread():
        return integrate_velocity(field, steps, padding_mode="border")[0].numpy()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: on these small grids threads only contend (10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _log_volume_change(displacement: np.ndarray) -> np.ndarray:
    import torch

    from counterwarp.geometry.volume import log_volume_change

    with torch.no_grad(), single_thread():
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
    displacement = integrate_velocity_array(effect_velocity(spec, grid, scale))
    return displacement, _log_volume_change(displacement)

