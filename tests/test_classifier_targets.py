"""Brought classifiers end to end on tiny cohorts with known answers: a C-class model (the
log-odds of one class), a regression head (a prediction in its unit), and a model trained in
one orientation fed the same anatomy stored in three."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from conftest import stored_as
from counterwarp.cli import main
from counterwarp.data.derivatives import output_name
from counterwarp.workflows.explain import explain_run

SHAPE = (16, 14, 12)
AFFINE = np.array([[2.0, 0, 0, -16], [0, 2.0, 0, -14], [0, 0, 2.0, -12], [0, 0, 0, 1]])


def _grid() -> np.ndarray:
    axes = [np.arange(n) - (n - 1) / 2 for n in SHAPE]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.sqrt(zz**2 + yy**2 + xx**2)


def _sphere_cohort(folder: Path, n: int = 12) -> Path:
    """Images of a bright sphere (radius 2.5-4.5 voxels) in a dimmer head; label: big."""
    rng = np.random.default_rng(0)
    radius_of = _grid()
    rows = ["path,label"]
    for i in range(n):
        radius = rng.uniform(2.5, 4.5)
        image = 2.0 / (1 + np.exp((radius_of - radius) / 0.5)) + 1.0 * (radius_of < 5.5)
        image += rng.normal(0, 0.02, SHAPE) * (radius_of < 5.5)
        nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), folder / f"s{i:02d}.nii.gz")
        rows.append(f"s{i:02d}.nii.gz,{int(radius > 3.5)}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


class SoftVolume(nn.Module):
    """The soft count of bright voxels (/ 100) ``v``: three class logits ``[0, v, 2v - 3]``
    or a regression value ``10 v`` ("years")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        volume = torch.sigmoid((x - 2.0) * 4).sum(dim=(1, 2, 3, 4)) / 100 * self.scale
        if self.kind == "class":
            return torch.stack([torch.zeros_like(volume), volume, 2 * volume - 3], dim=1)
        return 10 * volume


def _summary(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("kind", ["class", "regression"])
def test_inject_grows_what_the_score_counts(tmp_path, kind):
    """Known answer: the score grows with the sphere's volume, so "inject" must grow the
    sphere (log volume change > 0 in it) and "remove" shrink it, past the margin."""
    manifest = _sphere_cohort(tmp_path, n=8)
    torch.jit.save(torch.jit.script(SoftVolume(kind).eval()), tmp_path / "model.ts")
    contract = {"input_shape": list(SHAPE), "intensity": "none", "output": kind,
                **({"class_index": 2} if kind == "class" else {"unit": "years"})}
    (tmp_path / "c.json").write_text(json.dumps(contract))
    run, out = tmp_path / "run", tmp_path / "explain"
    assert main(["fit", "--manifest", str(manifest), "--run", str(run), "--classifier",
                 str(tmp_path / "model.ts"), "--contract", str(tmp_path / "c.json"),
                 "--steps", "40", "--batch-size", "4"]) == 0
    fit = json.loads((run / "simulator_fit.json").read_text())
    assert fit["output"] == kind and fit["unit"] == contract.get("unit")
    explain_run(run, out, manifest=manifest, split="all", panels=False, progress=False)
    rows = _summary(out)
    model = SoftVolume(kind).eval()
    core = _grid() < 2.0
    for row in rows:
        image = torch.from_numpy(nib.load(row["path"]).get_fdata(dtype=np.float32))[None, None]
        with torch.no_grad():
            output = model(image)
        expected = (output[0, 2] - torch.logsumexp(output[0, :2], 0) if kind == "class"
                    else output[0])
        assert float(row["logit_before"]) == pytest.approx(float(expected), abs=1e-4)
        assert (row["probability_before"] == "") == (kind == "regression")
    for direction, sign in (("inject", 1), ("remove", -1)):
        mine = [r for r in rows if r["direction"] == direction]
        moved = np.mean([r["moved_by_margin"] == "True" for r in mine])
        assert moved >= 0.75, (direction, moved)
        shifts = [sign * float(r["logit_shift"]) for r in mine]
        assert min(shifts) > 0
        change = [nib.load(out / output_name(r["id"], direction, "logjac")).get_fdata()
                  for r in mine]
        assert all(sign * c[core].mean() > 0.1 for c in change)


class Lopsided(nn.Module):
    """A model that tells left from right: fixed random weights over the grid."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, *SHAPE, generator=torch.Generator()
                                               .manual_seed(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).mean(dim=(1, 2, 3, 4)) * 10


def test_same_anatomy_in_three_orientations_gives_the_same_logits_and_maps(tmp_path):
    manifest = _sphere_cohort(tmp_path, n=8)
    # an asymmetric anatomy: a bright blob on the left of subject 0
    first = nib.load(tmp_path / "s00.nii.gz")
    data = first.get_fdata(dtype=np.float32)
    data[2:5, 4:8, 3:7] += 1.5
    asymmetric = nib.Nifti1Image(data, first.affine)
    files = {}
    for codes in ("RAS", "LAS", "PIR"):
        files[codes] = tmp_path / f"anatomy_{codes}.nii.gz"
        nib.save(stored_as(asymmetric, codes), files[codes])
    assert nib.aff2axcodes(nib.load(files["PIR"]).affine) == ("P", "I", "R")
    torch.jit.save(torch.jit.script(Lopsided().eval()), tmp_path / "model.ts")
    run = tmp_path / "run"
    for orientation in (None, "RAS"):
        (tmp_path / "c.json").write_text(json.dumps(
            {"input_shape": list(SHAPE), "orientation": orientation}))
        assert main(["fit", "--manifest", str(manifest), "--run", str(run), "--classifier",
                     str(tmp_path / "model.ts"), "--contract", str(tmp_path / "c.json"),
                     "--steps", "3", "--batch-size", "2"]) == 0
        outputs = {}
        for codes, file in files.items():
            out = tmp_path / f"explain_{orientation}_{codes}"
            assert main(["explain", "--run", str(run), "--direction", "inject", "--out",
                         str(out), str(file)]) == 0
            outputs[codes] = out
        logits = {c: float(_summary(o)[0]["logit_before"]) for c, o in outputs.items()}
        if orientation is None:  # as stored: the model sees a mirrored / permuted brain
            assert abs(logits["LAS"] - logits["RAS"]) > 1e-3
            continue
        assert logits["LAS"] == pytest.approx(logits["RAS"], abs=1e-5)
        assert logits["PIR"] == pytest.approx(logits["RAS"], abs=1e-5)
        reference = None
        for codes, out in outputs.items():
            written = nib.load(out / f"anatomy_{codes}_desc-inject_logjac.nii.gz")
            source = nib.load(files[codes])
            assert written.shape == source.shape
            assert np.allclose(written.affine, source.affine)
            canonical = nib.as_closest_canonical(written)  # the same world grid for all
            if reference is None:
                reference = canonical
                continue
            assert np.allclose(canonical.affine, reference.affine)
            assert np.allclose(canonical.get_fdata(), reference.get_fdata(), atol=1e-5)
