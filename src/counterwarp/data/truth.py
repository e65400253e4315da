"""The ground truth of a ``counterwarp synth`` cohort: its file names, and reading it back.

A cohort folder holds ``manifest.csv``, ``cohort.json`` and ``truth/`` with, per subject,
``<id>_log_volume_change.nii.gz`` (the true log volume change in the subject's image space,
zero for healthy subjects) and, in template space, the effect map at unit severity, the
effect's region labels and the template brain mask. :func:`load_cohort_truth` reads the truth
of chosen subjects onto a model grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from counterwarp.data.manifest import MANIFEST_NAME, ManifestRow, nifti_stem
from counterwarp.data.preprocess import resample_linear
from counterwarp.errors import CounterwarpError

__all__ = [
    "BRAIN_MASK_NAME",
    "COHORT_NAME",
    "EFFECT_NAME",
    "REGIONS_NAME",
    "REGIONS_TABLE_NAME",
    "TRUTH_DIR",
    "CohortTruth",
    "check_cohort",
    "load_cohort_truth",
    "subject_truth_name",
]

#: Every parameter of the cohort, its effect spec, grid spacing and affine.
COHORT_NAME = "cohort.json"
#: The folder of truth maps inside a cohort.
TRUTH_DIR = "truth"
#: Template-space log volume change of the effect at unit severity.
EFFECT_NAME = "effect_log_volume_change.nii.gz"
#: Template brain mask on the cohort grid (uint8).
BRAIN_MASK_NAME = "brain_mask.nii.gz"
#: Label map of the effect regions (int16, 1-based) and its ``label,name,...`` table.
REGIONS_NAME = "effect_regions.nii.gz"
REGIONS_TABLE_NAME = "effect_regions.csv"


def subject_truth_name(subject: str) -> str:
    """File name (inside :data:`TRUTH_DIR`) of one subject's true log volume change."""
    return f"{subject}_log_volume_change.nii.gz"


@dataclass
class CohortTruth:
    """Ground truth of held-out subjects, on the model grid.

    Attributes:
        truths: ``(N, *S)`` float32 true log volume change per subject (zero if healthy).
        effect: ``(*S)`` float32 template-space effect, unit severity.
        template_mask: ``(*S)`` bool template brain mask.
        ids: N subject ids (image file names without NIfTI suffixes).
    """

    truths: np.ndarray
    effect: np.ndarray
    template_mask: np.ndarray
    ids: list[str]



def check_cohort(data: Path) -> Path:
    """``DATA/truth`` after checking the cohort folder; a clear error otherwise."""
    if not data.is_dir():
        raise CounterwarpError(
            f"--data {data}: no such folder; make a cohort with `counterwarp synth --out {data}`"
        )
    if not (data / MANIFEST_NAME).is_file():
        raise CounterwarpError(
            f"--data {data}: no manifest.csv; the benchmark needs a cohort made by "
            f"`counterwarp synth --out {data}`"
        )
    truth = data / TRUTH_DIR
    missing = [
        name for name in (EFFECT_NAME, BRAIN_MASK_NAME) if not (truth / name).is_file()
    ]
    if not truth.is_dir() or missing:
        what = "no truth/ folder" if not truth.is_dir() else f"no truth/{missing[0]}"
        raise CounterwarpError(
            f"--data {data}: {what}. The benchmark scores maps against the known volume change "
            f"that `counterwarp synth` writes; the data must come from `counterwarp synth "
            f"--out {data}`"
        )
    return truth


def _subject_truth_paths(truth_dir: Path, rows: Sequence[ManifestRow]) -> list[Path]:
    paths = [truth_dir / subject_truth_name(nifti_stem(row.path)) for row in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CounterwarpError(
            f"{missing[0]} not found ({len(missing)} subject truth file(s) missing): the data "
            f"must come from `counterwarp synth`, with the images of its manifest.csv"
        )
    return paths


def _read_on_grid(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import nibabel as nib

    try:
        values = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    except Exception as error:  # noqa: BLE001 - any read failure is a bad file
        raise CounterwarpError(
            f"{path}: cannot read it ({type(error).__name__}); re-run `counterwarp synth`"
        ) from None
    if not np.isfinite(values).all():
        raise CounterwarpError(
            f"{path}: {int((~np.isfinite(values)).sum())} NaN/Inf value(s) in a truth map; "
            "re-run `counterwarp synth`"
        )
    while values.ndim > len(shape) and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != len(shape):
        raise CounterwarpError(
            f"{path} has shape {values.shape}; the classifier's grid is {shape} "
            f"({len(shape)}D). Use the cohort the run was trained on"
        )
    return resample_linear(values, shape)


def load_cohort_truth(
    data: str | Path, rows: Sequence[ManifestRow], shape: tuple[int, ...]
) -> CohortTruth:
    """Read the truth of ``rows`` (images of a ``synth`` cohort) onto the model grid ``shape``.

    Maps on another grid are resampled linearly, as the images are; the mask is re-thresholded
    at 0.5.
    """
    truth_dir = check_cohort(Path(data))
    paths = _subject_truth_paths(truth_dir, rows)
    truths = np.stack([_read_on_grid(p, shape) for p in paths]) if paths else np.zeros(
        (0, *shape), np.float32
    )
    effect = _read_on_grid(truth_dir / EFFECT_NAME, shape)
    mask = _read_on_grid(truth_dir / BRAIN_MASK_NAME, shape) > 0.5
    return CohortTruth(truths, effect, mask, [nifti_stem(row.path) for row in rows])

