"""Where the panels of a figure go, what its footer says, and which cuts it uses.

Shared by :mod:`counterwarp.report.figures` and :mod:`counterwarp.report.animation`: 3D
figures stack one full-width panel per row (three views and a colour bar), 2D figures put
one panel per column; the footer states the cut coordinates in mm and the rule they follow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from counterwarp.errors import CounterwarpError
from counterwarp.report.display import cuts_note, new_figure, subject_cut_coords

__all__ = ["CUT_RULE", "check_shapes", "footer", "layout", "resolve_cuts"]

CUT_RULE = "centre of the brain mask"
_ROW = (9.5, 2.4)  # inches of one 3D panel (three views and a colour bar)
_CELL = (3.4, 3.0)  # inches of one 2D panel


def layout(
    n: int, ndim: int, title: str, columns_2d: int = 5, title_color: str = "white"
) -> tuple[Figure, list[tuple[float, float, float, float]]]:
    """A figure for ``n`` panels and their rectangles (figure fractions), top to bottom."""
    head, foot = (0.45 if title else 0.1), 0.3
    if ndim == 3:
        columns, (width, height) = 1, _ROW
    else:
        columns, (width, height) = max(1, min(columns_2d, n)), _CELL
    rows = math.ceil(n / columns)
    total_w, total_h = columns * width, rows * height + head + foot
    figure = new_figure(total_w, total_h)
    rects = []
    for k in range(n):
        row, column = divmod(k, columns)
        rects.append((column * width / total_w, (foot + (rows - 1 - row) * height) / total_h,
                      width / total_w, height / total_h))
    if title:
        figure.suptitle(title, color=title_color, fontsize=10, y=1 - 0.08 / total_h, va="top")
    return figure, rects


def footer(figure: Figure, cuts: tuple[float, ...], affine: np.ndarray | None) -> None:
    """State the cuts, their units and their rule under the panels."""
    rule = CUT_RULE if len(cuts) == 3 else "the slice's plane"
    figure.text(0.01, 0.1 / figure.get_size_inches()[1], cuts_note(cuts, affine, rule),
                color="0.75", fontsize=7, va="bottom")


def check_shapes(image: np.ndarray, others: Mapping[str, np.ndarray], what: str) -> None:
    """Raise :class:`CounterwarpError` unless ``image`` is 2D / 3D and ``others`` match it."""
    if image.ndim not in (2, 3):
        raise CounterwarpError(f"{what}: the image must be 2D or 3D, got shape {image.shape}")
    for name, values in others.items():
        if np.shape(values) != image.shape:
            raise CounterwarpError(
                f"{what}: {name!r} has shape {np.shape(values)}, the image {image.shape}"
            )


def resolve_cuts(
    anatomy: np.ndarray, affine: np.ndarray | None, cut_coords: tuple[float, ...] | None
) -> tuple[float, ...]:
    """``cut_coords`` as floats (mm), checked; default :func:`subject_cut_coords`."""
    if cut_coords is None:
        return subject_cut_coords(anatomy, affine)
    cuts = tuple(float(c) for c in cut_coords)
    if len(cuts) != (3 if anatomy.ndim == 3 else 1):
        raise CounterwarpError(
            f"cut_coords {cut_coords!r}: give {3 if anatomy.ndim == 3 else 1} world "
            f"coordinate(s) in mm for a {anatomy.ndim}D image"
        )
    return cuts
