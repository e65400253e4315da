"""The registration check of one subject: template brain edges over the registered brain.

One PNG per subject: the subject's skull-stripped brain resampled into MNI152 space (the
2 mm template grid) in three orthogonal slices through the template's centre of mass
(sagittal, coronal, axial, drawn by :func:`counterwarp.report.display.draw_volume`, so
nilearn's L/R and the house's P/A, S/I letters are on every view), with the edges of the
MNI152 brain template drawn over it in red (nilearn ``add_edges``). A good registration
puts the red edges on the subject's own brain outline, ventricles and sulci.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from counterwarp.report.display import draw_volume, new_figure, save_figure, subject_cut_coords


def registration_figure(
    registered: Any, template_brain: Any, path: str | Path, title: str
) -> Path:
    """Write the QC PNG of one subject atomically.

    Args:
        registered: nibabel image ``(X, Y, Z)`` of the subject's brain in MNI152 space, on
            the template's grid (intensities in any unit, zero outside the brain).
        template_brain: nibabel image of the MNI152 brain on the same grid.
        path: the PNG to write.
        title: text in the first view's corner (the subject id, the metric).

    Returns:
        ``path``.
    """
    anatomy = np.asarray(registered.get_fdata(), dtype=np.float32)
    reference = np.asarray(template_brain.get_fdata(), dtype=np.float32)
    cuts = subject_cut_coords(reference, template_brain.affine)
    figure = new_figure(9.0, 3.4)
    display = draw_volume(figure, (0.0, 0.0, 1.0, 1.0), anatomy, cuts,
                          affine=registered.affine, title=title)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        display.add_edges(template_brain, color="r")
    return save_figure(figure, path, dpi=100)
