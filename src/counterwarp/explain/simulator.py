"""The public simulator API: ``Simulator.fit(classifier, data)`` and ``sim.explain(x, direction)``.

scikit-learn style: settings in the constructor, ``fit`` returns the fitted object. Captum
style: ``explain`` takes a batch of images and returns tensors of matching shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from counterwarp.errors import CounterwarpError
from counterwarp.geometry.volume import folding_fraction, log_volume_change
from counterwarp.losses import moved_by_margin
from counterwarp.nn.classifier import classifier_logits, freeze
from counterwarp.nn.simulator import DIRECTIONS, SimulatorNet, simulate, warp_by_field
from counterwarp.train.config import FitConfig
from counterwarp.train.simulator import fit_simulator
from counterwarp.train.staging import save_torch_file

SIMULATOR_FORMAT = "counterwarp.simulator_model"
SIMULATOR_VERSION = 1


def _simulate_directions(
    net: SimulatorNet, x: torch.Tensor, conditions: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``{direction: (simulated, displacement, inverse or None)}`` of ``x`` (B, 1, *S).

    An antisymmetric network's raw field is ``c * g(x)``, so it runs once and every other
    direction rescales that field by its condition.
    """
    shared = bool(getattr(net, "config", {}).get("antisymmetric"))
    first: tuple[torch.Tensor, torch.Tensor] | None = None  # (condition, raw field)
    out = {}
    for direction, condition in conditions.items():
        if shared and first is not None:
            raw = first[1] * (condition / first[0]).view(-1, *([1] * (x.ndim - 1)))
        else:
            raw = net(x, condition)
            first = first or (condition, raw)
        out[direction] = warp_by_field(net, x, raw)
    return out


@dataclass
class Explanation:
    """What the simulator says about a batch of B images in one direction.

    Attributes:
        direction: "inject" (more diseased) or "remove" (healthier).
        image: (B, 1, *S) the input images.
        simulated: (B, 1, *S) the images warped by the simulator.
        displacement: (B, d, *S) pull-back displacement in voxels (channel i along dim i).
        log_volume_change: (B, *S) log volume change of the anatomy (growth > 0), in the
            input image's space.
        logit_before, logit_after: (B,) classifier logits of input and simulated image.
        moved: (B,) bool, logit moved past the margin in the asked direction.
        folding: (B,) share of voxels where the deformation folds (det <= 0).
        margin: the logit margin the simulator was trained with.
    """

    direction: str
    image: torch.Tensor
    simulated: torch.Tensor
    displacement: torch.Tensor
    log_volume_change: torch.Tensor
    logit_before: torch.Tensor
    logit_after: torch.Tensor
    moved: torch.Tensor
    folding: torch.Tensor
    margin: float

    @property
    def valid(self) -> torch.Tensor:
        """(B,) bool: moved past the margin and folding nowhere
        (:mod:`counterwarp.explain.validity`)."""
        from counterwarp.explain.validity import valid_explanations

        return torch.from_numpy(valid_explanations(self.moved, self.folding))


def _as_image_tensor(data: Any) -> torch.Tensor:
    """Turn a tensor (N, 1, *S) or a Dataset of (image, label) into an (N, 1, *S) tensor."""
    if isinstance(data, torch.Tensor):
        images = data
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        images = torch.stack([item[0] if isinstance(item, (tuple, list)) else item
                              for item in items])
    else:
        raise CounterwarpError(
            f"training data must be a tensor (N, 1, *S) or a dataset of (image, label), got "
            f"{type(data).__name__}"
        )
    if images.ndim not in (4, 5) or images.shape[1] != 1:
        raise CounterwarpError(
            f"images must have shape (N, 1, *S) with 2 or 3 spatial dims, got "
            f"{tuple(images.shape)}"
        )
    return images.float()


_DEFAULT = FitConfig()  # the one home of the defaults; the signature below reads them


