"""How one volume is drawn: images with their affine, the cut rule, the colour scales.

Every figure of a volume (:mod:`counterwarp.report.figures`) is made of displays drawn by
:func:`draw_volume`: one nilearn display (``plot_anat`` of the anatomy, then
``add_overlay`` of a map) in a rectangle of a matplotlib ``Figure`` with an Agg canvas.
pyplot never creates a figure, so no global figure state is left behind.

World space
    Arrays are in the voxel order of their ``(4, 4)`` voxel-to-world affine (mm), e.g.
    ``LoadedVolume.model_affine`` of the model grid. nilearn reorients every image to RAS
    world space before drawing, so a picture follows the affine, not the storage order:
    horizontal = x (left on the left, neurological convention) or y (posterior on the
    left, sagittal views); vertical = z (superior up) or y (anterior up, axial views).
    Each view carries its letters: L/R from nilearn, P/A and S/I added here. Without an
    affine the grid is read as RAS with 1 mm voxels. A 2D ``(X, Z)`` array is a slice one
    voxel thick: its affine maps ``(i, j, 0)`` to mm (as ``counterwarp synth --dim 2`` and
    ``LoadedVolume.model_affine`` of a 2D file give it); without one it is a coronal slice
    at y = 0 mm (``i`` -> x, ``j`` -> z).

Cut rule
    All views of one subject are cut at :func:`subject_cut_coords`: the centre of mass of
    the brain (``anatomy != 0``), snapped to the nearest voxel centre of the RAS-reoriented
    grid, in mm (nilearn's own default for an anatomy is its centre of mass too). It
    depends on the anatomy and its affine only, never on a map, so the ``remove`` and
    ``inject`` panels, the saliency panel and the benchmark figure of a subject, drawn in
    separate calls, are cut at the same world point. For 2D it is the slice's position
    along its normal. Every figure function also takes explicit ``cut_coords``.

Colour scales (:class:`ColourScale`)
    - volume change: percent, ``100 (exp(log_volume_change) - 1)``, diverging ``RdBu_r``
      on a FIXED symmetric range ``+-DEFAULT_VOLUME_CHANGE_LIMIT`` (50 %) unless a caller
      passes another; stronger changes saturate. Being fixed, the scale is the same for
      both directions of a subject and for every subject. ``|change| < 1 %`` is
      transparent.
    - saliency: each method's ``|attribution|`` divided by its 99.5th percentile within
      the brain and clipped to [0, 1] (:func:`normalised_saliency`), so every method
      shares one 0..1 scale (``hot``); values below 0.1 are transparent.
    - anatomy: grey from the 1st to the 99.5th percentile of the brain voxels of the
      subject's image (the simulated image reuses the original's range).
    - intensity difference: ``+-DEFAULT_DIFFERENCE_LIMIT`` z-score units, fixed.
    Maps are shown over the anatomy and only inside the brain (``anatomy != 0``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from counterwarp._io import atomic_path
from counterwarp.errors import CounterwarpError

DEFAULT_VOLUME_CHANGE_LIMIT = 50.0
"""Colour limit of volume-change maps, percent: the scale is fixed at +-50 %."""
VOLUME_CHANGE_THRESHOLD = 1.0
"""Volume changes below this many percent (absolute) are transparent."""
SALIENCY_PERCENTILE = 99.5
"""Each saliency map is divided by this percentile of its ``|value|`` within the brain."""
SALIENCY_THRESHOLD = 0.1
"""Normalised saliency below this is transparent."""
DEFAULT_DIFFERENCE_LIMIT = 2.0
"""Colour limit of ``simulated - original`` intensity maps, z-score units."""
ANATOMY_PERCENTILES = (1.0, 99.5)
"""Grey range of the anatomy: these percentiles of its brain voxels."""

_TEXT = "white"
_LABEL_INCHES = 0.55  # right margin kept for a colour bar's label


@dataclass(frozen=True)
class ColourScale:
    """How a map is coloured: colour map, range, transparency threshold and bar label."""

    cmap: str
    vmin: float
    vmax: float
    threshold: float
    label: str


def volume_change_scale(limit: float | None = None) -> ColourScale:
    """Percent volume change on ``[-limit, limit]`` (default the fixed 50 %)."""
    fixed = limit is None
    limit = DEFAULT_VOLUME_CHANGE_LIMIT if limit is None else float(limit)
    if not (np.isfinite(limit) and limit > 0):
        raise CounterwarpError(f"volume change limit must be a number > 0 (%), got {limit!r}")
    how = "fixed" if fixed else "set"
    return ColourScale("RdBu_r", -limit, limit, min(VOLUME_CHANGE_THRESHOLD, 0.5 * limit),
                       f"volume change (%)\nscale {how} at ±{limit:g} %")


def saliency_scale() -> ColourScale:
    """Normalised saliency on [0, 1] (see :func:`normalised_saliency`)."""
    return ColourScale("hot", 0.0, 1.0, SALIENCY_THRESHOLD,
                       f"|attribution| / its {SALIENCY_PERCENTILE:g}th\npercentile in the brain")


def difference_scale(limit: float = DEFAULT_DIFFERENCE_LIMIT) -> ColourScale:
    """``simulated - original`` intensity on ``[-limit, limit]`` z-score units."""
    return ColourScale("RdBu_r", -limit, limit, 0.02 * limit,
                       f"simulated - original\n(z-score, ±{limit:g})")


# ------------------------------------------------------------------------------- values


def percent_volume_change(log_volume_change: np.ndarray) -> np.ndarray:
    """Percent volume change ``100 * (exp(x) - 1)`` of a natural-log volume change map."""
    return 100.0 * np.expm1(np.asarray(log_volume_change, dtype=np.float64))


def symmetric_limit(values: np.ndarray, percentile: float = 99.5) -> float:
    """A colour-bar limit symmetric around zero that ignores rare outliers."""
    finite = np.abs(values[np.isfinite(values)])
    if finite.size == 0:
        return 1.0
    limit = float(np.percentile(finite, percentile))
    return limit if limit > 0 else 1.0


def normalised_saliency(values: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``|values|`` divided by its :data:`SALIENCY_PERCENTILE` in ``brain``, clipped to [0, 1].

    Args:
        values: ``(*S)`` attribution in any unit.
        brain: ``(*S)`` bool brain mask; outside it the result is 0.

    Returns:
        ``(*S)`` float64 in [0, 1]. A map that is zero in the brain stays zero; one whose
        percentile is 0 is divided by its maximum instead.
    """
    magnitude = np.where(brain, np.abs(np.nan_to_num(np.asarray(values, np.float64))), 0.0)
    inside = magnitude[brain]
    scale = float(np.percentile(inside, SALIENCY_PERCENTILE)) if inside.size else 0.0
    if scale <= 0:
        scale = float(inside.max()) if inside.size else 0.0
    return np.clip(magnitude / scale, 0.0, 1.0) if scale > 0 else magnitude


