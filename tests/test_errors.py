"""Every refusal a user can cause at a public entry point is the project's one error type.

Each case below used to escape as a bare ``ValueError`` (so the command line printed a
traceback); now it is a :class:`CounterwarpError` whose message is one line.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from counterwarp.errors import CounterwarpError
from counterwarp.geometry.volume import jacobian_determinant
from counterwarp.geometry.warp import integrate_velocity, warp
from counterwarp.losses import cycle_loss, logit_shift_loss, smoothness_loss
from counterwarp.nn.classifier import Classifier, last_conv_layer, save_classifier
from counterwarp.nn.condconv import CondConv
from counterwarp.nn.simulator import SimulatorNet

SMALL = {"channels": (4, 8, 8), "latent_dim": 8}


def _tiny_classifier() -> Classifier:
    return Classifier(input_shape=(16, 16))


CASES = {
    "warp_image_without_batch_axis": (
        lambda _: warp(torch.zeros(16, 16), torch.zeros(1, 2, 16, 16)), "warp"),
    "warp_field_of_another_shape": (
        lambda _: warp(torch.zeros(1, 1, 16, 16), torch.zeros(1, 2, 8, 8)), "warp"),
    "integrate_zero_steps": (
        lambda _: integrate_velocity(torch.zeros(1, 2, 8, 8), 0), "num_steps"),
    "jacobian_of_a_channel_mismatch": (
        lambda _: jacobian_determinant(torch.zeros(1, 3, 8, 8)), "displacement"),
    "simulator_condition_of_wrong_length": (
        lambda _: SimulatorNet((16, 16), **SMALL)(torch.zeros(2, 1, 16, 16), torch.ones(3)),
        "condition"),
    "condconv_condition_of_wrong_length": (
        lambda _: CondConv(1, 2, dim=2)(torch.zeros(2, 1, 8, 8), torch.ones(3)), "condition"),
    "logit_shift_of_unequal_shapes": (
        lambda _: logit_shift_loss(torch.zeros(2), torch.zeros(3), torch.ones(2), 0.1),
        "shape"),
    "cycle_loss_of_unequal_shapes": (
        lambda _: cycle_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4)), "cycle_loss"),
    "smoothness_of_a_scalar_field": (
        lambda _: smoothness_loss(torch.zeros(1, 3, 8, 8)), "field"),
    "classifier_image_of_wrong_size": (
        lambda _: _tiny_classifier()(torch.zeros(1, 1, 8, 8)), "expects"),
    "last_conv_of_a_model_without_conv": (
        lambda _: last_conv_layer(nn.Linear(2, 1)), "Conv"),
    "checkpoint_extra_with_reserved_key": (
        lambda tmp: save_classifier(_tiny_classifier(), tmp / "c.pt", extra={"state_dict": 1}),
        "reserved"),
    "checkpoint_extra_not_json": (
        lambda tmp: save_classifier(_tiny_classifier(), tmp / "c.pt", extra={"x": object()}),
        "JSON"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_public_entry_points_refuse_with_the_project_error(name, tmp_path):
    call, words = CASES[name]
    with pytest.raises(CounterwarpError, match=words) as caught:
        call(tmp_path)
    message = str(caught.value)
    assert message and "\n" not in message
    assert type(caught.value) is CounterwarpError


def test_the_project_error_is_still_a_value_error():
    """Code that caught ValueError around a public function keeps working."""
    assert issubclass(CounterwarpError, ValueError)
