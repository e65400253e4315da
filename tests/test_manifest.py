"""Manifests, image loading / preprocessing, datasets and subject splits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from counterwarp.data.manifest import (
    ManifestDataset,
    ManifestRow,
    read_manifest,
)
from counterwarp.data.preprocess import (
    load_model_input,
    load_volume,
    restore_to_input,
    save_on_input_grid,
    zscore_in_brain,
)
from counterwarp.data.split import split_by_subject
from counterwarp.errors import CounterwarpError

SHAPE = (8, 8, 8)


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros(SHAPE, dtype=np.float32)
    image[2:6, 2:6, 2:6] = rng.uniform(50, 150, size=(4, 4, 4))
    return image


@pytest.fixture
def folder(tmp_path: Path, write_nifti: Callable[..., Path]) -> Path:
    """A folder with four valid images a.nii.gz .. d.nii.gz."""
    for seed, name in enumerate("abcd"):
        write_nifti(tmp_path / f"{name}.nii.gz", _image(seed))
    return tmp_path


def _manifest(folder: Path, text: str, name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = "path,label\na.nii.gz,0\nb.nii.gz,1\nc.nii.gz,0\nd.nii.gz,1\n"


# ---------------------------------------------------------------- read_manifest


def test_reads_rows_with_line_numbers_and_default_subject(folder: Path) -> None:
    rows = read_manifest(_manifest(folder, GOOD))
    assert [row.line for row in rows] == [2, 3, 4, 5]
    assert [row.label for row in rows] == [0, 1, 0, 1]
    assert rows[0].path == (folder / "a.nii.gz").resolve()
    assert rows[0].path.is_absolute()
    assert rows[0].subject == "a"
    assert rows[0].extras == {}


def test_bom_semicolons_blank_lines_and_extra_columns(folder: Path) -> None:
    text = "\ufeffPath;Label;subject;age;site\n\na.nii.gz;0;s1;61;x\n\nb.nii.gz;1;s2;70;y\n\n"
    rows = read_manifest(_manifest(folder, text))
    assert [row.label for row in rows] == [0, 1]
    assert [row.line for row in rows] == [3, 5]
    assert [row.subject for row in rows] == ["s1", "s2"]
    assert rows[1].extras == {"age": "70", "site": "y"}


def test_tabs_and_float_labels(folder: Path) -> None:
    rows = read_manifest(_manifest(folder, "path\tlabel\na.nii.gz\t0.0\nb.nii.gz\t1.0\n"))
    assert [row.label for row in rows] == [0, 1]


def test_relative_paths_resolve_against_manifest_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    sub = folder / "lists"
    sub.mkdir()
    rows = read_manifest(_manifest(sub, "path,label\n../a.nii.gz,0\n../b.nii.gz,1\n"))
    assert rows[0].path == (folder / "a.nii.gz").resolve()


def test_absolute_paths_kept(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("lists")
    text = f"path,label\n{folder / 'a.nii.gz'},0\n{folder / 'b.nii.gz'},1\n"
    rows = read_manifest(_manifest(other, text))
    assert rows[1].path == (folder / "b.nii.gz").resolve()


def test_folder_with_manifest_csv_accepted(folder: Path) -> None:
    _manifest(folder, GOOD)
    assert len(read_manifest(folder)) == 4


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(CounterwarpError, match="manifest not found.*nope.csv"):
        read_manifest(tmp_path / "nope.csv")


def test_missing_column(folder: Path) -> None:
    with pytest.raises(CounterwarpError, match=r"manifest\.csv.*no 'label' column"):
        read_manifest(_manifest(folder, "path,diagnosis\na.nii.gz,0\nb.nii.gz,1\n"))
    with pytest.raises(CounterwarpError, match="no 'path' column"):
        read_manifest(_manifest(folder, "file,label\na.nii.gz,0\nb.nii.gz,1\n"))


def test_empty_manifest(folder: Path) -> None:
    with pytest.raises(CounterwarpError, match="is empty"):
        read_manifest(_manifest(folder, "\n\n"))
    with pytest.raises(CounterwarpError, match="lists no images"):
        read_manifest(_manifest(folder, "path,label\n\n"))


def test_missing_image_file_names_line_and_file(folder: Path) -> None:
    text = "path,label\na.nii.gz,0\nmissing.nii.gz,1\n"
    with pytest.raises(CounterwarpError, match=r"line 3: image file not found: .*missing\.nii\.gz"):
        read_manifest(_manifest(folder, text))


def test_label_not_binary(folder: Path) -> None:
    text = "path,label\na.nii.gz,CN\nb.nii.gz,AD\nc.nii.gz,MCI\n"
    manifest = _manifest(folder, text)
    with pytest.raises(CounterwarpError, match=r"line 2: label 'CN' is not 0 or 1.*positive-label"):
        read_manifest(manifest)
    with pytest.raises(CounterwarpError, match=r"line 3: label '2'"):
        read_manifest(_manifest(folder, "path,label\na.nii.gz,0\nb.nii.gz,2\n", "two.csv"))


def test_positive_label_mapping(folder: Path) -> None:
    manifest = _manifest(folder, "path,label\na.nii.gz,CN\nb.nii.gz,AD\nc.nii.gz,MCI\n")
    rows = read_manifest(manifest, positive_label="AD", negative_labels="CN,MCI")
    assert [row.label for row in rows] == [0, 1, 0]
    with pytest.raises(CounterwarpError, match=r"positive label 'ALZ' never occurs.*'AD'"):
        read_manifest(manifest, positive_label="ALZ")


def test_one_class_only(folder: Path) -> None:
    with pytest.raises(CounterwarpError, match="all 2 images have label 1.*both classes"):
        read_manifest(_manifest(folder, "path,label\na.nii.gz,1\nb.nii.gz,1\n"))


def test_duplicated_paths_name_both_lines(folder: Path) -> None:
    text = "path,label\na.nii.gz,0\nb.nii.gz,1\n./a.nii.gz,1\n"
    with pytest.raises(CounterwarpError, match=r"lines 2 and 4 both name .*a\.nii\.gz"):
        read_manifest(_manifest(folder, text))


# ---------------------------------------------------------------- load_volume


def test_not_nifti(folder: Path) -> None:
    fake = folder / "fake.nii.gz"
    fake.write_text("this is not an image\n")
    with pytest.raises(CounterwarpError, match=r"fake\.nii\.gz: cannot read"):
        load_volume(fake)


def test_truncated_nifti(folder: Path) -> None:
    data = (folder / "a.nii.gz").read_bytes()
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CounterwarpError, match=r"truncated\.nii\.gz"):
        load_volume(truncated)


def test_4d_image_refused(folder: Path, write_nifti: Callable[..., Path]) -> None:
    path = write_nifti(folder / "four.nii.gz", np.random.default_rng(0).random((4, 4, 4, 3)))
    with pytest.raises(CounterwarpError, match=r"four\.nii\.gz.*4D"):
        load_volume(path)


def test_singleton_axes_dropped(folder: Path, write_nifti: Callable[..., Path]) -> None:
    rng = np.random.default_rng(0)
    volume = write_nifti(folder / "v.nii.gz", rng.random((4, 5, 6, 1)).astype(np.float32))
    assert load_volume(volume).shape == (4, 5, 6)
    slice_ = write_nifti(folder / "s.nii.gz", rng.random((7, 9, 1)).astype(np.float32))
    loaded = load_volume(slice_)
    assert loaded.shape == (7, 9)
    assert restore_to_input(loaded.data, loaded).shape == (7, 9, 1)
    flat = write_nifti(folder / "f.nii.gz", rng.random((7, 9)).astype(np.float32))
    assert load_volume(flat).shape == (7, 9)


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_nan_and_inf_voxels(
    folder: Path, write_nifti: Callable[..., Path], bad: float, word: str
) -> None:
    image = _image()
    image[3, 3, 3] = bad
    image[4, 4, 4] = bad
    path = write_nifti(folder / "bad.nii.gz", image)
    with pytest.raises(CounterwarpError, match=rf"bad\.nii\.gz: 2 {word} voxel"):
        load_volume(path)


def test_constant_image(folder: Path, write_nifti: Callable[..., Path]) -> None:
    path = write_nifti(folder / "flat.nii.gz", np.full(SHAPE, 7.0, dtype=np.float32))
    with pytest.raises(CounterwarpError, match=r"flat\.nii\.gz: the image is constant"):
        load_volume(path)


def test_shape_argument_must_fit(folder: Path) -> None:
    with pytest.raises(CounterwarpError, match="does not fit a 3D image"):
        load_volume(folder / "a.nii.gz", (8, 8))


def test_restore_to_input_round_trip(tmp_path: Path, write_nifti: Callable[..., Path]) -> None:
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 24, 18)], indexing="ij")
    smooth = (100 + 20 * axes[0] - 10 * axes[1] ** 2 + 5 * axes[2]).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    affine[:3, 3] = [-20, -24, -22]
    path = write_nifti(tmp_path / "smooth.nii.gz", smooth, affine)
    loaded = load_volume(path, (16, 16, 16))
    assert loaded.data.shape == (16, 16, 16) and loaded.data.dtype == np.float32
    np.testing.assert_allclose(loaded.affine, affine)
    restored = restore_to_input(loaded.data, loaded)
    assert restored.shape == smooth.shape
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(restored[inner], smooth[inner], rtol=0.02)
    vector = np.stack([loaded.data, 2 * loaded.data, torch.zeros(16, 16, 16).numpy()], axis=-1)
    restored_vector = restore_to_input(vector, loaded)
    assert restored_vector.shape == (*smooth.shape, 3)
    np.testing.assert_allclose(restored_vector[..., 1], 2 * restored, rtol=1e-5)
    # the model grid's affine maps its voxel centres into the same field of view
    centre_model = loaded.model_affine @ np.array([7.5, 7.5, 7.5, 1.0])
    centre_file = affine @ np.array([9.5, 11.5, 8.5, 1.0])
    np.testing.assert_allclose(centre_model, centre_file)
    written = save_on_input_grid(tmp_path / "out.nii.gz", loaded.data, loaded)
    import nibabel as nib

    reread = nib.load(str(written))
    assert reread.shape == smooth.shape
    np.testing.assert_allclose(reread.affine, affine)


def test_restore_identity_without_resampling(folder: Path) -> None:
    loaded = load_volume(folder / "a.nii.gz")
    assert not loaded.resampled
    np.testing.assert_array_equal(restore_to_input(loaded.data, loaded), loaded.data)


def test_zscore_in_brain() -> None:
    image = _image(3)
    out = zscore_in_brain(image)
    brain = image != 0
    assert out.dtype == np.float32
    assert np.all(out[~brain] == 0)
    assert abs(float(out[brain].mean())) < 1e-5
    assert abs(float(out[brain].std()) - 1.0) < 1e-4
    assert np.all(zscore_in_brain(np.zeros(SHAPE)) == 0)


def test_load_model_input(folder: Path) -> None:
    image, loaded = load_model_input(folder / "a.nii.gz", (4, 4, 4))
    assert image.shape == (1, 4, 4, 4) and image.dtype == torch.float32
    assert loaded.shape == (4, 4, 4)


# ---------------------------------------------------------------- ManifestDataset


def test_dataset_items(folder: Path) -> None:
    rows = read_manifest(_manifest(folder, GOOD))
    dataset = ManifestDataset(rows)
    assert len(dataset) == 4 and dataset.dim == 3 and dataset.spatial_shape == SHAPE
    image, label = dataset[1]
    assert image.shape == (1, *SHAPE) and image.dtype == torch.float32
    assert label.shape == () and float(label) == 1.0
    brain = image[image != 0]
    assert abs(float(brain.mean())) < 1e-5
    assert dataset[1][0] is image  # cached
    resized = ManifestDataset(rows, shape=(6, 6, 6))
    assert resized[0][0].shape == (1, 6, 6, 6)
    np.testing.assert_array_equal(resized.labels, [0, 1, 0, 1])


def test_dataset_shape_mismatch_and_dimension_mix(
    folder: Path, write_nifti: Callable[..., Path]
) -> None:
    write_nifti(folder / "big.nii.gz", np.random.default_rng(0).random((10, 8, 8)))
    write_nifti(folder / "flat2d.nii.gz", np.random.default_rng(0).random((8, 8)))
    rows = read_manifest(_manifest(folder, "path,label\na.nii.gz,0\nbig.nii.gz,1\n"))
    with pytest.raises(CounterwarpError, match=r"a\.nii\.gz.*big\.nii\.gz.*--shape"):
        ManifestDataset(rows)
    assert ManifestDataset(rows, shape=(8, 8, 8))[1][0].shape == (1, 8, 8, 8)
    mixed = read_manifest(_manifest(folder, "path,label\na.nii.gz,0\nflat2d.nii.gz,1\n", "m.csv"))
    with pytest.raises(CounterwarpError, match="mix 2D and 3D"):
        ManifestDataset(mixed)


# ---------------------------------------------------------------- split_by_subject


def _rows(n_subjects: int, per_subject: int = 2, positive_every: int = 2) -> list[ManifestRow]:
    rows = []
    for s in range(n_subjects):
        for k in range(per_subject):
            label = int(s % positive_every == 0)
            rows.append(ManifestRow(len(rows) + 2, Path(f"/x/{s}_{k}.nii"), label, f"s{s}"))
    return rows


def test_split_subject_level_deterministic_stratified() -> None:
    rows = _rows(40, per_subject=3)
    split = split_by_subject(rows, (0.7, 0.15, 0.15), seed=3)
    assert sorted(i for part in split.values() for i in part) == list(range(len(rows)))
    subjects = {name: {rows[i].subject for i in part} for name, part in split.items()}
    assert not subjects["train"] & subjects["val"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]
    assert [len(subjects[p]) for p in ("train", "val", "test")] == [28, 6, 6]
    for name in ("train", "val", "test"):
        labels = [rows[i].label for i in split[name]]
        assert abs(np.mean(labels) - 0.5) < 1e-9, name  # 20 / 20 subjects: exact balance
    assert split == split_by_subject(rows, (0.7, 0.15, 0.15), seed=3)
    reversed_rows = list(reversed(rows))
    reversed_split = split_by_subject(reversed_rows, (0.7, 0.15, 0.15), seed=3)
    assert {rows[i].subject for i in split["test"]} == {
        reversed_rows[i].subject for i in reversed_split["test"]
    }  # the split depends on the set of subjects, not on the row order
    assert split != split_by_subject(rows, (0.7, 0.15, 0.15), seed=4)


def test_split_small_cohort_gives_every_part_both_classes() -> None:
    rows = _rows(7, per_subject=1, positive_every=2)  # 4 positive, 3 negative subjects
    split = split_by_subject(rows, seed=0)
    for name, part in split.items():
        assert {rows[i].label for i in part} == {0, 1}, name


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(CounterwarpError, match="sum to 1"):
        split_by_subject(_rows(10), (0.5, 0.2, 0.2))
    with pytest.raises(CounterwarpError, match="non-negative"):
        split_by_subject(_rows(10), (1.2, -0.1, -0.1))
