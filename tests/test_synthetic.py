"""Tests for counterwarp.data.synthetic: cohorts, ground truth, determinism, validation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from counterwarp.data import effects as E
from counterwarp.data import synthetic as S
from counterwarp.data.effects import (
    EffectRegion,
    EffectSpec,
    default_effect_spec,
    effect_deformation,
    region_label_map,
)
from counterwarp.data.synthetic import synth
from counterwarp.data.template import CORONAL_SLICE_Y_MM, make_grid
from counterwarp.errors import CounterwarpError

VENTRICLES = (1, 2)
HIPPOCAMPI = (3, 4)
EFFECT32 = 1.5  # effect of the small 32^3 cohort: a clear signal with 5 subjects per group


def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def load(root: Path, relative: str) -> nib.Nifti1Image:
    return nib.load(root / relative)


def truth_path(root: Path, subject: str) -> Path:
    return root / "truth" / f"{subject}_log_volume_change.nii.gz"


def ventricle_csf_count(image: np.ndarray, ventricles: np.ndarray) -> int:
    """Voxels darker than 0.7 x the brain's median intensity inside the ventricle zone."""
    brain = image > 0
    median = np.median(image[brain])
    return int(((image < 0.7 * median) & brain & ventricles).sum())


@pytest.fixture(scope="module")
def cohort32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort32")
    synth(out, n=10, shape=(32, 32, 32), seed=3, effect=EFFECT32, progress=False)
    return out


