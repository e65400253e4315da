"""BatchNorm over the global batch under ``torchrun``: :class:`GlobalBatchNorm`.

While a network trains data-parallel, its BatchNorm layers are swapped for
:class:`GlobalBatchNorm` (:func:`convert_batchnorm`), whose training statistics are those of
the global batch: sums all-reduced over the ranks, gradients flowing through the
reduction. :func:`revert_batchnorm` puts the plain layers back before the weights are saved.
In a single process nothing is swapped. See :mod:`counterwarp.distributed`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from counterwarp.distributed import current
from counterwarp.errors import CounterwarpError

_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _SumOverRanks(torch.autograd.Function):
    """``y = sum over ranks of x`` (every rank gets y); ``dx = sum over ranks of dy``.

    The backward is right because every rank's loss depends on the same ``y``: the
    gradient of the summed losses with respect to one rank's ``x`` is the sum of all ranks'
    ``dy``.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(summed)
        return summed


def _all_reduce_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, differentiably (see :class:`_SumOverRanks`)."""
    return _SumOverRanks.apply(tensor)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all ranks.

    In training mode within a process group the per-channel sum and count, then the sum of
    squared deviations, are all-reduced (differentiably, so gradients flow to every rank's
    inputs as in one process over the global batch); the running statistics are updated
    with the global mean and unbiased variance, identically on every rank. In evaluation
    mode, outside a process group, or with ``synchronize = False`` it is a plain BatchNorm.

    Input ``(B, C, *S)`` with any number of spatial dims; same parameters and buffers as
    :class:`torch.nn.BatchNorm3d` (``state_dict`` keys unchanged).
    """

    original_class: type[_BatchNorm] = nn.BatchNorm3d
    synchronize: bool = True

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise CounterwarpError(f"expected at least 2D input (B, C, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if not (self.training and self.synchronize and current().distributed):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype,
                             device=input.device)
        first = _all_reduce_with_grad(torch.cat([input.sum(dims), count]))
        total = first[-1].detach()
        mean = first[:-1] / total
        centred = input - mean.view(shape)
        variance = _all_reduce_with_grad((centred * centred).sum(dims)) / total
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = variance * (total / (total - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(factor * mean)
                self.running_var.mul_(1 - factor).add_(factor * unbiased)
        return output


def _swap_batchnorm(module: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    """A ``cls`` BatchNorm sharing ``module``'s parameters and buffers (no copies)."""
    new = cls(module.num_features, module.eps, module.momentum, module.affine,
              module.track_running_stats)
    if module.affine:
        new.weight, new.bias = module.weight, module.bias
    new.running_mean, new.running_var = module.running_mean, module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    return new


def _replace(module: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    replaced = swap(module)
    if replaced is not None:
        return replaced
    for name, child in module.named_children():
        module.add_module(name, _replace(child, swap))
    return module


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace (in place) every plain BatchNorm1d/2d/3d by a :class:`GlobalBatchNorm`.

    Parameters and buffers are shared, so optimisers and ``state_dict`` keys are unaffected.
    Returns ``module`` (or the replacement, if ``module`` itself is a BatchNorm).
    """

    def swap(child: nn.Module) -> nn.Module | None:
        if type(child) in _PLAIN_BATCHNORMS:
            new = _swap_batchnorm(child, GlobalBatchNorm)  # type: ignore[arg-type]
            new.original_class = type(child)  # type: ignore[assignment]
            return new
        return None

    return _replace(module, swap)


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_batchnorm` (in place): back to the original BatchNorm classes."""

    def swap(child: nn.Module) -> nn.Module | None:
        if isinstance(child, GlobalBatchNorm):
            return _swap_batchnorm(child, child.original_class)
        return None

    return _replace(module, swap)


@contextlib.contextmanager
def local_batchnorm(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, :class:`GlobalBatchNorm` layers of ``module`` use local statistics.

    For passes where every rank sees the same, whole data (BatchNorm recalibration over the
    training set), so synchronising would only count every image N times.
    """
    layers = [m for m in module.modules() if isinstance(m, GlobalBatchNorm)]
    for layer in layers:
        layer.synchronize = False
    try:
        yield module
    finally:
        for layer in layers:
            layer.synchronize = True
