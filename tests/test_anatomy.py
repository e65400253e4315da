"""Tests for ``synth(anatomy=...)``: cohorts built from Colin27, a real individual's brain.

The Colin27 tests need Debian's ``mricron-data`` (``ch2bet.nii.gz``); without it they are
skipped, with the reason. The default-output, error and MNI-space checks run everywhere.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from counterwarp.data import anatomy as A
from counterwarp.data.effects import default_effect_spec, normalised_radius
from counterwarp.data.synthetic import synth
from counterwarp.data.template import (
    SyntheticGrid,
    Template,
    make_grid,
    mni_arrays,
    sample_at,
)
from counterwarp.errors import CounterwarpError

VENTRICLES = (1, 2)
HIPPOCAMPI = (3, 4)
SHAPE = (16, 16, 16)
N = 4
SEED = 0
EFFECT = 1.5


def _colin27_file() -> Path | None:
    try:
        return A.colin27_path()
    except CounterwarpError:
        return None


COLIN27 = _colin27_file()
needs_colin27 = pytest.mark.skipif(
    COLIN27 is None,
    reason=f"Colin27 {A.COLIN27_FILE} not found (in ${A.MRICRON_DIR_ENV} or {A.MRICRON_DIR}): "
    "`apt-get install mricron-data` to run the colin27 cohort tests",
)


def rows(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def read(root: Path, relative: str) -> np.ndarray:
    return np.asarray(nib.load(root / relative).dataobj)


def nifti_arrays(root: Path) -> dict[str, np.ndarray]:
    """Every NIfTI of a cohort (relative path -> array)."""
    return {str(p.relative_to(root)): np.asarray(nib.load(p).dataobj)
            for p in sorted(root.rglob("*.nii.gz"))}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def mni16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mni16")
    synth(out, n=N, shape=SHAPE, seed=SEED, effect=EFFECT, progress=False)
    return out


@pytest.fixture(scope="module")
def colin16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if COLIN27 is None:
        pytest.skip("Colin27 ch2bet.nii.gz missing: `apt-get install mricron-data`")
    out = tmp_path_factory.mktemp("colin16")
    synth(out, n=N, shape=SHAPE, seed=SEED, effect=EFFECT, progress=False, anatomy="colin27")
    return out


# ------------------------------------------------------------------ default: unchanged


def test_default_is_mni152_and_unchanged(mni16: Path, tmp_path: Path) -> None:
    explicit = tmp_path / "explicit"
    synth(explicit, n=N, shape=SHAPE, seed=SEED, effect=EFFECT, progress=False,
          anatomy="mni152")
    default, named = nifti_arrays(mni16), nifti_arrays(explicit)
    assert default.keys() == named.keys() and len(default) == 2 * N + 3  # images, truth
    for key in default:
        assert default[key].dtype == named[key].dtype
        np.testing.assert_array_equal(default[key], named[key], err_msg=key)
    assert (mni16 / "manifest.csv").read_bytes() == (explicit / "manifest.csv").read_bytes()
    cohort = json.loads((mni16 / "cohort.json").read_text())
    assert cohort["anatomy"] == "mni152"
    assert cohort["settings"]["template"] == "MNI152 T1 2 mm (nilearn), brain-masked"
    # the mask is the MNI152 template's, as before anatomies existed
    grid = make_grid(SHAPE, 3)
    _, mask, affine = mni_arrays()
    assert dice(read(mni16, "truth/brain_mask.nii.gz") > 0, _world_mask(grid, mask, affine)) > 0.9


def _world_mask(grid: SyntheticGrid, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``mask`` (on its own ``affine``) sampled at the grid's MNI mm, nearest neighbour."""
    mm = grid.mm_coordinates().reshape(3, -1)
    inverse = np.linalg.inv(affine)
    src = inverse[:3, :3] @ mm + inverse[:3, 3:4]
    return sample_at(mask, src, order=0, cval=0.0).reshape(grid.shape) > 0


# --------------------------------------------------------------------- errors, checks


