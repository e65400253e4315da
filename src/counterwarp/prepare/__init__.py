"""Native T1 scans -> model-ready images: skull stripping, affine registration to MNI152.

- :mod:`~counterwarp.prepare.inputs`: which scans (folder, manifest CSV, BIDS dataset).
- :mod:`~counterwarp.prepare.skullstrip`: deepbet, or none for stripped scans.
- :mod:`~counterwarp.prepare.register`: SimpleITK affine registration, resampling to the
  model grid and back to native space (:func:`~counterwarp.prepare.register.to_native`).
- :mod:`~counterwarp.prepare.grid`: the model grid around the template brain.
- :mod:`~counterwarp.prepare.qc`: one registration-check PNG per subject.

The command itself (:func:`counterwarp.workflows.prepare.prepare_scans`) composes them and
writes the output folder; see docs/prepare.md.
"""

from counterwarp.prepare.grid import ModelGrid, model_grid
from counterwarp.prepare.inputs import Scan, discover_scans
from counterwarp.prepare.register import (
    Registration,
    load_template,
    read_transform,
    register_affine,
    to_native,
    to_template_grid,
    transform_matrix_ras,
    write_transform,
)
from counterwarp.prepare.skullstrip import SKULL_STRIP_METHODS, SkullStripper, dice

__all__ = [
    "SKULL_STRIP_METHODS", "ModelGrid", "Registration", "Scan", "SkullStripper", "dice",
    "discover_scans", "load_template", "model_grid", "read_transform", "register_affine",
    "to_native", "to_template_grid", "transform_matrix_ras", "write_transform",
]
