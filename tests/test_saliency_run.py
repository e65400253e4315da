"""Tests of the ``counterwarp saliency`` workflow: files, grids, validation before writing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from counterwarp.data.manifest import read_manifest
from counterwarp.errors import CounterwarpError
from counterwarp.explain.saliency import SALIENCY_METHODS
from counterwarp.nn.classifier import Classifier, save_classifier
from counterwarp.workflows.saliency import INDEX_COLUMNS, parse_methods, saliency_run

AFFINE = np.array(
    [[1.5, 0.0, 0.0, -20.0], [0.0, 2.0, 0.0, 10.0], [0.0, 0.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]]
)


def _blob(shape: tuple[int, ...], label: int, rng: np.random.Generator) -> np.ndarray:
    """A bright disc / ball on zero background with a dark centre, bigger when label is 1."""
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    radius2 = sum(g**2 for g in grid)
    image = np.where(radius2 < 0.7, 100.0, 0.0) + (radius2 < 0.7) * rng.normal(0, 3, shape)
    image = np.where(radius2 < (0.1 + 0.1 * label), 30.0, image)
    return image.astype(np.float32)


def _write(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _make_run(run: Path, model_shape: tuple[int, ...], manifest: Path | None = None) -> Path:
    """A run folder with an untrained tiny classifier and, given a manifest, a split.json."""
    torch.manual_seed(0)
    model = Classifier(model_shape, channels=(4, 8), hidden=8).eval()
    save_classifier(
        run / "classifier.pt", model, extra={"positive_label": None, "input_shape": model_shape}
    )
    if manifest is not None:
        rows = read_manifest(manifest)
        records = [
            {"path": str(r.path), "label": r.label, "subject": r.subject, "line": r.line}
            for r in rows
        ]
        split = {
            "manifest": str(manifest.resolve()),
            "seed": 0,
            "fractions": [0.5, 0.25, 0.25],
            "positive_label": None,
            "train": records[:4],
            "val": records[4:6],
            "test": records[6:],
        }
        (run / "split.json").write_text(json.dumps(split), encoding="utf-8")
    return run


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """Eight 32x32 images (labels alternate) and their manifest; returns the manifest."""
    rng = np.random.default_rng(0)
    lines = ["path,label,subject"]
    for i in range(8):
        _write(tmp_path / "cohort" / "images" / f"sub-{i:02d}.nii.gz", _blob((32, 32), i % 2, rng))
        lines.append(f"images/sub-{i:02d}.nii.gz,{i % 2},sub-{i:02d}")
    manifest = tmp_path / "cohort" / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def _check_outputs(out: Path, rows: list[dict], ids: list[str], methods: list[str]) -> None:
    assert [(r["id"], r["method"]) for r in rows] == [(i, m) for i in ids for m in methods]
    for image_id in ids:
        assert (out / f"{image_id}_saliency.png").stat().st_size > 0
    for row in rows:
        assert row["file"] == f"{row['id']}_{row['method']}.nii.gz"  # relative to out
        saved = nib.load(out / row["file"])
        source = nib.load(row["path"])
        assert saved.shape == source.shape
        np.testing.assert_allclose(saved.affine, source.affine)
        assert np.isfinite(saved.get_fdata()).all()
    with open(out / "saliency_index.csv", encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(INDEX_COLUMNS)
    assert [(t["id"], t["method"], t["file"]) for t in table] == [
        (r["id"], r["method"], r["file"]) for r in rows
    ]


def test_manifest_split_writes_maps_per_image_and_method(tmp_path: Path, cohort: Path) -> None:
    run = _make_run(tmp_path / "run", (32, 32), manifest=cohort)
    out = tmp_path / "out"
    rows = saliency_run(run, out, methods="gradient,gradcam", manifest=cohort, progress=False)
    _check_outputs(out, rows, ["sub-06", "sub-07"], ["gradient", "gradcam"])
    assert {r["label"] for r in rows} == {0, 1}
    gradcam = nib.load(out / "sub-06_gradcam.nii.gz").get_fdata()
    assert (gradcam >= 0).all()


def test_images_not_at_model_shape_are_restored_to_input_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths = [_write(tmp_path / "in" / f"img{i}.nii.gz", _blob((40, 36), i, rng)) for i in range(2)]
    run = _make_run(tmp_path / "run", (32, 32))
    out = tmp_path / "out"
    rows = saliency_run(run, out, methods="all", images=paths, progress=False)
    _check_outputs(out, rows, ["img0", "img1"], list(SALIENCY_METHODS))
    assert nib.load(out / "img0_occlusion.nii.gz").shape == (40, 36)
    assert all(r["label"] == "" for r in rows)


def test_3d_images_and_duplicate_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    first = _write(tmp_path / "a" / "brain.nii.gz", _blob((12, 10, 8), 1, rng))
    second = _write(tmp_path / "b" / "brain.nii", _blob((8, 8, 8), 0, rng), np.eye(4))
    run = _make_run(tmp_path / "run", (8, 8, 8))
    out = tmp_path / "out"
    rows = saliency_run(
        run, out, methods=["gradcam", "gradient"], images=[first, second], progress=False
    )
    _check_outputs(out, rows, ["brain", "brain_2"], ["gradcam", "gradient"])
    assert nib.load(out / "brain_gradient.nii.gz").shape == (12, 10, 8)


def test_unknown_method_lists_valid_ones_and_writes_nothing(tmp_path: Path, cohort: Path) -> None:
    run = _make_run(tmp_path / "run", (32, 32), manifest=cohort)
    out = tmp_path / "out"
    with pytest.raises(CounterwarpError) as caught:
        saliency_run(run, out, methods="gradient,lime", manifest=cohort, progress=False)
    message = str(caught.value)
    assert "'lime'" in message
    assert all(name in message for name in SALIENCY_METHODS)
    assert not out.exists()


def test_bad_input_among_good_ones_writes_nothing(tmp_path: Path, cohort: Path) -> None:
    run = _make_run(tmp_path / "run", (32, 32))
    good = sorted((cohort.parent / "images").glob("*.nii.gz"))[:2]
    bad = tmp_path / "in" / "broken.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    with pytest.raises(CounterwarpError, match="broken.nii.gz"):
        saliency_run(run, out, methods="gradient", images=[*good, bad], progress=False)
    assert not out.exists()
    with pytest.raises(CounterwarpError, match="not found"):
        saliency_run(
            run, out, methods="gradient", images=[*good, tmp_path / "missing.nii"], progress=False
        )
    assert not out.exists()


def test_other_user_errors_write_nothing(tmp_path: Path, cohort: Path) -> None:
    run = _make_run(tmp_path / "run", (32, 32))
    image = sorted((cohort.parent / "images").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    with pytest.raises(CounterwarpError, match="occlusion-patch"):
        saliency_run(
            run, out, methods="occlusion", images=[image], occlusion_patch=33, progress=False
        )
    with pytest.raises(CounterwarpError, match="either --manifest or image"):
        saliency_run(run, out, methods="gradient", manifest=cohort, images=[image], progress=False)
    with pytest.raises(CounterwarpError, match="nothing to explain"):
        saliency_run(run, out, methods="gradient", progress=False)
    with pytest.raises(CounterwarpError, match="classifier checkpoint not found"):
        saliency_run(tmp_path / "norun", out, methods="gradient", images=[image], progress=False)
    assert not out.exists()


def test_parse_methods() -> None:
    assert parse_methods("all") == list(SALIENCY_METHODS)
    assert parse_methods(" Gradient , gradcam,gradient") == ["gradient", "gradcam"]
    assert parse_methods(["occlusion", "smoothgrad,gradient"]) == [
        "occlusion",
        "smoothgrad",
        "gradient",
    ]
    with pytest.raises(CounterwarpError, match="at least one"):
        parse_methods(" , ")
