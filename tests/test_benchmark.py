"""The benchmark: scoring core on hand-made maps, the run-folder workflow on a tiny 2D cohort,
input validation, and the two-simulator ablation arm."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

from counterwarp.data.synthetic import synth
from counterwarp.errors import CounterwarpError
from counterwarp.explain.saliency import SALIENCY_METHODS
from counterwarp.nn.two_simulators import TwoSimulators
from counterwarp.stats.benchmark_scores import SIMULATOR_METHODS, score_methods, summary_table
from counterwarp.train.classifier import train_classifier
from counterwarp.workflows.benchmark import methods_figure, run_benchmark
from counterwarp.workflows.fit import fit_run

TINY_FIT = {"steps": 3, "batch_size": 4, "channels": (4, 8, 8), "latent_dim": 16,
            "checkpoint_every": 3}


# ----------------------------------------------------------------------------- scoring core


def _hand_made(shape: tuple[int, int] = (24, 24)):
    """Template mask (a disc), an effect with a growing and a shrinking blob, 4 subjects."""
    yy, xx = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    mask = (yy - 12) ** 2 + (xx - 12) ** 2 < 11**2
    effect = 0.8 * np.exp(-((yy - 8) ** 2 + (xx - 12) ** 2) / 6.0)
    effect -= 0.45 * np.exp(-((yy - 16) ** 2 + (xx - 12) ** 2) / 4.0)
    effect *= mask
    severities = np.array([0.5, 0.0, 1.5, 0.0])  # subjects 1 and 3 are healthy
    truths = severities[:, None, None] * effect[None]
    brains = np.repeat(mask[None], 4, axis=0)
    return truths, brains, effect, mask


def test_a_perfect_method_scores_one_everywhere():
    truths, brains, effect, mask = _hand_made()
    scores = score_methods(
        {"simulator_inject": truths, "simulator_remove": 3.0 * truths, "gradient": -truths},
        truths, brains, effect, mask, ids=["a", "b", "c", "d"],
    )
    for method in ("simulator_inject", "simulator_remove", "gradient"):
        result = scores[method]
        for metric, value in result["group"].items():
            assert value == pytest.approx(1.0), (method, metric)
        assert set(result["subjects"]) == {"a", "c"}  # healthy subjects are not scored
        for values in result["subjects"].values():
            assert values["pearson"] == pytest.approx(1.0)
            assert values["auroc"] == pytest.approx(1.0)
        assert result["subject_median"]["pearson"] == pytest.approx(1.0)
    assert scores["simulator_inject"]["signed"] and not scores["gradient"]["signed"]
    assert scores["gradient"]["sign_used"].startswith("unsigned")


def test_signed_scoring_punishes_the_wrong_direction_and_unsigned_forgives_it():
    truths, brains, effect, mask = _hand_made()
    scores = score_methods(
        {"wrong_way": -truths, "magnitude_only": -truths}, truths, brains, effect, mask,
        signed={"wrong_way": True, "magnitude_only": False},
    )
    assert scores["wrong_way"]["group"]["pearson"] == pytest.approx(-1.0)
    assert scores["wrong_way"]["group"]["auroc"] == pytest.approx(1.0)  # |map| localises
    assert scores["magnitude_only"]["group"]["pearson"] == pytest.approx(1.0)


def test_noise_scores_near_chance_and_constant_maps_are_nan():
    truths, brains, effect, mask = _hand_made()
    noise = np.random.default_rng(0).normal(size=truths.shape)
    scores = score_methods(
        {"noise": noise, "flat": np.ones_like(truths)}, truths, brains, effect, mask,
        signed={"noise": True, "flat": True},
    )
    assert abs(scores["noise"]["group"]["pearson"]) < 0.2
    assert abs(scores["noise"]["group"]["auroc"] - 0.5) < 0.15
    assert math.isnan(scores["flat"]["group"]["pearson"])
    assert "| flat | signed | - |" in summary_table(scores)


def test_score_methods_rejects_mismatched_shapes():
    truths, brains, effect, mask = _hand_made()
    with pytest.raises(CounterwarpError, match="shape"):
        score_methods({"gradient": truths[:, :5]}, truths, brains, effect, mask)
    with pytest.raises(CounterwarpError, match="spatial shape"):
        score_methods({}, truths, brains, effect[:5], mask)


# ----------------------------------------------------------------------------- workflow


@pytest.fixture(scope="module")
def cohort_and_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    cohort, run = root / "cohort", root / "run"
    synth(cohort, n=20, dim=2, shape=(32, 32), seed=5)
    train_classifier(cohort / "manifest.csv", run, epochs=2, progress=False)
    fit_run(cohort / "manifest.csv", run, progress=False, **TINY_FIT)
    return cohort, run


def test_run_benchmark_writes_all_outputs(cohort_and_run, tmp_path):
    cohort, run = cohort_and_run
    out = tmp_path / "bench"
    result = run_benchmark(cohort, run, out, progress=False, occlusion_patch=8)
    for name in ("results.csv", "results.json", "results.md", "methods_figure.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["methods"]) == {*SIMULATOR_METHODS, *SALIENCY_METHODS}
    assert payload == json.loads(json.dumps(result))
    assert payload["methods"]["simulator_remove"]["signed"] is True
    assert payload["methods"]["gradient"]["signed"] is False
    for key in ("moved_share", "remove_flips", "mean_logit_shift_inject",
                "cycle_error_relative", "folding_share_mean", "mean_abs_grad_u"):
        assert key in payload["simulator"], key
    assert {"pearson_voxel", "pearson_region"} <= set(payload["inject_vs_truth_healthy"])

    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    groups = [r for r in rows if r["scope"] == "group"]
    assert {r["method"] for r in groups} == set(payload["methods"])
    subjects = [r for r in rows if r["scope"] == "subject"]
    per_method = len(subjects) // len(payload["methods"])
    assert per_method == payload["n_test_diseased"]
    assert all(r["label"] == "1" for r in subjects)

    sensitivity = payload["classifier_region_sensitivity"]
    assert [row["region"] for row in sensitivity][0] == "all regions"
    assert len(sensitivity) == 1 + 4 + 2  # all, each default region, age, brain outline
    assert sensitivity[5]["region"].startswith("age confound (+4 years")
    assert sensitivity[6]["region"].startswith("brain outline")
    markdown = (out / "results.md").read_text()
    assert "## What the classifier reads" in markdown
    assert "| method | sign used | group Pearson |" in markdown
    assert "absolute value" in markdown
    for method in payload["methods"]:
        assert f"| {method} |" in markdown


def test_region_sensitivity_finds_the_region_a_classifier_reads(cohort_and_run):
    """A hand-made classifier that only reads the ventricles' darkness: applying the true
    ventricle effect moves its logit the right way, the hippocampi's does not move it."""
    import nibabel as nib

    from counterwarp.explain.sensitivity import classifier_region_sensitivity
    from counterwarp.workflows.folder import load_images, rows_in_split

    cohort, run = cohort_and_run
    regions = np.asarray(nib.load(cohort / "truth" / "effect_regions.nii.gz").dataobj)
    ventricles = torch.from_numpy(np.isin(regions, (1, 2)).astype(np.float32))

    class ReadsVentricles(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(-10.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * (x[:, 0] * ventricles).sum((1, 2)) / ventricles.sum()

    rows = rows_in_split(run, cohort / "manifest.csv", "train+val+test")
    images, labels = load_images(rows, (32, 32), progress=False)
    table = {r["region"]: r for r in classifier_region_sensitivity(
        ReadsVentricles().eval(), images, labels, cohort)}
    grow = table["left_lateral_ventricle"]["inject_logit_shift"]
    assert grow > 0.05  # darker ventricles: the logit rises
    assert table["left_lateral_ventricle"]["remove_logit_shift"] < -0.05
    assert abs(table["left_hippocampus"]["inject_logit_shift"]) < 0.2 * grow
    assert table["all regions"]["inject_logit_shift"] > grow
    # a cohort on another grid than the images: no probe, no error
    assert classifier_region_sensitivity(
        ReadsVentricles().eval(), images[:, :, :16, :16], labels, cohort) is None


def test_region_sensitivity_measures_the_age_confound_and_the_brain_outline(cohort_and_run):
    """A hand-made classifier that reads brain size (the brain's total |intensity|; less
    brain = more diseased). Any warp blurs by interpolation and lowers that total in both
    directions alike, so the geometric part is the difference of the two shifts: the older
    brain's shrinking outline (inject) raises the logit more than undoing it (remove) does,
    while the ventricles, inside the brain, do not act that way."""
    from counterwarp.explain.sensitivity import classifier_region_sensitivity
    from counterwarp.workflows.folder import load_images, rows_in_split

    cohort, run = cohort_and_run

    class ReadsBrainSize(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -x[:, 0].abs().sum((1, 2)) / 10.0

    rows = rows_in_split(run, cohort / "manifest.csv", "train+val+test")
    images, labels = load_images(rows, (32, 32), progress=False)
    table = {r["region"]: r for r in classifier_region_sensitivity(
        ReadsBrainSize().eval(), images, labels, cohort)}

    def geometric(row: dict) -> float:
        return row["inject_logit_shift"] - row["remove_logit_shift"]

    outline = next(r for name, r in table.items() if name.startswith("brain outline"))
    age = next(r for name, r in table.items() if name.startswith("age confound"))
    assert outline["inject_logit_shift"] > 0.2
    assert geometric(outline) > 0.3
    assert geometric(age) > 0.3
    assert geometric(table["left_lateral_ventricle"]) < geometric(outline) - 0.3


def test_run_benchmark_simulator_only(cohort_and_run, tmp_path):
    cohort, run = cohort_and_run
    result = run_benchmark(cohort, run, tmp_path / "only", methods=[], progress=False)
    assert set(result["methods"]) == set(SIMULATOR_METHODS)


def test_run_benchmark_is_reproducible(cohort_and_run, tmp_path):
    cohort, run = cohort_and_run
    first = run_benchmark(cohort, run, tmp_path / "a", methods="smoothgrad", progress=False)
    second = run_benchmark(cohort, run, tmp_path / "b", methods="smoothgrad", progress=False)
    assert first["methods"] == second["methods"]


def test_methods_figure_3d_has_one_row_per_method(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 12, 12))
    truth = np.zeros_like(image)
    truth[4:7, 5:8, 6:9] = 0.5
    from PIL import Image

    sizes = []
    for maps in ({"gradient": image}, {"simulator_inject": truth, "gradient": image,
                                       "occlusion": image}):
        path = methods_figure(image, truth, maps, tmp_path / f"figure{len(maps)}.png")
        sizes.append(Image.open(path).size)
    assert sizes[0][0] == sizes[1][0]  # the same three slices per row
    assert sizes[1][1] > 1.6 * sizes[0][1]  # 4 rows vs 2


def test_data_without_truth_says_it_must_come_from_synth(cohort_and_run, tmp_path):
    cohort, run = cohort_and_run
    copy = tmp_path / "no_truth"
    shutil.copytree(cohort, copy)
    shutil.rmtree(copy / "truth")
    out = tmp_path / "out"
    with pytest.raises(CounterwarpError, match="counterwarp synth"):
        run_benchmark(copy, run, out, progress=False)
    with pytest.raises(CounterwarpError, match="no such folder"):
        run_benchmark(tmp_path / "nowhere", run, out, progress=False)
    assert not out.exists()


def test_run_without_simulator_says_run_fit(cohort_and_run, tmp_path):
    cohort, run = cohort_and_run
    bare = tmp_path / "bare_run"
    bare.mkdir()
    for name in ("classifier.pt", "split.json"):
        shutil.copy(run / name, bare / name)
    with pytest.raises(CounterwarpError, match="counterwarp fit"):
        run_benchmark(cohort, bare, tmp_path / "out", progress=False)


def test_bad_method_and_patch_fail_before_writing(cohort_and_run, tmp_path):
    cohort, run = cohort_and_run
    out = tmp_path / "out"
    with pytest.raises(CounterwarpError, match="unknown saliency method"):
        run_benchmark(cohort, run, out, methods="gradient,nonsense", progress=False)
    with pytest.raises(CounterwarpError, match="occlusion-patch"):
        run_benchmark(cohort, run, out, methods="occlusion", occlusion_patch=99,
                      progress=False)
    assert not out.exists()


def _benchmark_script(name: str):
    """Import ``benchmarks/<name>.py`` (not a package) as a module."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_script_runs_at_a_tiny_size(cohort_and_run, tmp_path, capsys):
    ablations = _benchmark_script("ablations")
    cohort, run = cohort_and_run
    out = tmp_path / "ablations"
    code = ablations.main([
        "--out", str(out), "--data", str(cohort), "--run", str(run), "--arms", "a,c",
        "--seeds", "2", "--steps", "2", "--batch-size", "4", "--channels", "4", "8", "8",
        "--latent-dim", "16",
    ])
    assert code == 0
    text = (out / "ablations.md").read_text()
    for label in ("one simulator, antisymmetric", "(a) two separate", "(c) without the cycle"):
        assert label in text
    with open(out / "ablations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["configuration"], r["seed"]) for r in rows] == [
        ("default", "0"), ("default", "1"), ("two", "0"), ("two", "1"),
        ("nocycle", "0"), ("nocycle", "1"),
    ]
    assert ablations.main(["--out", str(out), "--arms", "z"]) == 2
    assert "--arms" in capsys.readouterr().err


def test_settings_sweep_script_fits_and_scores_one_setting(cohort_and_run, tmp_path, capsys):
    sweep = _benchmark_script("settings_sweep")
    cohort, run = cohort_and_run
    out = tmp_path / "sweep"
    settings = json.dumps({**TINY_FIT, "channels": [4, 8, 8], "w_magnitude": 0.05})
    assert sweep.main(["--data", str(cohort), "--run", str(run), "--out", str(out),
                       "--name", "tiny", "--settings", settings]) == 0
    record = json.loads((out / "sweep.jsonl").read_text().splitlines()[-1])
    assert record["name"] == "tiny" and record["settings"]["w_magnitude"] == 0.05
    assert -1.0 <= record["inject_voxel"] <= 1.0 and 0.0 <= record["folding_max"] <= 1.0
    assert len(record["minus_remove_region_means"]) == 5  # 4 regions + outside
    assert (out / "tiny" / "simulator.pt").is_file() and not (run / "tiny").exists()
    assert sweep.main(["--data", str(cohort), "--run", str(tmp_path), "--out", str(out),
                       "--name", "bad"]) == 2
    assert "missing" in capsys.readouterr().err


# ----------------------------------------------------------------------------- two simulators


def test_two_simulators_dispatch_by_condition_sign():
    torch.manual_seed(0)
    net = TwoSimulators((16, 16), channels=(4, 8), latent_dim=8, routing_dropout=0.0)
    for sub in (net.inject_net, net.remove_net):  # the head starts at zero: perturb it
        torch.nn.init.normal_(sub.head.weight, std=0.1)
    net.eval()
    x = torch.randn(4, 1, 16, 16)
    condition = torch.tensor([1.0, -1.0, -1.0, 1.0])
    raw = net(x, condition)
    assert raw.shape == (4, 2, 16, 16)
    torch.testing.assert_close(raw[[0, 3]], net.inject_net(x[[0, 3]], condition[[0, 3]]))
    torch.testing.assert_close(raw[[1, 2]], net.remove_net(x[[1, 2]], condition[[1, 2]]))
    raw.square().sum().backward()
    assert net.inject_net.head.weight.grad.abs().sum() > 0
    assert net.remove_net.head.weight.grad.abs().sum() > 0
    u, inverse = net.displacements(raw)
    assert u is raw and inverse is None
    assert net.config["architecture"] == "two_simulators"
    assert net.config["num_experts"] == 1 and net.config["routing"] == "condition"


def test_visible_ceiling_scores_indicators_against_the_truth():
    ceiling = _benchmark_script("visible_ceiling")
    yy, xx = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
    brain = np.ones((24, 24), bool)
    regions = (((yy - 12) / 6.0) ** 2 + ((xx - 12) / 4.0) ** 2 <= 1).astype(int)
    effect = 0.8 * regions.astype(float)  # uniform growth of the whole region
    core = (np.abs(yy - 12) <= 1) & (np.abs(xx - 12) <= 1)  # a small dark structure inside
    image = np.where(core, -2.0, 1.0) + 0.01 * xx  # darker inside the core
    result = ceiling.visible_ceiling(effect, brain, regions, image, [1], quantiles=(0.1,),
                                     sigmas=(0.0,))
    # the whole region reproduces the truth exactly; its dark core only partly
    assert result["whole_regions"] == pytest.approx(1.0)
    assert result["region_voxels"] == int(regions.sum())
    dark = result["darkest"][0]
    assert dark["voxels"] < result["region_voxels"]
    assert 0.0 < dark["pearson"]["0.0"] < 0.6
    with pytest.raises(CounterwarpError, match="region labels"):
        ceiling.visible_ceiling(effect, brain, regions, image, [7])
