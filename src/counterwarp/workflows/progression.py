"""``explain --progression N``: a simulated progression written as an animated GIF.

The frames come from :func:`counterwarp.explain.progression.progression_frames`; the
drawing from :func:`counterwarp.report.figures.progression_gif`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from counterwarp.data.derivatives import output_name
from counterwarp.errors import CounterwarpError
from counterwarp.explain.progression import progression_frames
from counterwarp.explain.simulator import Simulator
from counterwarp.report.figures import progression_gif


def write_progression_gif(
    path: str | Path,
    frames: np.ndarray,
    changes: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    title: str = "",
    frame_ms: int = 200,
    hold_last_ms: int = 1000,
    dpi: int = 70,
) -> Path:
    """Write an animated GIF: each frame's image and its volume change over the input.

    Drawn by :func:`counterwarp.report.figures.progression_gif`, cut and coloured like the
    subject's panels.

    Args:
        path: output ``.gif``, written atomically.
        frames: ``(N, *S)`` images along the path (``frames[0]`` = the input).
        changes: ``(N, *S)`` natural-log volume change per frame, in the input's space.
        affine: ``(4, 4)`` voxel-to-world matrix of the model grid (mm).
        title, frame_ms, hold_last_ms, dpi: as :func:`~counterwarp.report.figures.
            progression_gif`.

    Returns:
        The written path. The GIF has exactly N frames and loops forever.
    """
    return progression_gif(path, frames, changes, affine=affine, title=title,
                           frame_ms=frame_ms, hold_last_ms=hold_last_ms, dpi=dpi)


def write_progression(
    out: str | Path,
    image_id: str,
    simulator: Simulator,
    image: torch.Tensor,
    direction: str,
    n_frames: int,
    *,
    linear_displacement: bool = False,
    affine: np.ndarray | None = None,
) -> Path:
    """Frames of one image and direction, written as
    ``OUT/<id>_desc-<direction>_progression.gif`` (:mod:`counterwarp.data.derivatives`).

    Args:
        out: output folder.
        image_id: file-name-safe id of the image (as ``explain`` names its outputs).
        simulator, direction, n_frames, linear_displacement: as :func:`progression_frames`.
        image: ``(1, *S)`` or ``(1, 1, *S)`` preprocessed image (model grid).
        affine: ``(4, 4)`` voxel-to-world matrix of the model grid (mm), for world cuts
            and orientation letters (``LoadedVolume.model_affine``).

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
        Path(out) / output_name(image_id, direction, "progression"), frames, changes,
        affine=affine, title=f"{image_id}: {direction} ({how})",
    )
