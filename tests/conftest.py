"""Shared test fixtures: tiny NIfTI files and tiny labelled cohorts written to ``tmp_path``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def toy_brain(
    shape: tuple[int, ...], label: int, rng: np.random.Generator, effect: float = 1.0
) -> np.ndarray:
    """A structured toy "brain": bright ellipsoid on a zero background with a dark ventricle.

    Diseased images (label 1) have a ventricle enlarged by ``40% * effect`` on the left half
    only (left/right specific, so a flip would destroy it).

    Args:
        shape: ``(H, W)`` or ``(D, H, W)`` in voxels.
        label: 0 or 1.
        rng: random generator (jitter of size, position, intensity; noise).
        effect: strength of the disease effect.

    Returns:
        float32 array of ``shape`` (background exactly 0, brain about 100).
    """
    axes = [np.linspace(-1.0, 1.0, n) for n in shape]
    grid = np.meshgrid(*axes, indexing="ij")
    centre = rng.normal(0.0, 0.03, size=len(shape))
    brain_radius = 0.8 * (1.0 + rng.normal(0.0, 0.03))
    radius2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    brain = radius2 < brain_radius**2
    ventricle_radius = 0.25 * (1.0 + rng.normal(0.0, 0.05))
    ventricle_radius_left = ventricle_radius * (1.0 + 0.4 * effect * label)
    on_left = grid[-1] < centre[-1]
    ventricle = np.where(on_left, radius2 < ventricle_radius_left**2, radius2 < ventricle_radius**2)
    image = np.where(brain, 100.0 * (1.0 + rng.normal(0.0, 0.05)), 0.0)
    image = np.where(ventricle & brain, 30.0, image)
    image = image + brain * rng.normal(0.0, 3.0, size=shape)
    return image.astype(np.float32)


def stored_as(image: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """The same anatomy (same world coordinates) with its array in orientation ``codes``."""
    from nibabel import orientations

    transform = orientations.ornt_transform(
        orientations.io_orientation(image.affine), orientations.axcodes2ornt(tuple(codes))
    )
    data = orientations.apply_orientation(np.asarray(image.dataobj), transform)
    affine = image.affine @ orientations.inv_ornt_aff(transform, image.shape)
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def fitted_toy_run(root: Path, affine: np.ndarray, seed: int) -> Path:
    """16 toy brains (16^3, ``affine``) in ``root`` with ``root/manifest.csv``, a classifier
    trained 2 epochs and a simulator fitted 3 steps through the CLI; returns the run."""
    from counterwarp.cli import main

    rng = np.random.default_rng(seed)
    lines = ["path,label,subject"]
    for i in range(16):
        name = f"sub-{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(toy_brain((16, 16, 16), i % 2, rng), affine), root / name)
        lines.append(f"{name},{i % 2},sub-{i:03d}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = root / "run"
    assert main(["train-classifier", "--manifest", str(root / "manifest.csv"), "--out",
                 str(run), "--epochs", "2", "--batch-size", "4"]) == 0
    assert main(["fit", "--manifest", str(root / "manifest.csv"), "--run", str(run),
                 "--steps", "3", "--batch-size", "2"]) == 0
    return run


@pytest.fixture
def write_nifti() -> Callable[..., Path]:
    """``write_nifti(path, array, affine=None) -> Path``: save an array as a NIfTI file."""

    def write(path: str | Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        image = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine)
        nib.save(image, str(path))
        return path

    return write


@pytest.fixture
def toy_cohort(tmp_path: Path, write_nifti: Callable[..., Path]) -> Callable[..., Path]:
    """Factory writing a tiny separable cohort and its manifest; returns the manifest path.

    ``toy_cohort(n=24, shape=(16, 16, 16), seed=0, effect=1.0, images_per_subject=1,
    folder="cohort")``: ``n`` images, half diseased (label 1, alternating by subject),
    files ``images/sub-XXX_Y.nii.gz`` referenced by relative paths in
    ``<folder>/manifest.csv`` with columns ``path,label,subject,age``.
    """

    def make(
        n: int = 24,
        shape: tuple[int, ...] = (16, 16, 16),
        seed: int = 0,
        effect: float = 1.0,
        images_per_subject: int = 1,
        folder: str = "cohort",
    ) -> Path:
        rng = np.random.default_rng(seed)
        root = tmp_path / folder
        lines = ["path,label,subject,age"]
        for index in range(n):
            subject_index = index // images_per_subject
            label = subject_index % 2
            subject = f"sub-{subject_index:03d}"
            relative = Path("images") / f"{subject}_{index % images_per_subject}.nii.gz"
            write_nifti(root / relative, toy_brain(shape, label, rng, effect))
            lines.append(f"{relative.as_posix()},{label},{subject},{60 + index % 20}")
        manifest = root / "manifest.csv"
        manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return manifest

    return make
