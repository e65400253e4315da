"""End to end through the command line on a tiny 2D cohort: synth -> train-classifier ->
fit -> explain, and what lands on disk."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from counterwarp.cli import main
from counterwarp.data.derivatives import DATASET_DESCRIPTION_NAME, derivative_id, output_name
from counterwarp.data.manifest import image_id
from counterwarp.workflows.explain import SUMMARY_COLUMNS
from counterwarp.workflows.fit import fit_run
from counterwarp.workflows.folder import read_split

TINY_FIT = {"steps": 4, "batch_size": 4, "channels": (4, 8, 8), "latent_dim": 16,
            "checkpoint_every": 2}


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cohort, run = root / "cohort", root / "run"
    assert main(["synth", "--out", str(cohort), "--n", "24", "--dim", "2",
                 "--shape", "32", "32", "--seed", "3"]) == 0
    assert main(["train-classifier", "--manifest", str(cohort / "manifest.csv"),
                 "--out", str(run), "--epochs", "2"]) == 0
    summary = fit_run(cohort / "manifest.csv", run, progress=False, **TINY_FIT)
    return cohort, run, summary


def test_fit_writes_model_log_and_margin(fitted_run):
    cohort, run, summary = fitted_run
    assert (run / "simulator.pt").exists()
    fit = json.loads((run / "simulator_fit.json").read_text())
    logits_sd = fit["logit_std"]
    assert fit["margin"] == pytest.approx(logits_sd)  # default: 1 sd of training logits
    split = json.loads((run / "split.json").read_text())
    assert fit["n_images"] == len(split["train"]) + len(split["val"])
    with open(run / "simulator_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"shift", "cycle", "smooth", "magnitude", "moved_share"} <= set(rows[0])


def test_explain_writes_maps_on_the_input_grid(fitted_run, tmp_path, capsys):
    cohort, run, _ = fitted_run
    out = tmp_path / "explain"
    code = main(["explain", "--run", str(run), "--manifest", str(cohort / "manifest.csv"),
                 "--direction", "both", "--out", str(out)])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    split = read_split(run)  # paths resolved, however split.json stores them
    test_paths = [item["path"] for item in split["test"]]
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert len(rows) == 2 * len(test_paths)
    first = nib.load(test_paths[0])
    stem = derivative_id(image_id(__import__("pathlib").Path(test_paths[0])))
    assert rows[0]["id"] == stem
    for direction in ("remove", "inject"):
        change = nib.load(out / output_name(stem, direction, "logjac"))
        assert change.shape == first.shape
        np.testing.assert_allclose(change.affine, first.affine)
        simulated = nib.load(out / output_name(stem, direction, "simulated"))
        assert simulated.shape == first.shape
        field = nib.load(out / output_name(stem, direction, "xfm"))  # 2D: as ANTs writes
        assert field.shape == (*first.shape[:2], 1, 1, 2)
        assert (out / output_name(stem, direction, "panel")).stat().st_size > 1000
    assert (out / DATASET_DESCRIPTION_NAME).is_file()
    assert not list(out.glob("*_log_volume_change.nii.gz"))  # the old names are gone


def test_explain_resamples_back_to_a_different_input_grid(fitted_run, tmp_path):
    cohort, run, _ = fitted_run
    source = nib.load(next((cohort / "images").glob("*.nii.gz")))
    bigger = np.pad(source.get_fdata(), ((2, 2), (0, 4))).astype(np.float32)
    path = tmp_path / "other subject.nii.gz"
    nib.save(nib.Nifti1Image(bigger, source.affine), path)
    out = tmp_path / "out"
    assert main(["explain", "--run", str(run), str(path), "--direction", "inject",
                 "--out", str(out)]) == 0
    change = nib.load(out / "other_subject_desc-inject_logjac.nii.gz")
    assert change.shape == bigger.shape


def test_explain_bad_input_fails_cleanly(fitted_run, tmp_path, capsys):
    _, run, _ = fitted_run
    bad = tmp_path / "broken.nii.gz"
    bad.write_text("not an image")
    out = tmp_path / "out"
    assert main(["explain", "--run", str(run), str(bad), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "broken.nii.gz" in error and len(error.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_fit_without_classifier_is_a_clear_error(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n")
    code = main(["fit", "--manifest", str(manifest), "--run", str(tmp_path / "nowhere")])
    assert code == 2
    assert "classifier" in capsys.readouterr().err
