"""Every explanation judged: the ``valid`` rule, the explain table and panels that carry it,
and group maps that use only valid explanations of the direction's own group."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from conftest import fitted_toy_run
from counterwarp.errors import CounterwarpError
from counterwarp.explain.validity import GROUP_SUBJECTS, invalid_reason, valid_explanations
from counterwarp.report.figures import draw_explanation


def test_valid_means_moved_past_the_margin_and_folding_nowhere():
    moved = torch.tensor([True, True, False, False])
    folding = torch.tensor([0.0, 0.001, 0.0, 0.2])
    assert valid_explanations(moved, folding).tolist() == [True, False, False, False]
    assert invalid_reason(True, 0.0) == ""
    assert "margin" in invalid_reason(False, 0.0)
    assert "folds in 0.10% of voxels" in invalid_reason(True, 0.001)
    both = invalid_reason(False, 0.2)
    assert "margin" in both and "folds" in both
    assert GROUP_SUBJECTS == {"inject": "healthy", "remove": "diseased"}


def test_an_invalid_panel_says_so_in_red():
    image = np.zeros((8, 8), np.float32)
    image[2:6, 2:6] = 1.0
    change = np.zeros_like(image)
    marked = draw_explanation(image, image, change, title="sub-1: inject",
                              invalid="the logit did not move past the margin")
    title = marked.figure.get_suptitle()
    assert title.startswith("NOT VALID (the logit did not move past the margin)")
    assert marked.figure._suptitle.get_color() == "#ff5555"
    plain = draw_explanation(image, image, change, title="sub-1: inject")
    assert plain.figure.get_suptitle() == "sub-1: inject"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("validity")
    return root, fitted_toy_run(root, np.diag([4.0, 4.0, 4.0, 1.0]), seed=3)


def test_explain_table_has_valid_consistent_with_moved_and_folding(toy_run, tmp_path):
    from counterwarp.cli import main

    root, run = toy_run
    out = tmp_path / "explain"
    assert main(["explain", "--run", str(run), "--manifest", str(root / "manifest.csv"),
                 "--split", "train+val+test", "--out", str(out)]) == 0
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    for row in rows:
        expected = row["moved_by_margin"] == "True" and float(row["folding_share"]) == 0.0
        assert row["valid"] == str(expected)
        assert (row["invalid_reason"] == "") == expected


def test_group_maps_use_valid_explanations_of_the_directions_own_group(toy_run, tmp_path):
    from counterwarp.data.preprocess import load_model_input
    from counterwarp.workflows.folder import (
        load_run_simulator,
        model_preprocessing,
        model_shape,
        rows_in_split,
    )
    from counterwarp.workflows.group import group_run

    root, run = toy_run
    simulator, payload = load_run_simulator(run)
    rows = rows_in_split(run, root / "manifest.csv", "train+val+test")
    healthy = [r for r in rows if int(r.label) == 0]
    images = torch.stack([load_model_input(r.path, model_shape(payload),
                                           model_preprocessing(payload))[0] for r in healthy])
    n_valid = int(simulator.explain(images, "inject").valid.sum())

    everything = group_run(run, tmp_path / "all", split="train+val+test", figures=False,
                           valid_only=False, permutations=0, progress=False)
    assert everything["subjects"] == "healthy"  # inject maps the healthy by default
    assert everything["n_subjects"] == len(healthy) == everything["n_explained"]
    assert everything["n_invalid"] == len(healthy) - n_valid
    if n_valid >= 2:
        valid = group_run(run, tmp_path / "valid", split="train+val+test", figures=False,
                          permutations=0, progress=False)
        assert valid["n_subjects"] == n_valid
        assert len(valid["invalid_ids"]) == len(healthy) - n_valid
    else:
        with pytest.raises(CounterwarpError, match="valid"):
            group_run(run, tmp_path / "valid", split="train+val+test", figures=False,
                      permutations=0, progress=False)
    pooled = group_run(run, tmp_path / "pooled", split="train+val+test", subset="all",
                       valid_only=False, figures=False, permutations=0, progress=False)
    assert pooled["n_subjects"] == len(rows)
