"""``explain --native``: maps of a prepared subject written back in its native scan space,
checked against the known geometry of the transform ``prepare`` recorded."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import fitted_toy_run
from counterwarp.cli import main
from counterwarp.geometry.itk_field import itk_field_image
from counterwarp.prepare import load_template, read_transform, transform_matrix_ras
from counterwarp.prepare.simulate import native_like
from counterwarp.workflows.explain import InputGridMaps
from counterwarp.workflows.native import native_name, write_native_outputs
from counterwarp.workflows.prepare import prepare_scans

pytest.importorskip("SimpleITK", reason="explain --native resamples with SimpleITK")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Two native-looking scans (PIR / LAS, anisotropic, moved by known transforms),
    prepared; the first manifest row is returned."""
    root = tmp_path_factory.mktemp("native")
    (root / "scans").mkdir()
    for name, codes, seed in (("scan-a", "PIR", 3), ("scan-b", "LAS", 4)):
        scan = native_like(load_template(2).brain, seed, codes=codes,
                           voxel_size=(2.0, 2.2, 2.4), crop_mm=4.0)
        nib.save(scan.image, root / "scans" / f"{name}.nii.gz")
    (root / "manifest.csv").write_text(
        "path,label\nscans/scan-a.nii.gz,1\nscans/scan-b.nii.gz,0\n", encoding="utf-8")
    out = root / "prepared"
    prepare_scans(root / "manifest.csv", out, skull_strip="none", shape=(16, 16, 16),
                  progress=False)
    with open(out / "manifest.csv", encoding="utf-8") as handle:
        row = next(csv.DictReader(handle))
    return out, row


def _world(image: nib.Nifti1Image) -> np.ndarray:
    """``(X, Y, Z, 3)`` RAS mm of every voxel centre."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape[:3]], indexing="ij"), -1)
    return index @ image.affine[:3, :3].T + image.affine[:3, 3]


def test_native_maps_follow_the_recorded_transform(prepared, tmp_path):
    """A constant shift ``d`` (LPS mm) in MNI152 space is ``L d`` in the native scan (``L``
    the transform's linear part); a log volume change that is a linear function of MNI152
    x lands at ``A^-1(p)``; the native simulation is the native scan shifted by ``L d``."""
    import SimpleITK as sitk

    out, row = prepared
    image = nib.load(out / row["path"])
    native_path, transform_path = out / row["native_path"], out / row["transform"]
    native = nib.load(native_path)
    shift = np.array([3.0, -2.0, 1.5])  # LPS mm
    field = itk_field_image(np.broadcast_to(shift, (*image.shape, 3)).astype(np.float32),
                            image.affine, 3)
    change = (_world(image)[..., 0] / 100.0).astype(np.float32)  # MNI152 x (RAS mm) / 100
    maps = InputGridMaps(simulated=image, field=field,
                         log_volume_change=nib.Nifti1Image(change, image.affine))
    written = write_native_outputs(tmp_path, "scan-a", "inject", maps, out / row["path"],
                                   native_path, transform_path)
    assert [p.name for p in written] == [native_name("scan-a", "inject", k)
                                         for k in ("simulated", "xfm", "logjac")]
    for path in written:
        np.testing.assert_allclose(nib.load(path).affine, native.affine)
        assert nib.load(path).shape[:3] == native.shape

    forward = read_transform(transform_path)  # MNI152 -> native, LPS
    linear = np.reshape(forward.GetMatrix(), (3, 3))
    to_mni = np.linalg.inv(transform_matrix_ras(forward))  # native RAS -> MNI152 RAS
    mni = _world(native) @ to_mni[:3, :3].T + to_mni[:3, 3]
    grid = np.linalg.inv(image.affine)
    voxel = mni @ grid[:3, :3].T + grid[:3, 3]  # where each native voxel is on the grid
    covered = np.all((voxel >= 0) & (voxel <= np.array(image.shape) - 1), axis=-1)
    assert covered.mean() > 0.2  # the prepared grid covers the brain, not the whole scan
    vectors = np.asarray(nib.load(written[1]).dataobj)[..., 0, :]
    np.testing.assert_allclose(vectors[covered],
                               np.broadcast_to(linear @ shift, vectors[covered].shape),
                               atol=1e-3)

    logjac = np.asarray(nib.load(written[2]).dataobj)
    brain = logjac != 0
    assert brain.sum() > 0.2 * (np.asarray(native.dataobj) != 0).sum()
    np.testing.assert_allclose(logjac[brain], mni[..., 0][brain] / 100.0, atol=2e-3)

    moving = sitk.ReadImage(str(native_path), sitk.sitkFloat32)
    reference = sitk.Resample(moving, moving, sitk.TranslationTransform(3, list(linear @ shift)),
                              sitk.sitkLinear, 0.0)
    by_sitk = sitk.GetArrayFromImage(reference).transpose(2, 1, 0)
    simulated = np.asarray(nib.load(written[0]).dataobj)
    inside = (np.asarray(native.dataobj) != 0) & covered
    assert np.abs(simulated - by_sitk)[inside].max() < 1e-2 * np.abs(by_sitk).max()
    assert np.abs(simulated - np.asarray(native.dataobj))[inside].mean() > 1e-3


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A fitted run on toy brains with the prepared images' grid (16^3)."""
    return fitted_toy_run(tmp_path_factory.mktemp("toy"), np.eye(4), seed=0)


def test_explain_native_through_the_command(prepared, tmp_path, toy_run):
    out, row = prepared
    run = toy_run
    explained = tmp_path / "explained"
    assert main(["explain", "--run", str(run), "--manifest", str(out / "manifest.csv"),
                 "--split", "all", "--direction", "inject", "--native", "--out",
                 str(explained)]) == 0
    native = nib.load(out / row["native_path"])
    for kind in ("simulated", "logjac", "xfm"):
        image = nib.load(explained / native_name("scan-a", "inject", kind))
        assert image.shape[:3] == native.shape
        np.testing.assert_allclose(image.affine, native.affine)


def test_native_without_a_prepared_manifest_is_refused(tmp_path, toy_run, capsys):
    run, manifest = toy_run, toy_run.parent / "manifest.csv"
    capsys.readouterr()
    explained = tmp_path / "explained"
    assert main(["explain", "--run", str(run), "--manifest", str(manifest), "--native",
                 "--out", str(explained)]) == 2
    assert "native_path, transform" in capsys.readouterr().err
    assert not explained.exists()
