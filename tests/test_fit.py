"""The simulator's training loop and public API, on tiny 2D images."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from counterwarp.errors import CounterwarpError
from counterwarp.explain.simulator import Simulator
from counterwarp.train.checkpoint import CHECKPOINT_NAME, LOG_NAME
from counterwarp.train.config import FitConfig
from counterwarp.train.simulator import FitResult, fit_simulator
from counterwarp.train.staging import FIT_STAGING

SHAPE = (32, 32)


class BlobScorer(nn.Module):
    """A classifier the package did not define: the logit is the weighted mean intensity
    inside a central disc, so growing / shrinking that region moves it. Returns (B, 1)."""

    def __init__(self) -> None:
        super().__init__()
        yy, xx = torch.meshgrid(torch.arange(SHAPE[0]), torch.arange(SHAPE[1]), indexing="ij")
        disc = ((yy - 16.0) ** 2 + (xx - 16.0) ** 2 < 36).float()
        self.register_buffer("weights", disc / disc.sum())
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.scale * (images[:, 0] * self.weights).sum((1, 2)) - 4.3)[:, None]


def blob_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 32, 32) bright discs of random radius on a dark square (background 0)."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SHAPE[0]), torch.arange(SHAPE[1]), indexing="ij")
    images = []
    for _ in range(n):
        radius = 2.0 + 3.0 * torch.rand((), generator=generator)
        disc = ((yy - 16.0) ** 2 + (xx - 16.0) ** 2 < radius**2).float()
        square = ((yy - 16).abs() < 12) & ((xx - 16).abs() < 12)
        noise = 0.05 * torch.randn(SHAPE, generator=generator)
        images.append(torch.where(square, 0.2 + disc + noise, torch.zeros(SHAPE)))
    return torch.stack(images)[:, None]


TINY = {"steps": 6, "batch_size": 4, "checkpoint_every": 3, "channels": (4, 8, 8),
        "latent_dim": 16, "lr": 1e-3}


class Killed(Exception):
    """Stands for a kill of the process in the middle of a fit."""


def assert_resume_is_exact(make_classifier, images, config, run_dir, kill_at: int) -> FitResult:
    """Fit whole in ``run_dir/a``; fit in ``run_dir/b`` killed after step ``kill_at``, then
    resumed; assert both end at bit-identical weights. Returns the whole fit."""
    whole = fit_simulator(make_classifier(), images, config, run_dir=run_dir / "a",
                          progress=False)

    def kill(step: int, values: dict) -> None:
        if step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        fit_simulator(make_classifier(), images, config, run_dir=run_dir / "b", progress=False,
                      on_step=kill)
    assert (run_dir / "b" / FIT_STAGING / CHECKPOINT_NAME).exists()  # staged until the end
    resumed = fit_simulator(make_classifier(), images, config, run_dir=run_dir / "b",
                            resume=True, progress=False)
    for (name, a), (_, b) in zip(whole.net.state_dict().items(),
                                 resumed.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    return whole


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path):
    assert_resume_is_exact(BlobScorer, blob_images(12), FitConfig(**TINY), tmp_path, kill_at=4)
    with open(tmp_path / "b" / LOG_NAME, newline="") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == list(range(1, 7))


def test_resume_refuses_other_settings(tmp_path):
    images = blob_images(8)
    fit_simulator(BlobScorer(), images, FitConfig(**TINY), run_dir=tmp_path, progress=False)
    other = FitConfig(**{**TINY, "steps": 9, "w_smooth": 3.0})
    with pytest.raises(CounterwarpError, match="other settings"):
        fit_simulator(BlobScorer(), images, other, run_dir=tmp_path, resume=True,
                      progress=False)


def test_simulator_api_explains_a_foreign_classifier(tmp_path):
    images = blob_images(16, seed=1)
    classifier = BlobScorer()
    simulator = Simulator(**{**TINY, "steps": 80, "lr": 3e-3}).fit(
        classifier, images, progress=False
    )
    inject = simulator.explain(images[:6], "inject")
    remove = simulator.explain(images[:6], "remove")
    assert inject.simulated.shape == (6, 1, *SHAPE)
    assert inject.displacement.shape == (6, 2, *SHAPE)
    assert inject.log_volume_change.shape == (6, *SHAPE)
    # inject raises the logit, remove lowers it, for every image
    assert (inject.logit_after > inject.logit_before).all()
    assert (remove.logit_after < remove.logit_before).all()
    # to raise the disc score the simulator grows the disc (positive volume change inside),
    # to lower it, it shrinks the disc
    assert inject.log_volume_change[:, 12:20, 12:20].mean() > 0
    assert remove.log_volume_change[:, 12:20, 12:20].mean() < 0
    # the classifier is frozen: its parameter did not move
    assert classifier.scale.item() == 8.0 and not classifier.scale.requires_grad
    path = simulator.save(tmp_path / "simulator.pt")
    again = Simulator.load(path, BlobScorer())
    assert torch.allclose(again.explain(images[:2], "inject").simulated,
                          simulator.explain(images[:2], "inject").simulated, atol=1e-6)


def test_classifier_with_wrong_output_shape_is_refused():
    class TwoLogits(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.flatten(1)[:, :2]

    with pytest.raises(CounterwarpError, match=r"one logit per image"):
        Simulator(**TINY).fit(TwoLogits(), blob_images(4), progress=False)


def test_bad_settings_are_refused():
    with pytest.raises(CounterwarpError, match="field"):
        Simulator(field="spline")
    with pytest.raises(CounterwarpError, match="steps"):
        Simulator(steps=0)
    with pytest.raises(CounterwarpError, match="unknown simulator settings"):
        Simulator(stepz=3)


def test_fold_and_antisymmetric_settings_are_validated_and_wired():
    with pytest.raises(CounterwarpError, match="w_fold"):
        Simulator(w_fold=-1.0)
    with pytest.raises(CounterwarpError, match="antisymmetric"):
        Simulator(antisymmetric=1)
    from counterwarp.losses import folding_penalty
    from counterwarp.train.steps import LossTerms as _LossTerms

    mirror = torch.zeros(1, 2, *SHAPE)
    mirror[:, 0] = -2.0 * torch.arange(SHAPE[0], dtype=torch.float32)[:, None]  # det -1
    def penalty(w_fold: float) -> torch.Tensor:
        terms = _LossTerms(None, None, FitConfig(w_fold=w_fold), 1.0)  # type: ignore[arg-type]
        return terms.regulariser(mirror)["regulariser"]

    plain, folded = penalty(0.0), penalty(3.0)
    torch.testing.assert_close(folded - plain, 3.0 * folding_penalty(mirror))
    assert float(folding_penalty(mirror)) > 1.0
    sim = Simulator(antisymmetric=True, **TINY).fit(BlobScorer(), blob_images(8), progress=False)
    assert sim.net_ is not None and sim.net_.config["antisymmetric"] is True
    x = blob_images(2, seed=5)
    inject = sim.net_(x, torch.ones(2))
    torch.testing.assert_close(sim.net_(x, -torch.ones(2)), -inject)


def test_fit_command_line_passes_the_new_settings():
    from counterwarp.cli import _fit_settings, build_parser

    base = ["fit", "--manifest", "m.csv", "--run", "r"]
    parser = build_parser()
    assert "antisymmetric" not in _fit_settings(parser.parse_args(base))
    settings = _fit_settings(parser.parse_args([*base, "--no-antisymmetric", "--w-fold", "2"]))
    assert settings["antisymmetric"] is False and settings["w_fold"] == 2.0
    assert _fit_settings(parser.parse_args([*base, "--antisymmetric"]))["antisymmetric"] is True


def test_cosine_learning_rate_decays_and_is_logged():
    from counterwarp.train.simulator import learning_rate

    constant = FitConfig(steps=10, lr=2e-3)
    assert [learning_rate(constant, s) for s in (0, 5, 9)] == [2e-3] * 3
    cosine = FitConfig(steps=10, lr=2e-3, lr_schedule="cosine")
    rates = [learning_rate(cosine, s) for s in range(10)]
    assert rates[0] == pytest.approx(2e-3) and rates[5] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates[:-1], rates[1:], strict=True)) and rates[-1] > 0
    with pytest.raises(CounterwarpError, match="lr_schedule"):
        Simulator(lr_schedule="step")
    sim = Simulator(lr_schedule="cosine", **TINY).fit(BlobScorer(), blob_images(8), progress=False)
    logged = [row["lr"] for row in sim.history_]
    assert logged == pytest.approx([learning_rate(sim.config, s) for s in range(TINY["steps"])])


def test_bf16_precision_runs_the_networks_in_bf16_and_keeps_fields_float32():
    from counterwarp.cli import _fit_settings, build_parser
    from counterwarp.nn.classifier import Classifier
    from counterwarp.train.steps import LossTerms as _LossTerms

    with pytest.raises(CounterwarpError, match="precision"):
        Simulator(precision="fp16")
    args = build_parser().parse_args(
        ["fit", "--manifest", "m.csv", "--run", "r", "--precision", "bf16", "--field-sigma", "2"]
    )
    assert _fit_settings(args)["precision"] == "bf16" and _fit_settings(args)["field_sigma"] == 2

    torch.manual_seed(0)
    sim = Simulator(**TINY).fit(BlobScorer(), blob_images(8), progress=False)  # non-zero head
    net = sim.net_
    assert net is not None
    net.train()
    classifier = Classifier(SHAPE, channels=(4, 8), dropout=0.0).eval()
    images, condition = blob_images(4, seed=3), torch.tensor([1.0, -1.0, 1.0, -1.0])
    seen: list[torch.dtype] = []
    hook = net.head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)  # same routing-dropout masks
        terms = _LossTerms(net, classifier, FitConfig(precision=precision), margin=1.0)
        with torch.no_grad():
            logit_before = classifier(images)
        results[precision] = terms.forward_terms(images, condition, logit_before)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]  # the convolutions ran in bf16
    for name in ("simulated", "shift", "smooth", "magnitude"):
        assert results["bf16"][name].dtype == torch.float32, name
    # same result to bf16 rounding, and not bit-identical (bf16 really was used)
    fp32, bf16 = results["fp32"]["simulated"], results["bf16"]["simulated"]
    assert not torch.equal(fp32, bf16)
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)
    torch.testing.assert_close(results["bf16"]["shift"], results["fp32"]["shift"],
                               atol=0.05, rtol=0.05)


def test_bf16_fit_trains_float32_weights_and_moves_the_logits():
    torch.manual_seed(0)
    settings = {**TINY, "steps": 30, "checkpoint_every": 30, "lr": 3e-3}
    images = blob_images(16)
    sim = Simulator(precision="bf16", **settings).fit(BlobScorer(), images, progress=False)
    assert sim.net_ is not None
    assert all(p.dtype == torch.float32 for p in sim.net_.parameters())
    shifts = [row["shift"] for row in sim.history_]
    assert all(torch.isfinite(torch.tensor(shifts)))
    assert sum(shifts[-5:]) / 5 < sum(shifts[:5]) / 5  # it learns under bf16 too


def _conv_weight(module: nn.Module) -> torch.Tensor:
    """The weight of the first Conv3d with several input channels (one channel is both
    layouts at once)."""
    return next(m.weight for m in module.modules()
                if isinstance(m, nn.Conv3d) and m.in_channels > 1)


def test_bf16_3d_fit_trains_channels_last_and_resumes_exactly(tmp_path):
    from counterwarp.nn.classifier import Classifier

    def classifier() -> nn.Module:
        torch.manual_seed(3)
        return Classifier((16, 16, 16), channels=(4, 8), dropout=0.0)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 1, 16, 16, 16, generator=generator)
    config = FitConfig(**{**TINY, "steps": 4, "checkpoint_every": 2, "channels": (4, 8, 8, 8)},
                       precision="bf16")
    assert_resume_is_exact(classifier, images, config, tmp_path, kill_at=3)
    reader = classifier()
    fit_simulator(reader, images, config, progress=False)
    # the 3D convolutions of a bf16 fit run in channels-last memory (measured faster)
    weight = _conv_weight(reader)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not weight.is_contiguous()
    reader = classifier()
    fit_simulator(reader, images, FitConfig.from_dict({**config.to_dict(), "precision": "fp32"}),
                  progress=False)
    assert _conv_weight(reader).is_contiguous()  # float32 keeps the default layout


@pytest.mark.parametrize("antisymmetric", [True, False])
@pytest.mark.parametrize("field", ["displacement", "velocity"])
def test_explaining_both_directions_at_once_matches_each_on_its_own(antisymmetric, field):
    from counterwarp.nn.classifier import classifier_logits
    from counterwarp.nn.simulator import SimulatorNet, simulate

    torch.manual_seed(0)
    net = SimulatorNet(SHAPE, field=field, channels=(4, 8, 8), latent_dim=16,
                       antisymmetric=antisymmetric).eval()
    torch.nn.init.normal_(net.head.weight, std=0.05)  # a field that is not zero
    simulator = Simulator()
    simulator.net_, simulator.classifier_, simulator.margin_ = net, BlobScorer(), 0.1
    images = blob_images(3, seed=2)
    both = simulator.explain_directions(images, ("inject", "remove"))
    for direction, c in (("inject", 1.0), ("remove", -1.0)):
        with torch.no_grad():
            simulated, displacement, _, _ = simulate(net, images, torch.full((3,), c))
            logit = classifier_logits(simulator.classifier_, simulated)
        got = both[direction]
        torch.testing.assert_close(got.simulated, simulated, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.displacement, displacement, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.logit_after, logit.reshape(-1), atol=1e-5, rtol=1e-5)
        assert displacement.abs().max() > 1e-3
    torch.testing.assert_close(both["inject"].logit_before, both["remove"].logit_before)