def anatomy_range(anatomy: np.ndarray) -> tuple[float, float]:
    """Grey range of an anatomy: :data:`ANATOMY_PERCENTILES` of its non-zero voxels."""
    values = np.asarray(anatomy, np.float64)
    inside = values[values != 0]
    source = inside if inside.size else values.ravel()
    low, high = (float(v) for v in np.percentile(source, ANATOMY_PERCENTILES))
    return (low, high) if high > low else (low, low + 1.0)


# ------------------------------------------------------------------------------- images


def _full_affine(shape: tuple[int, ...], affine: np.ndarray | None) -> np.ndarray:
    """The ``(4, 4)`` affine of the 3D image that holds an array of ``shape`` (2D or 3D)."""
    if affine is None:
        if len(shape) == 3:
            return np.eye(4)
        return np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
    out = np.asarray(affine, dtype=np.float64)
    if out.shape != (4, 4) or not np.all(np.isfinite(out)):
        raise CounterwarpError(f"an affine must be a finite (4, 4) matrix, got {out.shape}")
    out = out.copy()
    if abs(np.linalg.det(out[:3, :3])) < 1e-12 and len(shape) == 2:
        normal = np.cross(out[:3, 0], out[:3, 1])  # a 2D file may store a zero third column
        out[:3, 2] = normal / max(float(np.linalg.norm(normal)), 1e-12)
    if abs(np.linalg.det(out[:3, :3])) < 1e-12:
        raise CounterwarpError("the affine is singular: its voxel axes do not span 3D")
    return out


