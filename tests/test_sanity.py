"""Sanity checks: cascading randomisation of the classifier, the seed control, the oracle
classifier and the comparison with another run, on a tiny fitted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import fitted_toy_run
from counterwarp.errors import CounterwarpError
from counterwarp.explain.randomisation import (
    map_agreement,
    randomisation_stages,
    randomised_copy,
)
from counterwarp.nn.classifier import Classifier


def test_stages_cascade_from_the_last_block_to_all():
    model = Classifier((16, 16, 16))
    stages = randomisation_stages(model)
    assert [s.blocks for s in stages[:2]] == [("head",), ("head", "features.3")]
    assert stages[-1].blocks == ("head", "features.3", "features.2", "features.1",
                                 "features.0")


def test_a_randomised_copy_changes_only_its_blocks_and_leaves_the_model_alone():
    model = Classifier((16, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = randomisation_stages(model)[1]  # head + features.3
    copy = randomised_copy(model, stage, seed=4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the original is untouched
    changed = {k for k, v in copy.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, before[k])}
    assert any(k.startswith("head.") for k in changed)
    assert any(k.startswith("features.3.") for k in changed)
    assert not any(k.startswith(("features.0.", "features.1.", "features.2.")) for k in changed)
    again = randomised_copy(model, stage, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    assert not any(p.requires_grad for p in copy.parameters())


def test_torchscript_classifiers_are_refused():
    scripted = torch.jit.trace(Classifier((16, 16)).eval(), torch.zeros(1, 1, 16, 16))
    with pytest.raises(CounterwarpError, match="TorchScript"):
        randomisation_stages(scripted)


def test_map_agreement_is_one_for_the_same_map_and_ignores_sign_when_absolute():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6, 6))
    mask = np.ones(a.shape, bool)
    assert map_agreement(a, a, mask, absolute=False)["pearson"] == pytest.approx(1.0)
    assert map_agreement(a, -a, mask, absolute=False)["spearman"] == pytest.approx(-1.0)
    assert map_agreement(a, -a, mask, absolute=True)["spearman"] == pytest.approx(1.0)
    assert abs(map_agreement(a, rng.normal(size=a.shape), mask, False)["pearson"]) < 0.3


def test_sanity_run_writes_every_check(tmp_path):
    from counterwarp.cli import main

    run = fitted_toy_run(tmp_path, np.diag([4.0, 4.0, 4.0, 1.0]), seed=1)
    out = tmp_path / "sanity"
    assert main(["sanity", "--run", str(run), "--out", str(out), "--saliency",
                 "gradient,gradcam", "--simulator-steps", "2", "--oracle-epochs", "1",
                 "--compare-run", str(run)]) == 0
    result = json.loads((out / "sanity.json").read_text())
    n_stages = len(result["stages"])
    assert n_stages == 5
    rows = result["randomisation"]
    assert len(rows) == n_stages * 2 + 1  # two saliency methods per stage + one refit
    simulator_rows = [r for r in rows if r["method"] == "simulator_inject"]
    assert [r["stage"] for r in simulator_rows] == [1]
    gradients = [r["agreement_spearman"] for r in rows if r["method"] == "gradient"]
    assert all(g < 0.999 for g in gradients)  # randomising changes the gradient
    assert result["seed_control"]["seed"] == 1
    assert set(result["oracle"]) >= {"oracle_test_auroc", "oracle_channels"}
    # the run compared with itself agrees exactly
    assert result["compare_run_agreement"]["agreement_group_pearson"] == pytest.approx(1.0)
    for name in ("sanity.md", "sanity_randomisation.csv", "randomisation.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    markdown = (out / "sanity.md").read_text()
    assert "## Cascading randomisation" in markdown and "## Oracle classifier" in markdown


def test_sanity_refuses_bad_arguments_before_writing(tmp_path):
    from counterwarp.workflows.sanity import sanity_run

    with pytest.raises(CounterwarpError, match="max-images"):
        sanity_run(tmp_path, tmp_path / "out", max_images=1)
    assert not (tmp_path / "out").exists()
