"""Built-in disease effects for synthetic cohorts, selectable by name.

Each entry of :data:`BUILTIN_EFFECTS` builds an :class:`EffectSpec` of ellipsoids in MNI152
mm with a natural-log volume change each (see :mod:`counterwarp.data.effects`). Every
ellipsoid lies inside the brain of the MNI152 template, is at least 8 mm in radius (so that
it spans two or more voxels of the default 32^3 grid, about 6 mm voxels over a ~190 mm
field) and changes the volume by at most ``exp(0.9)``. Pass a name wherever an effect spec
is accepted (``synth(effect_spec="asymmetric")``, ``counterwarp synth --effect-spec
asymmetric``); :func:`counterwarp.data.effects.load_effect_spec` resolves it when no file
of that name exists.
"""

from __future__ import annotations

from collections.abc import Callable

from counterwarp.data.effects import EffectRegion, EffectSpec, default_effect_spec
from counterwarp.errors import CounterwarpError

__all__ = [
    "BUILTIN_EFFECTS",
    "asymmetric_effect_spec",
    "builtin_effect_names",
    "builtin_effect_spec",
    "cortical_thinning_effect_spec",
    "hippocampal_atrophy_csf_effect_spec",
    "partly_read_effect_spec",
]


def cortical_thinning_effect_spec() -> EffectSpec:
    """Grey-matter loss of lateral temporal and parietal cortex, as in Alzheimer's disease.

    Alzheimer's cortical atrophy is strongest in the lateral temporal lobe (middle and
    inferior temporal gyri), the inferior parietal lobule (angular / supramarginal gyri) and
    the medial parietal cortex (precuneus / posterior cingulate), on both sides. Each site is
    one shrinking ellipsoid (log change -0.3 to -0.5, i.e. 26 % to 39 % volume loss at unit
    severity) centred a little inside the cortical surface, so that most of it lies on the
    cortical ribbon and underlying white matter while staying inside the brain mask; the
    precuneus of both hemispheres, which face each other across the midline, is one medial
    ellipsoid. The radii (8-16 mm) are larger than the ribbon is thick because at 32^3 a
    voxel is about 6 mm: a thinner ellipsoid would hold no voxel. Every change is negative:
    the effect is atrophy only, and the tissue around each region (scalp-side CSF, white
    matter) absorbs it.
    """
    return EffectSpec(
        regions=[
            EffectRegion("left_lateral_temporal", (-60.0, -28.0, -10.0), (8.0, 20.0, 10.0), -0.4),
            EffectRegion("right_lateral_temporal", (60.0, -28.0, -10.0), (8.0, 20.0, 10.0), -0.4),
            EffectRegion("left_inferior_parietal", (-50.0, -58.0, 38.0), (9.0, 12.0, 10.0), -0.35),
            EffectRegion("right_inferior_parietal", (50.0, -58.0, 38.0), (9.0, 12.0, 10.0), -0.35),
            EffectRegion("precuneus", (0.0, -60.0, 40.0), (12.0, 14.0, 12.0), -0.3),
        ]
    )


def hippocampal_atrophy_csf_effect_spec() -> EffectSpec:
    """Both hippocampi shrink and the CSF next to them grows (ex-vacuo enlargement).

    When the hippocampus atrophies, the space it leaves is filled by CSF: the temporal horn
    of the lateral ventricle, which lies lateral and superior to the hippocampus, widens, and
    so does the adjacent lower sylvian fissure / insular cistern. Each side is a pair of
    adjacent ellipsoids with opposite signs, a few mm apart so that their tapers overlap:
    the hippocampus (log change -0.5) and, lateral-superior to it, the temporal horn and
    sylvian CSF (log change +0.5). This makes a dipole-like truth map (shrinkage next to
    growth) which an explanation must resolve without blurring the two together; summed over
    both regions the change nearly cancels, so a method that only reads the total volume of
    the medial temporal lobe would miss it.
    """
    return EffectSpec(
        regions=[
            EffectRegion("left_hippocampus", (-26.0, -24.0, -14.0), (8.0, 16.0, 8.0), -0.5),
            EffectRegion("right_hippocampus", (26.0, -24.0, -14.0), (8.0, 16.0, 8.0), -0.5),
            EffectRegion("left_temporal_horn_csf", (-40.0, -16.0, -2.0), (8.0, 14.0, 8.0), 0.5),
            EffectRegion("right_temporal_horn_csf", (40.0, -16.0, -2.0), (8.0, 14.0, 8.0), 0.5),
        ]
    )


