"""Disease progression along the simulator's flow: x o exp(t v) for t in [0, 1].

A velocity-field simulator (``counterwarp fit --field velocity``) predicts a stationary
velocity ``v``; its deformation is ``exp(v)`` (scaling and squaring). Integrating ``t * v``
for ``t`` from 0 to 1 gives a one-parameter family of diffeomorphisms, so the frames
``x o exp(t v)`` show the change "growing" from the input (``t = 0``) to the simulated image
(``t = 1``, exactly what :meth:`Simulator.explain` returns). The matching log volume change
of frame ``t`` is exact in the input's space: ``log det`` of the inverse map ``exp(-t v)``.

Decision for displacement-field simulators (the default ``--field displacement``): their
output ``u`` is not a flow, and ``Id + t u`` is not the path the model defines (it may fold
at intermediate ``t`` even when ``Id + u`` does not). :func:`progression_frames` therefore
raises a :class:`CounterwarpError` telling the user to fit with ``--field velocity``; the
API offers ``linear_displacement=True`` to draw ``x o (Id + t u)`` anyway, labelled as a
linear interpolation (its volume change is the first-order ``-log det(I + t grad u)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from counterwarp._io import atomic_path
from counterwarp.errors import CounterwarpError
from counterwarp.explain.simulator import DIRECTIONS, Simulator
from counterwarp.geometry.volume import log_volume_change
from counterwarp.geometry.warp import integrate_velocity, warp

__all__ = [
    "check_progression_supported",
    "progression_frames",
    "write_progression",
    "write_progression_gif",
]

MIN_FRAMES = 2
MAX_FRAMES = 200


def check_progression_supported(
    simulator: Simulator, n_frames: int, linear_displacement: bool = False
) -> None:
    """Raise :class:`CounterwarpError` unless ``simulator`` can draw ``n_frames`` frames.

    Call this before writing any output (``explain --progression N``).
    """
    if simulator.net_ is None:
        raise CounterwarpError("the simulator is not fitted: call fit() or load() first")
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or not (
        MIN_FRAMES <= n_frames <= MAX_FRAMES
    ):
        raise CounterwarpError(
            f"--progression {n_frames!r}: give a number of frames from {MIN_FRAMES} to "
            f"{MAX_FRAMES}"
        )
    if simulator.net_.field != "velocity" and not linear_displacement:
        raise CounterwarpError(
            "--progression needs a velocity-field simulator: this one predicts displacements, "
            "which define no path between the image and its simulation. Refit with "
            "`counterwarp fit --field velocity ...`"
        )


@torch.no_grad()
def progression_frames(
    simulator: Simulator,
    image: torch.Tensor,
    direction: str,
    n_frames: int,
    *,
    linear_displacement: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and volume change along the simulator's path, ``t = 0, 1/(N-1), ..., 1``.

    Args:
        simulator: a fitted :class:`Simulator` with ``field="velocity"`` (see the module
            docstring for displacement-field simulators and ``linear_displacement``).
        image: ``(1, 1, *S)`` one preprocessed image (z-scored, model grid).
        direction: ``"inject"`` or ``"remove"``.
        n_frames: N >= 2 frames; the first is the input, the last the simulated image.
        linear_displacement: for displacement-field simulators only: draw ``x o (Id + t u)``.

    Returns:
        ``(frames (N, *S), log_volume_change (N, *S))`` float32 arrays: the warped images
        (same intensity units as ``image``) and the natural-log volume change of the
        anatomy at each frame (growth > 0; 0 at ``t = 0``).
    """
    check_progression_supported(simulator, n_frames, linear_displacement)
    net = simulator.net_
    assert net is not None
    if direction not in DIRECTIONS:
        raise CounterwarpError(f"direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    expected = (1, 1, *net.input_shape)
    if not isinstance(image, torch.Tensor) or tuple(image.shape) != expected:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise CounterwarpError(
            f"progression needs one image of shape {expected}, got {shape}"
        )
    device = next(net.parameters()).device
    net.eval()
    x = image.float().to(device)
    condition = torch.full((1,), DIRECTIONS[direction], device=device)
    raw = net(x, condition)  # (1, d, *S): velocity v, or displacement u
    frames, changes = [], []
    for t in np.linspace(0.0, 1.0, n_frames):
        if t == 0.0:
            frames.append(x[0, 0])
            changes.append(torch.zeros_like(x[0, 0]))
            continue
        if net.field == "velocity":
            displacement = integrate_velocity(float(t) * raw, net.integration_steps)
            inverse = integrate_velocity(-float(t) * raw, net.integration_steps)
            change = log_volume_change(displacement, inverse_displacement=inverse)
        else:
            displacement = float(t) * raw
            change = log_volume_change(displacement)
        frames.append(warp(x, displacement)[0, 0])
        changes.append(change[0])
    return (
        torch.stack(frames).float().cpu().numpy(),
        torch.stack(changes).float().cpu().numpy(),
    )


def write_progression_gif(
    path: str | Path,
    frames: np.ndarray,
    changes: np.ndarray,
    *,
    title: str = "",
    frame_ms: int = 200,
    hold_last_ms: int = 1000,
    dpi: int = 80,
) -> Path:
    """Write an animated GIF: each frame's image beside its volume change over the input.

    Args:
        path: output ``.gif``, written atomically.
        frames: ``(N, *S)`` images along the path (2D ``(X, Z)`` or 3D ``(X, Y, Z)`` in RAS
            voxel order; 3D shows sagittal, coronal and axial slices through the strongest
            final change).
        changes: ``(N, *S)`` natural-log volume change per frame, shown in percent
            (``100 (exp(x) - 1)``) on one symmetric colour scale for all frames.
        title: text above every frame (``t`` is added).
        frame_ms: display time per frame (ms); the last frame is held ``hold_last_ms``.
        dpi: resolution.

    Returns:
        The written path. The GIF has exactly N frames and loops forever.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from counterwarp.report.figures import (
        VIEW_NAMES,
        orthogonal_slices,
        percent_volume_change,
        strongest_point,
        symmetric_limit,
    )

    frames = np.asarray(frames, dtype=np.float64)
    changes = np.asarray(changes, dtype=np.float64)
    if frames.shape != changes.shape or frames.ndim not in (3, 4) or frames.shape[0] < 1:
        raise CounterwarpError(
            f"frames and changes must both be (N, *S) with 2 or 3 spatial dims, got "
            f"{frames.shape} and {changes.shape}"
        )
    n = frames.shape[0]
    percent = percent_volume_change(changes)
    point = strongest_point(changes[-1])
    limit = symmetric_limit(percent[-1])
    brain = frames[0] != 0
    inside = frames[0][brain] if brain.any() else frames[0].ravel()
    gray = (float(np.percentile(inside, 1)), float(np.percentile(inside, 99.5)))
    first_views = orthogonal_slices(frames[0], point)
    rows = len(first_views)
    fig = Figure(figsize=(5.2, 2.5 * rows + 0.5))
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    image_handles, change_handles = [], []
    for row, view in enumerate(first_views):
        image_handles.append(axes[row, 0].imshow(view, cmap="gray", origin="lower",
                                                 vmin=gray[0], vmax=gray[1]))
        axes[row, 1].imshow(view, cmap="gray", origin="lower", vmin=gray[0], vmax=gray[1])
        change_handles.append(axes[row, 1].imshow(
            orthogonal_slices(percent[0], point)[row], cmap="RdBu_r", origin="lower",
            vmin=-limit, vmax=limit, alpha=0.8,
        ))
        if rows > 1:
            axes[row, 0].set_ylabel(VIEW_NAMES[row], fontsize=8)
        left, right = ("P", "A") if rows > 1 and row == 0 else ("L", "R")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.03, 0.04, left, transform=ax.transAxes, color="w", fontsize=8)
            ax.text(0.92, 0.04, right, transform=ax.transAxes, color="w", fontsize=8)
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title("volume change (%)", fontsize=9)
    bar = fig.colorbar(change_handles[-1], ax=axes[:, 1].tolist(), orientation="horizontal",
                       fraction=0.05, pad=0.04)
    bar.ax.tick_params(labelsize=7)
    heading = fig.suptitle("", fontsize=9)
    pictures = []
    for index, t in enumerate(np.linspace(0.0, 1.0, n) if n > 1 else [1.0]):
        image_views = orthogonal_slices(frames[index], point)
        change_views = orthogonal_slices(percent[index], point)
        for row in range(rows):
            image_handles[row].set_data(image_views[row])
            shown = np.ma.masked_where(np.abs(change_views[row]) < 0.02 * limit,
                                       change_views[row])
            change_handles[row].set_data(shown)
        heading.set_text(f"{title}  t = {t:.2f}".strip())
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        pictures.append(Image.fromarray(rgba[..., :3].copy()))
    durations = [frame_ms] * (n - 1) + [max(frame_ms, hold_last_ms)]
    path = Path(path)
    with atomic_path(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:],
                         duration=durations, loop=0, disposal=1, optimize=False)
    return path


def write_progression(
    out: str | Path,
    image_id: str,
    simulator: Simulator,
    image: torch.Tensor,
    direction: str,
    n_frames: int,
    *,
    linear_displacement: bool = False,
) -> Path:
    """Frames of one image and direction, written as ``OUT/<id>_<direction>_progression.gif``.

    Args:
        out: output folder.
        image_id: file-name-safe id of the image (as ``explain`` names its outputs).
        simulator, direction, n_frames, linear_displacement: as :func:`progression_frames`.
        image: ``(1, *S)`` or ``(1, 1, *S)`` preprocessed image (model grid).

    Returns:
        The GIF's path.
    """
    net = simulator.net_
    if net is None:
        raise CounterwarpError("the simulator is not fitted: call fit() or load() first")
    batch = image.unsqueeze(0) if image.ndim == len(net.input_shape) + 1 else image
    frames, changes = progression_frames(
        simulator, batch, direction, n_frames, linear_displacement=linear_displacement
    )
    how = "x o exp(t v)" if net.field == "velocity" else "linear path x o (Id + t u)"
    return write_progression_gif(
        Path(out) / f"{image_id}_{direction}_progression.gif", frames, changes,
        title=f"{image_id}: {direction} ({how})",
    )
