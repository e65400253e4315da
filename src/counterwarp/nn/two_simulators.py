"""Two separate, unconditional simulators behind the :class:`SimulatorNet` interface.

The "two simulators" arm of the ablation study (``benchmarks/ablations.py``): what the
coupled, conditional simulator is compared with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from counterwarp.nn.simulator import SimulatorNet

__all__ = ["TwoSimulators"]


class TwoSimulators(nn.Module):
    """Two separate, unconditional simulators behind the :class:`SimulatorNet` interface.

    The ablation baseline of the paper's robustness claim: one :class:`SimulatorNet` for
    "inject" and one for "remove", each with a single expert per layer routed on the
    condition alone (so within one net the condition is a constant and the net is
    unconditional). Each sample is dispatched by the sign of its condition (``c > 0``:
    inject net, else remove net). Trained with the same losses and batches as the coupled
    model (each net sees its half of every batch; the cycle loss sends the simulated image
    back through the *other* net), but with twice the parameters.

    Args:
        input_shape: as for :class:`SimulatorNet`.
        **settings: :class:`SimulatorNet` keywords, used for both nets; ``num_experts``,
            ``routing`` and ``antisymmetric`` are accepted so it can stand in for
            ``SimulatorNet`` and ignored (always 1, ``"condition"`` and two independent
            fields).
    """

    def __init__(self, input_shape: tuple[int, ...], **settings: Any) -> None:
        super().__init__()
        for ignored in ("num_experts", "routing", "antisymmetric"):
            settings.pop(ignored, None)
        settings.update(num_experts=1, routing="condition")
        self.inject_net = SimulatorNet(tuple(input_shape), **settings)  # type: ignore[arg-type]
        self.remove_net = SimulatorNet(tuple(input_shape), **settings)  # type: ignore[arg-type]
        self.input_shape = self.inject_net.input_shape
        self.field = self.inject_net.field
        self.dim = self.inject_net.dim

    @property
    def config(self) -> dict[str, Any]:
        """The nets' shared config plus ``"architecture": "two_simulators"`` (JSON-able)."""
        return {**self.inject_net.config, "architecture": "two_simulators"}

    def forward(self, x: torch.Tensor, condition: torch.Tensor | float) -> torch.Tensor:
        """``x`` (B, 1, *S), ``condition`` (B,) or scalar in {-1, +1} -> raw field (B, d, *S).

        Samples with ``c > 0`` go through the inject net, the others through the remove net.
        """
        c = torch.as_tensor(condition, dtype=x.dtype, device=x.device)
        if c.ndim == 0:
            c = c.expand(x.shape[0])
        if c.shape != (x.shape[0],):
            raise ValueError(f"condition must have shape ({x.shape[0]},), got {tuple(c.shape)}.")
        out = x.new_zeros((x.shape[0], self.dim, *x.shape[2:]))
        for net, chosen in ((self.inject_net, c > 0), (self.remove_net, c <= 0)):
            index = torch.nonzero(chosen).flatten()
            if index.numel():
                out = out.index_copy(0, index, net(x[index], c[index]))
        return out

    def displacements(self, raw_field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`SimulatorNet.displacements` (both nets use the same field type)."""
        return self.inject_net.displacements(raw_field)
