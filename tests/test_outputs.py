"""What ``counterwarp explain`` writes for a lab: BIDS-derivative names, maps that are 0
outside the brain, an ITK / ANTs displacement field that SimpleITK applies to the input to
give the simulated image, and a simulated image at the input's own intensities.

Constructed fields on three inputs (RAS on the model grid, the same image stored LAS and
reoriented by the contract, an oblique anisotropic grid of another shape), and one tiny 3D
run (untrained classifier, one-step simulator) explained end to end.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from counterwarp import __version__
from counterwarp.data.derivatives import (
    DATASET_DESCRIPTION_NAME,
    derivative_id,
    output_name,
    output_stem_suffix,
    unique_output_ids,
)
from counterwarp.data.preprocess import LoadedVolume, load_volume, restore_to_input
from counterwarp.explain.simulator import Simulator
from counterwarp.geometry.itk_field import ras_to_lps
from counterwarp.geometry.warp import warp
from counterwarp.workflows.explain import explain_run, input_grid_maps
from counterwarp.workflows.folder import load_run_classifier
from test_saliency_run import _make_run

MODEL = (16, 16, 16)
KINDS = ("simulated", "logjac", "xfm")


def _brain(shape: tuple[int, ...]) -> np.ndarray:
    """A skull-stripped toy T1: textured ball (intensities 20..160) on a zero background."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius2 = sum(g**2 for g in grid)
    image = 80 + 40 * np.cos(6 * grid[0]) * np.sin(5 * grid[1]) + 20 * grid[-1]
    image = np.where(radius2 < 0.08, 20.0, np.where(radius2 < 0.6, image, 0.0))
    return image.astype(np.float32)


def _oblique_affine() -> np.ndarray:
    """Rotated by 10, -15 and 20 degrees about x, y, z; voxels 1.2 x 0.9 x 1.5 mm."""
    def turn(axis: int, degrees: float) -> np.ndarray:
        a, (i, j) = np.radians(degrees), [(1, 2), (0, 2), (0, 1)][axis]
        rotation = np.eye(3)
        rotation[i, i] = rotation[j, j] = np.cos(a)
        rotation[i, j], rotation[j, i] = -np.sin(a), np.sin(a)
        return rotation

    affine = np.eye(4)
    affine[:3, :3] = turn(2, 20) @ turn(1, -15) @ turn(0, 10) @ np.diag([1.2, 0.9, 1.5])
    affine[:3, 3] = [-12.0, 7.0, 3.0]
    return affine


def _las() -> np.ndarray:
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[0, 3] = 15.0
    return affine


#: name -> (image, its affine, the contract's orientation)
CASES = {
    "ras": (_brain(MODEL), np.eye(4), None),
    "las": (_brain(MODEL)[::-1].copy(), _las(), "RAS"),  # the same anatomy stored LAS
    "oblique": (_brain((14, 20, 12)), _oblique_affine(), None),  # resampled to MODEL
}


def _loaded(tmp_path: Path, case: str) -> tuple[np.ndarray, LoadedVolume, Path]:
    data, affine, orientation = CASES[case]
    path = tmp_path / f"{case}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data, load_volume(path, MODEL, orientation=orientation), path