class Simulator:
    """A conditional warping simulator that explains a binary image classifier.

    Every keyword is a field of :class:`counterwarp.train.config.FitConfig`, with its
    default read from there; see that class for what each setting means.

    Args:
        field: ``"displacement"`` or ``"velocity"`` (diffeomorphic, exact inverse).
        num_experts, routing, channels, latent_dim, norm: the network (CondConv U-Net).
        steps, batch_size, lr, lr_schedule, weight_decay, schedule, cycle_warmup: training.
        margin: logit margin (logit units); ``None`` derives ``margin_sd`` x sd of the
            classifier's logits on the training images.
        w_shift, w_cycle, w_smooth, smooth_kind, w_magnitude, w_fold: loss weights.
        field_sigma: Gaussian smoothing of the predicted field (voxels).
        field_downsize: predict the field on a grid this many times coarser, upsampled.
        field_brain_margin: voxels around the brain beyond which the field fades to 0
            (0: anywhere).
        antisymmetric: one field for both directions, remove = -inject.
        precision: ``"fp32"`` or ``"bf16"`` (autocast forward passes).
        checkpoint_every, seed: checkpoints every N steps; random seed.

    Example:
        >>> sim = Simulator(steps=400).fit(classifier, train_images)
        >>> explanation = sim.explain(test_images, "remove")
        >>> explanation.log_volume_change.shape  # (B, *S)
    """

    def __init__(
        self,
        *,
        field: str = _DEFAULT.field,
        num_experts: int = _DEFAULT.num_experts,
        routing: str = _DEFAULT.routing,
        channels: tuple[int, ...] = _DEFAULT.channels,
        latent_dim: int = _DEFAULT.latent_dim,
        steps: int = _DEFAULT.steps,
        batch_size: int = _DEFAULT.batch_size,
        lr: float = _DEFAULT.lr,
        lr_schedule: str = _DEFAULT.lr_schedule,
        weight_decay: float = _DEFAULT.weight_decay,
        schedule: str = _DEFAULT.schedule,
        cycle_warmup: int = _DEFAULT.cycle_warmup,
        margin: float | None = _DEFAULT.margin,
        margin_sd: float = _DEFAULT.margin_sd,
        w_shift: float = _DEFAULT.w_shift,
        w_cycle: float = _DEFAULT.w_cycle,
        w_smooth: float = _DEFAULT.w_smooth,
        smooth_kind: str = _DEFAULT.smooth_kind,
        w_magnitude: float = _DEFAULT.w_magnitude,
        w_fold: float = _DEFAULT.w_fold,
        field_sigma: float = _DEFAULT.field_sigma,
        field_downsize: int = _DEFAULT.field_downsize,
        field_brain_margin: float = _DEFAULT.field_brain_margin,
        norm: str = _DEFAULT.norm,
        antisymmetric: bool = _DEFAULT.antisymmetric,
        precision: str = _DEFAULT.precision,
        checkpoint_every: int = _DEFAULT.checkpoint_every,
        seed: int = _DEFAULT.seed,
        **unknown: Any,
    ) -> None:
        settings = {
            name: value for name, value in locals().items()
            if name not in ("self", "unknown", "__class__")
        }
        self.config = FitConfig.from_dict({**settings, **unknown})
        self.net_: SimulatorNet | None = None
        self.classifier_: nn.Module | None = None
        self.margin_: float | None = None
        self.logit_mean_: float | None = None
        self.logit_std_: float | None = None
        self.history_: list[dict[str, float]] = []
        #: ``*_sha256`` digests the loaded file records of what it was fitted for.
        self.provenance_: dict[str, str] = {}

    def fit(
        self,
        classifier: nn.Module,
        data: torch.Tensor | Dataset,
        *,
        run_dir: str | Path | None = None,
        resume: bool = False,
        progress: bool = True,
        device: str | torch.device | None = None,
        bindings: dict[str, str] | None = None,
        swap_in: bool = True,
    ) -> Simulator:
        """Train the simulator for ``classifier`` on ``data`` and return ``self``.

        ``data`` is a tensor (N, 1, *S) or a dataset of ``(image (1, *S), label)`` items,
        preprocessed the way the classifier expects. The classifier is frozen. ``run_dir``,
        ``resume``, ``bindings`` and ``swap_in``: see
        :func:`counterwarp.train.simulator.fit_simulator` (checkpoints are staged and
        swapped into ``run_dir`` only when the fit completes).
        """
        images = _as_image_tensor(data)
        result = fit_simulator(
            classifier, images, self.config, run_dir=run_dir, resume=resume,
            progress=progress, device=device, bindings=bindings, swap_in=swap_in,
        )
        self.net_ = result.net
        self.classifier_ = classifier
        self.margin_ = result.margin
        self.logit_mean_, self.logit_std_ = result.logit_mean, result.logit_std
        self.history_ = result.history
        return self

    def _check_fitted(self) -> tuple[SimulatorNet, nn.Module, float]:
        if self.net_ is None or self.classifier_ is None or self.margin_ is None:
            raise CounterwarpError("the simulator is not fitted: call fit() or load() first")
        return self.net_, self.classifier_, self.margin_

    def explain(self, images: torch.Tensor, direction: str = "inject") -> Explanation:
        """Simulate ``direction`` on ``images`` (B, 1, *S) and measure the change.

        Returns an :class:`Explanation` whose tensors live on the CPU.
        """
        return self.explain_directions(images, (direction,))[direction]

    @torch.no_grad()
    def explain_directions(
        self, images: torch.Tensor, directions: tuple[str, ...] = tuple(DIRECTIONS)
    ) -> dict[str, Explanation]:
        """:meth:`explain` in several directions at once: ``{direction: Explanation}``.

        Faster than one call per direction: the classifier scores the input once and every
        simulated image in one batch, and an antisymmetric simulator (remove = -inject)
        runs its network once for both directions.
        """
        net, classifier, margin = self._check_fitted()
        unknown = [d for d in directions if d not in DIRECTIONS]
        if unknown or not directions:
            raise CounterwarpError(
                f"direction {(unknown or [''])[0]!r} is not one of {', '.join(DIRECTIONS)}"
            )
        expected = tuple(net.config["input_shape"])
        if images.ndim != len(expected) + 2 or tuple(images.shape[2:]) != expected:
            raise CounterwarpError(
                f"images of shape {tuple(images.shape)} do not match the simulator's input "
                f"(B, 1, {', '.join(map(str, expected))}); resample them to that grid first "
                f"(counterwarp.data.preprocess.load_model_input(path, shape) does)"
            )
        device = next(net.parameters()).device
        net.eval()
        x = images.float().to(device)
        b = x.shape[0]
        conditions = {d: torch.full((b,), DIRECTIONS[d], device=device) for d in directions}
        warped = _simulate_directions(net, x, conditions)
        logits = classifier_logits(
            classifier, torch.cat([x, *(warped[d][0] for d in directions)])
        ).float()
        logit_before = logits[:b]
        explanations = {}
        for k, direction in enumerate(directions, start=1):
            simulated, displacement, inverse = warped[direction]
            logit_after = logits[k * b : (k + 1) * b]
            change = log_volume_change(displacement, inverse_displacement=inverse)
            explanations[direction] = Explanation(
                direction=direction,
                image=x.cpu(),
                simulated=simulated.cpu(),
                displacement=displacement.cpu(),
                log_volume_change=change.cpu(),
                logit_before=logit_before.cpu(),
                logit_after=logit_after.cpu(),
                moved=moved_by_margin(
                    logit_before, logit_after, conditions[direction], margin
                ).cpu(),
                folding=folding_fraction(displacement).cpu(),
                margin=margin,
            )
        return explanations

    @torch.no_grad()
    def cycle(self, images: torch.Tensor, direction: str = "inject") -> torch.Tensor:
        """Warp ``images`` (B, 1, *S) in ``direction`` and back again; returns (B, 1, *S).

        The cycle error ``mean((images - cycle(images))**2)`` measures how well the two
        directions invert each other.
        """
        net, _, _ = self._check_fitted()
        if direction not in DIRECTIONS:
            raise CounterwarpError(f"direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
        device = next(net.parameters()).device
        net.eval()
        x = images.float().to(device)
        condition = torch.full((x.shape[0],), DIRECTIONS[direction], device=device)
        simulated = simulate(net, x, condition)[0]
        return simulate(net, simulated, -condition)[0].cpu()

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Write the fitted simulator (weights + JSON-able settings) atomically.

        ``extra``: ``*_sha256`` digests of what it was fitted for (``classifier_sha256``),
        stored in the file and read back into :attr:`provenance_` by :meth:`load`.
        """
        net, _, margin = self._check_fitted()
        extra = dict(extra or {})
        if not all(k.endswith("_sha256") and isinstance(v, str) for k, v in extra.items()):
            raise CounterwarpError(f"simulator extra entries must be '*_sha256' strings: {extra}")
        payload = {
            **extra,
            "format": SIMULATOR_FORMAT,
            "version": SIMULATOR_VERSION,
            "net_config": net.config,
            "fit_config": self.config.to_dict(),
            "margin": margin,
            "logit_mean": self.logit_mean_,
            "logit_std": self.logit_std_,
            "state_dict": net.state_dict(),
        }
        return save_torch_file(path, payload)

    @classmethod
    def load(
        cls, path: str | Path, classifier: nn.Module, map_location: str = "cpu"
    ) -> Simulator:
        """Load a simulator saved by :meth:`save` (``weights_only=True``) for ``classifier``."""
        path = Path(path)
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise CounterwarpError(f"{path}: no simulator here; run `counterwarp fit` first") \
                from None
        except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CounterwarpError(
                f"{path}: cannot be loaded safely as a simulator ({type(error).__name__}); "
                f"only weights-only checkpoints written by counterwarp are accepted"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != SIMULATOR_FORMAT:
            raise CounterwarpError(f"{path}: not a counterwarp simulator file")
        if payload.get("version") != SIMULATOR_VERSION:
            raise CounterwarpError(
                f"{path}: simulator file version {payload.get('version')!r}, this counterwarp "
                f"reads version {SIMULATOR_VERSION}; re-run `counterwarp fit`"
            )
        margin = payload.get("margin")
        if not isinstance(margin, float) or not margin > 0 or margin == float("inf"):
            raise CounterwarpError(f"{path}: invalid margin {margin!r} in simulator file")
        for key in ("logit_mean", "logit_std"):
            value = payload.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, float)):
                raise CounterwarpError(f"{path}: invalid {key} {value!r} in simulator file")
        fit_config, net_config = payload.get("fit_config"), payload.get("net_config")
        if not isinstance(fit_config, dict) or not isinstance(net_config, dict):
            raise CounterwarpError(
                f"{path}: the simulator file lacks its settings (fit_config and net_config must "
                f"be dicts); re-run `counterwarp fit`"
            )
        # Validate every setting (types and ranges) before any network is built.
        try:
            simulator = cls(**fit_config)
        except CounterwarpError as error:
            raise CounterwarpError(f"{path}: invalid simulator settings: {error}") from None
        except (TypeError, ValueError) as error:
            raise CounterwarpError(
                f"{path}: invalid simulator settings ({type(error).__name__}: {error})"
            ) from None
        try:
            net = SimulatorNet.from_config(net_config)
        except CounterwarpError as error:
            raise CounterwarpError(f"{path}: {error}") from None
        try:
            net.load_state_dict(payload["state_dict"])
        except (RuntimeError, KeyError, TypeError, AttributeError) as error:
            detail = " ".join(str(error).split())
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            raise CounterwarpError(
                f"{path}: weights do not match the stored architecture "
                f"({type(error).__name__}: {detail})"
            ) from None
        net.eval()
        simulator.net_ = net
        simulator.classifier_ = freeze(classifier)
        simulator.margin_ = margin
        simulator.logit_mean_ = payload.get("logit_mean")
        simulator.logit_std_ = payload.get("logit_std")
        simulator.provenance_ = {
            key: value for key, value in payload.items()
            if key.endswith("_sha256") and isinstance(value, str)
        }
        return simulator
