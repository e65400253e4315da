"""Training loop of the conditional warping simulator (``docs/method.md``).

The classifier is frozen (eval mode, ``requires_grad`` off) but gradients flow through it
into the simulator. Training images are split by the classifier's *own* prediction:
images it calls diseased teach "remove" (condition -1), images it calls healthy teach
"inject" (condition +1). Every batch holds both directions, one condition per sample. The
objective and its two schedules (``joint``, ``alternating``) are in
:mod:`counterwarp.train.steps`.

Checkpoints (``simulator_checkpoint.pt``, :mod:`counterwarp.train.checkpoint`) are written
atomically every ``checkpoint_every`` steps and hold the model, the optimisers, the step and
every random state, so a resumed run reaches the same weights as an uninterrupted one. They
and the log are written into the run's hidden ``.fit-staging`` folder and swapped into the
run only when the fit completes (:mod:`counterwarp.train.staging`): a fit that fails (a NaN, a
full disk, an exception) or is killed leaves the run's files as they were, and its progress
staged, where ``resume`` finds it.

Under ``torchrun`` (see :mod:`counterwarp.distributed`) ``batch_size`` is the global batch:
every rank draws it and trains on its contiguous slice, gradients are averaged after each
backward, BatchNorm uses global statistics, the logged values are global means, and only
rank 0 writes the checkpoint and the log (all ranks resume from the same checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from counterwarp import distributed, global_batchnorm
from counterwarp.errors import CounterwarpError
from counterwarp.nn.classifier import freeze, predict_in_batches
from counterwarp.nn.simulator import SimulatorNet
from counterwarp.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    LOG_NAME,
    load_checkpoint,
    random_state,
    restore_checkpoint,
    resume_source,
    write_log,
)
from counterwarp.train.config import FitConfig
from counterwarp.train.staging import FIT_STAGING, Staging, disk_errors, save_torch_file
from counterwarp.train.steps import (
    LOSS_KEYS,
    LossTerms,
    balanced_batch,
    non_finite_message,
    train_step,
)

__all__ = [
    "FitResult",
    "build_net",
    "fit_simulator",
    "learning_rate",
    "to_training_layout",
]


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

    ``net_factory`` replaces :class:`SimulatorNet` (same arguments; ``antisymmetric`` and
    ``field_downsize`` are passed only when set, so factories without those options work in
    the paper's form).
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
        **({"field_downsize": config.field_downsize} if config.field_downsize > 1 else {}),
        **({"brain_margin": config.field_brain_margin} if config.field_brain_margin > 0
           else {}),
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
    bindings: dict[str, str] | None = None,
    swap_in: bool = True,
) -> FitResult:
    """Train a conditional simulator that injects/removes what ``classifier`` reads as disease.

    Args:
        classifier: any module mapping (B, 1, *S) to (B,) or (B, 1) logits; frozen here.
        images: (N, 1, *S) float32 training images, preprocessed as the classifier expects.
        config: settings (defaults: :class:`FitConfig`).
        run_dir: folder for checkpoints and the per-step CSV log (None: keep nothing). They
            are written into ``run_dir/.fit-staging`` and moved into ``run_dir`` only when
            the fit completes, so a fit that fails or is killed changes no file of
            ``run_dir``; its progress stays staged for ``resume``.
        resume: continue from the staged checkpoint of an interrupted fit, else from
            ``run_dir/simulator_checkpoint.pt``, when one exists (see
            :func:`~counterwarp.train.checkpoint.resume_source`).
            Every setting must match the checkpoint's, except a larger ``steps`` with the
            constant learning rate, which extends the fit.
        progress: show a tqdm progress bar with the losses and the moved-by-margin share.
        device: torch device (default: CUDA when available, else CPU; under torchrun
            ``cuda:LOCAL_RANK``).
        on_step: called after every step with ``(step, logged values)`` (tests, callbacks).
        net_factory: builds the network instead of :class:`SimulatorNet`, called with the
            same arguments (e.g. ``TwoSimulators`` for the ablation of two separate
            unconditional simulators).
        bindings: digests of what the fit is made from (``{"classifier_sha256": ...}``),
            stored in every checkpoint; resuming from a checkpoint that records another
            value is refused.
        swap_in: move the finished fit's checkpoint and log into ``run_dir``; False leaves
            them staged (``Staging(run_dir, FIT_STAGING)``) for the caller, which adds its
            own files and commits them together.

    Raises:
        CounterwarpError: bad settings or images, a resume refused, a loss that became
            NaN/Inf (naming the value and the likely setting), a full disk.

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
        net = global_batchnorm.convert_batchnorm(net)
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
    staging: Staging | None = None
    if run_path is not None:
        run_path.mkdir(parents=True, exist_ok=True)
        staging = Staging(run_path, FIT_STAGING)
        if group.is_main:
            staging.recover()  # a swap a killed fit left half done
        group.barrier()
        source = resume_source(run_path) if resume else None
        if group.is_main:  # a fresh fit (or one resumed from the run's checkpoint) starts clean
            staging.start(keep=source is not None and source.parent == staging.folder)
        if source is not None:
            start_step, history = restore_checkpoint(
                source, config, dict(bindings or {}), net, main_opt, cycle_opt, sampler, group
            )

    terms = LossTerms(net, classifier, config, margin)
    average_gradients = (
        (lambda: group.average_gradients(net.parameters())) if group.distributed else None
    )
    all_logits = logits.to(device)
    images_on_device = images.to(device)

    def save_checkpoint(step: int) -> None:
        if run_path is None:
            return
        if not all(torch.isfinite(t).all() for t in net.state_dict().values()
                   if t.is_floating_point()):  # a finite loss, then an update that blew up
            raise CounterwarpError(
                non_finite_message({}, {"weights": False}, config, margin, step - 1)
                + _kept_after_failure(run_path, staging)
            )
        payload: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "fit_config": config.to_dict(),
            "net_config": net.config,
            "margin": margin,
            "state_dict": net.state_dict(),
            "optimizer": main_opt.state_dict(),
            "random_state": random_state(sampler),
        }
        if group.distributed:  # a collective: every rank takes part
            payload["random_state"]["torch_by_rank"] = group.all_gather(torch.get_rng_state())
        if cycle_opt is not None:
            payload["cycle_optimizer"] = cycle_opt.state_dict()
        payload.update(bindings or {})
        if not group.is_main:
            group.barrier()  # returns once rank 0 has written the checkpoint
            return
        assert staging is not None
        note = (f"the run folder {run_path} is unchanged; this fit's progress is kept in "
                f"{staging.folder} (`--resume` continues from it; delete it to free space)")
        # the log first: a kill between the two keeps every row (resume drops extra rows)
        with disk_errors(run_path / LOG_NAME, note):
            write_log(staging / LOG_NAME, history)
        with disk_errors(run_path / CHECKPOINT_NAME, note):
            save_torch_file(staging / CHECKPOINT_NAME, payload)
        group.barrier()

    net.train()
    bar = tqdm(
        range(start_step, config.steps), initial=start_step, total=config.steps,
        desc="fit simulator", disable=not progress, dynamic_ncols=True,
    )
    started = time.perf_counter()
    for step in bar:
        index, condition = balanced_batch(
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
        values = train_step(terms, config, main_opt, cycle_opt, batch, condition,
                             logit_before, step, after_backward=average_gradients)
        values = group.mean_values(values, values.keys())
        values.update(step=step + 1, lr=lr, seconds=time.perf_counter() - started)
        if not all(math.isfinite(values[k]) for k in LOSS_KEYS):
            raise CounterwarpError(
                non_finite_message(values, terms.finite_checks(), config, margin, step)
                + _kept_after_failure(run_path, staging)
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
    if start_step == config.steps:  # resumed at the end: stage the run's state as it is
        save_checkpoint(config.steps)
    if staging is not None and swap_in and group.is_main:
        staging.commit([LOG_NAME, CHECKPOINT_NAME])
    group.barrier()
    if group.distributed:
        net = global_batchnorm.revert_batchnorm(net)
    net.eval()
    return FitResult(net, config, margin, logit_mean, logit_std, history)


def _kept_after_failure(run_path: Path | None, staging: Staging | None) -> str:
    """What a failed fit leaves behind, for its error message."""
    if run_path is None or staging is None:
        return ""
    checkpoint = staging / CHECKPOINT_NAME
    if checkpoint.is_file():
        with contextlib.suppress(CounterwarpError):
            step = load_checkpoint(checkpoint).get("step")
            return (f"; the run folder {run_path} is unchanged, and the last good checkpoint "
                    f"(step {step}) is kept in {staging.folder} for --resume")
    return (f"; the run folder {run_path} is unchanged (this fit had not written a "
            f"checkpoint yet)")


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

