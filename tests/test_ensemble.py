"""The ensemble over simulator seeds: members saved, mean and spread maps that are what the
members' group maps say, and the seed-to-seed agreement."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import fitted_toy_run
from counterwarp.errors import CounterwarpError


def test_fit_ensemble_writes_mean_spread_and_agreement(tmp_path):
    from counterwarp.cli import main
    from counterwarp.explain.simulator import Simulator
    from counterwarp.stats.scores import pearson
    from counterwarp.workflows.folder import load_images, load_run_simulator, rows_in_split

    run = fitted_toy_run(tmp_path, np.diag([4.0, 4.0, 4.0, 1.0]), seed=2)
    assert main(["fit", "--manifest", str(tmp_path / "manifest.csv"), "--run", str(run),
                 "--steps", "2", "--batch-size", "2", "--ensemble", "2"]) == 0
    assert (run / "ensemble" / "ensemble.json").is_file()  # fit --ensemble wrote one
    from counterwarp.workflows.ensemble import ensemble_run

    out = tmp_path / "whole"  # every subject, so the group maps have several members
    result = ensemble_run(run, out, members=2, split="train+val+test", steps=2,
                          progress=False)
    assert result["members"] == 2 and len(result["seeds"]) == 2
    member_files = sorted(out.glob("member-seed*.pt"))
    assert len(member_files) == 1

    base, _ = load_run_simulator(run)
    other = Simulator.load(member_files[0], base.classifier_)
    rows = rows_in_split(run, tmp_path / "manifest.csv", "train+val+test")
    everyone, labels = load_images(rows, (16, 16, 16), progress=False)
    images = everyone[labels == 0]  # inject maps the healthy

    def group(member: Simulator) -> np.ndarray:
        explanation = member.explain(images, "inject")
        valid = explanation.valid.numpy()
        changes = explanation.log_volume_change.numpy().astype(np.float64)
        return (changes[valid] if valid.sum() >= 2 else changes).mean(0)

    maps = np.stack([group(base), group(other)])
    brain = (everyone[:, 0].numpy() != 0).mean(0) >= 0.5  # voxels of most brains
    spread = np.asarray(nib.load(out / "ensemble_inject_spread.nii.gz").dataobj)
    mean = np.asarray(nib.load(out / "ensemble_inject_mean.nii.gz").dataobj)
    assert np.allclose(spread[brain], maps.std(0, ddof=1)[brain], atol=1e-5)
    assert np.allclose(mean[brain], maps.mean(0)[brain], atol=1e-5)
    part = result["directions"]["inject"]
    assert part["agreement_mean"] == pytest.approx(pearson(maps[0], maps[1], brain), abs=1e-6)
    assert "seed-to-seed agreement" in (out / "ensemble.md").read_text()
    assert torch.is_tensor(other.explain(images[:1], "inject").log_volume_change)


def test_an_ensemble_of_one_is_refused(tmp_path):
    from counterwarp.workflows.ensemble import ensemble_run

    with pytest.raises(CounterwarpError, match="at least 2"):
        ensemble_run(tmp_path, members=1)
