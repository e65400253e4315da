"""Classifiers counterwarp did not define, brought with ``--classifier``: MONAI's DenseNet121
(needs 32^3, so the 16^3 cohort is resampled) and ResNet-10 (16^3), each as a TorchScript
file and as ``module:factory`` plus a state dict, through fit -> explain -> saliency ->
benchmark -> report from the command line on one tiny synthetic cohort.

Every (model, format) pipeline runs once per module (memoised) and the tests read what it
left on disk; the cohort and the saved models are shared too.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from counterwarp.cli import main
from counterwarp.data.manifest import image_id
from counterwarp.data.preprocess import load_model_input

# Recent torch deprecates TorchScript; saving and loading it is what is tested here.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.(script|load)` is deprecated:DeprecationWarning")

FACTORY_MODULE = "cw_test_monai_factories"
# Seeded inside fork_rng: the same weights every call, and the caller's RNG left alone.
FACTORY_SOURCE = '''"""MONAI models for counterwarp's tests, built with fixed weights."""
import torch
from monai.networks.nets import DenseNet121, resnet10


def densenet121():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)


def resnet10_3d():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return resnet10(spatial_dims=3, n_input_channels=1, num_classes=1)
'''
#: architecture -> (factory function, contract input_shape)
ARCHITECTURES = {"densenet121": ("densenet121", [32, 32, 32]),
                 "resnet10": ("resnet10_3d", [16, 16, 16])}
VARIANTS = [(arch, fmt) for arch in ARCHITECTURES for fmt in ("torchscript", "factory")]
VARIANT_IDS = [f"{arch}-{fmt}" for arch, fmt in VARIANTS]
MODEL_FILES = {"torchscript": "classifier_model.ts", "factory": "classifier_weights.pt"}
STEPS = ("fit", "explain", "saliency", "benchmark", "report")


@dataclass
class Brought:
    """One architecture saved both ways, with the original (eager) model."""

    model: torch.nn.Module
    torchscript: Path
    weights: Path
    factory: str
    contract: Path
    shape: tuple[int, ...]

    def args(self, fmt: str) -> list[str]:
        """``--classifier ... --contract ...`` for format ``fmt``."""
        if fmt == "torchscript":
            return ["--classifier", str(self.torchscript), "--contract", str(self.contract)]
        return ["--classifier", self.factory, "--weights", str(self.weights),
                "--contract", str(self.contract)]

    def file(self, fmt: str) -> Path:
        return self.torchscript if fmt == "torchscript" else self.weights


@dataclass
class Pipeline:
    """What one variant's commands returned and where they wrote."""

    run: Path
    codes: dict[str, int] = field(default_factory=dict)

    def require(self, *steps: str) -> None:
        for step in steps:
            assert self.codes.get(step) == 0, f"`{step}` did not succeed: {self.codes}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("monai_cohort") / "cohort"
    assert main(["synth", "--out", str(folder), "--n", "12", "--shape", "16", "16", "16",
                 "--seed", "0"]) == 0
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("monai", reason="MONAI is not installed (pip install monai)")
    root = tmp_path_factory.mktemp("monai_models")
    (root / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))  # the factory must import in every command
        factories = importlib.import_module(FACTORY_MODULE)
        brought = {}
        for arch, (function, shape) in ARCHITECTURES.items():
            model = getattr(factories, function)().eval()
            script = root / f"{arch}.ts"
            torch.jit.script(model).save(str(script))
            weights = root / f"{arch}_weights.pt"
            torch.save(model.state_dict(), weights)
            contract = root / f"{arch}_contract.json"
            contract.write_text(json.dumps({"input_shape": shape, "intensity": "zscore-brain",
                                            "output": "logit", "positive_label": "1"}))
            brought[arch] = Brought(model, script, weights, f"{FACTORY_MODULE}:{function}",
                                    contract, tuple(shape))
        yield brought
    sys.modules.pop(FACTORY_MODULE, None)


@pytest.fixture(scope="module")
def pipeline(cohort, models, tmp_path_factory) -> Callable[[str, str], Pipeline]:
    """``pipeline(arch, fmt)``: that variant's fit -> ... -> report, run once."""
    done: dict[tuple[str, str], Pipeline] = {}
    manifest = str(cohort / "manifest.csv")

    def get(arch: str, fmt: str) -> Pipeline:
        if (arch, fmt) in done:
            return done[arch, fmt]
        run = tmp_path_factory.mktemp(f"{arch}_{fmt}") / "run"
        brought, result = models[arch], Pipeline(run)
        methods = "gradient,gradcam" if fmt == "factory" else "gradient"
        commands = {
            "fit": ["fit", "--manifest", manifest, "--run", str(run), *brought.args(fmt),
                    "--steps", "2", "--batch-size", "2"],
            "explain": ["explain", "--run", str(run), "--manifest", manifest,
                        "--out", str(run / "explain")],
            "saliency": ["saliency", "--run", str(run), "--manifest", manifest,
                         "--method", methods, "--out", str(run / "saliency")],
            # the same classifier given again is accepted
            "benchmark": ["benchmark", "--data", str(cohort), "--run", str(run),
                          "--out", str(run / "benchmark"), "--methods", "gradient",
                          *brought.args(fmt)],
            "report": ["report", "--run", str(run)],
        }
        for step, command in commands.items():
            result.codes[step] = main(command)
            if result.codes[step] != 0:
                break
        done[arch, fmt] = result
        return result

    return get


def _test_paths(run: Path) -> list[Path]:
    split = json.loads((run / "split.json").read_text())
    return [(run / item["path"]).resolve() for item in split["test"]]  # stored relative


@pytest.mark.parametrize(("arch", "fmt"), VARIANTS, ids=VARIANT_IDS)
def test_every_command_succeeds(pipeline, arch, fmt):
    result = pipeline(arch, fmt)
    assert result.codes == dict.fromkeys(STEPS, 0)


@pytest.mark.parametrize(("arch", "fmt"), VARIANTS, ids=VARIANT_IDS)
def test_fit_records_the_classifier(pipeline, models, arch, fmt):
    result, brought = pipeline(arch, fmt), models[arch]
    result.require("fit")
    record = json.loads((result.run / "classifier.json").read_text())
    assert record["kind"] == fmt
    assert record["file"] == MODEL_FILES[fmt]
    copy = result.run / MODEL_FILES[fmt]
    assert record["file_sha256"] == _sha256(copy) == _sha256(brought.file(fmt))
    assert record["factory"] == (brought.factory if fmt == "factory" else None)
    assert record["contract"]["input_shape"] == list(brought.shape)
    assert (result.run / "split.json").is_file() and (result.run / "simulator.pt").is_file()
    other = set(MODEL_FILES.values()) - {MODEL_FILES[fmt]}
    assert not any((result.run / name).exists() for name in other)


@pytest.mark.parametrize(("arch", "fmt"), VARIANTS, ids=VARIANT_IDS)
def test_explain_logits_are_the_models_own(pipeline, models, arch, fmt):
    result, brought = pipeline(arch, fmt), models[arch]
    result.require("fit", "explain")
    rows = _rows(result.run / "explain" / "summary.csv")
    paths = _test_paths(result.run)
    assert sorted((Path(r["path"]), r["direction"]) for r in rows) == sorted(
        (p, d) for p in paths for d in ("inject", "remove"))
    for row in rows:
        assert math.isfinite(float(row["logit_before"]))
        assert math.isfinite(float(row["logit_after"]))
    with torch.no_grad():
        for path in paths:
            image, _ = load_model_input(path, brought.shape)
            expected = float(brought.model(image[None]).reshape(()))
            for row in rows:
                if Path(row["path"]) == path:
                    assert float(row["logit_before"]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("arch", "fmt"), VARIANTS, ids=VARIANT_IDS)
def test_saliency_maps_lie_on_the_input_grid(pipeline, arch, fmt):
    result = pipeline(arch, fmt)
    result.require("fit", "saliency")
    methods = ["gradient", "gradcam"] if fmt == "factory" else ["gradient"]
    index = _rows(result.run / "saliency" / "saliency_index.csv")
    paths = _test_paths(result.run)
    assert sorted((r["id"], r["method"]) for r in index) == sorted(
        (image_id(p), m) for p in paths for m in methods)
    for row in index:
        source = nib.load(row["path"])
        saliency = nib.load(result.run / "saliency" / row["file"])
        assert saliency.shape == source.shape == (16, 16, 16)
        np.testing.assert_allclose(saliency.affine, source.affine, atol=1e-5)
        values = np.asarray(saliency.dataobj)
        assert np.isfinite(values).all()
        if row["method"] == "gradient":
            assert np.abs(values).max() > 0


@pytest.mark.parametrize(("arch", "fmt"), VARIANTS, ids=VARIANT_IDS)
def test_benchmark_scores_the_simulator(pipeline, arch, fmt):
    result = pipeline(arch, fmt)
    result.require("fit", "benchmark")
    scores = json.loads((result.run / "benchmark" / "results.json").read_text())
    assert {"simulator_inject", "simulator_remove", "gradient"} <= set(scores["methods"])
    for name in ("simulator_inject", "simulator_remove"):
        assert math.isfinite(scores["methods"][name]["group"]["pearson"])
    assert scores["simulator"]["n"] == len(_test_paths(result.run))


@pytest.mark.parametrize(("arch", "fmt"), VARIANTS, ids=VARIANT_IDS)
def test_report_shows_the_simulator(pipeline, arch, fmt):
    result = pipeline(arch, fmt)
    result.require("fit", "report")
    text = (result.run / "report.html").read_text(encoding="utf-8")
    assert "Simulator" in text and "simulator training curves" in text
    assert "simulator_inject" in text  # the benchmark table, found in RUN/benchmark


@pytest.mark.parametrize(("arch", "fmt"), VARIANTS, ids=VARIANT_IDS)
def test_explain_refuses_another_classifier(pipeline, models, cohort, arch, fmt, capsys,
                                            tmp_path):
    result = pipeline(arch, fmt)
    result.require("fit")
    other = models[next(a for a in ARCHITECTURES if a != arch)]
    capsys.readouterr()
    out = tmp_path / "explain"
    code = main(["explain", "--run", str(result.run), "--manifest",
                 str(cohort / "manifest.csv"), "--out", str(out), *other.args(fmt)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "is not the classifier" in error
    assert not out.exists()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_gradcam_is_refused_for_torchscript(pipeline, cohort, arch, capsys, tmp_path):
    result = pipeline(arch, "torchscript")
    result.require("fit")
    capsys.readouterr()
    out = tmp_path / "saliency"
    code = main(["saliency", "--run", str(result.run), "--manifest",
                 str(cohort / "manifest.csv"), "--method", "gradcam", "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "TorchScript" in error and "gradcam" in error
    assert not out.exists()
