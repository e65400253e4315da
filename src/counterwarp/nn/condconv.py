"""Conditional convolution (CondConv, Yang et al. 2019) with a conditioning vector.

A :class:`CondConv` layer holds ``E`` expert kernels ``W_1..W_E`` (and biases). Per sample
``b`` it computes routing weights ``r_b = sigmoid(FC([GAP(x_b), c_b]))`` in ``(0, 1)^E`` and
convolves ``x_b`` with the mixed kernel ``sum_e r_be W_e`` (bias ``sum_e r_be b_e``).
The condition ``c`` (here the direction of the simulation, -1 or +1) therefore changes
every layer's kernel, so one network can hold two behaviours.

Two equivalent implementations, neither of which loops over the batch:

- ``impl="grouped"``: mix the kernels per sample, fold the batch into the channel axis and
  run one grouped convolution with ``groups=B``. Costs one convolution.
- ``impl="experts"``: run all ``E`` experts as one ordinary convolution with ``E * C_out``
  output channels, then mix the expert outputs with ``r`` (valid because convolution is
  linear in the kernel). Costs ``E`` convolutions but uses the best-tuned conv path.

Which is faster depends on the layer. Measured on 2 CPU cores (torch 2.13, oneDNN, E = 3,
forward + backward, 32^3 batch 8): 16 -> 32 channels grouped 109 ms vs experts 375 ms, 1 -> 16
grouped 38 ms vs 107 ms, but 16 -> 3 (a displacement head) grouped 168 ms vs experts 53 ms:
oneDNN's grouped kernels are slow when a group has few output channels (the ratios held at
64^3 batch 4 and on a busy machine; the absolute times did not). The default
``impl="auto"`` therefore picks ``"experts"`` for layers with fewer than
:data:`AUTO_EXPERTS_BELOW` output channels and ``"grouped"`` otherwise.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from counterwarp.errors import CounterwarpError

Routing = Literal["features+condition", "condition"]
Impl = Literal["auto", "grouped", "experts"]

ROUTINGS: tuple[str, ...] = ("features+condition", "condition")
IMPLS: tuple[str, ...] = ("auto", "grouped", "experts")
#: ``impl="auto"`` uses the per-expert form for layers with fewer output channels than this.
AUTO_EXPERTS_BELOW = 8

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


#: PyTorch (torch 2.13, ``ConvUtils.h``) sends a float32 CPU convolution with one image,
#: ``groups=1`` and a 3x3 kernel to its slow reference kernel unless ``N * C * D * H`` of
#: the input exceeds this; a batch of two goes to oneDNN.
_ONEDNN_MIN_SINGLE_IMAGE = 20480


def _split_depth_is_faster(x: torch.Tensor, kernel_size: int) -> bool:
    """Whether a one-image float32 3D convolution on the CPU should run as two halves.

    PyTorch runs a small single-image convolution on its slow reference kernel
    (:data:`_ONEDNN_MIN_SINGLE_IMAGE`). Measured with torch 2.13.0+cpu on 2 cores: a
    ``(1, 16, 32, 32, 32)`` input to 32 channels takes 32-41 ms, as two depth halves
    3.1 ms; ``(1, 64, 16, 16, 16)`` to 32 channels 7.8 ms against 1.3 ms. A single input
    channel stays (the reference kernel is the faster one there).
    """
    return (
        x.ndim == 5 and x.shape[0] == 1 and x.shape[1] > 1 and x.device.type == "cpu"
        and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        and kernel_size in (1, 3) and x.shape[2] % 2 == 0 and x.shape[2] >= 2 * kernel_size
        and x.shape[1] * x.shape[2] * x.shape[3] <= _ONEDNN_MIN_SINGLE_IMAGE
    )


def _conv3d_split_depth(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: int
) -> torch.Tensor:
    """``conv3d(x, weight, bias, padding="same")`` for ``x`` (1, C_in, D, H, W), computed
    as a batch of the two depth halves, each with its ``kernel_size // 2`` halo: the same
    numbers (up to float rounding), on PyTorch's fast batched path."""
    halo = kernel_size // 2
    depth = x.shape[2]
    padded = F.pad(x, (0, 0, 0, 0, halo, halo))
    half = depth // 2
    halves = torch.cat([padded[:, :, : half + 2 * halo], padded[:, :, half:]])
    y = F.conv3d(halves, weight, bias, padding=(0, halo, halo))  # (2, C_out, D/2, H, W)
    return torch.cat([y[:1], y[1:]], dim=2)