def volume_image(values: np.ndarray, affine: np.ndarray | None = None) -> Any:
    """A 3D ``nibabel.Nifti1Image`` of ``values`` (float32) with its world affine.

    Args:
        values: ``(X, Y, Z)`` volume, or ``(X, Z)`` slice stored as ``(X, Z, 1)``.
        affine: ``(4, 4)`` voxel-to-world matrix (mm); None: see the module docstring.
    """
    import nibabel as nib

    array = np.asarray(values)
    if array.ndim not in (2, 3):
        raise CounterwarpError(f"a volume must be 2D or 3D, got shape {array.shape}")
    full = _full_affine(array.shape, affine)
    data = array[:, :, None] if array.ndim == 2 else array
    return nib.Nifti1Image(np.asarray(data, dtype=np.float32), full)


def display_mode(shape: tuple[int, ...], affine: np.ndarray | None = None) -> str:
    """nilearn display mode: ``"ortho"`` for 3D, the slice's normal axis (x/y/z) for 2D."""
    if len(shape) == 3:
        return "ortho"
    normal = _full_affine(shape, affine)[:3, 2]
    return "xyz"[int(np.argmax(np.abs(normal)))]


def subject_cut_coords(
    anatomy: np.ndarray, affine: np.ndarray | None = None
) -> tuple[float, ...]:
    """World cut coordinates (mm) of a subject: its brain's centre of mass, on a voxel centre.

    Args:
        anatomy: ``(X, Y, Z)`` or ``(X, Z)`` image; brain = voxels ``!= 0`` (the whole grid
            when none are).
        affine: ``(4, 4)`` voxel-to-world matrix (mm); None: see the module docstring.

    Returns:
        ``(x, y, z)`` mm for 3D; ``(c,)`` for 2D, the slice's world coordinate along its
        normal. The centre is snapped to the nearest voxel centre of the grid reoriented to
        RAS (ties upward in world coordinates), so copies of one volume stored in other
        voxel orders give the same point.
    """
    import nibabel as nib

    array = np.asarray(anatomy)
    mask = volume_image((array != 0).astype(np.float32), affine)
    canonical = nib.as_closest_canonical(mask)
    brain = np.asarray(canonical.dataobj) > 0.5
    if not brain.any():
        brain = np.ones(brain.shape, bool)
    centre = np.argwhere(brain).mean(axis=0)
    voxel = np.floor(centre + 0.5 + 1e-9)
    world = canonical.affine @ np.array([*voxel, 1.0])
    if array.ndim == 2:
        return (float(world["xyz".index(display_mode(array.shape, affine))]),)
    return tuple(float(c) for c in world[:3])


# ------------------------------------------------------------------------------- drawing


def new_figure(width: float, height: float) -> Figure:
    """A black matplotlib ``Figure`` of ``width`` x ``height`` inches on an Agg canvas."""
    figure = Figure(figsize=(width, height), facecolor="black")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 90) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, facecolor=figure.get_facecolor())
    return path


def _letters(display: Any) -> None:
    """Add P/A to sagittal and S/I or A/P (vertical) to every view (nilearn draws L/R)."""
    for cut in display.axes.values():
        ax, direction = cut.ax, cut.direction
        style = {"transform": ax.transAxes, "color": _TEXT, "size": 8, "weight": "bold"}
        if direction == "x":
            ax.text(0.02, 0.5, "P", ha="left", va="center", **style)
            ax.text(0.98, 0.5, "A", ha="right", va="center", **style)
        top, bottom = ("A", "P") if direction == "z" else ("S", "I")
        ax.text(0.5, 0.99, top, ha="center", va="top", **style)
        ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)


