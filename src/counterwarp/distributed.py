"""Data parallelism under ``torchrun``: the process group, gradient averaging, global BatchNorm.

``counterwarp fit`` and ``counterwarp train-classifier`` (and the API functions behind them)
run unchanged in one process, and in N processes when started by ``torchrun``, which sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. With ``WORLD_SIZE`` unset or 1 everything here is
a no-op and the single-process code path runs exactly as before.

Semantics of an N-process run (``batch_size`` is always the GLOBAL batch):

- every rank draws the same global batch (same seeded generator) and computes on its own
  contiguous slice ``batch[rank * B/N : (rank + 1) * B/N]``; ``B`` must be divisible by N;
- after every ``backward`` the gradients are averaged over the ranks
  (:meth:`ProcessGroup.average_gradients`), so, the losses being means over the batch, the
  averaged gradient is the gradient of the loss over the global batch and an N-process run
  follows a 1-process run with the same global batch (up to float rounding);
- BatchNorm layers of the network being trained are replaced, for the run, by
  :class:`GlobalBatchNorm`, whose training statistics are those of the global batch (sums
  all-reduced over the ranks, with gradients flowing through the reduction), so BatchNorm
  does not make the N-process run differ either;
- every rank ends with the same weights; only rank 0 writes files and shows progress bars.

Why an explicit all-reduce after ``backward`` rather than
:class:`torch.nn.parallel.DistributedDataParallel`: the simulator's joint schedule calls the
network twice (forward warp, then the cycle back on its own output) before one backward,
the alternating schedule uses two optimisers and two backward passes per step, the
simulator also calls network methods other than ``forward`` (``displacements``), and with a
contiguous slice one rank may see only one direction so that parts of a network
(``TwoSimulators`` of the ablation) get no gradient on that rank. DDP's reducer relies on one
forward per backward and on every rank marking the same parameters ready; handling all of
the above would need ``find_unused_parameters``, ``static_graph`` or ``no_sync`` juggling per
schedule. One flat all-reduce of the gradients after each backward is exact in all cases,
costs one collective per backward (the networks here have a few million parameters at most,
so overlapping communication with the backward pass, DDP's advantage, buys little), and
leaves the single-process training loops untouched. BatchNorm is made global with our own
:class:`GlobalBatchNorm` instead of :class:`torch.nn.SyncBatchNorm` because the latter only
runs on GPUs, while the same code here runs (and is tested) on CPU with gloo and on GPU
with NCCL.

Backends: ``cpu:gloo,cuda:nccl`` when CUDA is available (collectives on CUDA tensors use
NCCL, those on CPU tensors gloo), ``gloo`` otherwise. Each rank uses ``cuda:LOCAL_RANK``.

Differences from a 1-process run that remain: float rounding (sums in another order), and
dropout masks (the classifier's), which are drawn per rank from the rank's own random
stream (see ``train_classifier``). Rounding stays at the rounding level except where it
decides a branch: a value that sits exactly on a ReLU's kink in exact arithmetic takes
slope 1 or the leak depending on the sign of its rounding noise, in one process as well
(with another summation order, or in float64). The simulator meets this once: with
``antisymmetric`` and images of mean 0, the background sits exactly at its first
BatchNorm's mean, i.e. on the LeakyReLU's kink while that BatchNorm's bias is still 0, so
the bias's gradient of that one step is arbitrary (see ``tests/test_distributed.py``).
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
from torch import nn

from counterwarp.errors import CounterwarpError

P = ParamSpec("P")
R = TypeVar("R")

RANK_SEED_STRIDE = 104729
"""Rank ``r`` seeds torch's global generator with ``seed + RANK_SEED_STRIDE * r``."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise CounterwarpError(
            f"environment variable {name}={raw!r} is not an integer; it is set by torchrun, "
            f"unset it when not running under torchrun"
        ) from None
    if value < 0:
        raise CounterwarpError(f"environment variable {name}={value} must be >= 0")
    return value