@pytest.fixture(scope="module")
def cohort32_null(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same seed as ``cohort32`` but no disease effect: the same subjects, unaffected."""
    out = tmp_path_factory.mktemp("cohort32_null")
    synth(out, n=10, shape=(32, 32, 32), seed=3, effect=0.0, progress=False)
    return out


@pytest.fixture(scope="module")
def cohort16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort16")
    synth(out, n=6, shape=(16, 16, 16), seed=0, progress=False)
    return out


# ----------------------------------------------------------------- (a) analytic truth


@pytest.mark.parametrize("s", [1.25, 0.8])
def test_truth_of_a_scaled_sphere(s: float) -> None:
    """One spherical region scaled by s: truth = 3 log s inside; its field is the analytic
    pull-back p -> c + (p - c) / s there (growth for s > 1)."""
    grid = make_grid((24, 24, 24), 3)
    centre_mm = (0.0, -15.0, 10.0)
    radius = 45.0
    spec = EffectSpec([EffectRegion("ball", centre_mm, (radius,) * 3, 3 * math.log(s))])
    displacement, truth = effect_deformation(spec, grid)
    assert displacement.shape == (3, 24, 24, 24) and truth.shape == (24, 24, 24)

    mm = grid.mm_coordinates()
    r = np.sqrt(((mm - np.reshape(centre_mm, (3, 1, 1, 1))) ** 2).sum(0)) / radius
    inside = r <= 0.6
    assert inside.sum() > 50
    np.testing.assert_allclose(truth[inside], 3 * math.log(s), atol=0.01)
    assert np.sign(truth[inside]).tolist() == [np.sign(math.log(s))] * int(inside.sum())

    centre = grid.mm_to_voxels(centre_mm).reshape(3, 1, 1, 1)
    analytic = (1.0 / s - 1.0) * (grid.voxel_coordinates() - centre)
    np.testing.assert_allclose(displacement[:, inside], analytic[:, inside], atol=0.02)

    far = r >= E.TAPER_OUTER + 0.3
    assert far.sum() > 100
    np.testing.assert_allclose(truth[far], 0.0, atol=1e-6)
    # the surrounding tissue absorbs the change with the opposite sign
    shell = (r > 1.2) & (r < E.TAPER_OUTER)
    assert np.sign(truth[shell].mean()) == -np.sign(math.log(s))


def test_truth_scales_with_severity_and_zero_effect_is_identity() -> None:
    grid = make_grid((16, 16, 16), 3)
    spec = default_effect_spec()
    labels = region_label_map(spec, grid)
    _, unit = effect_deformation(spec, grid, 1.0)
    _, half = effect_deformation(spec, grid, 0.5)
    core = np.isin(labels, VENTRICLES)
    assert unit[core].mean() > 0.3
    assert half[core].mean() == pytest.approx(unit[core].mean() / 2, rel=0.15)
    displacement, zero = effect_deformation(spec, grid, 0.0)
    assert not displacement.any() and not zero.any()


def test_integrate_velocity_matches_monai_dvf2ddf() -> None:
    import warnings

    import torch
    from monai.networks.blocks import DVF2DDF

    rng = np.random.default_rng(0)
    velocity = np.stack([S._smooth_noise(rng, (12, 14, 10), 2.0) for _ in range(3)]) * 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DVF2DDF(num_steps=7, padding_mode="border")(torch.from_numpy(velocity)[None])
    np.testing.assert_allclose(E.integrate_velocity_array(velocity), ref[0].numpy(), atol=1e-10)


def test_truth_is_transported_into_subject_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the subject map a pure translation p -> p + t (and no age effect), the subject's
    truth must be the template-space truth read at p + t: truth_s(p) = truth_d(p + t)."""
    grid = make_grid((16, 16, 16), 3)
    shift = 2  # voxels along every axis
    monkeypatch.setattr(S, "_smooth_noise", lambda rng, shape, sigma: np.ones(shape))
    monkeypatch.setattr(S, "SUBJECT_WARP_RMS_MM", shift * grid.spacing_mm)
    monkeypatch.setattr(S, "AGE_BRAIN_LVC_PER_YEAR", 0.0)
    monkeypatch.setattr(S, "AGE_VENTRICLE_LVC_PER_YEAR", 0.0)
    synth(tmp_path, n=2, shape=(16, 16, 16), seed=0, progress=False)
    row = next(r for r in read_manifest(tmp_path / "manifest.csv") if r["label"] == "1")
    truth = nib.load(truth_path(tmp_path, row["subject"])).get_fdata()
    _, template_truth = effect_deformation(default_effect_spec(), grid, float(row["severity"]))
    assert np.abs(template_truth).max() > 0.3
    np.testing.assert_allclose(
        truth[:-shift, :-shift, :-shift], template_truth[shift:, shift:, shift:], atol=1e-4
    )
    assert not np.allclose(truth, template_truth, atol=0.05)


# ----------------------------------------------------------------- (b) ventricles grow


def test_ventricles_larger_in_diseased_subjects(cohort32: Path, cohort32_null: Path) -> None:
    grid = make_grid((32, 32, 32), 3)
    zone = np.isin(region_label_map(default_effect_spec(), grid, extent=1.4), VENTRICLES)
    rows = read_manifest(cohort32 / "manifest.csv")
    counts = {0: [], 1: []}
    for row in rows:
        image = load(cohort32, row["path"]).get_fdata()
        counts[int(row["label"])].append(ventricle_csf_count(image, zone))
    assert len(counts[0]) == len(counts[1]) == 5
    assert np.mean(counts[1]) > np.mean(counts[0]) * 1.1

    # paired: the same subjects generated without the effect (same seed, effect=0)
    for row in rows:
        with_effect = load(cohort32, row["path"]).get_fdata()
        without = load(cohort32_null, row["path"]).get_fdata()
        if row["label"] == "0":
            np.testing.assert_array_equal(with_effect, without)
        else:
            grown = ventricle_csf_count(with_effect, zone)
            assert grown > ventricle_csf_count(without, zone), row["subject"]
    null_truth = [
        load(cohort32_null, f"truth/{r['subject']}_log_volume_change.nii.gz") for r in rows
    ]
    assert all(not t.get_fdata().any() for t in null_truth)


# ----------------------------------------------------------------- (c) determinism


def test_same_seed_same_cohort_different_seed_different(tmp_path: Path, cohort16: Path) -> None:
    again = tmp_path / "again"
    other = tmp_path / "other"
    synth(again, n=6, shape=(16, 16, 16), seed=0, progress=False)
    synth(other, n=6, shape=(16, 16, 16), seed=1, progress=False)
    assert (again / "manifest.csv").read_text() == (cohort16 / "manifest.csv").read_text()
    for row in read_manifest(cohort16 / "manifest.csv"):
        a = load(cohort16, row["path"]).get_fdata()
        b = load(again, row["path"]).get_fdata()
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(
            nib.load(truth_path(cohort16, row["subject"])).get_fdata(),
            nib.load(truth_path(again, row["subject"])).get_fdata(),
        )
        assert not np.array_equal(a, load(other, row["path"]).get_fdata())


# ----------------------------------------------------------------- (d) files and truth


def test_files_manifest_and_affines(cohort16: Path) -> None:
    for name in [
        "manifest.csv",
        "cohort.json",
        "truth/effect_log_volume_change.nii.gz",
        "truth/effect_regions.nii.gz",
        "truth/effect_regions.csv",
        "truth/brain_mask.nii.gz",
    ]:
        assert (cohort16 / name).is_file(), name
    with open(cohort16 / "manifest.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["path", "label", "subject", "severity", "age"]
    rows = read_manifest(cohort16 / "manifest.csv")
    assert [r["subject"] for r in rows] == [f"sub-{i:04d}" for i in range(1, 7)]
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 0, 1, 1, 1]
    reference = load(cohort16, "truth/brain_mask.nii.gz")
    affine = reference.affine
    # voxel -> MNI mm: isotropic, RAS-aligned, centre of the grid near the brain's centre
    spacing = affine[0, 0]
    np.testing.assert_allclose(affine[:3, :3], spacing * np.eye(3))
    centre_mm = affine @ np.array([7.5, 7.5, 7.5, 1.0])
    assert np.linalg.norm(centre_mm[:3]) < 30.0
    brain = reference.get_fdata() > 0
    for row in rows:
        assert row["path"] == f"images/{row['subject']}.nii.gz"
        image = load(cohort16, row["path"])
        truth = nib.load(truth_path(cohort16, row["subject"]))
        assert image.shape == truth.shape == (16, 16, 16)
        assert image.get_data_dtype() == np.float32
        np.testing.assert_allclose(image.affine, affine)
        np.testing.assert_allclose(truth.affine, affine)
        data = image.get_fdata()
        assert data.min() >= 0 and (data[~brain] == 0).mean() > 0.9
        assert (data[brain] > 0).mean() > 0.9
        assert data[0, 0, 0] == 0 and data[-1, -1, -1] == 0
        severity, age = float(row["severity"]), float(row["age"])
        assert S.AGE_RANGE[0] <= age <= S.AGE_RANGE[1]
        if row["label"] == "0":
            assert severity == 0.0
            assert not truth.get_fdata().any()
        else:
            assert S.SEVERITY_RANGE[0] <= severity <= S.SEVERITY_RANGE[1]
            assert truth.get_fdata().any()
    cohort = json.loads((cohort16 / "cohort.json").read_text())
    assert cohort["n"] == 6 and cohort["shape"] == [16, 16, 16] and cohort["seed"] == 0
    assert EffectSpec.from_dict(cohort["effect_spec"]) == default_effect_spec()
    np.testing.assert_allclose(cohort["affine"], affine)
    with open(cohort16 / "truth/effect_regions.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["name"] for r in table] == [r.name for r in default_effect_spec().regions]
    assert list(table[0]) == ["label", "name", "log_volume_change", "mean_true_log_volume_change"]


def test_truth_signs_in_regions(cohort32: Path) -> None:
    regions = load(cohort32, "truth/effect_regions.nii.gz").get_fdata().astype(int)
    assert set(np.unique(regions)) == {0, 1, 2, 3, 4}
    effect = load(cohort32, "truth/effect_log_volume_change.nii.gz").get_fdata()
    # the template-space map is at severity 1 x effect; nominal 0.8 / -0.45 at effect 1
    for label in VENTRICLES:
        assert 0.5 * EFFECT32 < effect[regions == label].mean() < 0.8 * EFFECT32
    for label in HIPPOCAMPI:
        assert -0.45 * EFFECT32 < effect[regions == label].mean() < -0.2 * EFFECT32
    for row in read_manifest(cohort32 / "manifest.csv"):
        if row["label"] == "0":
            continue
        severity = float(row["severity"]) * EFFECT32
        truth = nib.load(truth_path(cohort32, row["subject"])).get_fdata()
        vent = truth[np.isin(regions, VENTRICLES)].mean()
        hipp = truth[np.isin(regions, HIPPOCAMPI)].mean()
        assert vent > 0.2 * severity and hipp < -0.05 * severity, row["subject"]
        # transported into the subject's space: close to, but not equal to, the template map
        assert not np.allclose(truth, severity / EFFECT32 * effect, atol=1e-3)
        assert np.corrcoef(truth.ravel(), effect.ravel())[0, 1] > 0.7


def test_custom_spec_from_json(tmp_path: Path) -> None:
    spec = EffectSpec([EffectRegion("blob", (0.0, -20.0, 20.0), (25.0, 25.0, 25.0), -0.5)])
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert EffectSpec.from_json(path) == spec
    out = tmp_path / "cohort"
    synth(out, n=2, shape=(16, 16, 16), effect_spec=path, effect=2.0, progress=False)
    cohort = json.loads((out / "cohort.json").read_text())
    assert cohort["effect_spec"] == spec.to_dict() and cohort["effect"] == 2.0
    regions = load(out, "truth/effect_regions.nii.gz").get_fdata()
    assert set(np.unique(regions)) == {0, 1}
    effect = load(out, "truth/effect_log_volume_change.nii.gz").get_fdata()
    assert effect[regions == 1].mean() < -0.6  # effect 2 x -0.5, a bit less at the edges


# ----------------------------------------------------------------- (e) 2D


def test_dim2_coronal_slice(tmp_path: Path) -> None:
    manifest = synth(tmp_path, n=4, shape=(32, 32), dim=2, seed=0, progress=False)
    rows = read_manifest(manifest)
    regions = load(tmp_path, "truth/effect_regions.nii.gz").get_fdata().astype(int)
    assert regions.shape == (32, 32) and set(np.unique(regions)) == {0, 1, 2, 3, 4}
    for row in rows:
        image = load(tmp_path, row["path"])
        assert image.shape == (32, 32)
        affine = image.affine
        # (i, j) -> (x, y0, z): axis 0 = x, axis 1 = z, slice at y0
        assert affine[1, 3] == CORONAL_SLICE_Y_MM
        assert affine[0, 0] > 0 and affine[2, 1] > 0 and affine[1, 0] == affine[1, 1] == 0
        truth = nib.load(truth_path(tmp_path, row["subject"])).get_fdata()
        assert truth.shape == (32, 32)
        assert truth.any() == (row["label"] == "1")
        if row["label"] == "1":
            assert truth[np.isin(regions, VENTRICLES)].mean() > 0
            assert truth[np.isin(regions, HIPPOCAMPI)].mean() < 0
    # left hippocampus (label 3) lies at negative x, i.e. low axis-0 indices
    i3 = np.argwhere(regions == 3)[:, 0].mean()
    i4 = np.argwhere(regions == 4)[:, 0].mean()
    assert i3 < i4
    assert make_grid(None, 2).shape == (64, 64)
    assert make_grid(None, 3).shape == (32, 32, 32)


def test_any_3d_shape(tmp_path: Path) -> None:
    synth(tmp_path, n=2, shape=(12, 16, 14), progress=False)
    image = load(tmp_path, "images/sub-0001.nii.gz")
    assert image.shape == (12, 16, 14)
    assert (image.get_fdata() > 0).mean() > 0.2


# ----------------------------------------------------------------- (f) bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 1}, "n must"),
        ({"n": 2.5}, "n must"),
        ({"diseased_fraction": 0.0}, "diseased_fraction"),
        ({"diseased_fraction": 1.0}, "diseased_fraction"),
        ({"diseased_fraction": 1.5}, "diseased_fraction"),
        ({"shape": (16, 16)}, "dim=3"),
        ({"shape": (16, 16, 16), "dim": 2}, "dim=2"),
        ({"shape": (0, 16, 16)}, "at least"),
        ({"shape": (-16, 16, 16)}, "at least"),
        ({"dim": 4}, "dim must"),
        ({"effect": -1.0}, "effect"),
        ({"effect": float("nan")}, "effect"),
        ({"seed": -1}, "seed"),
        ({"effect_spec": {"regions": []}}, "at least one region"),
        ({"effect_spec": 42}, "effect_spec"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(CounterwarpError, match=match):
        synth(tmp_path / "out", progress=False, **{"n": 4, **kwargs})
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_bad_specs(tmp_path: Path) -> None:
    good = default_effect_spec().regions[0].to_dict()
    with pytest.raises(CounterwarpError, match="radii_mm must be positive"):
        EffectRegion.from_dict({**good, "radii_mm": [10, -1, 10]})
    with pytest.raises(CounterwarpError, match="center_mm"):
        EffectRegion.from_dict({**good, "center_mm": [1, 2]})
    with pytest.raises(CounterwarpError, match="unknown keys"):
        EffectRegion.from_dict({**good, "colour": "red"})
    with pytest.raises(CounterwarpError, match="missing keys"):
        EffectRegion.from_dict({"name": "x"})
    with pytest.raises(CounterwarpError, match="log_volume_change"):
        EffectRegion.from_dict({**good, "log_volume_change": 9})
    with pytest.raises(CounterwarpError, match="unique"):
        EffectSpec.from_dict({"regions": [good, good]})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CounterwarpError, match="broken.json"):
        synth(tmp_path / "out", n=2, effect_spec=broken, progress=False)
    with pytest.raises(CounterwarpError, match="cannot read"):
        EffectSpec.from_json(tmp_path / "missing.json")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CounterwarpError, match="not a folder"):
        synth(afile, n=2, shape=(16, 16, 16), progress=False)


def test_diseased_fraction_is_respected(tmp_path: Path) -> None:
    synth(tmp_path, n=5, shape=(8, 8, 8), diseased_fraction=0.2, progress=False)
    labels = [int(r["label"]) for r in read_manifest(tmp_path / "manifest.csv")]
    assert sorted(labels) == [0, 0, 0, 0, 1]


def test_spec_outside_the_slice_is_refused(tmp_path: Path) -> None:
    spec = EffectSpec([EffectRegion("frontal", (0.0, 50.0, 20.0), (10.0, 10.0, 10.0), 0.5)])
    with pytest.raises(CounterwarpError, match="coronal slice"):
        synth(tmp_path, n=2, shape=(32, 32), dim=2, effect_spec=spec, progress=False)
