"""Every figure of a volume: explanation, saliency, benchmark and group panels, progression GIFs.

All of them are drawn by :func:`counterwarp.report.display.draw_volume` (nilearn displays
on an Agg ``Figure``), so they share one look and three rules stated once in
:mod:`counterwarp.report.display`: world (mm) cuts at the subject's brain centre (the same
for every panel and method of a subject, whatever map is drawn), orientation letters from
the affine, and colour scales that can be compared across panels (percent volume change on
a fixed +-50 % scale, saliency normalised to its 99.5th percentile in the brain).

Arrays are ``(X, Y, Z)`` volumes or ``(X, Z)`` slices in the voxel order of ``affine``, the
``(4, 4)`` voxel-to-world matrix of the model grid (``LoadedVolume.model_affine``). 3D
figures have one row per panel (sagittal, coronal, axial views); 2D figures one panel per
column. Each ``*_panel`` / ``*_figure`` writer returns the path it wrote atomically; the
``draw_*`` builders return a :class:`~counterwarp.report.display.Drawing` to inspect.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from counterwarp.report.animation import progression_gif
from counterwarp.report.curves import classifier_curves_figure, simulator_curves_figure
from counterwarp.report.display import (
    ColourScale,
    Drawing,
    anatomy_range,
    difference_scale,
    draw_volume,
    normalised_saliency,
    percent_volume_change,
    saliency_scale,
    save_figure,
    subject_cut_coords,
    symmetric_limit,
    volume_change_scale,
)
from counterwarp.report.layout import check_shapes, footer, layout, resolve_cuts

__all__ = [
    "classifier_curves_figure",
    "draw_explanation",
    "draw_methods",
    "draw_saliency",
    "explanation_panel",
    "methods_figure",
    "percent_volume_change",
    "progression_gif",
    "saliency_panel",
    "simulator_curves_figure",
    "stat_map_figure",
    "subject_cut_coords",
    "symmetric_limit",
]

# ----------------------------------------------------------------------- explanation


def draw_explanation(
    image: np.ndarray,
    simulated: np.ndarray,
    log_volume_change: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    cut_coords: tuple[float, ...] | None = None,
    limit: float | None = None,
    title: str = "",
    invalid: str = "",
) -> Drawing:
    """Original, simulated, their difference and the volume change over the original.

    Args:
        image, simulated: ``(*S)`` intensities (z-scored; 0 = outside the brain).
        log_volume_change: ``(*S)`` natural-log volume change (growth > 0), drawn as
            percent on the fixed scale (``limit`` percent overrides it).
        affine: ``(4, 4)`` voxel-to-world matrix of the grid (mm).
        cut_coords: world cuts (mm); default :func:`subject_cut_coords` of ``image``.
        title: figure title.
        invalid: why the explanation is not valid (:mod:`counterwarp.explain.validity`);
            when given, the title says "NOT VALID" and the reason, in red.
    """
    image = np.asarray(image, np.float64)
    check_shapes(image, {"simulated": simulated, "log_volume_change": log_volume_change},
                  "explanation_panel")
    cuts = resolve_cuts(image, affine, cut_coords)
    gray = anatomy_range(image)
    if invalid:
        title = f"NOT VALID ({invalid}): {title}"
    figure, rects = layout(4, image.ndim, title,
                           title_color="#ff5555" if invalid else "white")
    drawing = Drawing(figure, cut_coords=cuts)
    simulated = np.asarray(simulated, np.float64)
    rows: list[tuple[str, np.ndarray, np.ndarray | None, ColourScale | None]] = [
        ("original", image, None, None),
        ("simulated", simulated, None, None),
        ("simulated - original", image, simulated - image, difference_scale()),
        ("volume change", image, percent_volume_change(log_volume_change),
         volume_change_scale(limit)),
    ]
    for rect, (name, background, overlay, scale) in zip(rects, rows, strict=True):
        drawing.displays[name] = draw_volume(
            figure, rect, background, cuts, affine=affine, gray=gray, overlay=overlay,
            scale=scale, anatomy_label="intensity (z-score)", title=name,
        )
    footer(figure, cuts, affine)
    return drawing


def explanation_panel(
    image: np.ndarray,
    simulated: np.ndarray,
    log_volume_change: np.ndarray,
    path: str | Path,
    title: str = "",
    *,
    affine: np.ndarray | None = None,
    cut_coords: tuple[float, ...] | None = None,
    limit: float | None = None,
    dpi: int = 90,
    invalid: str = "",
) -> Path:
    """Write the PNG of :func:`draw_explanation` (same arguments) to ``path``."""
    drawing = draw_explanation(image, simulated, log_volume_change, affine=affine,
                               cut_coords=cut_coords, limit=limit, title=title,
                               invalid=invalid)
    return drawing.save(path, dpi)


# ----------------------------------------------------------------------- saliency


def draw_saliency(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    affine: np.ndarray | None = None,
    cut_coords: tuple[float, ...] | None = None,
    title: str = "",
) -> Drawing:
    """The image, then every saliency map over it on the shared normalised scale.

    Args:
        image: ``(*S)`` intensities the classifier saw (0 = outside the brain).
        maps: method -> ``(*S)`` attribution, any unit; each is drawn as
            :func:`~counterwarp.report.display.normalised_saliency` (0..1).
        affine, cut_coords, title: as :func:`draw_explanation`.
    """
    image = np.asarray(image, np.float64)
    check_shapes(image, maps, "saliency_panel")
    cuts = resolve_cuts(image, affine, cut_coords)
    brain = image != 0
    figure, rects = layout(1 + len(maps), image.ndim, title)
    drawing = Drawing(figure, cut_coords=cuts)
    drawing.displays["image"] = draw_volume(
        figure, rects[0], image, cuts, affine=affine, anatomy_label="intensity (z-score)",
        title="image",
    )
    for rect, (name, values) in zip(rects[1:], maps.items(), strict=True):
        shown = normalised_saliency(values, brain)
        drawing.displays[name] = draw_volume(
            figure, rect, image, cuts, affine=affine, overlay=shown, scale=saliency_scale(),
            title=name if shown.any() else f"{name} (zero in the brain)",
        )
    footer(figure, cuts, affine)
    return drawing


def saliency_panel(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    path: str | Path,
    title: str = "",
    *,
    affine: np.ndarray | None = None,
    cut_coords: tuple[float, ...] | None = None,
    dpi: int = 90,
) -> Path:
    """Write the PNG of :func:`draw_saliency` (same arguments) to ``path``."""
    drawing = draw_saliency(image, maps, affine=affine, cut_coords=cut_coords, title=title)
    return drawing.save(path, dpi)


# ----------------------------------------------------------------------- benchmark


def draw_methods(
    image: np.ndarray,
    truth: np.ndarray,
    maps: Mapping[str, np.ndarray],
    *,
    signed: Collection[str] = (),
    labels: Mapping[str, str] | None = None,
    affine: np.ndarray | None = None,
    cut_coords: tuple[float, ...] | None = None,
    limit: float | None = None,
    title: str = "",
    columns_2d: int = 5,
) -> Drawing:
    """The true map, then every method's map, one subject, the same cuts and scales.

    Args:
        image: ``(*S)`` anatomy (z-scored, 0 = outside the brain).
        truth: ``(*S)`` true natural-log volume change, drawn as percent.
        maps: method -> ``(*S)`` map. Methods in ``signed`` are log volume changes (the
            simulator's) and share the truth's percent scale; the others are saliency maps,
            drawn normalised (0..1).
        labels: method -> panel label (default the name).
        affine, cut_coords, title: as :func:`draw_explanation`; ``limit``: percent scale.
        columns_2d: panels per row for 2D images.
    """
    image = np.asarray(image, np.float64)
    check_shapes(image, {"truth": truth, **maps}, "methods_figure")
    cuts = resolve_cuts(image, affine, cut_coords)
    brain = image != 0
    labels = dict(labels or {})
    panels: list[tuple[str, np.ndarray, ColourScale]] = [
        ("truth", percent_volume_change(truth), volume_change_scale(limit))
    ]
    for method, values in maps.items():
        if method in signed:
            panels.append((labels.get(method, method), percent_volume_change(values),
                           volume_change_scale(limit)))
        else:
            shown = normalised_saliency(values, brain)
            label = labels.get(method, method)
            panels.append((label if shown.any() else f"{label} (zero in the brain)", shown,
                           saliency_scale()))
    figure, rects = layout(len(panels), image.ndim, title, columns_2d)
    drawing = Drawing(figure, cut_coords=cuts)
    for rect, (name, overlay, scale) in zip(rects, panels, strict=True):
        drawing.displays[name] = draw_volume(figure, rect, image, cuts, affine=affine,
                                             overlay=overlay, scale=scale, title=name)
    footer(figure, cuts, affine)
    return drawing


def methods_figure(
    image: np.ndarray,
    truth: np.ndarray,
    maps: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    dpi: int = 90,
    **options: Any,
) -> Path:
    """Write the PNG of :func:`draw_methods` (same keyword ``options``) to ``path``."""
    return draw_methods(image, truth, maps, **options).save(path, dpi)


# ----------------------------------------------------------------------- group maps


def stat_map_figure(
    values: np.ndarray,
    path: str | Path,
    *,
    anatomy: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    brain: np.ndarray | None = None,
    colorbar_label: str = "volume change (%)",
    cut_coords: tuple[float, ...] | None = None,
    limit: float | None = None,
    threshold: float = 0.0,
    show: np.ndarray | None = None,
    title: str = "",
    dpi: int = 110,
) -> Path:
    """Write a PNG of one signed map over an anatomy (e.g. a group's mean percent change).

    Args:
        values: ``(*S)`` signed map (e.g. percent volume change).
        path: output PNG, written atomically.
        anatomy: ``(*S)`` background (any intensity unit); default the brain mask in grey.
        affine: ``(4, 4)`` voxel-to-world matrix (mm).
        brain: ``(*S)`` bool mask the cuts are taken from (default ``anatomy != 0``, or
            ``values != 0`` without an anatomy); the map is drawn only inside it.
        colorbar_label: the colour bar's label, with units; the limit is appended.
        cut_coords: world cuts (mm); default :func:`subject_cut_coords` of ``brain``.
        limit: colour range ``[-limit, limit]``; default the 99.5th percentile of
            ``|values|`` where shown.
        threshold: voxels with ``|value| <= threshold`` are transparent.
        show: ``(*S)`` bool mask within the brain where the map is drawn (default all).
        title: figure title.
        dpi: resolution.
    """
    data = np.nan_to_num(np.asarray(values, dtype=np.float64))
    if brain is None:
        brain = (np.asarray(anatomy) != 0) if anatomy is not None else data != 0
    brain = np.asarray(brain, bool)
    visible = brain if show is None else brain & np.asarray(show, bool)
    if limit is None:
        limit = symmetric_limit(data[visible]) if visible.any() else 1.0
        colorbar_label = f"{colorbar_label}\n±{limit:.3g} = 99.5th pct of |map|"
    else:
        colorbar_label = f"{colorbar_label}\nscale ±{limit:.3g}"
    background = (np.asarray(anatomy, np.float64) if anatomy is not None
                  else brain.astype(np.float64))
    background = np.where(brain & (background == 0), 1e-6, np.where(brain, background, 0.0))
    gray = anatomy_range(background) if anatomy is not None else (0.0, 3.0)
    cuts = resolve_cuts(background, affine, cut_coords if cut_coords is not None
                 else subject_cut_coords(brain.astype(np.float32), affine))
    scale = ColourScale("RdBu_r", -limit, limit, max(threshold, 1e-6 * limit), colorbar_label)
    figure, rects = layout(1, data.ndim, title)
    display = draw_volume(figure, rects[0], background, cuts, affine=affine, gray=gray,
                          overlay=np.where(visible, data, 0.0), scale=scale)
    footer(figure, cuts, affine)
    del display
    return save_figure(figure, path, dpi)
