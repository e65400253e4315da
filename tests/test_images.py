"""The nilearn-style image API: paths or nibabel images in, nibabel images out on the
input's grid, the same numbers ``counterwarp explain`` and ``saliency`` write."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import fitted_toy_run
from counterwarp.cli import main
from counterwarp.data.derivatives import output_name
from counterwarp.errors import CounterwarpError
from counterwarp.images import Explainer

AFFINE = np.array([[-2.0, 0, 0, 15], [0, 2.0, 0, -17], [0, 0, 2.0, -13], [0, 0, 0, 1]])  # LAS


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    return root, fitted_toy_run(root, AFFINE, seed=1)


def test_explain_matches_the_command_and_keeps_the_affine(fitted, tmp_path):
    root, run = fitted
    path = root / "sub-003.nii.gz"
    out = tmp_path / "explained"
    assert main(["explain", "--run", str(run), "--direction", "inject", "--out", str(out),
                 str(path)]) == 0
    with (out / "summary.csv").open(encoding="utf-8") as handle:
        row = next(csv.DictReader(handle))
    explainer = Explainer(run)
    result = explainer.explain(path, direction="inject")
    source = nib.load(path)
    for image in (result.simulated, result.log_jacobian):
        assert image.shape == source.shape
        np.testing.assert_allclose(image.affine, source.affine)
    assert result.displacement.shape == (*source.shape, 1, 3)
    written = nib.load(out / output_name("sub-003", "inject", "logjac")).get_fdata()
    np.testing.assert_allclose(result.log_jacobian.get_fdata(), written, atol=1e-6)
    simulated = nib.load(out / output_name("sub-003", "inject", "simulated")).get_fdata()
    np.testing.assert_allclose(result.simulated.get_fdata(), simulated, atol=1e-4)
    assert result.score_before == pytest.approx(float(row["logit_before"]), abs=1e-4)
    assert result.score_after == pytest.approx(float(row["logit_after"]), abs=1e-4)
    assert explainer.score(path) == pytest.approx(result.score_before, abs=1e-5)
    assert np.abs(written).max() > 0  # a real map, so the match means something


def test_an_in_memory_image_gives_what_its_file_gives(fitted):
    root, run = fitted
    path = root / "sub-004.nii.gz"
    explainer = Explainer(run)
    from_file = explainer.explain(path, direction="remove")
    from_memory = explainer.explain(nib.load(path), direction="remove")
    np.testing.assert_allclose(from_memory.log_jacobian.get_fdata(),
                               from_file.log_jacobian.get_fdata(), atol=1e-6)
    assert from_memory.score_before == pytest.approx(from_file.score_before, abs=1e-6)
    assert explainer.score(from_file.simulated) == pytest.approx(
        explainer.score(nib.Nifti1Image(from_file.simulated.get_fdata(), AFFINE)), abs=1e-5)


def test_saliency_is_on_the_input_grid_and_matches_the_command(fitted, tmp_path):
    root, run = fitted
    path = root / "sub-005.nii.gz"
    out = tmp_path / "saliency"
    assert main(["saliency", "--run", str(run), "--method", "gradient", "--out", str(out),
                 str(path)]) == 0
    image = Explainer(run).saliency(nib.load(path), method="gradient")
    assert image.shape == nib.load(path).shape
    np.testing.assert_allclose(image.affine, AFFINE)
    np.testing.assert_allclose(image.get_fdata(),
                               nib.load(out / "sub-005_gradient.nii.gz").get_fdata(),
                               rtol=1e-4, atol=1e-6)


def test_bad_arguments_are_named(fitted):
    _, run = fitted
    explainer = Explainer(run)
    with pytest.raises(CounterwarpError, match="nibabel image"):
        explainer.explain(np.zeros((16, 16, 16)))
    with pytest.raises(CounterwarpError, match="method 'magic'"):
        explainer.saliency(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), AFFINE),
                           method="magic")
