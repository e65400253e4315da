"""CondConv equals a per-sample loop that mixes the expert kernels one sample at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from counterwarp.errors import CounterwarpError
from counterwarp.nn.condconv import AUTO_EXPERTS_BELOW, CondConv

CONV = {2: F.conv2d, 3: F.conv3d}


def reference_condconv(layer: CondConv, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """Straightforward loop over the batch: route, mix the kernel, convolve (eval mode)."""
    outs = []
    for b in range(x.shape[0]):
        route_in = condition[b].reshape(1)
        if layer.routing == "features+condition":
            route_in = torch.cat([x[b].mean(dim=tuple(range(1, x.ndim - 1))), route_in])
        r = torch.sigmoid(layer.route_fc.weight @ route_in + layer.route_fc.bias)  # (E,)
        kernel = sum(r[e] * layer.weight[e] for e in range(layer.num_experts))
        bias = sum(r[e] * layer.bias[e] for e in range(layer.num_experts))
        pad = layer.kernel_size // 2
        outs.append(CONV[layer.dim](x[b : b + 1], kernel, bias, padding=pad))
    return torch.cat(outs)


def _inputs(dim: int, cin: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (3, cin) + (7,) * dim if dim == 3 else (3, cin, 9, 8)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    c = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    return x, c


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("routing", ["features+condition", "condition"])
@pytest.mark.parametrize("impl", ["grouped", "experts"])
def test_matches_per_sample_loop_forward_and_gradients(dim: int, routing: str, impl: str) -> None:
    torch.manual_seed(1)
    layer = CondConv(4, 5, dim=dim, routing=routing, impl=impl).double().eval()
    x, c = _inputs(dim, 4)
    weight_grad = torch.randn(3, 5, *x.shape[2:], dtype=torch.float64)

    def run(fn):  # noqa: ANN001, ANN202
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(layer, xi, c)
        (y * weight_grad).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        return y.detach(), xi.grad, grads

    y, gx, gp = run(lambda m, xi, ci: m(xi, ci))
    y_ref, gx_ref, gp_ref = run(reference_condconv)
    assert y.shape == (3, 5, *x.shape[2:])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    assert set(gp) == {"weight", "bias", "route_fc.weight", "route_fc.bias"}
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["grouped", "experts"])
def test_float32_matches_reference(impl: str) -> None:
    torch.manual_seed(2)
    layer = CondConv(3, 6, dim=3, impl=impl).eval()
    x, c = _inputs(3, 3)
    x = x.float()
    torch.testing.assert_close(
        layer(x, c.float()), reference_condconv(layer, x, c.float()), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("routing", ["features+condition", "condition"])
def test_different_conditions_give_different_outputs(routing: str) -> None:
    torch.manual_seed(3)
    layer = CondConv(2, 4, dim=3, routing=routing).eval()
    x = torch.randn(1, 2, 6, 6, 6).expand(2, -1, -1, -1, -1)
    y = layer(x, torch.tensor([1.0, -1.0]))
    assert not torch.allclose(y[0], y[1], atol=1e-4)


def test_condition_shapes_and_cond_dim() -> None:
    layer = CondConv(2, 3, dim=2, cond_dim=2).eval()
    x = torch.randn(4, 2, 5, 5)
    assert layer(x, torch.randn(4, 2)).shape == (4, 3, 5, 5)
    with pytest.raises(ValueError, match="condition"):
        layer(x, torch.randn(4))
    one = CondConv(2, 3, dim=2).eval()
    torch.testing.assert_close(one(x, torch.ones(4)), one(x, torch.ones(4, 1)))


def test_zero_init_gives_zero_output_but_learns() -> None:
    layer = CondConv(3, 2, dim=3, zero_init=True)
    x = torch.randn(2, 3, 5, 5, 5)
    y = layer(x, torch.tensor([1.0, -1.0]))
    assert torch.count_nonzero(y) == 0
    (y - 1).square().mean().backward()
    assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0


def test_default_init_like_conv() -> None:
    torch.manual_seed(0)
    layer = CondConv(8, 16, dim=3)
    bound = 1 / (8 * 27) ** 0.5
    assert layer.weight.abs().max() <= bound + 1e-7
    assert layer.weight.std() > bound / 3
    assert layer.bias.abs().max() <= bound + 1e-7


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_auto_impl_choice_and_even_kernel() -> None:
    assert CondConv(4, AUTO_EXPERTS_BELOW).impl == "grouped"
    assert CondConv(4, 3).impl == "experts"
    layer = CondConv(2, 3, kernel_size=2, dim=2, impl="grouped").eval()
    x = torch.randn(2, 2, 6, 7)
    c = torch.tensor([1.0, -1.0])
    assert layer(x, c).shape == (2, 3, 6, 7)
    layer.impl = "experts"
    assert layer(x, c).shape == (2, 3, 6, 7)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_experts": 0},
        {"routing": "features"},
        {"impl": "loop"},
        {"dim": 4},
        {"routing_dropout": 1.0},
        {"in_channels": 2.5},
    ],
)
def test_invalid_config_raises(kwargs: dict) -> None:
    args = {"in_channels": 2, "out_channels": 3} | kwargs
    with pytest.raises(CounterwarpError):
        CondConv(**args)


@pytest.mark.parametrize("impl", ["grouped", "experts"])
def test_bf16_weight_gradient_is_right_at_a_depth_of_two(impl: str) -> None:
    """oneDNN's bf16 conv3d weight gradient is wrong when the depth is 2 (the deepest
    level of a 32^3 U-Net); CondConv runs such layers in float32 under bf16 autocast."""
    torch.manual_seed(0)
    layer = CondConv(16, 16, dim=3, impl=impl, routing_dropout=0.0)
    x = torch.randn(4, 16, 2, 4, 4)
    c = torch.tensor([1.0, -1.0, 1.0, -1.0])
    layer(x, c).square().sum().backward()
    reference = layer.weight.grad.clone()
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, c)
    out.float().square().sum().backward()
    error = (layer.weight.grad - reference).abs().max() / reference.abs().max()
    assert error < 0.02


@pytest.mark.parametrize("impl", ["grouped", "experts"])
def test_one_image_split_into_depth_halves_gives_the_same_output_and_gradients(impl: str) -> None:
    from counterwarp.nn import condconv

    torch.manual_seed(0)
    layer = CondConv(16, 16, dim=3, impl=impl, routing_dropout=0.0)
    x = torch.randn(1, 16, 8, 8, 8, requires_grad=True)
    assert condconv._split_depth_is_faster(x, 3)  # this input takes the split path
    split = layer(x, torch.ones(1))
    split.square().sum().backward()
    grads = (x.grad.clone(), layer.weight.grad.clone())
    x.grad, layer.weight.grad = None, None
    original = condconv._split_depth_is_faster
    try:
        condconv._split_depth_is_faster = lambda *_: False
        plain = layer(x, torch.ones(1))
    finally:
        condconv._split_depth_is_faster = original
    plain.square().sum().backward()
    torch.testing.assert_close(split, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1], layer.weight.grad, atol=1e-4, rtol=1e-4)
