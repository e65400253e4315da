"""PNG figures: per-subject explanation panels.

Volumes are arrays in voxel order (x, y, z) of a RAS-oriented grid (the synthetic cohort and
most MNI-registered data); slices are drawn with the second axis up (``origin="lower"``),
left hemisphere on the left of sagittal-free views and marked with "L"/"R".
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from counterwarp._io import atomic_path  # noqa: E402

VIEW_NAMES = ("sagittal", "coronal", "axial")


def strongest_point(volume: np.ndarray, sigma: float = 1.0) -> tuple[int, ...]:
    """Voxel index of the largest |value| after light Gaussian smoothing (sigma in voxels)."""
    smoothed = gaussian_filter(np.abs(volume.astype(np.float64)), sigma)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(smoothed)), volume.shape))


def orthogonal_slices(volume: np.ndarray, point: tuple[int, ...]) -> list[np.ndarray]:
    """Display-ready 2D slices through ``point``: [sagittal, coronal, axial] for 3D (x, y, z)
    volumes, or the single image for 2D (x, z) arrays; each transposed for ``origin='lower'``.
    """
    if volume.ndim == 2:
        return [volume.T]
    x, y, z = point
    return [volume[x, :, :].T, volume[:, y, :].T, volume[:, :, z].T]


def symmetric_limit(values: np.ndarray, percentile: float = 99.5) -> float:
    """A colour-bar limit symmetric around zero that ignores rare outliers."""
    finite = np.abs(values[np.isfinite(values)])
    if finite.size == 0:
        return 1.0
    limit = float(np.percentile(finite, percentile))
    return limit if limit > 0 else 1.0


def explanation_panel(
    image: np.ndarray,
    simulated: np.ndarray,
    log_volume_change: np.ndarray,
    path: str | Path,
    title: str = "",
) -> Path:
    """Write a PNG: original, simulated, difference and volume change over the anatomy.

    Args:
        image, simulated: (*S) intensities (z-scored).
        log_volume_change: (*S) log volume change of the anatomy (growth > 0); shown as
            percent volume change, exp(value) - 1, with a symmetric diverging colour map.
        path: output PNG (written atomically).
    """
    point = strongest_point(log_volume_change)
    percent = 100.0 * np.expm1(np.where(image != 0, log_volume_change, 0.0))
    difference = simulated - image
    columns = [
        ("original", orthogonal_slices(image, point), "gray", None),
        ("simulated", orthogonal_slices(simulated, point), "gray", None),
        ("simulated - original", orthogonal_slices(difference, point), "RdBu_r",
         symmetric_limit(difference)),
        ("volume change (%)", orthogonal_slices(percent, point), "RdBu_r",
         symmetric_limit(percent)),
    ]
    brain = orthogonal_slices((image != 0).astype(np.float32), point)
    rows = len(columns[0][1])
    gray = matplotlib.colormaps["gray"].with_extremes(bad="black")
    fig, axes = plt.subplots(rows, 4, figsize=(12, 3 * rows + 0.6), squeeze=False)
    anatomy = columns[0][1]  # the original image's slices
    gray_limits = (float(np.percentile(image, 1)), float(np.percentile(image, 99.5)))
    for col, (name, slices, cmap, limit) in enumerate(columns):
        for row, data in enumerate(slices):
            ax = axes[row, col]
            outside = brain[row] == 0
            if name == "volume change (%)":
                ax.imshow(np.ma.masked_where(outside, anatomy[row]), cmap=gray,
                          origin="lower", vmin=gray_limits[0], vmax=gray_limits[1])
                shown = np.ma.masked_where(outside | (np.abs(data) < 0.05 * limit), data)
                handle = ax.imshow(shown, cmap=cmap, origin="lower", vmin=-limit,
                                   vmax=limit, alpha=0.85)
            elif limit is None:
                handle = ax.imshow(np.ma.masked_where(outside & (data == 0), data), cmap=gray,
                                   origin="lower", vmin=gray_limits[0], vmax=gray_limits[1])
            else:
                handle = ax.imshow(data, cmap=cmap, origin="lower", vmin=-limit, vmax=limit)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0 and rows > 1:
                ax.set_ylabel(VIEW_NAMES[row], fontsize=9)
            left, right = ("P", "A") if rows > 1 and row == 0 else ("L", "R")
            ax.text(0.02, 0.5, left, transform=ax.transAxes, color="w", fontsize=8,
                    va="center")
            ax.text(0.93, 0.5, right, transform=ax.transAxes, color="w", fontsize=8,
                    va="center")
            if limit is not None and row == rows - 1:
                bar = fig.colorbar(handle, ax=axes[:, col].tolist(), orientation="horizontal",
                                   fraction=0.05, pad=0.04)
                bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- paper figures
# Added for group maps and the HTML report. Drawn on a matplotlib ``Figure`` (no pyplot
# state), nilearn ``plot_stat_map`` style: black background, anatomy in grey, the map in a
# symmetric diverging colour map centred on zero, cut coordinates in mm, L/R marked.


def percent_volume_change(log_volume_change: np.ndarray) -> np.ndarray:
    """Percent volume change ``100 * (exp(x) - 1)`` of a natural-log volume change map."""
    return 100.0 * np.expm1(np.asarray(log_volume_change, dtype=np.float64))


def _cut_labels(
    point: tuple[int, ...], affine: np.ndarray | None, ndim: int
) -> list[str]:
    """Titles of the views through ``point``: world coordinates in mm when ``affine`` is given."""
    if ndim == 2:
        return [""]
    if affine is None:
        return [f"x = {point[0]} (voxel)", f"y = {point[1]} (voxel)", f"z = {point[2]} (voxel)"]
    world = np.asarray(affine, dtype=np.float64) @ np.array([*point[:3], 1.0])
    return [f"x = {world[0]:.0f} mm", f"y = {world[1]:.0f} mm", f"z = {world[2]:.0f} mm"]


def stat_map_figure(
    values: np.ndarray,
    path: str | Path,
    *,
    anatomy: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    colorbar_label: str = "volume change (%)",
    point: tuple[int, ...] | None = None,
    limit: float | None = None,
    threshold: float = 0.0,
    show: np.ndarray | None = None,
    title: str = "",
    dpi: int = 110,
) -> Path:
    """Write a paper-ready PNG of a signed map over anatomy, orthogonal views, one colour bar.

    Args:
        values: ``(X, Y, Z)`` or ``(X, Z)`` signed map in RAS voxel order (e.g. percent volume
            change; see :func:`percent_volume_change`).
        path: output PNG, written atomically.
        anatomy: optional background of the same shape (any intensity unit), drawn in grey.
        affine: optional ``(4, 4)`` voxel -> mm matrix, used to label the cuts in mm.
        colorbar_label: the colour bar's label, with units.
        point: voxel to cut through; default the strongest ``|values|`` (lightly smoothed,
            only where ``show`` is true).
        limit: colour range ``[-limit, limit]``; default a robust symmetric maximum.
        threshold: voxels with ``|value| <= threshold`` are transparent. Background voxels
            of ``anatomy`` (exactly 0) are drawn black.
        show: optional bool mask of the same shape; voxels outside it are transparent.
        title: figure title.
        dpi: resolution of the PNG.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.nan_to_num(np.asarray(values, dtype=np.float64))
    visible = np.ones(data.shape, bool) if show is None else np.asarray(show, bool)
    if point is None:
        point = strongest_point(np.where(visible, data, 0.0))
    if limit is None:
        limit = symmetric_limit(data[visible]) if visible.any() else 1.0
    background = None if anatomy is None else np.asarray(anatomy, dtype=np.float64)
    overlay = np.ma.masked_where(~visible | (np.abs(data) <= threshold), data)
    views = orthogonal_slices(overlay.filled(np.nan), point)
    backs = None if background is None else orthogonal_slices(background, point)
    labels = _cut_labels(point, affine, data.ndim)
    widths = [view.shape[1] / view.shape[0] for view in views]
    fig = Figure(figsize=(2.6 * sum(widths) + 1.3, 3.0 + (0.35 if title else 0.0)),
                 facecolor="black")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, len(views) + 1, width_ratios=[*widths, 0.08], wspace=0.05)
    gray = (0.0, 1.0)
    if background is not None:
        inside = background[background != 0]
        source = inside if inside.size else background.ravel()
        gray = (float(np.percentile(source, 1)), float(np.percentile(source, 99.5)))
    handle = None
    for index, view in enumerate(views):
        ax = fig.add_subplot(grid[0, index])
        ax.set_facecolor("black")
        if backs is not None:
            ax.imshow(np.ma.masked_equal(backs[index], 0.0), cmap="gray", origin="lower",
                      vmin=gray[0], vmax=gray[1], interpolation="nearest")
        handle = ax.imshow(np.ma.masked_invalid(view), cmap="RdBu_r", origin="lower",
                           vmin=-limit, vmax=limit, interpolation="nearest",
                           alpha=0.9 if backs is not None else 1.0)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(labels[index], color="white", fontsize=9)
        sagittal = data.ndim == 3 and index == 0
        left, right = ("P", "A") if sagittal else ("L", "R")
        for x, text, align in ((0.02, left, "left"), (0.98, right, "right")):
            ax.text(x, 0.04, text, transform=ax.transAxes, color="white", fontsize=10,
                    ha=align, va="bottom", fontweight="bold")
    cax = fig.add_subplot(grid[0, -1])
    bar = fig.colorbar(handle, cax=cax)
    bar.set_label(colorbar_label, color="white", fontsize=9)
    bar.ax.tick_params(colors="white", labelsize=8)
    bar.outline.set_edgecolor("white")
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="black", bbox_inches="tight")
    return path


