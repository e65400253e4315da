"""SimulatorNet (conditional U-Net), warping and velocity integration conventions."""

from __future__ import annotations

import json

import pytest
import torch

from counterwarp.errors import CounterwarpError
from counterwarp.geometry.warp import integrate_velocity, warp
from counterwarp.nn.blocks import num_levels
from counterwarp.nn.simulator import SimulatorNet

SMALL = {"channels": (4, 8, 8, 4), "latent_dim": 16}


def _blob(shape: tuple[int, ...], width: float = 0.25) -> torch.Tensor:
    """A smooth Gaussian blob ``(1, 1, *shape)`` centred in the image."""
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = sum(a**2 for a in axes)
    return torch.exp(-r2 / (2 * width**2))[None, None]


def _smooth_field(shape: tuple[int, ...], amplitude: float, seed: int = 0) -> torch.Tensor:
    """A smooth random ``(1, d, *shape)`` field, max |component| about ``amplitude`` voxels."""
    g = torch.Generator().manual_seed(seed)
    d = len(shape)
    coarse = torch.randn(1, d, *(4,) * d, generator=g)
    mode = "bilinear" if d == 2 else "trilinear"
    field = torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)
    return amplitude * field / field.abs().max()


# ---------------------------------------------------------------- warp conventions


@pytest.mark.parametrize("shape", [(12, 10), (10, 12, 9)])
def test_zero_displacement_is_identity(shape: tuple[int, ...]) -> None:
    image = torch.randn(2, 3, *shape)
    out = warp(image, torch.zeros(2, len(shape), *shape))
    torch.testing.assert_close(out, image, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(12, 10), (10, 12, 9)])
def test_integer_translation_moves_along_the_matching_axis(shape: tuple[int, ...]) -> None:
    d = len(shape)
    image = torch.randn(1, 1, *shape)
    for axis in range(d):
        u = torch.zeros(1, d, *shape)
        u[:, axis] = 2.0  # pull from two voxels further along `axis`
        out = warp(image, u)
        n = shape[axis]
        moved = out.narrow(2 + axis, 0, n - 2)
        source = image.narrow(2 + axis, 2, n - 2)
        torch.testing.assert_close(moved, source, atol=1e-5, rtol=1e-5)
        # zero padding: the last two slices read from outside the field of view
        assert torch.count_nonzero(out.narrow(2 + axis, n - 2, 2)) == 0


def test_warp_follows_the_displacement_device_and_dtype() -> None:
    image = torch.randn(1, 1, 6, 7)
    u = torch.zeros(1, 2, 6, 7)
    warp(image, u)
    out = warp(image.double(), u.double())  # cached reference grid must not go stale
    assert out.dtype == torch.float64
    with pytest.raises(CounterwarpError):
        warp(image, u, padding_mode="wrap")
    with pytest.raises(ValueError, match="displacement"):
        warp(image, torch.zeros(1, 3, 6, 7))


@pytest.mark.parametrize("shape", [(16, 14), (12, 14, 10)])
def test_constant_velocity_integrates_to_the_same_translation(shape: tuple[int, ...]) -> None:
    d = len(shape)
    for axis in range(d):
        v = torch.zeros(1, d, *shape)
        v[:, axis] = 1.5
        u = integrate_velocity(v, 7)
        inner = (0, slice(None)) + tuple(slice(3, s - 3) for s in shape)
        expected = torch.zeros(d)
        expected[axis] = 1.5
        torch.testing.assert_close(
            u[inner].mean(dim=tuple(range(1, d + 1))), expected, atol=1e-3, rtol=0
        )


@pytest.mark.parametrize("shape", [(32, 28), (20, 24, 18)])
def test_velocity_exponential_and_its_inverse_compose_to_identity(shape: tuple[int, ...]) -> None:
    v = _smooth_field(shape, amplitude=2.0)
    u, u_inv = integrate_velocity(v, 7), integrate_velocity(-v, 7)
    assert u.abs().max() > 1.0
    # displacement of exp(v) o exp(-v): p -> p + u_inv(p) + u(p + u_inv(p))
    inner = (slice(None), slice(None)) + tuple(slice(4, s - 4) for s in shape)
    error = (u_inv + warp(u, u_inv))[inner].abs().max()
    naive_error = (-u + warp(u, -u))[inner].abs().max()  # -u is not the inverse of u
    assert error < 0.15 and error < naive_error / 2
    # the same through images: warp forward with exp(v), then back with exp(-v)
    image = _blob(shape, width=0.4)
    back = warp(warp(image, u), u_inv)
    assert (back - image)[inner].abs().max() < 0.04
    assert (warp(image, u) - image)[inner].abs().max() > 0.1


# ---------------------------------------------------------------- network


def test_num_levels_is_sized_from_the_shape() -> None:
    assert num_levels((32, 32, 32), 4) == 4
    assert num_levels((64, 64, 64), 4) == 4
    assert num_levels((16, 16, 16), 4) == 3
    assert num_levels((32, 32), 4) == 4
    assert num_levels((48, 56, 48), 4) == 3
    assert num_levels((15, 16), 4) == 0


