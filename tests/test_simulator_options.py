"""Options of the simulator network: GroupNorm, Gaussian smoothing of the field and the
antisymmetric (one disease direction) form."""

from __future__ import annotations

import pytest
import torch

from counterwarp.errors import CounterwarpError
from counterwarp.geometry.smooth import gaussian_smooth
from counterwarp.nn.simulator import SimulatorNet

SMALL = {"channels": (4, 8, 8), "latent_dim": 8, "routing_dropout": 0.0}


def _trained_once(net: SimulatorNet, x: torch.Tensor, c: torch.Tensor) -> SimulatorNet:
    """One optimiser step so the zero-initialised head produces a non-zero field."""
    optimiser = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(2):
        optimiser.zero_grad()
        (net(x, c) - 1.0).pow(2).mean().backward()
        optimiser.step()
    return net


def test_group_norm_gives_the_same_field_in_training_and_evaluation():
    torch.manual_seed(0)
    x, c = torch.randn(4, 1, 32, 32), torch.tensor([1.0, -1.0, 1.0, -1.0])
    group = _trained_once(SimulatorNet((32, 32), norm="group", **SMALL), x, c)
    batch = _trained_once(SimulatorNet((32, 32), norm="batch", **SMALL), x, c)
    group.train()
    batch.train()
    group_train, batch_train = group(x, c), batch(x, c)
    group.eval()
    batch.eval()
    assert torch.allclose(group_train, group(x, c), atol=1e-6)
    # BatchNorm's running statistics differ from the batch's: the field changes
    assert not torch.allclose(batch_train, batch(x, c), atol=1e-3)


def test_norm_is_validated_and_round_trips_through_the_config():
    net = SimulatorNet((32, 32), norm="group", **SMALL)
    assert SimulatorNet.from_config(net.config).config["norm"] == "group"
    with pytest.raises(CounterwarpError, match="norm"):
        SimulatorNet((32, 32), norm="layer", **SMALL)


def test_gaussian_smoothing_keeps_mass_and_spreads_an_impulse():
    field = torch.zeros(1, 3, 15, 15, 15)
    field[0, :, 7, 7, 7] = 1.0
    smoothed = gaussian_smooth(field, 1.0)
    assert torch.allclose(smoothed.sum((2, 3, 4)), torch.ones(1, 3), atol=1e-5)
    centre, neighbour = smoothed[0, 0, 7, 7, 7], smoothed[0, 0, 7, 7, 8]
    # separable Gaussian, sigma 1: the neighbour is exp(-1/2) of the centre
    assert float(neighbour / centre) == pytest.approx(float(torch.exp(torch.tensor(-0.5))),
                                                       rel=1e-4)
    constant = torch.full((1, 2, 12, 12), 0.7)
    assert torch.allclose(gaussian_smooth(constant, 1.0)[..., 4:8, 4:8],
                          constant[..., 4:8, 4:8], atol=1e-6)


def test_smoothing_sigma_smooths_the_network_output():
    torch.manual_seed(0)
    x, c = torch.randn(2, 1, 32, 32), torch.tensor([1.0, -1.0])
    net = _trained_once(SimulatorNet((32, 32), **SMALL), x, c).eval()
    rough = net(x, c)
    net._cfg["smoothing_sigma"] = 1.5
    smooth = net(x, c)
    roughness = lambda f: (f[..., 1:, :] - f[..., :-1, :]).abs().mean()  # noqa: E731
    assert roughness(smooth) < roughness(rough)


@pytest.mark.parametrize("field", ["displacement", "velocity"])
def test_antisymmetric_remove_is_the_negated_inject_field(field: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 1, 16, 16)
    c = torch.tensor([1.0, -1.0, 1.0])
    net = _trained_once(SimulatorNet((16, 16), field=field, antisymmetric=True, **SMALL), x, c)
    net.eval()
    inject, remove = net(x, torch.ones(3)), net(x, -torch.ones(3))
    assert inject.abs().mean() > 1e-4
    torch.testing.assert_close(remove, -inject)
    if field == "velocity":  # exp(-v) is the exact inverse: remove undoes inject
        forward, inverse = net.displacements(inject)
        torch.testing.assert_close(net.displacements(remove)[0], inverse)
        assert forward.abs().mean() > 1e-4
    # the plain conditional network has no such constraint
    plain = _trained_once(SimulatorNet((16, 16), field=field, **SMALL), x, c).eval()
    assert not torch.allclose(plain(x, -torch.ones(3)), -plain(x, torch.ones(3)), atol=1e-5)


def test_antisymmetric_round_trips_and_is_validated():
    net = SimulatorNet((16, 16), antisymmetric=True, **SMALL)
    assert SimulatorNet.from_config(net.config).config["antisymmetric"] is True
    with pytest.raises(CounterwarpError, match="antisymmetric"):
        SimulatorNet((16, 16), antisymmetric="yes", **SMALL)  # type: ignore[arg-type]
