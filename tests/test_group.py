"""Group maps (mean, t, FDR, regions) on hand-made maps with a known effect, and the
progression along a velocity-field simulator's flow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from counterwarp.data.derivatives import output_name
from counterwarp.data.maps import load_map_folder, read_atlas_names
from counterwarp.errors import CounterwarpError
from counterwarp.explain.progression import progression_frames
from counterwarp.explain.simulator import Simulator
from counterwarp.nn.simulator import SimulatorNet
from counterwarp.stats.group import fdr_mask, group_statistics
from counterwarp.workflows.group import group_run
from counterwarp.workflows.progression import write_progression, write_progression_gif

SHAPE = (16, 16, 16)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
AFFINE[:3, 3] = (-30.0, -40.0, -20.0)
GROWTH, SHRINK = 0.3, -0.5  # true mean log volume change of the two regions


def _labels() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[3:7, 4:9, 4:8] = 1  # grows
    labels[10:13, 8:12, 9:13] = 2  # shrinks
    return labels


@pytest.fixture
def known_effect(tmp_path: Path) -> dict:
    """10 subjects: region 1 at +0.3, region 2 at -0.5, everywhere noise of sd 0.1."""
    rng = np.random.default_rng(0)
    labels = _labels()
    truth = np.where(labels == 1, GROWTH, 0.0) + np.where(labels == 2, SHRINK, 0.0)
    maps = truth + rng.normal(0.0, 0.1, size=(10, *SHAPE))
    folder = tmp_path / "maps"
    folder.mkdir()
    for index, values in enumerate(maps):
        nib.save(nib.Nifti1Image(values.astype(np.float32), AFFINE),
                 str(folder / f"sub-{index:02d}.nii.gz"))
    atlas = tmp_path / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(labels, AFFINE), str(atlas))
    names = tmp_path / "atlas.csv"
    names.write_text("label,name,extra\n1,growing region,x\n2,shrinking region,y\n")
    return {"maps": maps.astype(np.float32).astype(np.float64), "labels": labels,
            "folder": folder, "atlas": atlas, "names": names}


def test_group_maps_find_the_known_effect(known_effect, tmp_path):
    out = tmp_path / "group"
    summary = group_run(None, out, maps_dir=known_effect["folder"], atlas=known_effect["atlas"],
                        atlas_names=known_effect["names"], progress=False)
    assert summary["n_subjects"] == 10
    labels = known_effect["labels"]
    region = labels > 0
    t = nib.load(out / "group_inject_t.nii.gz")
    np.testing.assert_allclose(t.affine, AFFINE)
    t_map = np.asarray(t.get_fdata())
    assert np.all(t_map[labels == 1] > 4) and np.all(t_map[labels == 2] < -4)
    assert np.median(np.abs(t_map[~region])) < 1.5
    fdr = np.asarray(nib.load(out / "group_inject_fdr_mask.nii.gz").get_fdata()) > 0
    assert fdr[region].mean() >= 0.95
    assert fdr[~region].mean() < 0.01
    mean = np.asarray(nib.load(out / "group_inject_mean.nii.gz").get_fdata())
    np.testing.assert_allclose(mean, known_effect["maps"].mean(0), atol=1e-6)
    p = np.asarray(nib.load(out / "group_inject_p.nii.gz").get_fdata())
    assert p.min() >= 0 and p.max() <= 1 and p[region].max() < 1e-3
    for name in ("mean.png", "mean_significant.png", "README.txt", "summary.json",
                 "brain_mask.nii.gz", "subjects.nii.gz", "effect_size.nii.gz",
                 "fwe_tfce_mask.nii.gz"):
        assert (out / f"group_inject_{name}").is_file(), name
    assert nib.load(out / "group_inject_subjects.nii.gz").shape == (*SHAPE, 10)
    assert "registered" in (out / "group_inject_README.txt").read_text()
    assert json.loads((out / "group_inject_summary.json").read_text())["n_fdr_voxels"] > 0


def test_region_table_is_sorted_by_effect_with_exact_means(known_effect, tmp_path):
    out = tmp_path / "group"
    summary = group_run(None, out, maps_dir=known_effect["folder"], direction="remove",
                        atlas=known_effect["atlas"], atlas_names=known_effect["names"],
                        progress=False)
    maps, labels = known_effect["maps"], known_effect["labels"]
    with open(out / "group_remove_regions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["shrinking region", "growing region", "outside"]
    for row, label in zip(rows, (2, 1, 0), strict=True):
        expected = maps[:, labels == label].mean()
        assert float(row["mean_log_volume_change"]) == pytest.approx(expected, rel=1e-5)
        assert int(row["n_voxels"]) == int((labels == label).sum())
        assert float(row["percent_volume_change"]) == pytest.approx(
            100 * np.expm1(expected), rel=1e-5)
    exact = summary["regions"]
    assert exact[0]["mean_log_volume_change"] == pytest.approx(
        maps[:, labels == 2].mean(), rel=1e-9)
    assert exact[0]["t"] < -10 and exact[1]["t"] > 10
    assert abs(exact[0]["mean_log_volume_change"] - SHRINK) < 0.02


def test_map_folder_with_mismatched_shapes_is_refused(known_effect, tmp_path):
    folder = known_effect["folder"]
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 15), np.float32), AFFINE),
             str(folder / "sub-99.nii.gz"))
    with pytest.raises(CounterwarpError, match="shape"):
        load_map_folder(folder)
    with pytest.raises(CounterwarpError, match="one grid"):
        group_run(None, tmp_path / "out", maps_dir=folder, progress=False)
    assert not (tmp_path / "out").exists()


def test_map_folder_with_another_affine_is_refused(known_effect):
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), shifted),
             str(known_effect["folder"] / "sub-99.nii.gz"))
    with pytest.raises(CounterwarpError, match="affine"):
        load_map_folder(known_effect["folder"])


def test_map_folder_reads_only_the_direction_of_an_explain_folder(tmp_path):
    folder = tmp_path / "explain"
    folder.mkdir()
    for index in range(3):
        for direction, value in (("inject", 1.0), ("remove", -1.0)):
            values = np.full((8, 8), value + index, np.float32)
            nib.save(nib.Nifti1Image(values, np.eye(4)),
                     str(folder / output_name(f"s{index}", direction, "logjac")))
            nib.save(nib.Nifti1Image(values, np.eye(4)),  # same grid, not a map
                     str(folder / output_name(f"s{index}", direction, "simulated")))
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 1, 1, 2), np.float32), np.eye(4)),
                 str(folder / output_name(f"s{index}", "inject", "xfm")))
    maps, _, ids = load_map_folder(folder, "remove")
    assert ids == [f"s{i}_desc-remove_logjac" for i in range(3)]
    assert np.allclose(maps[:, 0, 0], [-1.0, 0.0, 1.0])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CounterwarpError, match="at least 2"):
        load_map_folder(empty, None)


def test_missing_maps_folder_and_bad_names_csv(tmp_path):
    with pytest.raises(CounterwarpError, match="not a folder"):
        load_map_folder(tmp_path / "nowhere")
    bad = tmp_path / "names.csv"
    bad.write_text("id,region\n1,a\n")
    with pytest.raises(CounterwarpError, match="label,name"):
        read_atlas_names(bad)


def test_fdr_matches_benjamini_hochberg_by_hand():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    # BH at q = 0.05: largest k with p_(k) <= k q / m: k = 2 (0.008 <= 0.01; 0.039 > 0.015)
    assert fdr_mask(p, 0.05).tolist() == [True, True] + [False] * 8
    mask = np.zeros(10, bool)
    mask[:2] = True
    assert fdr_mask(p, 0.05, mask).tolist() == [True, True] + [False] * 8
    with pytest.raises(CounterwarpError):
        fdr_mask(p, 1.5)


def test_group_statistics_handle_constant_voxels():
    maps = np.zeros((4, 3))
    maps[:, 1] = 0.2  # no spread, non-zero mean
    maps[:, 2] = [0.1, 0.2, 0.3, 0.4]
    result = group_statistics(maps)
    assert result["t"][0] == 0 and result["p"][0] == 1
    assert result["t"][1] == 0 and result["p"][1] == 1  # zero spread: no t
    assert not result["fdr"][1] and list(result["zero_spread"]) == [True, True, False]
    expected_t = 0.25 / (np.std([0.1, 0.2, 0.3, 0.4], ddof=1) / 2)
    assert result["t"][2] == pytest.approx(expected_t)
    with pytest.raises(CounterwarpError, match="at least 2"):
        group_statistics(maps[:1])


# --------------------------------------------------------------------------- progression


class _MeanLogit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).mean(1)


def _hand_made_simulator(field: str) -> Simulator:
    """A small simulator with random (non-zero) weights, no training needed."""
    torch.manual_seed(0)
    net = SimulatorNet((32, 32), field=field, channels=(4, 8, 8), latent_dim=16)
    with torch.no_grad():
        for parameter in net.head.parameters():
            parameter.normal_(0.0, 0.2)
    net.eval()
    simulator = Simulator(field=field, channels=(4, 8, 8), latent_dim=16)
    simulator.net_ = net
    simulator.classifier_ = _MeanLogit().eval()
    simulator.margin_ = 1.0
    return simulator


def _image() -> torch.Tensor:
    axes = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    radius = axes[0] ** 2 + axes[1] ** 2
    image = torch.where(radius < 0.6, 1.0 + torch.sin(6 * axes[0]) * torch.cos(5 * axes[1]),
                        torch.zeros(()))
    return image[None, None].float()


def test_progression_starts_at_the_image_and_ends_at_the_simulation(tmp_path):
    simulator = _hand_made_simulator("velocity")
    image = _image()
    frames, changes = progression_frames(simulator, image, "inject", 5)
    assert frames.shape == changes.shape == (5, 32, 32)
    np.testing.assert_array_equal(frames[0], image[0, 0].numpy())
    assert np.all(changes[0] == 0)
    explanation = simulator.explain(image, "inject")
    assert float(explanation.displacement.abs().max()) > 0.1  # the test is not trivial
    np.testing.assert_allclose(frames[-1], explanation.simulated[0, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(changes[-1], explanation.log_volume_change[0].numpy(),
                               atol=1e-5)
    # the change grows along the path
    size = [float(np.abs(c).mean()) for c in changes]
    assert size == sorted(size) and size[-1] > 0
    path = write_progression_gif(tmp_path / "p.gif", frames, changes, title="sub")
    with Image.open(path) as gif:
        assert gif.n_frames == 5
        assert gif.format == "GIF"


def test_write_progression_names_the_gif_after_image_and_direction(tmp_path):
    simulator = _hand_made_simulator("velocity")
    path = write_progression(tmp_path, "sub-01", simulator, _image()[0], "remove", 3)
    assert path == tmp_path / output_name("sub-01", "remove", "progression")
    assert path.name == "sub-01_desc-remove_progression.gif"
    with Image.open(path) as gif:
        assert gif.n_frames == 3


def test_progression_of_a_displacement_simulator_asks_for_velocity():
    simulator = _hand_made_simulator("displacement")
    with pytest.raises(CounterwarpError, match="--field velocity"):
        progression_frames(simulator, _image(), "inject", 4)
    frames, _ = progression_frames(simulator, _image(), "inject", 3, linear_displacement=True)
    np.testing.assert_allclose(frames[-1], simulator.explain(_image(), "inject")
                               .simulated[0, 0].numpy(), atol=1e-5)


def test_progression_checks_its_arguments():
    simulator = _hand_made_simulator("velocity")
    with pytest.raises(CounterwarpError, match="frames"):
        progression_frames(simulator, _image(), "inject", 1)
    with pytest.raises(CounterwarpError, match="shape"):
        progression_frames(simulator, torch.zeros(1, 1, 16, 16), "inject", 3)
    with pytest.raises(CounterwarpError, match="direction"):
        progression_frames(simulator, _image(), "sideways", 3)


def test_a_3d_atlas_on_another_grid_is_resampled(known_effect, tmp_path):
    labels = known_effect["labels"]
    fine = np.repeat(np.repeat(np.repeat(labels, 2, 0), 2, 1), 2, 2)  # 2 mm voxels
    affine = AFFINE.copy()
    affine[:3, :3] /= 2.0
    affine[:3, 3] -= 1.0  # centres of the 2 mm voxels inside each 4 mm voxel
    atlas = tmp_path / "fine_atlas.nii.gz"
    nib.save(nib.Nifti1Image(fine, affine), str(atlas))
    summary = group_run(None, tmp_path / "out", maps_dir=known_effect["folder"], atlas=atlas,
                        figures=False, progress=False)
    counts = {row["label"]: row["n_voxels"] for row in summary["regions"]}
    assert counts[1] == int((labels == 1).sum()) and counts[2] == int((labels == 2).sum())