@pytest.mark.parametrize("field", ["displacement", "velocity"])
@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_output_shapes_and_zero_field_at_init(field: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = SimulatorNet(shape, field=field, **SMALL)
    x = torch.randn(3, 1, *shape)
    raw = net(x, torch.tensor([1.0, -1.0, 1.0]))
    assert raw.shape == (3, len(shape), *shape)
    assert torch.count_nonzero(raw) == 0
    u, u_inv = net.displacements(raw)
    assert u.shape == raw.shape and torch.count_nonzero(u) == 0
    if field == "displacement":
        assert u_inv is None
    else:
        assert u_inv is not None and torch.count_nonzero(u_inv) == 0
    torch.testing.assert_close(warp(x, u), x, atol=1e-5, rtol=1e-5)


def test_default_channels_at_reference_size_build_the_reference_bottleneck() -> None:
    net = SimulatorNet((64, 64, 64))
    assert net.levels == 4
    assert net.bottleneck.encode.in_features == 1024  # 16 channels x 4^3, the paper's bottleneck
    assert net.bottleneck.encode.out_features == 512


def _one_step(net: SimulatorNet, x: torch.Tensor, c: torch.Tensor) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    target = _smooth_field(net.input_shape, 1.0).expand(x.shape[0], -1, *net.input_shape)
    loss = (net(x, c) - c.view(-1, *[1] * (x.ndim - 1)) * target).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("routing", ["features+condition", "condition"])
def test_conditions_give_different_fields_after_one_step(routing: str) -> None:
    torch.manual_seed(0)
    net = SimulatorNet((16, 16, 16), routing=routing, **SMALL)
    x = torch.randn(1, 1, 16, 16, 16).expand(2, -1, -1, -1, -1)
    c = torch.tensor([1.0, -1.0])
    _one_step(net, x, c)
    net.eval()
    with torch.no_grad():
        field = net(x, c)
    assert field.abs().max() > 0
    assert not torch.allclose(field[0], field[1], atol=1e-6)


def test_gradients_reach_the_first_layer() -> None:
    torch.manual_seed(0)
    net = SimulatorNet((32, 32), **SMALL)
    x = torch.randn(2, 1, 32, 32)
    c = torch.tensor([1.0, -1.0])
    # the zero-initialised head blocks gradients to earlier layers at step 0 only
    _one_step(net, x, c)
    net.zero_grad()
    net(x, c).square().mean().backward()
    for name in ("inlet.weight", "inlet.route_fc.weight", "bottleneck.encode.weight"):
        grad = net.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_max_displacement_bounds_the_field() -> None:
    torch.manual_seed(0)
    net = SimulatorNet((16, 16), max_displacement=0.5, **SMALL)
    torch.nn.init.normal_(net.head.weight, std=5.0)
    out = net(torch.randn(2, 1, 16, 16), torch.tensor([1.0, -1.0]))
    assert out.abs().max() <= 0.5 and out.abs().max() > 0.1


def test_scalar_condition_and_input_validation() -> None:
    net = SimulatorNet((16, 16), **SMALL).eval()
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(net(x, 1.0), net(x, torch.ones(2)))
    with pytest.raises(CounterwarpError, match="shape"):
        net(torch.randn(2, 1, 16, 18), torch.ones(2))
    with pytest.raises(ValueError, match="condition"):
        net(x, torch.ones(3))


def test_config_round_trip() -> None:
    net = SimulatorNet(
        (16, 16, 16), field="velocity", max_displacement=3, integration_steps=5, **SMALL
    )
    cfg = json.loads(json.dumps(net.config))
    again = SimulatorNet.from_config(cfg)
    assert again.config == net.config
    again.load_state_dict(net.state_dict())
    minimal = SimulatorNet.from_config({"input_shape": [32, 32]})
    assert minimal.config["channels"] == [16, 32, 64, 16, 16] and minimal.dim == 2


@pytest.mark.parametrize(
    "cfg",
    [
        {"input_shape": [15, 15, 15]},
        {"input_shape": [16]},
        {"input_shape": [16, 16, 16, 16]},
        {"input_shape": [16, "16"]},
        {"input_shape": [16, 16], "field": "affine"},
        {"input_shape": [16, 16], "channels": [16]},
        {"input_shape": [16, 16], "channels": [16, 0]},
        {"input_shape": [16, 16], "latent_dim": 0},
        {"input_shape": [16, 16], "num_experts": 2.0},
        {"input_shape": [16, 16], "routing": "features"},
        {"input_shape": [16, 16], "integration_steps": True},
        {"input_shape": [16, 16], "max_displacement": -1.0},
        {"input_shape": [16, 16], "routing_dropout": 1.5},
        {"input_shape": [16, 16], "learning_rate": 1e-3},
        {"input_shape": [16, 16], "field_downsize": 3},
        {"input_shape": [16, 16, 16], "field_downsize": 8},  # 3 levels: at most 4
        {"input_shape": [16, 16], "field_downsize": 0},
        {"channels": [16, 32]},
        [16, 16],
    ],
)
def test_invalid_config_raises(cfg: object) -> None:
    with pytest.raises(CounterwarpError):
        SimulatorNet.from_config(cfg)  # type: ignore[arg-type]


# ---------------------------------------------------------------- coarse field


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_half_resolution_field_has_the_input_grid_and_no_full_size_decoder(
    shape: tuple[int, ...],
) -> None:
    torch.manual_seed(0)
    full = SimulatorNet(shape, **SMALL)
    half = SimulatorNet(shape, field_downsize=2, **SMALL)
    assert len(half.up) == len(full.up) - 1  # the full-size decoder level is gone
    assert half.head.in_channels == SMALL["channels"][1]
    x = torch.randn(2, 1, *shape)
    c = torch.tensor([1.0, -1.0])
    assert torch.count_nonzero(half(x, c)) == 0  # still starts at the identity
    _one_step(half, x, c)
    half.eval()
    with torch.no_grad():
        field = half(x, c)
    assert field.shape == (2, len(shape), *shape) and field.abs().max() > 0


def test_half_resolution_field_is_the_upsampled_coarse_head_in_fine_voxels() -> None:
    torch.manual_seed(0)
    net = SimulatorNet((16, 16), field_downsize=2, smoothing_sigma=0.0, **SMALL).eval()
    torch.nn.init.normal_(net.head.weight, std=0.1)
    x = torch.randn(1, 1, 16, 16)
    coarse = {}
    net.head.register_forward_hook(lambda m, i, out: coarse.setdefault("out", out))
    with torch.no_grad():
        field = net(x, 1.0)
    expected = torch.nn.functional.interpolate(
        2 * coarse["out"], size=(16, 16), mode="bilinear", align_corners=False
    )
    assert coarse["out"].shape[2:] == (8, 8)
    torch.testing.assert_close(field, expected)
    # a shift of one coarse voxel is two fine voxels: the field is in input-grid voxels
    assert field.abs().max() > 1.5 * coarse["out"].abs().max()


# ---------------------------------------------------------------- field kept in the brain


def _disc_image(shape: tuple[int, ...], radius: float) -> torch.Tensor:
    """(1, 1, *shape): a disc (ball) of ones in the middle, background exactly 0."""
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in shape],
                          indexing="ij")
    inside = sum(a**2 for a in axes) <= radius**2
    return inside.float()[None, None] * (1.0 + 0.1 * torch.randn(1, 1, *shape))


