"""counterwarp's own classifier sees every 3D image in RAS: the same anatomy stored in RAS,
LAS or PIR (same world coordinates) gets the same logit, and its maps land on the same
world voxels, written on each file's own grid."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import fitted_toy_run, stored_as
from counterwarp.cli import main
from counterwarp.workflows.folder import load_run_classifier, model_preprocessing

#: A non-trivial, non-RAS-symmetric affine: 2 mm voxels, shifted origin.
AFFINE = np.array([[2.0, 0, 0, -15], [0, 2.0, 0, -17], [0, 0, 2.0, -13], [0, 0, 0, 1]])


def _logit(out: Path) -> float:
    with (out / "summary.csv").open(encoding="utf-8") as handle:
        return float(next(csv.DictReader(handle))["logit_before"])


def _change_map(out: Path) -> Path:
    """The log volume change map the explain folder holds (one image, one direction)."""
    found = [p for p in out.glob("*.nii.gz") if "logjac" in p.name or "log_volume" in p.name]
    assert len(found) == 1, sorted(p.name for p in out.iterdir())
    return found[0]


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("canonical")
    return root, fitted_toy_run(root, AFFINE, seed=0)


def test_the_own_classifier_records_ras(fitted_run):
    _, run = fitted_run
    _, payload = load_run_classifier(run)
    assert payload["orientation"] == "RAS"
    assert model_preprocessing(payload).orientation == "RAS"


def test_same_anatomy_in_three_orientations_same_logit_same_world_map(fitted_run, tmp_path):
    root, run = fitted_run
    image = nib.load(root / "sub-001.nii.gz")
    data = image.get_fdata(dtype=np.float32)
    data[2:6, 5:9, 4:8] += 60.0  # a bright blob on one side only: a mirror would move it
    asymmetric = nib.Nifti1Image(data, image.affine)
    logits, maps = {}, {}
    for codes in ("RAS", "LAS", "PIR"):
        file = tmp_path / f"anatomy_{codes}.nii.gz"
        stored = stored_as(asymmetric, codes)
        nib.save(stored, file)
        assert nib.aff2axcodes(nib.load(file).affine) == tuple(codes)
        out = tmp_path / f"explain_{codes}"
        assert main(["explain", "--run", str(run), "--direction", "inject", "--out", str(out),
                     str(file)]) == 0
        logits[codes] = _logit(out)
        written = nib.load(_change_map(out))
        assert written.shape == stored.shape
        assert np.allclose(written.affine, stored.affine)
        maps[codes] = nib.as_closest_canonical(written)  # the same world grid for all
    assert logits["LAS"] == pytest.approx(logits["RAS"], abs=1e-4)
    assert logits["PIR"] == pytest.approx(logits["RAS"], abs=1e-4)
    reference = maps["RAS"].get_fdata()
    assert np.abs(reference).max() > 0  # the map is not empty, so the match means something
    for codes in ("LAS", "PIR"):
        assert np.allclose(maps[codes].affine, maps["RAS"].affine)
        assert np.allclose(maps[codes].get_fdata(), reference, atol=1e-4)
    # a mirrored array with the RAS affine is another anatomy: the logit must change
    mirrored = nib.Nifti1Image(np.ascontiguousarray(data[::-1]), image.affine)
    nib.save(mirrored, tmp_path / "mirrored.nii.gz")
    out = tmp_path / "explain_mirrored"
    assert main(["explain", "--run", str(run), "--direction", "inject", "--out", str(out),
                 str(tmp_path / "mirrored.nii.gz")]) == 0
    assert abs(_logit(out) - logits["RAS"]) > 1e-4


def test_a_run_moved_alone_or_with_its_cohort_keeps_its_split(fitted_run, tmp_path):
    """split.json stores paths relative to the run and absolute beside them: a run copied
    elsewhere alone still names the same images; a project moved whole uses the relative."""
    import shutil

    from counterwarp.workflows.folder import read_split

    root, run = fitted_run
    original = {p: sorted(i["path"] for i in read_split(run)[p]) for p in ("train", "test")}
    alone = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, alone)
    assert {p: sorted(i["path"] for i in read_split(alone)[p])
            for p in ("train", "test")} == original
    project = tmp_path / "project"
    shutil.copytree(root, project)
    moved = {p: sorted(i["path"] for i in read_split(project / "run")[p]) for p in ("train",)}
    assert all(path.startswith(str(project.resolve())) for path in moved["train"])
