"""Tests of counterwarp.explain.saliency on tiny CNNs and an exactly solvable linear model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from counterwarp.errors import CounterwarpError
from counterwarp.explain.saliency import SALIENCY_METHODS, saliency_map
from counterwarp.nn.classifier import last_conv_layer as find_last_conv
from counterwarp.report.figures import saliency_panel

FAST = {"ig_steps": 8, "smoothgrad_samples": 4}


class TinyCNN(nn.Module):
    """Conv -> BN -> ReLU -> MaxPool, twice, then a linear head: (B, 1, *S) -> (B, 1)."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        norm = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        pool = nn.MaxPool3d if dims == 3 else nn.MaxPool2d
        self.features = nn.Sequential(
            conv(1, 4, 3, padding=1),
            norm(4),
            nn.ReLU(inplace=True),
            pool(2),
            conv(4, 8, 3, padding=1),
            norm(8),
            nn.ReLU(),
            pool(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Linear(nn.Module):
    """Conv-free model: logit = sum(w * x) per image, returned as (B,)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, *shape, generator=torch.Generator().manual_seed(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).flatten(1).sum(1)


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def _model_and_images(dims: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    shape = (16, 16, 16) if dims == 3 else (32, 32)
    model = TinyCNN(dims)
    images = torch.rand(2, 1, *shape)
    model(images)  # materialise the lazy head
    # give BatchNorm non-trivial running statistics, then leave the model in train mode
    model.features[1].running_mean.uniform_(-0.1, 0.1)
    model.train()
    return model, images


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", SALIENCY_METHODS)
def test_shape_finite_and_model_untouched(dims: int, method: str) -> None:
    model, images = _model_and_images(dims)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no leaked Captum warnings
        out = saliency_map(model, images, method, **FAST)
    assert out.shape == (images.shape[0], *images.shape[2:])
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not out.requires_grad
    assert model.training  # training flag restored
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert _hook_count(model) == 0
    if method == "gradcam":
        assert (out >= 0).all()


@pytest.mark.parametrize("dims", [2, 3])
def test_linear_model_exact(dims: int) -> None:
    shape = (16, 16, 16) if dims == 3 else (32, 32)
    model = Linear(shape)
    images = torch.rand(3, 1, *shape, generator=torch.Generator().manual_seed(1))
    w = model.w.detach()
    expected = (w * images)[:, 0]

    grad = saliency_map(model, images, "gradient")
    torch.testing.assert_close(grad, w.expand(3, *shape), rtol=0, atol=0)
    torch.testing.assert_close(saliency_map(model, images, "gradient_x_input"), expected)

    ig = saliency_map(model, images, "integrated_gradients", ig_steps=16)
    torch.testing.assert_close(ig, expected, rtol=1e-5, atol=1e-6)
    logit = model(images).detach()
    torch.testing.assert_close(ig.flatten(1).sum(1), logit - 0.0, rtol=1e-4, atol=1e-4)

    occ = saliency_map(model, images, "occlusion", occlusion_patch=1, perturbations_per_eval=64)
    torch.testing.assert_close(occ, expected, rtol=1e-4, atol=1e-5)

    # no ReLU modules: guided backprop degenerates to the gradient (and says so)
    with pytest.warns(UserWarning, match="no nn.ReLU"):
        guided = saliency_map(model, images, "guided_backprop")
    torch.testing.assert_close(guided, grad)

    # SmoothGrad of a linear model: gradient is constant, so noise changes nothing
    torch.testing.assert_close(saliency_map(model, images, "smoothgrad", **FAST), grad)

    # no conv layer: Grad-CAM needs target_layer
    with pytest.raises(CounterwarpError, match="target_layer"):
        saliency_map(model, images, "gradcam")


def test_integrated_gradients_completeness_cnn() -> None:
    model, images = _model_and_images(2)
    model.eval()
    ig = saliency_map(model, images, "integrated_gradients", ig_steps=64)
    with torch.no_grad():
        delta = model(images)[:, 0] - model(torch.zeros_like(images))[:, 0]
    torch.testing.assert_close(ig.flatten(1).sum(1), delta, rtol=0.05, atol=0.02)


def test_occlusion_covers_every_voxel_with_odd_size() -> None:
    shape = (15, 13)
    model = Linear(shape)
    images = torch.rand(1, 1, *shape) + 0.5
    occ = saliency_map(model, images, "occlusion", occlusion_patch=4)
    assert occ.shape == (1, *shape)
    assert torch.isfinite(occ).all()
    assert (occ != 0).all()


def test_guided_backprop_leaves_no_trace() -> None:
    model, images = _model_and_images(3)
    first = saliency_map(model, images, "gradient")
    guided = saliency_map(model, images, "guided_backprop")
    again = saliency_map(model, images, "gradient")
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(guided, first)
    assert _hook_count(model) == 0


def test_gradcam_target_layer_and_default() -> None:
    model, images = _model_and_images(2)
    last = find_last_conv(model)
    assert last is model.features[4]
    default = saliency_map(model, images, "gradcam")
    explicit = saliency_map(model, images, "gradcam", target_layer=last)
    torch.testing.assert_close(default, explicit)
    first = saliency_map(model, images, "gradcam", target_layer=model.features[0])
    assert first.shape == default.shape and (first >= 0).all()


def test_works_under_no_grad_and_with_frozen_parameters() -> None:
    model, images = _model_and_images(2)
    reference = saliency_map(model, images, "gradient")
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        out = saliency_map(model, images, "gradient")
    torch.testing.assert_close(out, reference)


def test_user_errors() -> None:
    model, images = _model_and_images(2)
    with pytest.raises(CounterwarpError) as info:
        saliency_map(model, images, "lime")
    for name in SALIENCY_METHODS:
        assert name in str(info.value)
    with pytest.raises(CounterwarpError, match="shape"):
        saliency_map(model, images[:, 0], "gradient")
    with pytest.raises(CounterwarpError, match="occlusion_patch"):
        saliency_map(model, images, "occlusion", occlusion_patch=64)

    class TwoLogits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :2]

    with pytest.raises(CounterwarpError, match="one logit per image"):
        saliency_map(TwoLogits(), images, "gradient")


@pytest.mark.parametrize("dims", [2, 3])
def test_saliency_panel_writes_png(tmp_path, dims: int) -> None:
    model, images = _model_and_images(dims)
    maps = {
        name: saliency_map(model, images[:1], name, **FAST)[0].numpy()
        for name in ("gradient", "gradcam")
    }
    maps["zeros"] = np.zeros(images.shape[2:])
    path = tmp_path / "panel" / f"saliency_{dims}d.png"
    written = saliency_panel(images[0, 0].numpy(), maps, path, title="test")
    assert written == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    with pytest.raises(CounterwarpError, match="shape"):
        saliency_panel(images[0, 0].numpy(), {"bad": np.zeros((3, 3))}, path)