def test_soft_brain_mask_is_one_in_the_brain_and_zero_far_outside() -> None:
    from counterwarp.nn.simulator import soft_brain_mask

    image = _disc_image((24, 24), radius=5.0)
    mask = soft_brain_mask(image, 2.0)[0, 0]
    brain = image[0, 0] != 0
    assert torch.all(mask[brain] > 0.99)  # inside: untouched
    assert mask[0, 0] == 0 and mask[0].max() == 0  # far background: no field
    assert 0 < mask[12, 12 + 8] < 1  # fades between 2 and 4 voxels outside


def test_brain_margin_keeps_the_field_off_the_far_background_in_both_directions() -> None:
    torch.manual_seed(0)
    shape = (32, 32)
    net = SimulatorNet(shape, brain_margin=1.0, antisymmetric=True, **SMALL).eval()
    torch.nn.init.normal_(net.head.weight, std=0.1)
    image = _disc_image(shape, radius=7.0)
    with torch.no_grad():
        field = net(image.expand(2, -1, -1, -1), torch.tensor([1.0, -1.0]))
    assert field[:, :, :, :4].abs().max() == 0  # 9+ voxels from the brain: still
    assert field[:, :, 14:18, 14:18].abs().max() > 0  # the brain moves
    assert torch.allclose(field[1], -field[0])  # remove is still the negated inject
    free = SimulatorNet(shape, antisymmetric=True, **SMALL).eval()
    free.load_state_dict(net.state_dict())
    with torch.no_grad():
        unmasked = free(image, 1.0)
    assert unmasked[:, :, :, :4].abs().max() > 0  # without it the background moves


def test_fit_config_passes_the_brain_margin_to_the_network() -> None:
    from counterwarp.train.config import FitConfig
    from counterwarp.train.simulator import build_net

    net = build_net(FitConfig(field_brain_margin=2.0, channels=(4, 8, 8)), (16, 16))
    assert net.config["brain_margin"] == 2.0
    assert build_net(FitConfig(channels=(4, 8, 8)), (16, 16)).config["brain_margin"] is None
    with pytest.raises(CounterwarpError, match="field_brain_margin"):
        FitConfig(field_brain_margin=-1.0).validate()