def _bump_field(shape: tuple[int, ...], amplitude: float = 1.5) -> np.ndarray:
    """``(3, *shape)`` smooth pull-back displacement (model voxels), peak ``amplitude``."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    weight = np.exp(-sum((g - (n - 1) / 2) ** 2 for g, n in zip(grid, shape, strict=True))
                    / (2 * (shape[0] / 5) ** 2))
    return np.stack([weight, -0.7 * weight, 0.5 * weight]).astype(np.float32) * amplitude


def _save(maps, folder: Path) -> dict[str, Path]:
    paths = {kind: folder / f"{kind}.nii.gz" for kind in KINDS}
    for kind, image in zip(KINDS, (maps.simulated, maps.log_volume_change, maps.field),
                           strict=True):
        nib.save(image, str(paths[kind]))
    return paths


def _itk_resample(image: Path, field: Path) -> np.ndarray:
    """``image`` resampled onto its own grid through the displacement field ``field``."""
    sitk = pytest.importorskip(
        "SimpleITK", reason="SimpleITK is not installed: the ITK reading of the field is "
        "checked only where it is (pip install SimpleITK)")
    moving = sitk.ReadImage(str(image), sitk.sitkFloat64)
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(field),
                                                               sitk.sitkVectorFloat64))
    resampled = sitk.Resample(moving, transform, sitk.sitkLinear)
    return sitk.GetArrayFromImage(resampled).transpose()  # ITK's (z, y, x) -> (x, y, z)


# --------------------------------------------------------------------------- names


def test_names_are_bids_derivatives_with_one_home() -> None:
    assert derivative_id("sub-01_ses-1_T1w") == "sub-01_ses-1"
    assert derivative_id("sub-01_space-MNI152_desc-preproc_T1w") == "sub-01"  # prepared
    assert derivative_id("sub-0002") == "sub-0002"
    assert derivative_id("scan1") == "scan1"
    assert derivative_id("other_subject") == "other_subject"  # not BIDS: kept whole
    assert output_name("sub-01_ses-1", "inject", "logjac") == \
        "sub-01_ses-1_desc-inject_logjac.nii.gz"
    assert output_name("scan1", "remove", "panel") == "scan1_desc-remove_panel.png"
    assert output_stem_suffix("remove", "logjac") == "_desc-remove_logjac"
    paths = [Path(f"/d/{name}.nii.gz") for name in ("sub-01_T1w", "sub-01_T2w", "SUB-01")]
    assert unique_output_ids(paths) == ["sub-01", "sub-01_2", "SUB-01_3"]


# --------------------------------------------------------------------------- the field


@pytest.mark.parametrize("case", sorted(CASES))
def test_simpleitk_applies_the_field_to_the_input_and_gets_the_simulated_image(
    case: str, tmp_path: Path
) -> None:
    data, volume, path = _loaded(tmp_path, case)
    maps = input_grid_maps(volume, _bump_field(MODEL), np.zeros(MODEL, np.float32))
    paths = _save(maps, tmp_path)
    simulated = np.asarray(nib.load(paths["simulated"]).dataobj)
    itk = _itk_resample(path, paths["xfm"])
    brain = data != 0
    correlation = float(np.corrcoef(itk[brain], simulated[brain])[0, 1])
    largest = float(np.abs(itk[brain] - simulated[brain]).max())
    print(f"{case}: SimpleITK vs simulated inside the brain: 1 - r = {1 - correlation:.1e}, "
          f"max |diff| = {largest:.2e} (intensities 0..{data.max():.0f})")
    assert correlation > 0.99
    assert largest < 1e-3
    assert np.abs(simulated - data)[brain].mean() > 5.0  # the field does move anatomy
    field = nib.load(paths["xfm"])
    assert field.shape == (*data.shape, 1, 3)
    assert field.header.get_intent()[0] == "vector"
    assert field.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(field.affine, nib.load(path).affine, atol=1e-5)


@pytest.mark.parametrize("stored", [(20, 24), (20, 24, 1)])
def test_a_2d_image_gets_a_2d_field_that_simpleitk_applies(stored, tmp_path: Path) -> None:
    data = _brain(stored[:2]).reshape(stored)
    affine = np.diag([-1.3, 0.8, 2.0, 1.0])
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    volume = load_volume(path, (16, 16))
    maps = input_grid_maps(volume, _bump_field((16, 16, 16))[:2, :, :, 8], np.zeros((16, 16)))
    assert maps.field.shape == (20, 24, 1, 1, 2)
    paths = _save(maps, tmp_path)
    flat = tmp_path / "flat.nii.gz"  # ITK reads an (X, Y, 1) image as 3D: give it the slice
    nib.save(nib.Nifti1Image(data.reshape(stored[:2]), affine), str(flat))
    itk = _itk_resample(flat, paths["xfm"])
    simulated = np.asarray(nib.load(paths["simulated"]).dataobj).reshape(stored[:2])
    brain = data.reshape(stored[:2]) != 0
    assert np.abs(itk - simulated)[brain].max() < 1e-3
    assert np.abs(simulated - data.reshape(stored[:2]))[brain].mean() > 5.0


@pytest.mark.parametrize("case", ["ras", "las", "oblique"])
def test_the_field_is_the_model_warp_in_lps_millimetres(case: str, tmp_path: Path) -> None:
    """A constant shift of one model voxel along axis 0 is the model grid's first column
    (RAS mm) flipped to LPS everywhere (outside the brain too); on the model's own grid
    the simulated image changes as the simulator's own warp changes the model input."""
    data, volume, _ = _loaded(tmp_path, case)
    shift = np.zeros((3, *MODEL), np.float32)
    shift[0] = 1.0
    vectors = np.asarray(input_grid_maps(volume, shift, np.zeros(MODEL)).field.dataobj)[..., 0, :]
    brain = data != 0
    expected = ras_to_lps(volume.model_affine[:3, 0])
    inside_grid = _inside_model_grid(volume, data.shape)
    np.testing.assert_allclose(vectors[inside_grid],
                               np.broadcast_to(expected, vectors[inside_grid].shape), atol=1e-5)
    if case == "oblique":
        return  # another grid: the model's warp is of a resampled image
    bump = _bump_field(MODEL)
    simulated = np.asarray(input_grid_maps(volume, bump, np.zeros(MODEL)).simulated.dataobj)
    model = warp(torch.from_numpy(volume.data)[None, None], torch.from_numpy(bump)[None])
    change = restore_to_input(model[0, 0], volume) - restore_to_input(volume.data, volume)
    assert np.corrcoef((simulated - data)[brain], change[brain])[0, 1] > 0.99


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_identity_warp_gives_back_the_input(case: str, tmp_path: Path) -> None:
    data, volume, _ = _loaded(tmp_path, case)
    maps = input_grid_maps(volume, np.zeros((3, *MODEL), np.float32), np.zeros(MODEL))
    np.testing.assert_allclose(np.asarray(maps.simulated.dataobj), data, atol=1e-4)
    np.testing.assert_allclose(maps.simulated.affine, nib.load(tmp_path / f"{case}.nii.gz")
                               .affine, atol=1e-6)