def _bf16_weight_gradient_unreliable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a 3D convolution of ``x`` would run in bf16 on the CPU with a first spatial
    size of at most 2, where oneDNN's bf16 weight gradient is wrong.

    Measured with torch 2.13.0+cpu (plain and grouped ``conv3d``, 3^3 kernel, padding 1,
    either memory format): the weight gradient of a ``(2, 4, 4)`` or ``(2, 2, 2)`` input
    differs from the float32 one by 70-100 % (up to Inf/NaN), while ``(3, 3, 3)``,
    ``(4, 4, 2)`` and larger agree to 0.4 %; the input gradient is right everywhere. The
    deepest level of a 32^3 U-Net is 2^3, so such layers run in float32 (they are tiny).
    """
    return (
        x.ndim == 5 and x.shape[2] <= 2 and x.device.type == "cpu"
        and weight.requires_grad and torch.is_grad_enabled()
        and (x.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        ))
    )


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CounterwarpError(f"CondConv: {name} must be a positive integer, got {value!r}.")
    return value


class CondConv(nn.Module):
    """Conditionally parameterised convolution with ``'same'`` padding and stride 1.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: cubic kernel edge length ``k`` (any positive int; odd is usual).
        dim: number of spatial dimensions (1, 2 or 3).
        num_experts: ``E``, the number of expert kernels mixed per sample.
        cond_dim: length of the condition vector per sample.
        routing: ``"features+condition"`` routes on ``[GAP(x), c]``; ``"condition"`` on ``c``
            only (then the kernel depends on the condition alone).
        routing_dropout: dropout probability applied to the routing input (training only).
        bias: whether the experts carry biases.
        impl: ``"grouped"``, ``"experts"`` or ``"auto"`` (default: ``"experts"`` if
            ``out_channels < AUTO_EXPERTS_BELOW``, else ``"grouped"``); every form gives
            the same result.
        zero_init: set every expert weight and bias to 0 (use for the last layer of a
            network that must start at the identity). The routing FC keeps its default init.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dim: int = 3,
        num_experts: int = 3,
        cond_dim: int = 1,
        routing: Routing = "features+condition",
        routing_dropout: float = 0.1,
        bias: bool = True,
        impl: Impl = "auto",
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.num_experts = _positive_int("num_experts", num_experts)
        self.cond_dim = _positive_int("cond_dim", cond_dim)
        if dim not in _CONV:
            raise CounterwarpError(f"CondConv: dim must be 1, 2 or 3, got {dim!r}.")
        if routing not in ROUTINGS:
            raise CounterwarpError(f"CondConv: routing must be one of {ROUTINGS}, got {routing!r}.")
        if impl not in IMPLS:
            raise CounterwarpError(f"CondConv: impl must be one of {IMPLS}, got {impl!r}.")
        if not 0.0 <= float(routing_dropout) < 1.0:
            raise CounterwarpError(
                f"CondConv: routing_dropout must be in [0, 1), got {routing_dropout!r}."
            )
        self.dim = dim
        self.routing = routing
        if impl == "auto":
            impl = "experts" if out_channels < AUTO_EXPERTS_BELOW else "grouped"
        self.impl: str = impl

        kernel = (kernel_size,) * dim
        # (E, C_out, C_in, *k): one ordinary conv kernel per expert
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, *kernel))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        route_in = cond_dim + (in_channels if routing == "features+condition" else 0)
        self.route_dropout = nn.Dropout(routing_dropout)
        self.route_fc = nn.Linear(route_in, num_experts)
        self.reset_parameters(zero=zero_init)

    def reset_parameters(self, zero: bool = False) -> None:
        """Initialise every expert like ``nn.ConvNd`` (kaiming-uniform), or to zero."""
        if zero:
            nn.init.zeros_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
            return
        fan_in = self.in_channels * self.kernel_size**self.dim
        bound = 1.0 / math.sqrt(fan_in)
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias[e], -bound, bound)

    def routing_weights(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Per-sample expert weights.

        Args:
            x: ``(B, C_in, *S)`` input features.
            condition: ``(B,)`` or ``(B, cond_dim)``.

        Returns:
            ``(B, E)`` routing weights in ``(0, 1)``.
        """
        c = self._condition(condition, x)
        if self.routing == "features+condition":
            gap = x.mean(dim=tuple(range(2, x.ndim)))  # (B, C_in)
            c = torch.cat([gap, c], dim=1)
        return torch.sigmoid(self.route_fc(self.route_dropout(c)))

    def _condition(self, condition: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Return the condition as ``(B, cond_dim)`` in ``x``'s dtype, or raise."""
        c = torch.as_tensor(condition, device=x.device, dtype=x.dtype)
        if c.ndim == 1 and self.cond_dim == 1:
            c = c[:, None]
        if c.shape != (x.shape[0], self.cond_dim):
            raise CounterwarpError(
                f"CondConv: condition must have shape ({x.shape[0]},) or "
                f"({x.shape[0]}, {self.cond_dim}), got {tuple(c.shape)}."
            )
        return c

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Convolve each sample with its own mixed kernel.

        Args:
            x: ``(B, C_in, *S)`` features, ``len(S) == dim``.
            condition: ``(B,)`` or ``(B, cond_dim)`` conditioning values.

        Returns:
            ``(B, C_out, *S)``.
        """
        if x.ndim != self.dim + 2 or x.shape[1] != self.in_channels:
            raise CounterwarpError(
                f"CondConv: expected input (B, {self.in_channels}, {self.dim} spatial dims), "
                f"got {tuple(x.shape)}."
            )
        if _bf16_weight_gradient_unreliable(x, self.weight):
            with torch.autocast(device_type="cpu", enabled=False):
                return self._convolve(x.float(), condition)
        return self._convolve(x, condition)

    def _convolve(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        r = self.routing_weights(x, condition)  # (B, E)
        if self.impl == "grouped":
            return self._forward_grouped(x, r)
        return self._forward_experts(x, r)

    def _forward_grouped(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        spatial = x.shape[2:]
        # (B, C_out, C_in, *k) mixed kernels -> (B * C_out, C_in, *k) for groups=B
        kernels = torch.einsum("be,e...->b...", r, self.weight)
        kernels = kernels.reshape(b * self.out_channels, *self.weight.shape[2:])
        bias = None
        if self.bias is not None:
            bias = (r @ self.bias).reshape(b * self.out_channels)
        if b == 1 and _split_depth_is_faster(x, self.kernel_size):
            return _conv3d_split_depth(x, kernels, bias, self.kernel_size)
        y = _CONV[self.dim](
            x.reshape(1, b * self.in_channels, *spatial), kernels, bias, padding="same", groups=b
        )
        return y.reshape(b, self.out_channels, *spatial)

    def _forward_experts(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        spatial = x.shape[2:]
        kernels = self.weight.reshape(self.num_experts * self.out_channels, *self.weight.shape[2:])
        if b == 1 and _split_depth_is_faster(x, self.kernel_size):
            y = _conv3d_split_depth(x, kernels, None, self.kernel_size)
        else:
            y = _CONV[self.dim](x, kernels, None, padding="same")  # (B, E * C_out, *S)
        y = y.reshape(b, self.num_experts, self.out_channels, *spatial)
        y = torch.einsum("be,beo...->bo...", r, y)
        if self.bias is not None:
            y = y + (r @ self.bias).reshape(b, self.out_channels, *((1,) * self.dim))
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"dim={self.dim}, num_experts={self.num_experts}, routing={self.routing!r}, "
            f"impl={self.impl!r}, bias={self.bias is not None}"
        )