def test_unknown_anatomy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CounterwarpError, match="mni152, colin27"):
        synth(tmp_path / "c", n=2, shape=(8, 8, 8), anatomy="colin", progress=False)
    assert not (tmp_path / "c").exists()


def test_missing_colin27_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(A.MRICRON_DIR_ENV, str(empty))
    out = tmp_path / "cohort"
    with pytest.raises(CounterwarpError) as caught:
        synth(out, n=2, shape=(8, 8, 8), anatomy="colin27", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "apt-get install mricron-data" in message and A.MRICRON_DIR_ENV in message
    assert str(empty) in message and "ch2bet.nii.gz" in message
    assert not out.exists()  # refused before anything was written


def test_a_brain_outside_mni_space_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ch2bet.nii.gz whose brain sits 40 mm off MNI space would put the effect regions on
    the wrong anatomy: refused."""
    data, mask, affine = mni_arrays()
    shifted = affine.copy()
    shifted[:3, 3] += (0.0, 40.0, 0.0)
    nib.save(nib.Nifti1Image((data * 255).astype(np.uint8), shifted), tmp_path / A.COLIN27_FILE)
    monkeypatch.setenv(A.MRICRON_DIR_ENV, str(tmp_path))
    with pytest.raises(CounterwarpError, match="not in MNI space"):
        A.anatomy_arrays("colin27")


@needs_colin27
def test_the_variable_points_at_another_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert COLIN27 is not None
    shutil.copy(COLIN27, tmp_path / A.COLIN27_FILE)
    monkeypatch.setenv(A.MRICRON_DIR_ENV, str(tmp_path))
    assert A.colin27_path() == tmp_path / A.COLIN27_FILE
    data, mask, _ = A.anatomy_arrays("colin27")
    assert data.shape == mask.shape == (181, 217, 181)


# ------------------------------------------------------------------- the colin27 cohort


@needs_colin27
def test_colin27_is_mni_aligned_and_on_the_mni152_scale() -> None:
    """The effect regions (MNI mm) land on Colin27's anatomy: its ventricle ellipsoids hold
    several times the brain's share of dark (CSF) voxels; intensities match MNI152's."""
    data, mask, affine = A.anatomy_arrays("colin27")
    brain = mask > 0
    assert (data[~brain] == 0).all() and (data[brain] > 0).all()
    mni_data, mni_mask, _ = mni_arrays()
    assert np.median(data[brain]) == pytest.approx(np.median(mni_data[mni_mask > 0]), abs=0.05)
    ijk = np.indices(data.shape, dtype=np.float64).reshape(3, -1)
    mm = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *data.shape)
    dark = brain & (data < 0.35)
    for region in default_effect_spec().regions[:2]:
        inside = brain & (normalised_radius(region, mm) <= 1.0)
        assert dark[inside].mean() > 3 * dark[brain].mean(), region.name


@needs_colin27
def test_colin27_cohort_records_its_anatomy(colin16: Path, mni16: Path) -> None:
    cohort = json.loads((colin16 / "cohort.json").read_text())
    mni = json.loads((mni16 / "cohort.json").read_text())
    assert cohort["anatomy"] == "colin27"
    assert "Colin27" in cohort["settings"]["template"]
    # same grid, same effect in MNI mm: only the anatomy differs
    assert cohort["affine"] == mni["affine"] and cohort["shape"] == mni["shape"] == list(SHAPE)
    assert cohort["effect_spec"] == mni["effect_spec"]


@needs_colin27
def test_colin27_images_differ_from_mni152(colin16: Path, mni16: Path) -> None:
    """Same seed, other anatomy: each Colin27 subject resembles Colin27 (sampled on the
    grid) more than MNI152, and each MNI152 subject the other way round."""
    grid = make_grid(SHAPE, 3)
    identity = grid.voxel_coordinates()
    colin_template, _ = Template(grid, A.anatomy_arrays("colin27")).sample(identity)
    mni_template, _ = Template(grid).sample(identity)
    colin_rows, mni_rows = rows(colin16), rows(mni16)
    assert colin_rows == mni_rows  # same seed: same labels, severities, ages

    def corr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
        return float(np.corrcoef(a[where], b[where])[0, 1])

    for row in colin_rows:
        colin, mni = read(colin16, row["path"]), read(mni16, row["path"])
        assert colin.shape == mni.shape == SHAPE and colin.dtype == np.float32
        assert np.isfinite(colin).all() and (colin >= 0).all()
        brain = (colin > 0) & (mni > 0)
        assert brain.sum() > 0.2 * colin.size
        assert np.abs(colin - mni)[brain].mean() > 0.01, row["subject"]
        assert ((colin > 0) ^ (mni > 0)).sum() > 20, row["subject"]
        own, other = corr(colin, colin_template, brain), corr(colin, mni_template, brain)
        assert own > other + 0.03, (row["subject"], own, other)
        own, other = corr(mni, mni_template, brain), corr(mni, colin_template, brain)
        assert own > other + 0.03, (row["subject"], own, other)


@needs_colin27
def test_colin27_brain_mask_overlaps_the_colin27_brain(colin16: Path) -> None:
    grid = make_grid(SHAPE, 3)
    _, mask, affine = A.anatomy_arrays("colin27")
    cohort_mask = read(colin16, "truth/brain_mask.nii.gz") > 0
    colin_brain = _world_mask(grid, mask, affine)
    _, mni_mask, mni_affine = mni_arrays()
    mni_brain = _world_mask(grid, mni_mask, mni_affine)
    assert dice(cohort_mask, colin_brain) > 0.95  # 0.97 as shipped
    assert dice(cohort_mask, colin_brain) > dice(cohort_mask, mni_brain) + 0.02  # 0.93
    # the brain fits on the grid (no face touched) and every image's non-zero voxels lie
    # near it (the subject warps move the edge by a few mm, about one voxel here)
    for axis in range(3):
        assert not cohort_mask.take(0, axis).any() and not cohort_mask.take(-1, axis).any()
    for row in rows(colin16):
        assert dice(read(colin16, row["path"]) > 0, cohort_mask) > 0.8


@needs_colin27
def test_colin27_truth_in_the_effect_regions(colin16: Path) -> None:
    regions = read(colin16, "truth/effect_regions.nii.gz")
    effect = read(colin16, "truth/effect_log_volume_change.nii.gz")
    ventricles, hippocampi = np.isin(regions, VENTRICLES), np.isin(regions, HIPPOCAMPI)
    assert ventricles.any() and hippocampi.any()
    assert effect[ventricles].mean() > 0.3 and effect[hippocampi].mean() < -0.1
    labels = [int(r["label"]) for r in rows(colin16)]
    assert 0 < sum(labels) < len(labels)
    for row in rows(colin16):
        truth = read(colin16, f"truth/{row['subject']}_log_volume_change.nii.gz")
        assert np.isfinite(truth).all()
        if row["label"] == "1":
            assert truth[ventricles].mean() > 0.1 and truth[hippocampi].mean() < 0
        else:
            assert not truth.any()


@needs_colin27
def test_colin27_slice_cohort(tmp_path: Path) -> None:
    out = tmp_path / "slice"
    synth(out, n=N, shape=(24, 24), dim=2, seed=SEED, effect=EFFECT, progress=False,
          anatomy="colin27")
    mask = read(out, "truth/brain_mask.nii.gz") > 0
    assert mask.shape == (24, 24) and 0.3 < mask.mean() < 0.9
    for axis in range(2):
        assert not mask.take(0, axis).any() and not mask.take(-1, axis).any()
    regions = read(out, "truth/effect_regions.nii.gz")
    for row in rows(out):
        image = read(out, row["path"])
        assert image.shape == (24, 24) and np.isfinite(image).all() and image.max() > 0.3
        truth = read(out, f"truth/{row['subject']}_log_volume_change.nii.gz")
        if row["label"] == "1":
            assert truth[np.isin(regions, VENTRICLES)].mean() > 0.1
        else:
            assert not truth.any()
    assert json.loads((out / "cohort.json").read_text())["anatomy"] == "colin27"