def _column(rows: list[dict[str, str]], name: str) -> np.ndarray:
    """Float column of CSV rows; blanks and unparsable entries become nan."""
    out = []
    for row in rows:
        try:
            out.append(float(row.get(name, "") or "nan"))
        except ValueError:
            out.append(float("nan"))
    return np.asarray(out, dtype=np.float64)


def classifier_curves_figure(rows: list[dict[str, str]]) -> matplotlib.figure.Figure:
    """Training curves of the classifier from ``classifier_log.csv`` rows (as read by
    ``csv.DictReader``): train / validation loss and validation AUC per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epoch = _column(rows, "epoch")
    fig = Figure(figsize=(8.0, 2.8))
    FigureCanvasAgg(fig)
    loss_ax, auc_ax = fig.subplots(1, 2)
    loss_ax.plot(epoch, _column(rows, "train_loss"), label="train")
    loss_ax.plot(epoch, _column(rows, "val_loss"), label="validation")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss (BCE)")
    loss_ax.legend(fontsize=8)
    auc_ax.plot(epoch, _column(rows, "val_auc"), label="AUC")
    auc_ax.plot(epoch, _column(rows, "val_balanced_accuracy"), label="balanced accuracy")
    auc_ax.set_ylim(0.0, 1.02)
    auc_ax.set_xlabel("epoch")
    auc_ax.set_ylabel("validation")
    auc_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def simulator_curves_figure(
    rows: list[dict[str, str]], window: int = 10
) -> matplotlib.figure.Figure:
    """Training curves of the simulator from ``simulator_log.csv`` rows: every loss term
    (log scale) and the share of the batch moved past the margin (raw and running mean over
    ``window`` steps) against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    step = _column(rows, "step")
    fig = Figure(figsize=(8.0, 2.8))
    FigureCanvasAgg(fig)
    loss_ax, moved_ax = fig.subplots(1, 2)
    positive = []
    for name in ("loss", "shift", "cycle", "smooth", "magnitude"):
        values = _column(rows, name)
        if np.any(values > 0):
            loss_ax.plot(step, np.where(values > 0, values, np.nan), label=name, lw=1)
            positive.append(values[values > 0])
    loss_ax.set_yscale("log")
    if positive:  # a first step's near-zero term must not squash the curves
        loss_ax.set_ylim(bottom=0.5 * float(np.percentile(np.concatenate(positive), 2)))
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss term")
    loss_ax.legend(fontsize=7)
    moved = _column(rows, "moved_share")
    moved_ax.plot(step, moved, lw=0.6, alpha=0.5, label="per step")
    if moved.size:
        size = max(1, min(window, moved.size))
        running = np.convolve(np.nan_to_num(moved), np.ones(size) / size, mode="valid")
        moved_ax.plot(step[size - 1:], running, lw=1.5, label=f"mean of {size} steps")
    moved_ax.set_ylim(-0.02, 1.02)
    moved_ax.set_xlabel("step")
    moved_ax.set_ylabel("moved past margin (share)")
    moved_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
