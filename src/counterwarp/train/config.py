"""The one home of the simulator's settings and their defaults: :class:`FitConfig`.

Every other place that names a simulator setting (the ``Simulator`` estimator, the
command line's ``fit`` options, the benchmark scripts) reads its default from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from counterwarp.errors import CounterwarpError

#: ``FitConfig.precision``: ``"bf16"`` runs the networks' forward passes (simulator and
#: classifier) under ``torch.autocast(dtype=torch.bfloat16)``; fields, warps and losses stay
#: float32, and so do the weights and the optimiser (plain mixed precision, no loss scaling).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


#: The allowed values of every :class:`FitConfig` setting that takes a name.
CHOICES: dict[str, tuple[str, ...]] = {
    "field": ("displacement", "velocity"),
    "routing": ("features+condition", "condition"),
    "schedule": ("joint", "alternating"),
    "smooth_kind": ("l1", "l2", "bending"),
    "norm": ("batch", "group"),
    "lr_schedule": ("constant", "cosine"),
    "precision": PRECISIONS,
}


#: What each setting a user may change on the command line (``counterwarp fit --NAME``)
#: means; the CLI's types, choices and shown defaults come from :class:`FitConfig`.
SETTING_HELP: dict[str, str] = {
    "field": "displacement field (the paper's) or diffeomorphic velocity field",
    "steps": "training steps",
    "batch_size": "images per step (both directions in every batch)",
    "lr": "Adam learning rate",
    "lr_schedule": "learning rate over the steps (cosine: decays to 0 at the last step)",
    "schedule": "joint: one optimiser on all losses; alternating: the paper's two optimisers",
    "margin": "logit margin of the shift loss, in logit units "
              "(default: --margin-sd x sd of the training logits)",
    "margin_sd": "the derived margin, in standard deviations of the training logits",
    "w_cycle": "weight of the cycle loss (inject then remove returns the image)",
    "w_smooth": "weight of the field smoothness loss",
    "smooth_kind": "smoothness penalty on the field's gradients",
    "w_magnitude": "weight of the field magnitude loss",
    "w_fold": "weight of the penalty on near-singular / folded voxels (det < 0.25)",
    "num_experts": "expert kernels per conditional convolution",
    "routing": "what the conditional convolutions route on",
    "antisymmetric": "one disease field g(x) for both directions (remove = -inject); "
                     "--no-antisymmetric gives the paper's fully conditional simulator",
    "field_sigma": "Gaussian smoothing of the predicted field, in voxels",
    "field_downsize": "predict the field on a grid this many times coarser (a power of 2) "
                      "and upsample it: faster, and smooth at that scale (1: full resolution)",
    "field_brain_margin": "keep the field in the brain: it fades to 0 from this many voxels "
                          "outside the brain over as many more (0: it may move the "
                          "background too)",
    "precision": "bf16: forward passes under bfloat16 autocast (GPUs, and CPUs with "
                 "AMX/AVX512-BF16); fields, warps and weights stay float32",
    "checkpoint_every": "write a resumable checkpoint every N steps",
    "seed": "random seed of the fit",
}


@dataclass
class FitConfig:
    """Settings of one simulator fit (JSON-able; stored in the checkpoints).

    Weights and defaults were chosen by measurement on the synthetic cohort (the measured
    alternatives are in docs/benchmarks.md). ``margin`` in logit units; ``None`` derives it
    as ``margin_sd`` times the standard deviation of the classifier's logits on the training
    images. The network settings (``field``, ``num_experts``, ``routing``, ``channels``,
    ``latent_dim``, ``norm``) equal the paper's reference network, the defaults of
    :class:`counterwarp.nn.simulator.SimulatorNet`; two product defaults differ from it on
    purpose: ``antisymmetric=True`` (one field, remove = -inject) and ``field_sigma=1``
    voxel of smoothing (the network's ``smoothing_sigma`` defaults to 0).
    """

    field: str = "displacement"
    num_experts: int = 3
    routing: str = "features+condition"
    channels: tuple[int, ...] = (16, 32, 64, 16, 16)
    latent_dim: int = 512
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "constant"
    weight_decay: float = 1e-4
    schedule: str = "joint"
    cycle_warmup: int = 20
    margin: float | None = None
    margin_sd: float = 1.0
    w_shift: float = 1.0
    w_cycle: float = 5.0
    w_smooth: float = 1.0
    smooth_kind: str = "l2"
    w_magnitude: float = 0.01
    w_fold: float = 0.0
    field_sigma: float = 1.0
    field_downsize: int = 1
    field_brain_margin: float = 0.0
    norm: str = "batch"
    antisymmetric: bool = True
    precision: str = "fp32"
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`CounterwarpError` naming the first invalid setting."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise CounterwarpError(
                    f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        positive_ints = ("num_experts", "steps", "batch_size", "checkpoint_every", "latent_dim",
                         "field_downsize")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CounterwarpError(f"{name} must be a positive integer, got {value!r}")
        non_negative = ("w_shift", "w_cycle", "w_smooth", "w_magnitude", "w_fold",
                        "weight_decay", "field_sigma", "field_brain_margin")
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise CounterwarpError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise CounterwarpError(f"lr must be a positive number, got {self.lr!r}")
        def positive_number(value: Any) -> bool:
            return (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and value > 0)

        if self.field_downsize & (self.field_downsize - 1):
            raise CounterwarpError(
                f"field_downsize must be a power of 2 (1, 2, 4, ...), got {self.field_downsize!r}"
            )
        if self.margin is not None and not positive_number(self.margin):
            raise CounterwarpError(f"margin must be a positive number, got {self.margin!r}")
        if not positive_number(self.margin_sd):
            raise CounterwarpError(f"margin_sd must be a positive number, got {self.margin_sd!r}")
        for name in ("seed", "cycle_warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CounterwarpError(f"{name} must be an integer >= 0, got {value!r}")
        if not (
            isinstance(self.channels, tuple) and len(self.channels) >= 2
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1
                    for c in self.channels)
        ):
            raise CounterwarpError(
                f"channels must be two or more positive integers, got {self.channels!r}"
            )
        if not isinstance(self.antisymmetric, bool):
            raise CounterwarpError(
                f"antisymmetric must be true or false, got {self.antisymmetric!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        payload = dataclasses.asdict(self)
        payload["channels"] = list(self.channels)
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> FitConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise CounterwarpError(f"unknown simulator settings: {', '.join(unknown)}")
        values = dict(payload)
        if "channels" in values:
            values["channels"] = tuple(int(c) for c in values["channels"])
        config = cls(**values)
        config.validate()
        return config