def environment() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` read from ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``.

    Unset variables mean one process: ``(0, 1, 0)``.

    Raises:
        CounterwarpError: a variable that is not a non-negative integer, or a rank outside
            ``0 .. world_size - 1``.
    """
    world_size = max(_env_int("WORLD_SIZE", 1), 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if rank >= world_size:
        raise CounterwarpError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
    return rank, world_size, local_rank


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a data-parallel run; ``ProcessGroup()`` is a single process.

    Every method is a no-op (returns its input) when ``world_size == 1``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and shows progress bars."""
        return self.rank == 0

    def check_batch_size(self, batch_size: int, name: str = "batch_size") -> None:
        """Refuse a global batch that does not split evenly over the ranks."""
        if self.distributed and batch_size % self.world_size != 0:
            raise CounterwarpError(
                f"{name}={batch_size} is the global batch and must be divisible by the number "
                f"of processes ({self.world_size}); use e.g. {name}="
                f"{max(1, batch_size // self.world_size) * self.world_size}"
            )

    def local_slice(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch ``(B, ...)``: ``(B / N, ...)``."""
        if not self.distributed:
            return batch
        size = batch.shape[0] // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace every ``.grad`` by its mean over the ranks (one all-reduce per dtype).

        A parameter without a gradient on some rank counts as a zero gradient there; it
        keeps ``grad = None`` only if no rank has a gradient for it (as in one process,
        where a parameter unused by the whole batch has none and the optimiser skips it).
        """
        if not self.distributed:
            return
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for parameter in parameters:
            if parameter.requires_grad:
                by_dtype.setdefault(parameter.dtype, []).append(parameter)
        for group in by_dtype.values():
            flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in group
                ]
                + [
                    torch.tensor(
                        [p.grad is not None for p in group], dtype=group[0].dtype,
                        device=group[0].device,
                    )
                ]
            )
            torch.distributed.all_reduce(flat)
            present = flat[-len(group):]
            offset = 0
            for index, parameter in enumerate(group):
                values = flat[offset : offset + parameter.numel()].view_as(parameter)
                offset += parameter.numel()
                if present[index] == 0:
                    continue
                values = values / self.world_size
                if parameter.grad is None:
                    parameter.grad = values.clone()
                else:
                    parameter.grad.copy_(values)

    def sum_values(self, *values: float) -> tuple[float, ...]:
        """Python numbers summed over the ranks (float64, via the CPU backend)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return tuple(float(v) for v in tensor)

    def mean_values(self, values: dict[str, float], keys: Iterable[str]) -> dict[str, float]:
        """``values`` with the entries ``keys`` replaced by their mean over the ranks.

        With equal slices the mean of per-rank batch means is the global batch mean.
        """
        if not self.distributed:
            return values
        names = list(keys)
        summed = self.sum_values(*(values[name] for name in names))
        return {**values, **{n: s / self.world_size for n, s in zip(names, summed, strict=True)}}

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` (in place) with rank 0's and return it."""
        if self.distributed:
            torch.distributed.broadcast(tensor, src=0)
        return tensor

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (in place)."""
        if not self.distributed:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order."""
        if not self.distributed:
            return [tensor]
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, tensor.contiguous())
        return gathered

    def seed_per_rank(self, seed: int) -> None:
        """Give each rank its own stream of torch's global random numbers (dropout masks).

        Called after the network is initialised (identically on every rank). With one
        stream for all ranks, sample ``j`` of every rank's slice would get the same mask.
        """
        if self.distributed:
            torch.manual_seed(seed + RANK_SEED_STRIDE * self.rank)

    def barrier(self) -> None:
        """Wait until every rank got here (an all-reduce of one CPU number)."""
        if self.distributed:
            torch.distributed.all_reduce(torch.zeros(1))


def current() -> ProcessGroup:
    """The running process group, or a single process when none is initialised."""
    if not _initialized():
        return ProcessGroup()
    rank = torch.distributed.get_rank()
    local_rank = _env_int("LOCAL_RANK", rank)
    return ProcessGroup(rank, torch.distributed.get_world_size(), local_rank)


def is_main() -> bool:
    """True on rank 0 of a running group, or (no group) when ``RANK`` is unset or 0."""
    if _initialized():
        return torch.distributed.get_rank() == 0
    return environment()[0] == 0


def barrier() -> None:
    """Wait for every rank of the running group (no-op in a single process)."""
    current().barrier()


def init() -> ProcessGroup:
    """Join the process group that ``torchrun`` describes in the environment.

    No-op (returns the running group, or a single process) when a group is already
    initialised or ``WORLD_SIZE`` is unset or 1. Picks NCCL for CUDA tensors and gloo for CPU
    tensors, and makes ``cuda:LOCAL_RANK`` the current CUDA device. The group stays up
    until the process exits (joining a second time in one process can hang on torchrun's
    rendezvous store), so a script may call several training functions in a row.
    """
    if _initialized():
        return current()
    rank, world_size, local_rank = environment()
    if world_size == 1:
        return ProcessGroup()
    if not torch.distributed.is_available():
        raise CounterwarpError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
    atexit.register(destroy)
    return current()


def destroy() -> None:
    """Leave the process group (no-op when none is initialised)."""
    if _initialized():
        torch.distributed.destroy_process_group()


def in_process_group(function: Callable[P, R]) -> Callable[P, R]:
    """Decorator: run ``function`` inside the torchrun process group, if there is one.

    Joins the group described by the environment when needed (see :func:`init`) and,
    after a successful call, waits for every rank, so that rank 0 has written its files
    when any rank returns.
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        group = init()
        result = function(*args, **kwargs)
        group.barrier()
        return result

    return wrapper


def local_device(device: str | torch.device | None) -> str | torch.device | None:
    """The device this rank should use for ``device``.

    In a single process ``device`` is returned unchanged. Under torchrun with CUDA, ``None``
    and a bare ``"cuda"`` become ``cuda:LOCAL_RANK`` (an explicit ``cuda:N`` or ``cpu`` is
    kept), so N ranks on one node use N GPUs.
    """
    group = current()
    if not group.distributed or not torch.cuda.is_available():
        return device
    try:
        requested = None if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        return device  # an unknown name: the caller's check reports it
    if requested is None or (requested.type == "cuda" and requested.index is None):
        return torch.device("cuda", group.local_rank % torch.cuda.device_count())
    return device
