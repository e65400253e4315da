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
    simulator_rows = [r for r in rows if r["method"] == "simulator_inject"]
    # auto: stage 1 and the first stage whose classifier lost the group signal
    from counterwarp.workflows.sanity_report import first_stage_without_group_signal

    informative = first_stage_without_group_signal(result["randomised_classifiers"])
    expected = sorted({1} | ({informative} if informative is not None else set()))
    assert [r["stage"] for r in simulator_rows] == expected == result["simulator_stages"]
    assert len(rows) == n_stages * 2 + len(expected)  # two saliency methods per stage
    gradients = [r["agreement_spearman"] for r in rows if r["method"] == "gradient"]
    assert all(g < 0.999 for g in gradients)  # randomising changes the gradient
    left = result["randomised_classifiers"]
    assert [r["stage"] for r in left] == list(range(1, n_stages + 1))
    assert all(0.0 <= r["auroc"] <= 1.0 for r in left)
    assert result["seed_control"]["seed"] == 1
    assert set(result["oracle"]) >= {"oracle_test_auroc", "oracle_channels"}
    # the run compared with itself agrees exactly
    assert result["compare_run_agreement"]["agreement_group_pearson"] == pytest.approx(1.0)
    for name in ("sanity.md", "sanity_randomisation.csv", "randomisation.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    markdown = (out / "sanity.md").read_text()
    assert "## Cascading randomisation" in markdown and "## Oracle classifier" in markdown
    assert "### What each randomised classifier still does" in markdown


def test_what_is_left_of_a_classifier_whose_read_out_is_the_same_is_everything():
    from counterwarp.nn.classifier import predict_in_batches
    from counterwarp.workflows.sanity import what_is_left

    torch.manual_seed(0)
    model = Classifier((16, 16, 16)).eval()
    images = torch.randn(8, 1, 16, 16, 16)
    logits = predict_in_batches(model, images).numpy()
    labels = torch.from_numpy((logits > np.median(logits)).astype(np.int64))
    same = what_is_left(model, images, labels, logits)
    assert same["auroc"] == pytest.approx(1.0)  # the labels are its own ranking
    assert same["logit_pearson"] == pytest.approx(1.0)
    flipped = what_is_left(model, images, 1 - labels, logits)
    assert flipped["auroc"] == pytest.approx(0.0)


def test_the_markdown_says_when_the_last_block_check_is_confounded():
    from counterwarp.workflows.sanity_report import sanity_markdown, still_separating_stages

    result = {"run": "r", "n_images": 4, "split": "test", "stages": ["head", "head + f"],
              "randomisation": [],
              "randomised_classifiers": [
                  {"stage": 1, "blocks": "head", "auroc": 0.95, "logit_pearson": 0.9},
                  {"stage": 2, "blocks": "head + f", "auroc": 0.55, "logit_pearson": 0.1}]}
    assert still_separating_stages(result) == [1]
    assert "confounded" in sanity_markdown(result)
    result["randomised_classifiers"][0]["auroc"] = 0.6
    assert still_separating_stages(result) == []
    assert "confounded" not in sanity_markdown(result)


def test_sanity_refuses_bad_arguments_before_writing(tmp_path):
    from counterwarp.workflows.sanity import sanity_run

    with pytest.raises(CounterwarpError, match="max-images"):
        sanity_run(tmp_path, tmp_path / "out", max_images=1)
    assert not (tmp_path / "out").exists()


def test_refit_stages_are_auto_a_count_or_stage_numbers():
    from counterwarp.workflows.sanity import parse_refit_stages

    assert parse_refit_stages("auto", 5) is None
    assert parse_refit_stages(2, 5) == {1, 2}
    assert parse_refit_stages("0", 5) == set()
    assert parse_refit_stages("1,3", 5) == {1, 3}
    for bad in ("6", "-1", "0,2", "1,9", "head", ","):
        with pytest.raises(CounterwarpError, match="--simulator-stages"):
            parse_refit_stages(bad, 5)


def test_the_first_stage_without_group_signal_is_the_first_near_chance():
    from counterwarp.workflows.sanity_report import first_stage_without_group_signal

    rows = [{"stage": 1, "auroc": 1.0}, {"stage": 2, "auroc": 0.04},
            {"stage": 3, "auroc": 0.54}, {"stage": 4, "auroc": 0.51}]
    assert first_stage_without_group_signal(rows) == 3
    assert first_stage_without_group_signal(rows[:2]) is None
    assert first_stage_without_group_signal([{"stage": 1, "auroc": float("nan")}]) is None
