"""Training loop of the conditional warping simulator (METHOD.md).

The classifier is frozen (eval mode, ``requires_grad`` off) but gradients flow through it
into the simulator. Training images are split by the classifier's *own* prediction:
images it calls diseased teach "remove" (condition -1), images it calls healthy teach
"inject" (condition +1). Every batch holds both directions, one condition per sample.

Two schedules:
- ``joint`` (default): one Adam optimiser on
  ``w_shift * L_shift + w_cycle * L_cycle + w_smooth * L_smooth + w_magnitude * L_magnitude``;
- ``alternating`` (the paper's): one optimiser steps on the shift and regularisers, a second
  one (after ``cycle_warmup`` steps) on the cycle loss, on every batch.

Checkpoints (``simulator_checkpoint.pt``) are written atomically every ``checkpoint_every``
steps and hold the model, the optimisers, the step and every random state, so a resumed run
reaches the same weights as an uninterrupted one.

Under ``torchrun`` (see :mod:`counterwarp.distributed`) ``batch_size`` is the global batch:
every rank draws it and trains on its contiguous slice, gradients are averaged after each
backward, BatchNorm uses global statistics, the logged values are global means, and only
rank 0 writes the checkpoint and the log (all ranks resume from the same checkpoint).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from counterwarp import distributed
from counterwarp._io import save_torch_atomic, write_text_atomic
from counterwarp.errors import CounterwarpError
from counterwarp.geometry.warp import warp
from counterwarp.losses import (
    cycle_loss,
    displacement_magnitude_loss,
    folding_penalty,
    logit_shift_loss,
    moved_by_margin,
    smoothness_loss,
)
from counterwarp.nn.simulator import SimulatorNet
from counterwarp.train.config import FitConfig

CHECKPOINT_NAME = "simulator_checkpoint.pt"
LOG_NAME = "simulator_log.csv"
LOG_COLUMNS = (
    "step", "loss", "shift", "cycle", "smooth", "magnitude", "moved_share", "lr", "seconds",
)
INJECT = 1.0
REMOVE = -1.0
@dataclass
class FitResult:
    """What :func:`fit_simulator` returns."""

    net: SimulatorNet
    config: FitConfig
    margin: float
    logit_mean: float
    logit_std: float
    history: list[dict[str, float]] = field(default_factory=list)


def build_net(
    config: FitConfig, spatial_shape: tuple[int, ...],
    net_factory: Callable[..., nn.Module] | None = None,
) -> nn.Module:
    """The untrained simulator network a fit with ``config`` starts from (on the CPU).

    ``net_factory`` replaces :class:`SimulatorNet` (same arguments; ``antisymmetric`` is
    passed only when set, so factories without that option work in the paper's form).
    """
    return (net_factory or SimulatorNet)(
        spatial_shape,
        field=config.field,
        channels=config.channels,
        latent_dim=config.latent_dim,
        num_experts=config.num_experts,
        routing=config.routing,
        smoothing_sigma=config.field_sigma,
        norm=config.norm,
        **({"antisymmetric": True} if config.antisymmetric else {}),
    )


def to_training_layout(module: nn.Module, config: FitConfig, spatial_dims: int) -> nn.Module:
    """``module`` in the memory layout a fit trains in, changed in place (like ``.to``).

    3D networks of a bf16 fit use channels-last memory: measured on a 2-core AMX CPU at 64^3
    batch 4 (``docs/performance.md``) it makes a bf16 training step 13-16 % faster, and a
    float32 one anywhere from 5 % faster to 2 % slower, so float32 keeps the default layout.
    """
    if config.precision == "bf16" and spatial_dims == 3:
        return module.to(memory_format=torch.channels_last_3d)
    return module


def classifier_logits(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Apply ``classifier`` and return logits of shape (B,).

    Accepts any module mapping ``(B, 1, *S)`` to ``(B,)`` or ``(B, 1)``; anything else is a
    :class:`CounterwarpError` that says what shape was returned.
    """
    output = classifier(images)
    batch = images.shape[0]
    if not isinstance(output, torch.Tensor):
        raise CounterwarpError(
            f"the classifier returned {type(output).__name__}; it must return a tensor of "
            f"logits with shape (B,) or (B, 1)"
        )
    if output.shape == (batch,):
        return output
    if output.shape == (batch, 1):
        return output[:, 0]
    raise CounterwarpError(
        f"the classifier returned shape {tuple(output.shape)} for a batch of {batch}; "
        f"it must return one logit per image, shape ({batch},) or ({batch}, 1)"
    )


def freeze(classifier: nn.Module) -> nn.Module:
    """Put ``classifier`` in eval mode and turn off its parameters' gradients (in place)."""
    classifier.eval()
    for parameter in classifier.parameters():
        parameter.requires_grad_(False)
    return classifier


@torch.no_grad()
def predict_in_batches(
    classifier: nn.Module, images: torch.Tensor, batch_size: int = 32
) -> torch.Tensor:
    """Logits (N,) of ``images`` (N, 1, *S), computed in batches without gradients."""
    device = _module_device(classifier)
    chunks = [
        classifier_logits(classifier, images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def _module_device(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


def simulate(
    net: SimulatorNet, images: torch.Tensor, condition: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Warp ``images`` (B, 1, *S) in direction ``condition`` (B,) of +-1.

    Returns ``(simulated (B,1,*S), displacement (B,d,*S) voxels, inverse displacement or
    None, raw field)``.
    """
    raw = net(images, condition)
    with torch.autocast(device_type=raw.device.type, enabled=False):  # geometry in float32
        displacement, inverse = net.displacements(raw.float())
        return warp(images.float(), displacement), displacement, inverse, raw


class _LossTerms:
    """Computes every term of the objective for one batch."""

    def __init__(
        self, net: SimulatorNet, classifier: nn.Module, config: FitConfig, margin: float
    ) -> None:
        self.net = net
        self.classifier = classifier
        self.config = config
        self.margin = margin

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
        return {
            "cycle": cycle_loss(images, cycled),
            **self.regulariser(back_displacement),
        }


def _balanced_batch(
    inject_pool: torch.Tensor, remove_pool: torch.Tensor, batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and conditions of one batch: half inject, half remove when both exist."""
    pools = [(p, c) for p, c in ((inject_pool, INJECT), (remove_pool, REMOVE)) if len(p) > 0]
    per_pool = [batch_size // len(pools)] * len(pools)
    per_pool[0] += batch_size - sum(per_pool)
    indices, conditions = [], []
    for (pool, condition), count in zip(pools, per_pool, strict=True):
        picks = torch.randint(len(pool), (count,), generator=generator)
        indices.append(pool[picks])
        conditions.append(torch.full((count,), condition))
    return torch.cat(indices), torch.cat(conditions)


def _random_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state(), "sampler": generator.get_state()}


def _restore_random_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])


def _restore_rank_random_state(
    state: dict[str, Any], group: distributed.ProcessGroup, config: FitConfig, step: int
) -> None:
    """Each rank's own torch random state from a checkpoint of a distributed run.

    A checkpoint written by another number of processes has no state for this rank: the
    rank then gets a fresh stream (the run continues correctly, though not bit-exactly as
    an uninterrupted one would).
    """
    by_rank = state.get("torch_by_rank")
    if isinstance(by_rank, list) and len(by_rank) == group.world_size:
        torch.set_rng_state(by_rank[group.rank])
    else:
        group.seed_per_rank(config.seed + step)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a simulator checkpoint with ``weights_only=True`` (never unpickles code)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CounterwarpError(f"{path}: no such checkpoint") from None
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CounterwarpError(
            f"{path}: not a loadable counterwarp checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); delete it or re-run "
            f"without --resume"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != "counterwarp.simulator":
        raise CounterwarpError(f"{path}: not a counterwarp simulator checkpoint")
    return payload


def _read_log(path: Path, up_to_step: int) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [
            {k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)
            if int(float(row["step"])) <= up_to_step
        ]
    return rows


def _write_log(path: Path, rows: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _format(row[k]) for k in LOG_COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"


@distributed.in_process_group
def fit_simulator(
    classifier: nn.Module,
    images: torch.Tensor,
    config: FitConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    net_factory: Callable[..., nn.Module] | None = None,
) -> FitResult:
    """Train a conditional simulator that injects/removes what ``classifier`` reads as disease.

    Args:
        classifier: any module mapping (B, 1, *S) to (B,) or (B, 1) logits; frozen here.
        images: (N, 1, *S) float32 training images, preprocessed as the classifier expects.
        config: settings (defaults: :class:`FitConfig`).
        run_dir: folder for checkpoints and the per-step CSV log (None: keep nothing).
        resume: continue from ``run_dir/simulator_checkpoint.pt`` when it exists.
        progress: show a tqdm progress bar with the losses and the moved-by-margin share.
        device: torch device (default: CUDA when available, else CPU; under torchrun
            ``cuda:LOCAL_RANK``).
        on_step: called after every step with ``(step, logged values)`` (tests, callbacks).
        net_factory: builds the network instead of :class:`SimulatorNet`, called with the
            same arguments (e.g. ``TwoSimulators`` for the ablation of two separate
            unconditional simulators).

    Returns:
        A :class:`FitResult` with the trained network (eval mode) and the derived margin.
    """
    config = config or FitConfig()
    config.validate()
    if images.ndim not in (4, 5) or images.shape[1] != 1:
        raise CounterwarpError(
            f"training images must have shape (N, 1, *S) with 2 or 3 spatial dims, got "
            f"{tuple(images.shape)}"
        )
    if images.shape[0] < 2:
        raise CounterwarpError("need at least 2 training images to fit a simulator")
    group = distributed.current()
    group.check_batch_size(config.batch_size)
    progress = progress and group.is_main
    device = distributed.local_device(device)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    classifier = freeze(classifier).to(device)
    torch.manual_seed(config.seed)

    logits = group.broadcast_(predict_in_batches(classifier, images))  # same pools everywhere
    if not torch.isfinite(logits).all():
        raise CounterwarpError("the classifier returned NaN/Inf logits on the training images")
    logit_mean, logit_std = float(logits.mean()), float(logits.std())
    margin = config.margin if config.margin is not None else config.margin_sd * logit_std
    if not margin > 0:
        raise CounterwarpError(
            "the classifier's logits on the training images are constant: cannot derive a "
            "margin; pass --margin explicitly or check the classifier"
        )
    inject_pool = torch.nonzero(logits <= 0).flatten()
    remove_pool = torch.nonzero(logits > 0).flatten()

    spatial_shape = tuple(images.shape[2:])
    net = build_net(config, spatial_shape, net_factory).to(device)
    if group.distributed:
        net = distributed.convert_batchnorm(net)
        group.broadcast_module(net)
        group.seed_per_rank(config.seed)  # own dropout masks per rank
    net = to_training_layout(net, config, len(spatial_shape))
    classifier = to_training_layout(classifier, config, len(spatial_shape))
    main_opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    cycle_opt = (
        torch.optim.Adam(net.parameters(), lr=config.lr / 2, weight_decay=config.weight_decay)
        if config.schedule == "alternating"
        else None
    )
    sampler = torch.Generator().manual_seed(config.seed)
    start_step = 0
    run_path = Path(run_dir) if run_dir is not None else None
    history: list[dict[str, float]] = []
    if run_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        checkpoint_path = run_path / CHECKPOINT_NAME
        if resume and checkpoint_path.exists():
            state = load_checkpoint(checkpoint_path)
            if not isinstance(state.get("fit_config"), dict):
                raise CounterwarpError(
                    f"{checkpoint_path}: damaged checkpoint (no settings); delete it or start "
                    f"a new run folder"
                )
            try:
                saved = FitConfig.from_dict(state["fit_config"])
            except (CounterwarpError, TypeError, ValueError) as error:
                raise CounterwarpError(
                    f"{checkpoint_path}: damaged settings ({error}); delete it or start a new "
                    f"run folder"
                ) from None
            if saved.to_dict() != config.to_dict():
                raise CounterwarpError(
                    f"{checkpoint_path} was written with other settings; resume with the same "
                    f"settings or start a new run folder"
                )
            start_step = state.get("step")
            if not isinstance(start_step, int) or not 0 <= start_step <= config.steps:
                raise CounterwarpError(
                    f"{checkpoint_path}: step {start_step!r} is not within 0..{config.steps}; "
                    f"delete the checkpoint or start a new run folder"
                )
            try:
                net.load_state_dict(state["state_dict"])
                main_opt.load_state_dict(state["optimizer"])
                if cycle_opt is not None:
                    cycle_opt.load_state_dict(state["cycle_optimizer"])
                _restore_random_state(state["random_state"], sampler)
                if group.distributed:
                    _restore_rank_random_state(state["random_state"], group, config, start_step)
            except (KeyError, TypeError, ValueError, RuntimeError) as error:
                message = " ".join(str(error).split())[:200]
                raise CounterwarpError(
                    f"{checkpoint_path}: damaged checkpoint ({type(error).__name__}: "
                    f"{message}); delete it or start a new run folder"
                ) from None
            history = _read_log(run_path / LOG_NAME, start_step)
        elif not resume and group.is_main:
            for stale in (checkpoint_path, run_path / LOG_NAME):
                stale.unlink(missing_ok=True)

    terms = _LossTerms(net, classifier, config, margin)
    average_gradients = (
        (lambda: group.average_gradients(net.parameters())) if group.distributed else None
    )
    all_logits = logits.to(device)
    images_on_device = images.to(device)

    def save_checkpoint(step: int) -> None:
        if run_path is None:
            return
        payload: dict[str, Any] = {
            "format": "counterwarp.simulator",
            "step": step,
            "fit_config": config.to_dict(),
            "net_config": net.config,
            "margin": margin,
            "state_dict": net.state_dict(),
            "optimizer": main_opt.state_dict(),
            "random_state": _random_state(sampler),
        }
        if group.distributed:  # a collective: every rank takes part
            payload["random_state"]["torch_by_rank"] = group.all_gather(torch.get_rng_state())
        if cycle_opt is not None:
            payload["cycle_optimizer"] = cycle_opt.state_dict()
        if not group.is_main:
            group.barrier()  # returns once rank 0 has written the checkpoint
            return
        # the log first: a kill between the two keeps every row (resume drops extra rows)
        _write_log(run_path / LOG_NAME, history)
        save_torch_atomic(run_path / CHECKPOINT_NAME, payload)
        group.barrier()

    net.train()
    bar = tqdm(
        range(start_step, config.steps), initial=start_step, total=config.steps,
        desc="fit simulator", disable=not progress, dynamic_ncols=True,
    )
    started = time.perf_counter()
    for step in bar:
        index, condition = _balanced_batch(
            inject_pool, remove_pool, config.batch_size, sampler
        )
        index, condition = group.local_slice(index), group.local_slice(condition)
        batch = images_on_device[index]
        condition = condition.to(device)
        logit_before = all_logits[index]
        lr = learning_rate(config, step)
        for optimiser, base in ((main_opt, 1.0), (cycle_opt, 0.5)):
            if optimiser is not None:
                for param_group in optimiser.param_groups:
                    param_group["lr"] = base * lr
        values = _train_step(terms, config, main_opt, cycle_opt, batch, condition,
                             logit_before, step, after_backward=average_gradients)
        values = group.mean_values(values, values.keys())
        values.update(step=step + 1, lr=lr, seconds=time.perf_counter() - started)
        if not all(math.isfinite(values[k]) for k in ("loss", "shift", "cycle")):
            raise CounterwarpError(
                f"the simulator loss became NaN/Inf at step {step + 1}; the last good "
                f"checkpoint is kept; lower --lr or raise the regularisation weights"
            )
        history.append(values)
        if on_step is not None:
            on_step(step + 1, values)
        bar.set_postfix(
            shift=f"{values['shift']:.3f}", cyc=f"{values['cycle']:.3f}",
            moved=f"{values['moved_share']:.2f}",
        )
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(step + 1)
    bar.close()
    if group.distributed:
        net = distributed.revert_batchnorm(net)
    net.eval()
    return FitResult(net, config, margin, logit_mean, logit_std, history)


def learning_rate(config: FitConfig, step: int) -> float:
    """Learning rate of the main optimiser at 0-based ``step`` (the cycle optimiser of the
    alternating schedule uses half of it).

    ``"constant"``: ``config.lr``. ``"cosine"``: decays along half a cosine from
    ``config.lr`` at step 0 to 0 after the last step, so the field settles instead of
    jittering at the end of training. A pure function of the step, so a resumed run uses
    the same rates as an uninterrupted one.
    """
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / config.steps))


def _train_step(
    terms: _LossTerms,
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
        main_opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        main_opt.step()
        cycle_value = float(back["cycle"].detach())
    else:
        smooth, magnitude = forward["smooth"], forward["magnitude"]
        loss = config.w_shift * forward["shift"] + forward["regulariser"]
        main_opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        main_opt.step()
        if step >= config.cycle_warmup:
            with terms.autocast(images.device):
                simulated = simulate(terms.net, images, condition)[0]
            back = terms.cycle_terms(images, simulated, condition)
            cycle_total = config.w_cycle * back["cycle"]
            cycle_opt.zero_grad(set_to_none=True)
            cycle_total.backward()
            if after_backward is not None:
                after_backward()
            cycle_opt.step()
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
