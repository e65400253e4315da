"""One optimisation step of the simulator: the objective's terms, the batch, the schedules.

``joint`` (default): one Adam optimiser on
``w_shift * L_shift + w_cycle * L_cycle + w_smooth * L_smooth + w_magnitude * L_magnitude``
(the regularisers averaged over the forward and the cycled pass); ``alternating`` (the
paper's): one optimiser steps on the shift and regularisers, a second one (after
``cycle_warmup`` steps) on the cycle loss, on every batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from counterwarp.losses import (
    cycle_loss,
    displacement_magnitude_loss,
    folding_penalty,
    logit_shift_loss,
    moved_by_margin,
    smoothness_loss,
)
from counterwarp.nn.classifier import classifier_logits
from counterwarp.nn.simulator import DIRECTIONS, SimulatorNet, simulate
from counterwarp.train.config import FitConfig

__all__ = ["LOSS_KEYS", "LossTerms", "balanced_batch", "non_finite_message", "train_step"]

#: The logged values of a step that must stay finite (``cycle`` is 0 before the warm-up).
LOSS_KEYS = ("loss", "shift", "cycle", "smooth", "magnitude")
#: A margin above this (logit units) makes the shift loss overflow float32 (max 3.4e38)
#: once it is summed over a batch and weighted; real logit spreads are below 1e3.
OVERFLOWING_MARGIN = 1e30


class LossTerms:
    """Computes every term of the objective for one batch."""

    def __init__(
        self, net: SimulatorNet, classifier: nn.Module, config: FitConfig, margin: float
    ) -> None:
        self.net = net
        self.classifier = classifier
        self.config = config
        self.margin = margin
        # 0-dim bool tensors: whether the last step's intermediate values were finite
        # (read only when a loss is not, so no device synchronisation per step)
        self._finite: dict[str, torch.Tensor] = {}

    def finite_checks(self) -> dict[str, bool]:
        """Whether the last step's field, simulated images, classifier logits and cycled
        field were finite (the names of :func:`non_finite_message`)."""
        return {name: bool(flag) for name, flag in self._finite.items()}

    def regulariser(self, displacement: torch.Tensor) -> dict[str, torch.Tensor]:
        """Penalties on a displacement ``(B, d, *S)``, each computed once: ``smooth`` and
        ``magnitude`` (for the log) and ``regulariser``, their weighted sum plus (when
        ``w_fold > 0``) the folding penalty (for the loss)."""
        config = self.config
        smooth = smoothness_loss(displacement, kind=config.smooth_kind)
        magnitude = displacement_magnitude_loss(displacement)
        total = config.w_smooth * smooth + config.w_magnitude * magnitude
        if config.w_fold > 0:
            total = total + config.w_fold * folding_penalty(displacement)
        return {"regulariser": total, "smooth": smooth, "magnitude": magnitude}

    def autocast(self, device: torch.device) -> torch.autocast:
        """The forward passes' precision context (``config.precision``) on ``device``."""
        return torch.autocast(
            device_type=device.type, dtype=torch.bfloat16,
            enabled=self.config.precision == "bf16",
        )

    def forward_terms(
        self, images: torch.Tensor, condition: torch.Tensor, logit_before: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        with self.autocast(images.device):
            simulated, displacement, _, _ = simulate(self.net, images, condition)
            logit_after = classifier_logits(self.classifier, simulated).float()
        self._finite = {
            "field": torch.isfinite(displacement.detach()).all(),
            "simulated": torch.isfinite(simulated.detach()).all(),
            "logits": torch.isfinite(logit_after.detach()).all(),
        }
        return {
            "simulated": simulated,
            "shift": logit_shift_loss(logit_before, logit_after, condition, self.margin),
            **self.regulariser(displacement),
            "moved": moved_by_margin(logit_before, logit_after, condition, self.margin),
        }

    def cycle_terms(
        self, images: torch.Tensor, simulated: torch.Tensor, condition: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        with self.autocast(images.device):
            cycled, back_displacement, _, _ = simulate(self.net, simulated, -condition)
        self._finite["cycled field"] = torch.isfinite(back_displacement.detach()).all()
        return {
            "cycle": cycle_loss(images, cycled),
            **self.regulariser(back_displacement),
        }


def balanced_batch(
    inject_pool: torch.Tensor, remove_pool: torch.Tensor, batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and conditions of one batch: half inject, half remove when both exist."""
    both = ((inject_pool, DIRECTIONS["inject"]), (remove_pool, DIRECTIONS["remove"]))
    pools = [(p, c) for p, c in both if len(p) > 0]
    per_pool = [batch_size // len(pools)] * len(pools)
    per_pool[0] += batch_size - sum(per_pool)
    indices, conditions = [], []
    for (pool, condition), count in zip(pools, per_pool, strict=True):
        picks = torch.randint(len(pool), (count,), generator=generator)
        indices.append(pool[picks])
        conditions.append(torch.full((count,), condition))
    return torch.cat(indices), torch.cat(conditions)


def _descend(
    optimiser: torch.optim.Optimizer, loss: torch.Tensor,
    after_backward: Callable[[], None] | None,
) -> None:
    """One optimiser step on ``loss``; ``after_backward`` runs between backward and step
    (the gradient averaging under torchrun)."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    optimiser.step()


def train_step(
    terms: LossTerms,
    config: FitConfig,
    main_opt: torch.optim.Optimizer,
    cycle_opt: torch.optim.Optimizer | None,
    images: torch.Tensor,
    condition: torch.Tensor,
    logit_before: torch.Tensor,
    step: int,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One optimisation step of the chosen schedule; returns the logged loss values.

    ``after_backward`` runs after every ``backward()``, before the optimiser's step (the
    gradient averaging over the ranks of a distributed run).
    """
    forward = terms.forward_terms(images, condition, logit_before)
    if cycle_opt is None:
        back = terms.cycle_terms(images, forward["simulated"], condition)
        smooth = (forward["smooth"] + back["smooth"]) / 2
        magnitude = (forward["magnitude"] + back["magnitude"]) / 2
        loss = (
            config.w_shift * forward["shift"] + config.w_cycle * back["cycle"]
            + (forward["regulariser"] + back["regulariser"]) / 2
        )
        _descend(main_opt, loss, after_backward)
        cycle_value = float(back["cycle"].detach())
    else:
        smooth, magnitude = forward["smooth"], forward["magnitude"]
        loss = config.w_shift * forward["shift"] + forward["regulariser"]
        _descend(main_opt, loss, after_backward)
        if step >= config.cycle_warmup:
            with terms.autocast(images.device):
                simulated = simulate(terms.net, images, condition)[0]
            back = terms.cycle_terms(images, simulated, condition)
            cycle_total = config.w_cycle * back["cycle"]
            _descend(cycle_opt, cycle_total, after_backward)
            cycle_value = float(back["cycle"].detach())
            loss = loss.detach() + cycle_total.detach()
        else:
            cycle_value = float("nan")
    return {
        "loss": float(loss.detach()),
        "shift": float(forward["shift"].detach()),
        "cycle": cycle_value if math.isfinite(cycle_value) else 0.0,
        "smooth": float(smooth.detach()),
        "magnitude": float(magnitude.detach()),
        "moved_share": float(forward["moved"].float().mean()),
    }


#: What each check of :meth:`LossTerms.finite_checks` and each logged value is, in the
#: order a non-finite value is blamed (the first one in a forward pass's order).
_DESCRIPTIONS = (
    ("weights", "the simulator's weights (after the update)"),
    ("field", "the simulator's displacement field"),
    ("simulated", "the simulated images"),
    ("logits", "the classifier's logits on the simulated images"),
    ("shift", "the shift loss"),
    ("cycled field", "the cycled (backward) field"),
    ("cycle", "the cycle loss"),
    ("smooth", "the smoothness loss"),
    ("magnitude", "the magnitude loss"),
    ("loss", "the total (weighted) loss"),
)


def non_finite_message(
    values: dict[str, float], finite: dict[str, bool], config: FitConfig, margin: float,
    step: int,
) -> str:
    """One line naming the first value of 0-based ``step`` that went NaN/Inf and the
    setting that most likely caused it.

    ``values`` are the step's logged losses, ``finite`` the checks of
    :meth:`LossTerms.finite_checks` (and ``"weights"``: the weights after the update).
    The likely cause: a margin so large that the shift loss overflows (``--margin`` /
    ``--margin-sd``); a classifier that returns NaN/Inf on finite simulated images (the
    classifier, no setting of the fit); loss weights whose weighted sum overflows; after
    finite steps, or in the weights, an update that made the weights diverge (``--lr``).
    """
    bad = None
    for key, description in _DESCRIPTIONS:
        value = values.get(key) if key in values else None
        ok = finite.get(key, True) if value is None else math.isfinite(value)
        if not ok:
            kind = ("NaN" if math.isnan(value) else "Inf") if value is not None else "NaN/Inf"
            bad = (key, description, kind)
            break
    if bad is None:  # nothing specific: the total loss
        bad = ("loss", "the total (weighted) loss", "NaN/Inf")
    key, description, kind = bad
    upstream_finite = all(finite.get(k, True) for k in ("field", "simulated", "logits"))
    weights = {"--w-shift": config.w_shift, "--w-cycle": config.w_cycle,
               "--w-smooth": config.w_smooth, "--w-magnitude": config.w_magnitude,
               "--w-fold": config.w_fold}
    if key in ("shift", "loss") and upstream_finite and margin * max(config.w_shift, 1.0) \
            > OVERFLOWING_MARGIN:
        flag = "--margin" if config.margin is not None else "--margin-sd"
        cause = (f"the margin {margin:g} (logit units) is so large that the shift loss "
                 f"overflows float32; lower {flag} to the scale of the classifier's logits")
    elif key == "logits" and finite.get("field", True) and finite.get("simulated", True):
        cause = ("the classifier returns NaN/Inf on finite simulated images; check the "
                 "classifier (no setting of fit causes this)")
    elif key == "weights":
        cause = (f"an optimiser update made the weights diverge; lower --lr (now "
                 f"{config.lr:g})")
    elif key == "loss" and max(weights.values()) > OVERFLOWING_MARGIN:
        name = max(weights, key=weights.__getitem__)
        cause = f"{name} {weights[name]:g} is so large that the weighted loss overflows"
    elif step > 0:
        cause = (f"the losses were finite for {step} step(s), so an update made the weights "
                 f"diverge; lower --lr (now {config.lr:g})")
    else:
        cause = ("it happened before any update, so the training images or the settings "
                 "are at fault; check that the images are finite and lower the loss weights")
    return f"{description} became {kind} at step {step + 1}; likely cause: {cause}"
