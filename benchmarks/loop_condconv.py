"""Per-sample-loop CondConv: the baseline that the benchmarks compare against.

The paper's research code (like most public CondConv code) loops over the batch inside
every conditional convolution: for each sample ``b`` it mixes the expert kernels with that
sample's routing weights and runs one ordinary convolution on ``x[b:b+1]``. That costs
``B`` small convolutions (and ``B`` small backward passes) per layer, instead of the one
grouped convolution or the one ``E * C_out`` convolution of
:class:`counterwarp.nn.condconv.CondConv`.

This module lives in ``benchmarks/`` on purpose: the product never uses it. It provides

- :class:`LoopCondConv`, a drop-in replacement of ``CondConv`` (same parameters, same
  routing, same result up to float rounding), and
- :func:`loop_simulator`, which copies a :class:`~counterwarp.nn.simulator.SimulatorNet`
  and swaps every ``CondConv`` for a ``LoopCondConv`` carrying the same weights, and
- :func:`with_impl`, which forces every ``CondConv`` of a network onto one vectorised form.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from counterwarp.nn.condconv import CondConv

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoopCondConv(CondConv):
    """``CondConv`` computed one sample at a time (the reference code's approach).

    Parameters, routing (``routing_weights``) and initialisation are inherited from
    :class:`~counterwarp.nn.condconv.CondConv`, so a state dict moves freely between the
    two; only :meth:`forward` differs.
    """

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Route, then for each sample mix its kernel and convolve it alone.

        Args:
            x: ``(B, C_in, *S)`` features.
            condition: ``(B,)`` or ``(B, cond_dim)`` conditioning values.

        Returns:
            ``(B, C_out, *S)``.
        """
        if x.ndim != self.dim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"LoopCondConv: expected input (B, {self.in_channels}, {self.dim} spatial dims), "
                f"got {tuple(x.shape)}."
            )
        r = self.routing_weights(x, condition)  # (B, E)
        conv = _CONV[self.dim]
        outputs = []
        for b in range(x.shape[0]):
            kernel = torch.einsum("e,e...->...", r[b], self.weight)  # (C_out, C_in, *k)
            bias = r[b] @ self.bias if self.bias is not None else None  # (C_out,)
            outputs.append(conv(x[b : b + 1], kernel, bias, padding="same"))
        return torch.cat(outputs, dim=0)

    @classmethod
    def from_condconv(cls, layer: CondConv) -> LoopCondConv:
        """A ``LoopCondConv`` with ``layer``'s settings and a copy of its weights.

        The copy is on ``layer``'s device and dtype and in its train/eval mode.
        """
        loop = cls(
            layer.in_channels,
            layer.out_channels,
            kernel_size=layer.kernel_size,
            dim=layer.dim,
            num_experts=layer.num_experts,
            cond_dim=layer.cond_dim,
            routing=layer.routing,  # type: ignore[arg-type]
            routing_dropout=layer.route_dropout.p,
            bias=layer.bias is not None,
        )
        loop.to(device=layer.weight.device, dtype=layer.weight.dtype)
        loop.load_state_dict(layer.state_dict())
        loop.impl = "loop"
        loop.train(layer.training)
        return loop


class BoundCondConv(LoopCondConv):
    """Not a CondConv: one ordinary batched convolution with the first expert's kernel.

    No routing, no kernel mixing, no per-sample work: the cheapest any implementation of a
    CondConv layer of this shape could be. A network built from these gives the *bound* of
    the benchmark: the loop baseline's time over the bound's time is the largest speed-up
    that a faster CondConv can bring to the whole step, because everything else in the step
    (normalisation, pooling, upsampling, the warp, the classifier, the losses, the
    optimiser) is the same work in every implementation. Its outputs differ from a CondConv's.
    """

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S) -> (B, C_out, *S)``, ignoring ``condition``."""
        bias = self.bias[0] if self.bias is not None else None
        return _CONV[self.dim](x, self.weight[0], bias, padding="same")

    @classmethod
    def from_condconv(cls, layer: CondConv) -> BoundCondConv:
        bound = super().from_condconv(layer)
        bound.impl = "bound"
        return bound  # type: ignore[return-value]


def bound_simulator(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` with every ``CondConv`` replaced by :class:`BoundCondConv`."""
    bound = copy.deepcopy(net)
    if _replace_condconvs(bound, BoundCondConv) == 0:
        raise ValueError(f"{type(net).__name__} has no CondConv layer to replace.")
    return bound


def _replace_condconvs(net: nn.Module, make: type[LoopCondConv]) -> int:
    """Swap every ``CondConv`` child of ``net`` (recursively) in place; return how many."""
    count = 0
    for name, child in list(net.named_children()):
        if isinstance(child, CondConv) and not isinstance(child, make):
            setattr(net, name, make.from_condconv(child))
            count += 1
        else:
            count += _replace_condconvs(child, make)
    return count


def loop_simulator(net: nn.Module) -> nn.Module:
    """A deep copy of ``net`` whose ``CondConv`` layers loop over the batch.

    Args:
        net: typically a :class:`~counterwarp.nn.simulator.SimulatorNet`; left unchanged.

    Returns:
        The copy, with identical weights (so identical outputs up to float rounding).

    Raises:
        ValueError: if ``net`` holds no ``CondConv`` at all.
    """
    loop = copy.deepcopy(net)
    if _replace_condconvs(loop, LoopCondConv) == 0:
        raise ValueError(f"{type(net).__name__} has no CondConv layer to replace.")
    return loop


def with_impl(net: nn.Module, impl: str) -> nn.Module:
    """Force every ``CondConv`` of ``net`` onto ``impl`` (``"grouped"`` or ``"experts"``).

    ``"auto"`` leaves the per-layer choice made at construction. Changes ``net`` in place
    (the implementations share their parameters) and returns it.
    """
    if impl == "auto":
        return net
    if impl not in ("grouped", "experts"):
        raise ValueError(f"impl must be 'auto', 'grouped' or 'experts', got {impl!r}.")
    for module in net.modules():
        if isinstance(module, CondConv) and not isinstance(module, LoopCondConv):
            module.impl = impl
    return net


def condconv_impls(net: nn.Module) -> list[str]:
    """The implementation of each ``CondConv`` in ``net``, in module order."""
    return [m.impl for m in net.modules() if isinstance(m, CondConv)]