def _inside_model_grid(volume, shape: tuple[int, ...]) -> np.ndarray:
    """Input voxels whose centres lie inside the model grid's field of view (where a field
    resampled from it is defined without edge effects)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = index @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    inverse = np.linalg.inv(volume.model_affine)
    model = world @ inverse[:3, :3].T + inverse[:3, 3]
    return np.all((model >= 0) & (model <= np.array(MODEL) - 1), axis=-1)


def test_maps_are_zero_outside_the_brain(tmp_path: Path) -> None:
    data, volume, _ = _loaded(tmp_path, "oblique")
    change = np.full(MODEL, 0.3, np.float32)
    maps = input_grid_maps(volume, np.ones((3, *MODEL), np.float32), change)
    brain = data != 0
    logjac = np.asarray(maps.log_volume_change.dataobj)
    field = np.asarray(maps.field.dataobj)[..., 0, :]
    assert not logjac[~brain].any()
    assert np.abs(field[~brain]).min() > 0.1  # the field moves background into the brain
    np.testing.assert_allclose(logjac[brain], 0.3, atol=1e-5)
    assert np.abs(field[brain]).min() > 0.1


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny 3D run explaining a BIDS-named LAS anisotropic image and a plain RAS one."""
    root = tmp_path_factory.mktemp("outputs")
    run = _make_run(root / "run", MODEL)
    (run / "split.json").write_text(json.dumps({"train": [], "val": [], "test": []}))
    classifier, _ = load_run_classifier(run)
    batch = torch.stack([torch.from_numpy(_brain(MODEL))[None] for _ in range(4)])
    batch = (batch - batch.mean()) / batch.std() + 0.1 * torch.randn_like(batch)
    torch.manual_seed(0)
    Simulator(steps=1, batch_size=4, channels=(4, 8, 8), latent_dim=16).fit(
        classifier, batch, progress=False).save(run / "simulator.pt")
    affine = np.diag([-1.1, 0.9, 1.3, 1.0])
    bids = root / "bids" / "sub-01_ses-1_T1w.nii.gz"
    bids.parent.mkdir()
    nib.save(nib.Nifti1Image(_brain((20, 18, 14))[::-1].copy(), affine), str(bids))
    plain = root / "scan1.nii.gz"
    nib.save(nib.Nifti1Image(_brain(MODEL), np.eye(4)), str(plain))
    out = root / "explain"
    explain_run(run, out, images=[bids, plain], direction="both", progress=False)
    return {"out": out, "inputs": {"sub-01_ses-1": bids, "scan1": plain}}


def test_explain_writes_bids_names_and_a_dataset_description(explained) -> None:
    out, inputs = explained["out"], explained["inputs"]
    expected = {output_name(id_, d, kind) for id_ in inputs for d in ("inject", "remove")
                for kind in (*KINDS, "panel")}
    names = {p.name for p in out.iterdir() if p.is_file()}
    assert expected <= names
    assert names - expected == {"summary.csv", "provenance.json", DATASET_DESCRIPTION_NAME}
    description = json.loads((out / DATASET_DESCRIPTION_NAME).read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "counterwarp"
    assert description["GeneratedBy"][0]["Version"] == __version__
    with open(out / "summary.csv", newline="") as handle:
        assert [row["id"] for row in csv.DictReader(handle)] == \
            ["sub-01_ses-1", "sub-01_ses-1", "scan1", "scan1"]


@pytest.mark.parametrize("id_", ["sub-01_ses-1", "scan1"])
def test_explained_maps_sit_on_the_input_grid_at_its_intensities(explained, id_) -> None:
    out, path = explained["out"], explained["inputs"][id_]
    source = nib.load(path)
    data = np.asarray(source.dataobj)
    brain = data != 0
    for direction in ("inject", "remove"):
        files = {kind: out / output_name(id_, direction, kind) for kind in KINDS}
        simulated, logjac, field = (nib.load(files[kind]) for kind in KINDS)
        for image in (simulated, logjac, field):
            np.testing.assert_allclose(image.affine, source.affine, atol=1e-6)
        assert simulated.shape == logjac.shape == data.shape
        assert field.shape == (*data.shape, 1, 3)
        values = np.asarray(simulated.dataobj)
        low, high = np.percentile(data[brain], [1, 99])
        sim_low, sim_high = np.percentile(values[brain], [1, 99])
        assert abs(sim_high - high) < 0.05 * high and abs(sim_low - low) < 0.1 * high
        assert values.max() <= data.max() + 1e-3 and values.min() >= 0.0  # not z-scored
        assert not np.asarray(logjac.dataobj)[~brain].any()
        itk = _itk_resample(path, files["xfm"])
        assert np.abs(itk - values)[brain].max() < 1e-3
