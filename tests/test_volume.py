"""Tests for counterwarp.geometry.volume: Jacobians, sign of the volume change, folding."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from counterwarp.errors import CounterwarpError
from counterwarp.geometry.volume import (
    folding_fraction,
    jacobian_determinant,
    jacobian_matrix,
    log_volume_change,
)

SHAPES = {2: (24, 20), 3: (16, 14, 12)}


def grid(shape: tuple[int, ...]) -> torch.Tensor:
    """Voxel coordinates, shape ``(d, *shape)``, float64."""
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def centre(shape: tuple[int, ...]) -> torch.Tensor:
    """Centre of the grid as ``(d, 1, ..., 1)`` for broadcasting."""
    c = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64)
    return c.view(-1, *([1] * len(shape)))


def linear_field(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Displacement ``u(p) = (M - I)(p - c)``, shape ``(1, d, *shape)``."""
    d = len(shape)
    offset = grid(shape) - centre(shape)
    disp = torch.einsum("ij,j...->i...", matrix - torch.eye(d, dtype=torch.float64), offset)
    return disp.unsqueeze(0)


def rotation(d: int, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    if d == 2:
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    rz = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    rx = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)
    return rz @ rx


@pytest.mark.parametrize("d", [2, 3])
def test_uniform_scaling_has_det_a_to_the_d(d: int) -> None:
    a = 1.3
    disp = linear_field(a * torch.eye(d, dtype=torch.float64), SHAPES[d])
    det = jacobian_determinant(disp)
    assert det.shape == (1, *SHAPES[d])
    torch.testing.assert_close(det, torch.full_like(det, a**d))
    jac = jacobian_matrix(disp)
    assert jac.shape == (1, *SHAPES[d], d, d)
    torch.testing.assert_close(jac[(0, *(1,) * d)], a * torch.eye(d, dtype=torch.float64))


@pytest.mark.parametrize("d", [2, 3])
def test_rotation_has_det_one(d: int) -> None:
    disp = linear_field(rotation(d, 0.4), SHAPES[d])
    assert disp.abs().max() > 1.0  # a real rotation, not a tiny one
    det = jacobian_determinant(disp)
    torch.testing.assert_close(det, torch.ones_like(det))


@pytest.mark.parametrize("d", [2, 3])
def test_translation_has_det_one_and_no_volume_change(d: int) -> None:
    shape = SHAPES[d]
    disp = torch.zeros(2, d, *shape, dtype=torch.float64)
    disp[:, 0] = 2.5
    disp[1, -1] = -1.25
    det = jacobian_determinant(disp)
    torch.testing.assert_close(det, torch.ones_like(det))
    lvc = log_volume_change(disp)
    assert lvc.shape == (2, *shape)
    torch.testing.assert_close(lvc, torch.zeros_like(lvc))


@pytest.mark.parametrize("d", [2, 3])
def test_sign_growth_is_positive(d: int) -> None:
    """The pull-back p -> c + (p - c) / s enlarges the anatomy by s per axis."""
    s = 1.25
    disp = linear_field(torch.eye(d, dtype=torch.float64) / s, SHAPES[d])
    lvc = log_volume_change(disp)
    torch.testing.assert_close(lvc, torch.full_like(lvc, d * math.log(s)))
    shrink = linear_field(torch.eye(d, dtype=torch.float64) * s, SHAPES[d])
    torch.testing.assert_close(log_volume_change(shrink), torch.full_like(lvc, -d * math.log(s)))


