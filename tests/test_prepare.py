"""counterwarp prepare on synthetic native scans made from nilearn's MNI152 template.

The native scans are the 2 mm template brain moved by a known random rigid + scale
transform, stored with other axis codes (PIR, LAS), anisotropic voxels and a cropped field
of view, built with scipy only (:mod:`counterwarp.prepare.simulate`), so the ITK LPS / RAS
conventions are checked against an independent construction.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from counterwarp.errors import CounterwarpError
from counterwarp.prepare import (
    discover_scans,
    load_template,
    model_grid,
    read_transform,
    to_native,
    transform_matrix_ras,
)
from counterwarp.prepare.register import from_sitk, to_sitk
from counterwarp.prepare.simulate import brain_points, native_like, registration_error
from counterwarp.prepare.skullstrip import dice
from counterwarp.workflows.prepare import SUFFIXES, prepare_scans

#: Bound on the mean registration error over the template brain (mm); measured ~0.2 mm.
MEAN_ERROR_MM = 1.0
#: Bound on the largest error over the template brain (mm); measured ~0.4 mm.
MAX_ERROR_MM = 2.0
NATIVE = {"scan-a": ("PIR", 0), "scan-b": ("LAS", 1)}


@pytest.fixture(scope="module")
def template():
    return load_template(2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, template):
    """Two native-looking scans, a manifest with covariates, and their prepared folder."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "scans").mkdir()
    truth = {}
    for name, (codes, seed) in NATIVE.items():
        scan = native_like(template.brain, seed, codes=codes, voxel_size=(2.0, 2.2, 2.4),
                           crop_mm=4.0)
        nib.save(scan.image, root / "scans" / f"{name}.nii.gz")
        truth[name] = scan.matrix
    (root / "manifest.csv").write_text(
        "path,label,subject,age,site\n"
        "scans/scan-a.nii.gz,AD,s1,71.5,Lyon\n"
        "scans/scan-b.nii.gz,CN,s2,64,Paris\n", encoding="utf-8")
    out = root / "prepared"
    summary = prepare_scans(root / "manifest.csv", out, skull_strip="none", progress=False)
    return root, out, truth, summary


def test_registration_recovers_the_known_transform(cohort, template):
    _root, out, truth, _summary = cohort
    points = brain_points(template.mask)
    for name, matrix in truth.items():
        transform = read_transform(out / f"{name}{SUFFIXES['transform']}")
        mean, largest = registration_error(transform_matrix_ras(transform), matrix, points)
        assert mean < MEAN_ERROR_MM, (name, mean)
        assert largest < MAX_ERROR_MM, (name, largest)


