"""Animated GIF of a progression: frames of the image and their volume change, one look.

Frames are drawn like every other figure (:mod:`counterwarp.report.figures`): the same
world cuts (the input's brain centre), letters from the affine and the fixed percent scale
of :mod:`counterwarp.report.display`, so a GIF's last frame matches the subject's panel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from counterwarp._io import atomic_path
from counterwarp.errors import CounterwarpError
from counterwarp.report.display import (
    anatomy_range,
    draw_volume,
    percent_volume_change,
    volume_change_scale,
)
from counterwarp.report.layout import footer, layout, resolve_cuts

__all__ = ["progression_gif"]


def progression_gif(
    path: str | Path,
    frames: np.ndarray,
    changes: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    cut_coords: tuple[float, ...] | None = None,
    limit: float | None = None,
    title: str = "",
    frame_ms: int = 200,
    hold_last_ms: int = 1000,
    dpi: int = 70,
) -> Path:
    """Write an animated GIF: each frame's image above its volume change over the input.

    Args:
        path: output ``.gif``, written atomically.
        frames: ``(N, *S)`` images along the path; ``frames[0]`` is the input, whose brain
            gives the cuts and the grey range of every frame.
        changes: ``(N, *S)`` natural-log volume change of each frame in the input's space,
            drawn in percent on the fixed scale (``limit`` percent overrides it).
        affine, cut_coords: as :func:`draw_explanation`.
        title: text above every frame (``t`` is added).
        frame_ms: display time per frame (ms); the last frame is held ``hold_last_ms``.
        dpi: resolution.

    Returns:
        The written path. The GIF has exactly N frames and loops forever.
    """
    from PIL import Image

    frames = np.asarray(frames, dtype=np.float64)
    changes = np.asarray(changes, dtype=np.float64)
    if frames.shape != changes.shape or frames.ndim not in (3, 4) or frames.shape[0] < 1:
        raise CounterwarpError(
            f"frames and changes must both be (N, *S) with 2 or 3 spatial dims, got "
            f"{frames.shape} and {changes.shape}"
        )
    n, first = frames.shape[0], frames[0]
    cuts = resolve_cuts(first, affine, cut_coords)
    gray = anatomy_range(first)
    scale = volume_change_scale(limit)
    percent = percent_volume_change(changes)
    figure, rects = layout(2, first.ndim, title or " ", columns_2d=2)
    figure.set_dpi(dpi)
    pictures = []
    for index, t in enumerate(np.linspace(0.0, 1.0, n) if n > 1 else [1.0]):
        figure.clear()
        figure.suptitle(f"{title}  t = {t:.2f}".strip(), color="white", fontsize=9,
                        y=1 - 0.08 / figure.get_size_inches()[1], va="top")
        draw_volume(figure, rects[0], frames[index], cuts, affine=affine, gray=gray,
                    anatomy_label="intensity (z-score)", title="image")
        draw_volume(figure, rects[1], first, cuts, affine=affine, gray=gray,
                    overlay=percent[index], scale=scale, title="volume change")
        footer(figure, cuts, affine)
        figure.canvas.draw()
        rgba = np.asarray(figure.canvas.buffer_rgba())
        pictures.append(Image.fromarray(rgba[..., :3].copy()))
    durations = [frame_ms] * (n - 1) + [max(frame_ms, hold_last_ms)]
    path = Path(path)
    with atomic_path(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:],
                         duration=durations, loop=0, disposal=1, optimize=False)
    return path