def asymmetric_effect_spec() -> EffectSpec:
    """A left-hemisphere-only effect: the left lateral ventricle grows, the left hippocampus
    shrinks, the right hemisphere is untouched.

    Models a left-lateralised disease (e.g. left-predominant temporal-lobe atrophy). The
    ventricle ellipsoid sits on the body of the left lateral ventricle and is narrower in x
    than the default's (9 mm) so that its whole support, ``TAPER_OUTER`` = 1.8 radii, ends at
    the midline (x < 0.2 mm); the hippocampus ellipsoid's support ends at x = -9 mm. So the
    true change map is zero on the right, and an explanation that flips or symmetrises the
    brain (a left/right augmentation, a mirrored saliency) is caught out.
    """
    return EffectSpec(
        regions=[
            EffectRegion("left_lateral_ventricle", (-16.0, -12.0, 14.0), (9.0, 36.0, 14.0), 0.8),
            EffectRegion("left_hippocampus", (-27.0, -22.0, -14.0), (10.0, 20.0, 10.0), -0.45),
        ]
    )


def partly_read_effect_spec() -> EffectSpec:
    """A strong, easy effect (lateral ventricles grow) plus a weak, small one (both amygdalae
    shrink a little) that a classifier may only partly read.

    The ventricles are exactly the default's (log change +0.8, clearly visible at 32^3).
    The weak part is both amygdalae shrinking by log -0.15 (14 % volume loss) in 8-9 mm
    ellipsoids, a few voxels each. The amygdalae, not the thalami, carry it because the
    thalami lie inside the default's generous ventricle ellipsoids, whose growth would swamp
    a weak thalamic shrinkage; the amygdalae lie beyond the ventricles' support (normalised
    radius > 2.2), so their truth is their own. A classifier can reach high accuracy from the
    ventricles alone; an explanation of that classifier may then show the ventricles and
    little or none of the amygdalae, which is the behaviour this spec is meant to expose.
    """
    ventricles = default_effect_spec().regions[:2]
    return EffectSpec(
        regions=[
            *ventricles,
            EffectRegion("left_amygdala", (-23.0, -5.0, -18.0), (8.0, 9.0, 8.0), -0.15),
            EffectRegion("right_amygdala", (23.0, -5.0, -18.0), (8.0, 9.0, 8.0), -0.15),
        ]
    )


#: Built-in effect specs by name; each value builds a fresh :class:`EffectSpec`.
BUILTIN_EFFECTS: dict[str, Callable[[], EffectSpec]] = {
    "default": default_effect_spec,
    "cortical_thinning": cortical_thinning_effect_spec,
    "hippocampal_atrophy_csf": hippocampal_atrophy_csf_effect_spec,
    "asymmetric": asymmetric_effect_spec,
    "partly_read": partly_read_effect_spec,
}


def builtin_effect_names() -> tuple[str, ...]:
    """The names of the built-in effect specs, in the order of :data:`BUILTIN_EFFECTS`."""
    return tuple(BUILTIN_EFFECTS)


def builtin_effect_spec(name: str) -> EffectSpec:
    """The built-in effect spec called ``name`` (a fresh object on every call).

    Raises:
        CounterwarpError: ``name`` is not a built-in; the message lists the valid names.
    """
    try:
        factory = BUILTIN_EFFECTS[name]
    except (KeyError, TypeError):
        raise CounterwarpError(
            f"unknown built-in effect spec {name!r}; choose one of "
            f"{', '.join(builtin_effect_names())}"
        ) from None
    return factory()
