"""Losses and field metrics: hinge sign convention, smoothness on analytic fields."""

from __future__ import annotations

import pytest
import torch

from counterwarp.errors import CounterwarpError
from counterwarp.losses import (
    cycle_loss,
    displacement_magnitude_loss,
    folding_penalty,
    logit_shift_loss,
    mean_abs_gradient,
    moved_by_margin,
    smoothness_loss,
)


def _linear_field(shape: tuple[int, ...], a: torch.Tensor) -> torch.Tensor:
    """``u_i(p) = sum_j A_ij p_j`` as a ``(1, d, *shape)`` field (voxel coordinates)."""
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    )  # (d, *S)
    return torch.einsum("ij,j...->i...", a, grid)[None]


# ---------------------------------------------------------------- logit shift


def test_hinge_zero_past_margin_and_positive_before() -> None:
    before = torch.zeros(4)
    c = torch.tensor([1.0, 1.0, -1.0, -1.0])
    past = torch.tensor([2.5, 2.0, -2.5, -2.0])  # at or past the margin, in the asked direction
    assert logit_shift_loss(before, past, c, margin=2.0) == 0
    assert moved_by_margin(before, past, c, 2.0).all()
    short = torch.tensor([1.0, -1.0, -1.0, 1.0])
    # per sample: relu(c * (0 - after) + 2) = 1, 3, 1, 3
    assert logit_shift_loss(before, short, c, margin=2.0).item() == pytest.approx(2.0)
    assert not moved_by_margin(before, short, c, 2.0).any()


@pytest.mark.parametrize("c", [1.0, -1.0])
def test_hinge_gradient_pushes_the_logit_in_the_asked_direction(c: float) -> None:
    before = torch.tensor([0.3])
    after = torch.tensor([0.3], requires_grad=True)
    logit_shift_loss(before, after, torch.tensor([c]), margin=1.0).backward()
    # gradient descent moves `after` against the gradient: up for inject, down for remove
    assert after.grad is not None and torch.sign(-after.grad).item() == c


def test_hinge_validates_shapes_and_margin() -> None:
    with pytest.raises(ValueError):
        logit_shift_loss(torch.zeros(3), torch.zeros(3, 1), torch.ones(3), 1.0)
    with pytest.raises(CounterwarpError):
        logit_shift_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), -1.0)


# ---------------------------------------------------------------- cycle


def test_cycle_loss_plain_and_masked() -> None:
    image = torch.zeros(2, 1, 4, 4)
    cycled = image.clone()
    cycled[:, :, 0] = 2.0  # error 2 on a quarter of the voxels
    assert cycle_loss(image, cycled).item() == pytest.approx(1.0)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 1:] = 1.0  # excludes the wrong row
    assert cycle_loss(image, cycled, mask).item() == 0.0
    cycled.requires_grad_()
    cycle_loss(image, cycled).backward()
    assert cycled.grad is not None and cycled.grad.abs().sum() > 0


# ---------------------------------------------------------------- smoothness


@pytest.mark.parametrize("kind", ["l2", "l1", "bending"])
@pytest.mark.parametrize("shape", [(8, 9), (6, 7, 5)])
def test_smoothness_zero_for_translation_positive_otherwise(kind: str, shape: tuple) -> None:
    d = len(shape)
    translation = torch.ones(2, d, *shape) * torch.arange(1.0, d + 1).view(1, d, *[1] * d)
    assert smoothness_loss(translation, kind).item() == pytest.approx(0.0, abs=1e-12)
    bumpy = torch.randn(2, d, *shape, requires_grad=True)
    loss = smoothness_loss(bumpy, kind)
    assert loss.item() > 0
    loss.backward()
    assert bumpy.grad is not None and bumpy.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(8, 9), (6, 7, 5)])
def test_l2_and_l1_of_a_linear_field_are_analytic(shape: tuple) -> None:
    d = len(shape)
    a = torch.arange(1.0, d * d + 1, dtype=torch.float64).reshape(d, d) / 10 - 0.3
    u = _linear_field(shape, a)
    # forward differences of u_i along j are A_ij everywhere; mean over i, j (and voxels)
    assert smoothness_loss(u, "l2").item() == pytest.approx((a**2).sum().item() / d**2)
    assert smoothness_loss(u, "l1").item() == pytest.approx(a.abs().sum().item() / d**2)
    assert mean_abs_gradient(u).item() == pytest.approx(a.abs().sum().item() / d**2)


@pytest.mark.parametrize("shape", [(8, 9), (6, 7, 5)])
def test_bending_energy_of_linear_field_is_zero_and_of_quadratic_is_analytic(shape: tuple) -> None:
    d = len(shape)
    a = torch.randn(d, d, dtype=torch.float64)
    assert smoothness_loss(_linear_field(shape, a), "bending").item() == pytest.approx(0, abs=1e-10)
    # u_0 = p_0^2 / 2: d^2 u_0 / dp_0^2 = 1, everything else 0 -> mean over d components = 1/d
    u = torch.zeros(1, d, *shape, dtype=torch.float64)
    p0 = torch.arange(shape[0], dtype=torch.float64).view(-1, *[1] * (d - 1))
    u[0, 0] = (p0**2 / 2).expand(*shape)
    assert smoothness_loss(u, "bending").item() == pytest.approx(1 / d)


def test_mean_abs_gradient_is_a_detached_metric() -> None:
    u = torch.randn(1, 2, 5, 5, requires_grad=True)
    m = mean_abs_gradient(u)
    assert not m.requires_grad and m.ndim == 0


def test_smoothness_validates() -> None:
    with pytest.raises(CounterwarpError):
        smoothness_loss(torch.zeros(1, 2, 4, 4), "tv")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        smoothness_loss(torch.zeros(1, 3, 4, 4), "l2")


# ---------------------------------------------------------------- magnitude


def test_magnitude_of_constant_field_is_a_squared() -> None:
    u = torch.full((2, 3, 4, 5, 6), -1.5, requires_grad=True)
    loss = displacement_magnitude_loss(u)
    assert loss.item() == pytest.approx(2.25)
    loss.backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(8, 9), (6, 7, 8)])
def test_folding_penalty_is_zero_for_mild_fields_and_analytic_for_strong_ones(shape: tuple) -> None:
    d = len(shape)
    # uniform scaling by s: det = s**d everywhere
    mild = _linear_field(shape, 0.2 * torch.eye(d, dtype=torch.float64))  # det 1.2**d
    assert folding_penalty(mild).item() == 0.0
    squeeze = _linear_field(shape, -0.9 * torch.eye(d, dtype=torch.float64))  # det 0.1**d
    assert folding_penalty(squeeze, threshold=0.25).item() == pytest.approx(0.25 - 0.1**d)
    mirror = torch.zeros(d, d, dtype=torch.float64)
    mirror[0, 0] = -2.0  # p0 -> -p0: a reflection, det -1 (folded)
    folded = _linear_field(shape, mirror).requires_grad_(True)
    loss = folding_penalty(folded, threshold=0.25)
    assert loss.item() == pytest.approx(0.25 + 1.0)
    loss.backward()
    assert folded.grad is not None and folded.grad.abs().sum() > 0
