"""counterwarp prepare on a real individual brain: Colin27 from Debian's mricron-data.

``ch2.nii.gz`` (with skull) and ``ch2bet.nii.gz`` (its BET-stripped version) are moved by a
known rigid + scale transform, stored as PIR with 1 x 1 x 1.2 mm voxels and a field of view
cut 20 mm at the bottom (:func:`counterwarp.prepare.simulate.native_like`), then prepared
with deepbet. Skipped, with the reason, where mricron-data (or deepbet) is not installed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from counterwarp.prepare import load_template, read_transform, register_affine
from counterwarp.prepare.register import transform_matrix_ras
from counterwarp.prepare.simulate import brain_points, native_like, registration_error
from counterwarp.prepare.skullstrip import dice
from counterwarp.workflows.prepare import SUFFIXES, prepare_scans

TEMPLATES = Path("/usr/share/mricron/templates")
#: deepbet's native mask against the moved ch2bet mask; measured 0.94.
MIN_DICE = 0.90
#: Registration error against the known transform composed with the same registration of
#: the unmoved ch2bet (mm over the MNI152 brain); measured mean ~0.9, max ~1.8 end to end.
MEAN_ERROR_MM = 2.0
MAX_ERROR_MM = 4.0
#: ch2bet's own affine registration against the identity (Colin27 is in MNI space already;
#: measured mean 1.6 mm, max 3.5 mm against MNI152 2009).
REFERENCE_MEAN_MM = 3.0


@pytest.fixture(scope="module")
def colin(tmp_path_factory):
    if not (TEMPLATES / "ch2.nii.gz").is_file() or not (TEMPLATES / "ch2bet.nii.gz").is_file():
        pytest.skip(f"Colin27 not installed ({TEMPLATES}/ch2.nii.gz, ch2bet.nii.gz): "
                    "apt-get install mricron-data")
    pytest.importorskip("deepbet", reason="deepbet not installed: pip install deepbet")
    head = nib.load(TEMPLATES / "ch2.nii.gz")
    stripped = nib.load(TEMPLATES / "ch2bet.nii.gz")
    mask = nib.Nifti1Image((np.asarray(stripped.dataobj) > 0).astype(np.uint8), stripped.affine)
    options = {"codes": "PIR", "voxel_size": (1.0, 1.0, 1.2), "crop_mm": 20.0}
    moved = native_like(head, 0, **options)
    moved_mask = native_like(mask, 0, matrix=moved.matrix, order=0, **options).image
    root = tmp_path_factory.mktemp("colin")
    (root / "in").mkdir()
    nib.save(moved.image, root / "in" / "colin.nii.gz")
    (root / "in" / "manifest.csv").write_text("path,label,age\ncolin.nii.gz,0,27\n")
    out = root / "out"
    prepare_scans(root / "in" / "manifest.csv", out, skull_strip="deepbet", progress=False)
    return {"out": out, "matrix": moved.matrix, "mask": moved_mask, "stripped": stripped,
            "native": moved.image}


def test_deepbet_mask_matches_ch2bet(colin):
    mask = nib.load(colin["out"] / f"colin{SUFFIXES['mask']}")
    assert mask.shape == colin["native"].shape
    np.testing.assert_allclose(mask.affine, colin["native"].affine)
    overlap = dice(np.asarray(mask.dataobj) > 0, np.asarray(colin["mask"].dataobj) > 0)
    assert overlap > MIN_DICE, overlap


def test_registration_recovers_the_known_transform(colin):
    template = load_template()
    points = brain_points(template.mask)
    reference = transform_matrix_ras(register_affine(colin["stripped"], template).transform)
    assert registration_error(reference, np.eye(4), points)[0] < REFERENCE_MEAN_MM
    estimated = transform_matrix_ras(read_transform(
        colin["out"] / f"colin{SUFFIXES['transform']}"))
    mean, largest = registration_error(estimated, colin["matrix"] @ reference, points)
    assert mean < MEAN_ERROR_MM, mean
    assert largest < MAX_ERROR_MM, largest


def test_prepared_image_and_manifest(colin):
    out = colin["out"]
    with open(out / "manifest.csv", encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["label"], row["age"]) == ("0", "27")
    image = np.asarray(nib.load(out / row["path"]).dataobj)
    assert image.shape == (32, 32, 32)
    brain = image > 0
    assert 0.2 < brain.mean() < 0.6  # the brain fills the box around the template brain
    assert (out / row["native_path"]).resolve() == (out.parent / "in" / "colin.nii.gz").resolve()