@pytest.mark.parametrize("d", [2, 3])
def test_sign_matches_what_the_resampler_does_to_a_ball(d: int) -> None:
    """Warp a ball with MONAI's pull-back Warp: its volume must change like the map says."""
    from monai.networks.blocks import Warp

    shape = (32,) * d
    s = 1.3
    radius = 6.0
    offset = grid(shape) - centre(shape)
    ball = (offset.pow(2).sum(0).sqrt() <= radius).to(torch.float32)[None, None]
    disp = linear_field(torch.eye(d, dtype=torch.float64) / s, shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warped = Warp(mode="bilinear", padding_mode="zeros")(ball, disp.to(torch.float32))
    ratio = (warped.sum() / ball.sum()).item()
    predicted = math.exp(log_volume_change(disp).mean().item())
    assert ratio > 1.5  # the ball grew
    assert ratio == pytest.approx(s**d, rel=0.1)
    assert predicted == pytest.approx(s**d, rel=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_inverse_displacement_gives_the_same_sign(d: int) -> None:
    s = 1.2
    eye = torch.eye(d, dtype=torch.float64)
    pull = linear_field(eye / s, SHAPES[d])  # anatomy grows
    inverse = linear_field(eye * s, SHAPES[d])  # q -> c + s (q - c)
    lvc = log_volume_change(pull, inverse_displacement=inverse)
    torch.testing.assert_close(lvc, torch.full_like(lvc, d * math.log(s)))
    with pytest.raises(CounterwarpError, match="inverse_displacement"):
        log_volume_change(pull, inverse_displacement=inverse[..., :-1])


def test_velocity_field_forward_and_inverse_agree() -> None:
    """For u = exp(v) and w = exp(-v) both paths give the same map in the bump's core."""
    from monai.networks.blocks import DVF2DDF

    shape = (24, 24, 24)
    offset = grid(shape) - centre(shape)
    r = offset.pow(2).sum(0).sqrt()
    bump = torch.clamp((10.0 - r) / 4.0, 0.0, 1.0)  # 1 inside r <= 6, 0 beyond r = 10
    k = 0.2
    velocity = (-k * bump * offset).unsqueeze(0).to(torch.float32)  # pull towards c: growth
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        integrate = DVF2DDF(num_steps=7, padding_mode="border")
        forward = integrate(velocity).double()
        inverse = integrate(-velocity).double()
    lvc_forward = log_volume_change(forward)
    lvc_inverse = log_volume_change(forward, inverse_displacement=inverse)
    core = r <= 3.0
    assert lvc_forward[0][core].mean().item() == pytest.approx(3 * k, abs=0.01)
    assert lvc_inverse[0][core].mean().item() == pytest.approx(3 * k, abs=0.01)
    far = r >= 11.0
    assert lvc_forward[0][far].abs().max() < 1e-4
    # the tissue around a growing region is compressed, in both readings
    shell = (r > 7.5) & (r < 9.5)
    assert lvc_forward[0][shell].mean() < 0 and lvc_inverse[0][shell].mean() < 0


def test_spacing_for_displacements_in_mm() -> None:
    shape = SHAPES[3]
    spacing = (2.0, 3.0, 0.5)
    a = 0.8
    mm = grid(shape) * torch.tensor(spacing, dtype=torch.float64).view(3, 1, 1, 1)
    disp_mm = ((a - 1.0) * (mm - mm.mean(dim=(1, 2, 3), keepdim=True))).unsqueeze(0)
    det = jacobian_determinant(disp_mm, spacing=spacing)
    torch.testing.assert_close(det, torch.full_like(det, a**3))
    # without spacing the same numbers would be read as voxels: a different answer
    assert not torch.allclose(jacobian_determinant(disp_mm), det)
    with pytest.raises(CounterwarpError, match="spacing"):
        jacobian_determinant(disp_mm, spacing=(1.0, 1.0))
    with pytest.raises(CounterwarpError, match="spacing"):
        jacobian_determinant(disp_mm, spacing=(1.0, 0.0, 1.0))


@pytest.mark.parametrize("d", [2, 3])
def test_folding_fraction(d: int) -> None:
    shape = SHAPES[d]
    identity = torch.zeros(1, d, *shape, dtype=torch.float64)
    torch.testing.assert_close(folding_fraction(identity), torch.zeros(1, dtype=torch.float64))
    # mirror the first axis inside a slab: p0 -> c0 - (p0 - c0) there, det = -1
    offset = grid(shape) - centre(shape)
    slab = (offset[0].abs() <= 3).to(torch.float64)
    fold = identity.clone()
    fold[0, 0] = -2.0 * offset[0] * slab
    fraction = folding_fraction(fold)
    assert 0.0 < fraction.item() < 1.0
    det = jacobian_determinant(fold)
    assert fraction.item() == pytest.approx((det <= 0).double().mean().item())
    # masks: only the slab folds, outside it nothing does
    outside = slab == 0
    assert folding_fraction(fold, mask=outside).item() < fraction.item()
    inside = offset[0].abs() <= 1
    assert folding_fraction(fold, mask=inside).item() == pytest.approx(1.0)
    batch = torch.cat([identity, fold])
    both = folding_fraction(batch, mask=inside.unsqueeze(0).unsqueeze(0).expand(2, 1, *shape))
    torch.testing.assert_close(both, torch.tensor([0.0, 1.0], dtype=torch.float64))
    empty = torch.zeros(shape, dtype=torch.bool)
    assert folding_fraction(fold, mask=empty).item() == 0.0
    with pytest.raises(CounterwarpError, match="mask"):
        folding_fraction(fold, mask=inside[..., :-1])


def test_folded_voxels_are_clamped_not_nan() -> None:
    disp = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    disp[0, 0] = -2.0 * (grid((8, 8))[0] - 3.5)
    lvc = log_volume_change(disp)
    assert torch.isfinite(lvc).all()
    # det = -1 everywhere is clamped to eps, i.e. -log(eps), not NaN
    torch.testing.assert_close(lvc, torch.full_like(lvc, -math.log(1e-6)))


def test_bad_inputs_raise() -> None:
    with pytest.raises(CounterwarpError, match="channel"):
        jacobian_determinant(torch.zeros(1, 3, 8, 8))
    with pytest.raises(CounterwarpError, match="batch"):
        jacobian_determinant(torch.zeros(2, 8))
    with pytest.raises(CounterwarpError, match="at least 2"):
        jacobian_determinant(torch.zeros(1, 2, 8, 1))
    with pytest.raises(CounterwarpError, match="torch.Tensor"):
        jacobian_determinant([[0.0]])  # type: ignore[arg-type]
    with pytest.raises(CounterwarpError, match="floating"):
        jacobian_determinant(torch.zeros(1, 2, 4, 4, dtype=torch.int64))
    with pytest.raises(CounterwarpError, match="eps"):
        log_volume_change(torch.zeros(1, 2, 4, 4), eps=0.0)


def test_float32_and_gradients_flow() -> None:
    disp = torch.zeros(1, 3, 6, 6, 6, requires_grad=True)
    lvc = log_volume_change(disp)
    assert lvc.dtype == torch.float32
    lvc.sum().backward()
    assert disp.grad is not None and torch.isfinite(disp.grad).all()