def draw_volume(
    figure: Figure,
    rect: tuple[float, float, float, float],
    anatomy: np.ndarray,
    cut_coords: tuple[float, ...],
    *,
    affine: np.ndarray | None = None,
    gray: tuple[float, float] | None = None,
    overlay: np.ndarray | None = None,
    scale: ColourScale | None = None,
    anatomy_label: str | None = None,
    title: str | None = None,
) -> Any:
    """Draw one nilearn display: the anatomy, optionally a map over it, one colour bar.

    Args:
        figure: the figure to draw into (see :func:`new_figure`).
        rect: ``(left, bottom, width, height)`` in figure fractions.
        anatomy: ``(*S)`` background image; its zero voxels (outside the brain) are black.
        cut_coords: world cut coordinates in mm (see :func:`subject_cut_coords`).
        affine: ``(4, 4)`` voxel-to-world matrix of both arrays (mm).
        gray: anatomy grey range; default :func:`anatomy_range` of ``anatomy``.
        overlay: ``(*S)`` map in the units of ``scale``; only voxels with ``anatomy != 0``
            are drawn.
        scale: colours of ``overlay`` and its colour bar label (required with ``overlay``).
        anatomy_label: without ``overlay``, the label of the anatomy's grey colour bar
            (None: no bar).
        title: text in the display's corner.

    Returns:
        The nilearn display: ``display.cut_coords`` in mm, ``display.axes`` its cuts (each
        with ``.direction``, one of x / y / z, and the matplotlib ``.ax``).
    """
    from nilearn import plotting

    values = np.asarray(anatomy, dtype=np.float64)
    brain = values != 0
    left, bottom, width, height = rect
    if overlay is not None or anatomy_label is not None:  # room for the bar's label
        width -= min(0.5 * width, _LABEL_INCHES / float(figure.get_size_inches()[0]))
    rect = (left, bottom, width, height)
    low, high = anatomy_range(values) if gray is None else gray
    background = volume_image(np.where(brain, values, low), affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nilearn's notes on non-finite / resampled data
        display = plotting.plot_anat(
            background, cut_coords=list(cut_coords),
            display_mode=display_mode(values.shape, affine), figure=figure, axes=rect,
            annotate=True, draw_cross=False, black_bg=True, dim=0, decimals=1,
            vmin=low, vmax=high, colorbar=overlay is None and anatomy_label is not None,
        )
        if overlay is not None:
            if scale is None:
                raise CounterwarpError("draw_volume: an overlay needs its colour scale")
            shown = np.where(brain, np.nan_to_num(np.asarray(overlay, np.float64)), 0.0)
            display.add_overlay(
                volume_image(shown, affine), threshold=scale.threshold, colorbar=True,
                cmap=scale.cmap, vmin=scale.vmin, vmax=scale.vmax,
                cbar_vmin=scale.vmin, cbar_vmax=scale.vmax,
            )
    label = scale.label if overlay is not None and scale is not None else anatomy_label
    bar = getattr(display, "_cbar", None)  # nilearn keeps the colour bar it drew here
    if bar is not None and label:
        low_tick, high_tick = (scale.vmin, scale.vmax) if overlay is not None and scale else (
            low, high)
        bar.set_ticks(np.linspace(low_tick, high_tick, 5))  # not nilearn's threshold ticks
        bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        bar.ax.tick_params(labelsize=7, colors=_TEXT)
        bar.set_label(label, color=_TEXT, fontsize=7)
        bar.ax.yaxis.set_label_position("right")
    if title:
        display.title(title, size=9, color=_TEXT, bgcolor="black")
    _letters(display)
    return display


def colorbar_label(display: Any) -> str | None:
    """The label of the colour bar a display drew, or None when it drew none."""
    bar = getattr(display, "_cbar", None)
    return None if bar is None else str(bar.ax.get_ylabel())


def colorbar_range(display: Any) -> tuple[float, float] | None:
    """``(vmin, vmax)`` of the colour bar a display drew, or None when it drew none."""
    bar = getattr(display, "_cbar", None)
    if bar is None:
        return None
    return float(bar.norm.vmin), float(bar.norm.vmax)


@dataclass
class Drawing:
    """A drawn figure and its displays, by panel name, for saving or inspection.

    Attributes:
        figure: the matplotlib figure (Agg canvas).
        displays: panel name -> nilearn display.
        cut_coords: world cut coordinates (mm) shared by every display.
    """

    figure: Figure
    displays: dict[str, Any] = field(default_factory=dict)
    cut_coords: tuple[float, ...] = ()

    def colorbar_labels(self) -> dict[str, str]:
        """Panel name -> colour bar label, for the panels that have a colour bar."""
        labels = {name: colorbar_label(d) for name, d in self.displays.items()}
        return {name: label for name, label in labels.items() if label is not None}

    def save(self, path: str | Path, dpi: int = 90) -> Path:
        """Write the PNG atomically; returns the path."""
        return save_figure(self.figure, path, dpi)


def cuts_note(cut_coords: tuple[float, ...], affine: np.ndarray | None, rule: str) -> str:
    """One line stating the cut coordinates and their units, for a figure's footer."""
    space = "mm" if affine is not None else "mm of a 1 mm voxel grid (no affine given)"
    where = ", ".join(f"{c:.1f}" for c in cut_coords)
    return f"cuts at ({where}) {space}: {rule}"