def test_outputs_manifest_round_trip(cohort):
    root, out, _truth, summary = cohort
    with open(out / "manifest.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == ["AD", "CN"]
    assert [(r["subject"], r["age"], r["site"]) for r in rows] == [
        ("s1", "71.5", "Lyon"), ("s2", "64", "Paris")]
    assert list(rows[0])[-2:] == ["native_path", "transform"]
    for row in rows:
        assert (out / row["native_path"]).resolve() == (
            root / "scans" / f"{row['path'].split('_')[0]}.nii.gz").resolve()
        assert (out / row["transform"]).is_file()
        image = nib.load(out / row["path"])
        assert image.shape == (32, 32, 32)
        np.testing.assert_allclose(image.affine, model_grid((32, 32, 32)).affine)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    from counterwarp.data.manifest import read_manifest

    parsed = read_manifest(out / "manifest.csv", positive_label="AD")
    assert [r.label for r in parsed] == [1, 0]
    assert parsed[0].extras["age"] == "71.5"
    record = json.loads((out / "prepare.json").read_text())
    assert record["skull_strip"] == "none"
    assert {s["id"] for s in record["scans"]} == set(NATIVE)
    assert all(s["seconds"]["register"] > 0 for s in record["scans"])
    assert summary["manifest"] == str(out.resolve() / "manifest.csv")
    for name in NATIVE:
        for suffix in SUFFIXES.values():
            assert (out / f"{name}{suffix}").is_file(), suffix


def test_native_mask_sits_on_the_native_grid(cohort):
    root, out, _truth, _summary = cohort
    native = nib.load(root / "scans" / "scan-a.nii.gz")
    mask = nib.load(out / f"scan-a{SUFFIXES['mask']}")
    assert mask.shape == native.shape
    np.testing.assert_allclose(mask.affine, native.affine)
    assert dice(np.asarray(mask.dataobj) > 0, native.get_fdata() != 0) == 1.0


def test_to_native_puts_a_mask_back_where_it_was(cohort, template):
    """The template brain mask, resampled onto the model grid, mapped back to native space
    through the written transform, overlaps the brain of the native scan."""
    from nilearn.image import resample_to_img

    root, out, _truth, _summary = cohort
    prepared = nib.load(out / f"scan-b{SUFFIXES['image']}")
    grid_mask = resample_to_img(template.mask, prepared, interpolation="nearest",
                                force_resample=True, copy_header=True)
    native = nib.load(root / "scans" / "scan-b.nii.gz")
    back = to_native(grid_mask, out / f"scan-b{SUFFIXES['transform']}", native,
                     interpolation="nearest")
    assert back.shape == native.shape
    np.testing.assert_allclose(back.affine, native.affine)
    assert back.get_data_dtype() == np.uint8
    overlap = dice(np.asarray(back.dataobj) > 0, native.get_fdata() > 0)
    assert overlap > 0.85, overlap  # a 6 mm grid mask against a 2 mm native brain
    linear = to_native(grid_mask, out / f"scan-b{SUFFIXES['transform']}",
                       root / "scans" / "scan-b.nii.gz")
    assert linear.get_data_dtype() == np.float32


def test_sitk_conversion_matches_itk_reading_the_file(tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    values = rng.random((5, 6, 7)).astype(np.float32)
    affine = np.array([[0, 0, -1.5, 40], [-2.0, 0, 0, 12], [0, 1.2, 0, -30], [0, 0, 0, 1]])
    image = nib.Nifti1Image(values, affine)
    nib.save(image, tmp_path / "pir.nii.gz")
    read = sitk.ReadImage(str(tmp_path / "pir.nii.gz"))
    converted = to_sitk(image)
    np.testing.assert_allclose(converted.GetOrigin(), read.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(converted.GetDirection(), read.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(converted.GetSpacing(), read.GetSpacing(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted),
                                  sitk.GetArrayFromImage(read))
    point = read.TransformIndexToPhysicalPoint((1, 2, 3))  # LPS
    ras = affine @ [1, 2, 3, 1]
    np.testing.assert_allclose(point, [-ras[0], -ras[1], ras[2]], atol=1e-5)
    back = from_sitk(converted)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(back.get_fdata(), values)


def test_model_grid_semantics():
    by_shape = model_grid((32, 32, 32))
    assert by_shape.brain_inside == 1.0 and 5.5 < by_shape.voxel_size < 6.5
    by_size = model_grid(None, 2.0)
    assert by_size.voxel_size == 2.0 and by_size.brain_inside == 1.0
    assert all(60 < n < 100 for n in by_size.shape)
    both = model_grid((40, 40, 40), 2.0)
    assert both.shape == (40, 40, 40) and both.brain_inside < 0.5
    for bad in ({"shape": (32, 32)}, {"shape": (32, 32, 0)}, {"shape": None, "voxel_size": -1}):
        with pytest.raises(CounterwarpError):
            model_grid(**bad)


def _bids(root: Path, template, columns: str = "participant_id\tgroup\tage") -> Path:
    rows = {"sub-01": "AD\t70", "sub-02": "CN\t66", "sub-03": "CN\t60"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "participants.tsv").write_text(
        columns + "\n" + "".join(f"{k}\t{v}\n" for k, v in rows.items()), encoding="utf-8")
    small = nib.Nifti1Image(np.asarray(template.brain.dataobj)[::4, ::4, ::4], np.diag(
        [8.0, 8, 8, 1]))
    for part in ("sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
                 "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz"):
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        nib.save(small, root / part)
    return root


def test_bids_discovery_with_participants_tsv(tmp_path, template):
    root = _bids(tmp_path / "bids", template)
    scans = discover_scans(root, label_column="group")
    assert [s.id for s in scans] == ["sub-01", "sub-02_ses-1", "sub-02_ses-2"]
    assert [s.label for s in scans] == ["AD", "CN", "CN"]
    assert [s.subject for s in scans] == ["sub-01", "sub-02", "sub-02"]
    assert scans[1].columns == {"session": "ses-1", "age": "66"}
    from counterwarp.prepare.inputs import participants_without_scans

    assert participants_without_scans(root, scans) == ["sub-03"]


def test_folder_input_uses_file_stems(tmp_path, template):
    (tmp_path / "in").mkdir()
    for name in ("b.nii.gz", "a.nii", "notes.txt"):
        nib.save(template.mask, tmp_path / "in" / name) if name != "notes.txt" else (
            tmp_path / "in" / name).write_text("x")
    assert [s.id for s in discover_scans(tmp_path / "in")] == ["a", "b"]


def _missing_file_manifest(tmp_path: Path) -> Path:
    path = tmp_path / "m.csv"
    path.write_text("path,label\nnowhere.nii.gz,1\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing file", "line 2"),
    ("bids without the label column", "no column 'diagnosis'"),
    ("missing input", "not found"),
    ("bad skull strip", "--skull-strip"),
])
def test_bad_inputs_leave_out_absent(tmp_path, template, case, expected):
    kwargs = {"skull_strip": "none", "progress": False}
    if case == "missing file":
        source = _missing_file_manifest(tmp_path)
    elif case == "bids without the label column":
        source = _bids(tmp_path / "bids", template)
        kwargs["label_column"] = "diagnosis"
    elif case == "missing input":
        source = tmp_path / "nothing-here"
    else:
        source = _missing_file_manifest(tmp_path)
        kwargs["skull_strip"] = "bet2"
    out = tmp_path / "out"
    with pytest.raises(CounterwarpError) as raised:
        prepare_scans(source, out, **kwargs)
    message = str(raised.value)
    assert expected in message and "\n" not in message
    if case == "bids without the label column":
        assert "participants.tsv" in message
    assert not out.exists()


def test_failure_mid_run_leaves_an_existing_out_as_it_was(tmp_path, template):
    """A scan that turns out unusable after the first was written: nothing stays."""
    (tmp_path / "in").mkdir()
    good = native_like(template.brain, 5, codes="LAS", voxel_size=(3.0, 3.0, 3.0))
    nib.save(good.image, tmp_path / "in" / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)),
             tmp_path / "in" / "b.nii.gz")  # constant: refused when its voxels are read
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(CounterwarpError, match="b.nii.gz"):
        prepare_scans(tmp_path / "in", out, skull_strip="none", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
