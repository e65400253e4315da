"""The simulator network: a conditional U-Net that predicts a deformation per direction.

``SimulatorNet(x, c)`` returns a dense field ``(B, d, *S)`` in voxels for images ``x`` and
directions ``c`` in {-1, +1} (+1 inject the disease pattern, -1 remove it). Every
convolution is a :class:`~counterwarp.nn.condconv.CondConv`, so ``c`` changes every layer's
kernel (and it enters the bottleneck), coupling both simulators in one set of weights
(Liu et al., IPMI 2021; see ``docs/method.md``).

Architecture, for ``channels = (c0, c1, ..., cL)`` and ``n`` resolution levels::

    inlet     CondConv 1 -> c0                                  at S
    down[i]   BN, LeakyReLU(0.1), MaxPool(2), CondConv c_i -> c_{i+1}   (i = 0..n-1)
    bottleneck  flatten -> FC -> latent -> ReLU -> concat c -> FC -> reshape
    up[i]     CondConv c_{i+1} -> c_i, BN, LeakyReLU(0.1), Upsample(2), + skip   (i = n-1..0)
    head      CondConv c_k -> d at S / 2**k, zero-initialised (the field starts at exactly 0)
    upsample  with ``field_downsize = 2**k > 1``: trilinear to S, times 2**k (fine voxels)

With ``field_downsize = 2**k`` the decoder stops ``k`` levels above the input grid (as
VoxelMorph's ``int_downsize``): the field is predicted on a grid ``2**k`` times coarser and
upsampled, so no decoder level and no head runs at full size, and every field the network
can express is smooth at the scale of ``2**k`` voxels.

The depth ``n`` is sized from ``input_shape``: the largest ``n <= len(channels) - 1`` such
that every spatial size is divisible by ``2**n`` and ``size / 2**n >= 2``. At 32^3 that is
4 levels down to 2^3, at 64^3 4 levels down to 4^3 (the reference), at 16^3 3 levels.
Shapes that are odd cannot be pooled at all and are rejected: pad or crop images to a
multiple of 16 first. The bottleneck FC has ``cn * prod(S / 2**n)`` inputs (1024 at 64^3).

Deviation from ``docs/method.md``: the ReLU is applied to the latent code *before* ``c`` is
concatenated, so ``c = -1`` is not clipped to 0.

BatchNorm runs in batch-statistics mode while training, including when the simulator is
applied a second time to the simulated images in the cycle; that is intended.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from counterwarp.errors import CounterwarpError
from counterwarp.geometry.smooth import gaussian_smooth
from counterwarp.geometry.warp import integrate_velocity, warp
from counterwarp.limits import check_fits, check_grid
from counterwarp.nn.blocks import (
    NORMS,
    UPSAMPLE_MODE,
    ConditionalBottleneck,
    DownBlock,
    UpBlock,
    num_levels,
)
from counterwarp.nn.condconv import ROUTINGS, CondConv

Field = Literal["displacement", "velocity"]
FIELDS: tuple[str, ...] = ("displacement", "velocity")
#: The simulator's two directions and their condition ``c``: "inject" makes an image look
#: more diseased to the classifier (its logit rises), "remove" healthier (it falls).
DIRECTIONS: dict[str, float] = {"inject": 1.0, "remove": -1.0}

def _int_tuple(name: str, value: Any, min_len: int, max_len: int, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len:
        raise CounterwarpError(
            f"SimulatorNet: {name} must be a list of {min_len} to {max_len} integers, "
            f"got {value!r}."
        )
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise CounterwarpError(
                f"SimulatorNet: every entry of {name} must be an integer >= {minimum}, "
                f"got {value!r}."
            )
    return tuple(value)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CounterwarpError(
            f"SimulatorNet: {name} must be an integer >= {minimum}, got {value!r}."
        )
    return value


def _validated(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise a simulator config; raise :class:`CounterwarpError` if invalid."""
    out = dict(cfg)
    shape = _int_tuple("input_shape", cfg["input_shape"], 2, 3, 1)
    channels = _int_tuple("channels", cfg["channels"], 2, 16, 1)
    out["input_shape"], out["channels"] = shape, channels
    if cfg["field"] not in FIELDS:
        raise CounterwarpError(
            f"SimulatorNet: field must be one of {FIELDS}, got {cfg['field']!r}."
        )
    if cfg["routing"] not in ROUTINGS:
        raise CounterwarpError(
            f"SimulatorNet: routing must be one of {ROUTINGS}, got {cfg['routing']!r}."
        )
    out["latent_dim"] = _positive_int("latent_dim", cfg["latent_dim"])
    out["num_experts"] = _positive_int("num_experts", cfg["num_experts"])
    out["integration_steps"] = _positive_int("integration_steps", cfg["integration_steps"])
    m = cfg["max_displacement"]
    if m is not None:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < math.inf:
            raise CounterwarpError(
                f"SimulatorNet: max_displacement must be None or a positive number of voxels, "
                f"got {m!r}."
            )
        out["max_displacement"] = float(m)
    if cfg["norm"] not in NORMS:
        raise CounterwarpError(f"SimulatorNet: norm must be one of {NORMS}, got {cfg['norm']!r}.")
    sigma = cfg["smoothing_sigma"]
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma <= 8:
        raise CounterwarpError(
            f"SimulatorNet: smoothing_sigma must be a number of voxels in [0, 8], got {sigma!r}."
        )
    out["smoothing_sigma"] = float(sigma)
    p = cfg["routing_dropout"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise CounterwarpError(f"SimulatorNet: routing_dropout must be in [0, 1), got {p!r}.")
    out["routing_dropout"] = float(p)
    if not isinstance(cfg["antisymmetric"], bool):
        raise CounterwarpError(
            f"SimulatorNet: antisymmetric must be true or false, got {cfg['antisymmetric']!r}."
        )
    downsize = cfg["field_downsize"]
    levels = num_levels(shape, len(channels) - 1)
    if (isinstance(downsize, bool) or not isinstance(downsize, int) or downsize < 1
            or downsize & (downsize - 1) or downsize >= 2 ** max(levels, 1)):
        raise CounterwarpError(
            f"SimulatorNet: field_downsize must be a power of two below 2**levels = "
            f"{2 ** max(levels, 1)} for input_shape {list(shape)}, got {downsize!r}."
        )
    margin = cfg["brain_margin"]
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin <= 8:
            raise CounterwarpError(
                f"SimulatorNet: brain_margin must be None or a number of voxels in (0, 8], "
                f"got {margin!r}."
            )
        out["brain_margin"] = float(margin)
    if levels < 1:
        raise CounterwarpError(
            f"SimulatorNet: input_shape {list(shape)} cannot be pooled by 2 (every size must be "
            "even and >= 4). Pad or crop images to a multiple of 16 voxels per axis."
        )
    _check_size(shape, channels, out["latent_dim"], out["num_experts"])
    return out


def _parameter_estimate(
    shape: tuple[int, ...], channels: tuple[int, ...], latent_dim: int, num_experts: int
) -> int:
    """About how many weights :class:`SimulatorNet` would allocate (computed, not built):
    the expert kernels of every CondConv and the two bottleneck FC layers."""
    levels = num_levels(shape, len(channels) - 1)
    kernel = 3 ** len(shape)
    pairs = sum(channels[i] * channels[i + 1] for i in range(levels))
    convs = num_experts * kernel * (channels[0] + 2 * pairs + channels[0] * len(shape))
    flat = channels[levels] * math.prod(n // 2**levels for n in shape)
    return convs + 2 * flat * (latent_dim + 1)


def _check_size(
    shape: tuple[int, ...], channels: tuple[int, ...], latent_dim: int, num_experts: int
) -> None:
    """Refuse an input grid or a weight count that cannot fit, before allocating."""
    fix = (
        "The config is damaged or made for another machine; fit the simulator on smaller "
        "images (or with fewer channels / a smaller latent_dim)."
    )
    check_grid(shape, f"SimulatorNet: input_shape {list(shape)}",
               bytes_per_voxel=4 * (2 + 2 * channels[0]), fix=fix)
    n_weights = _parameter_estimate(shape, channels, latent_dim, num_experts)
    check_fits(
        f"SimulatorNet: input_shape {list(shape)}, channels {list(channels)}, latent_dim "
        f"{latent_dim}, num_experts {num_experts} ask for about {n_weights:,} weights",
        4 * n_weights, fix,
    )


class SimulatorNet(nn.Module):
    """Conditional U-Net predicting a displacement or stationary velocity field.

    Args:
        input_shape: spatial shape ``S`` of the images, 2 or 3 entries (2D or 3D network).
        field: ``"displacement"`` (the output is ``u`` itself) or ``"velocity"`` (the output
            is a stationary velocity ``v``; ``u = exp(v)`` is diffeomorphic and
            ``exp(-v)`` its exact inverse).
        channels: ``(c0, c1, ..., cL)``: inlet width, then one width per resolution level;
            at most ``L`` levels are used (see :func:`num_levels`).
        latent_dim: width of the fully connected bottleneck code.
        num_experts: experts per CondConv layer.
        routing: CondConv routing, ``"features+condition"`` or ``"condition"``.
        integration_steps: scaling-and-squaring steps for ``field="velocity"``.
        max_displacement: if set, the raw field is soft-clipped to
            ``m * tanh(field / m)`` voxels per component.
        routing_dropout: dropout on every CondConv routing input (training only).
        norm: ``"batch"`` (BatchNorm, the paper's) or ``"group"`` (GroupNorm: behaves the
            same in training and evaluation, which matters for small batches and 2^3 maps).
        smoothing_sigma: if > 0, the raw field is Gaussian-smoothed with this sigma (voxels),
            so every deformation the simulator can express is smooth at that scale.
        field_downsize: ``2**k``: predict the field on a grid ``2**k`` times coarser than
            the input and upsample it (1: at full resolution, the paper's).
        antisymmetric: if True, the network predicts one field ``g(x)``, "the disease
            direction at x", without looking at the condition, and returns ``c * g(x)``:
            "remove" is then exactly the negated "inject" field (with ``field="velocity"``,
            its exact inverse), so both directions train one and the same quantity.
        brain_margin: if set (voxels), the field is multiplied by
            :func:`soft_brain_mask` of the input: it moves the brain and up to about
            ``2 * brain_margin`` voxels around it, never the far background (None: anywhere,
            the paper's).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        field: Field = "displacement",
        channels: tuple[int, ...] = (16, 32, 64, 16, 16),
        latent_dim: int = 512,
        num_experts: int = 3,
        routing: str = "features+condition",
        integration_steps: int = 7,
        max_displacement: float | None = None,
        routing_dropout: float = 0.1,
        smoothing_sigma: float = 0.0,
        norm: str = "batch",
        antisymmetric: bool = False,
        field_downsize: int = 1,
        brain_margin: float | None = None,
    ) -> None:
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        cfg = _validated(arguments)
        self._cfg = cfg
        self.input_shape: tuple[int, ...] = cfg["input_shape"]
        self.field: str = cfg["field"]
        self.integration_steps: int = cfg["integration_steps"]
        self.max_displacement: float | None = cfg["max_displacement"]
        dim = self.dim = len(self.input_shape)
        ch = cfg["channels"]
        self.levels = num_levels(self.input_shape, len(ch) - 1)
        self.field_downsize: int = cfg["field_downsize"]
        first_up = self.field_downsize.bit_length() - 1  # k: the level the field comes out at
        cc = dict(
            num_experts=cfg["num_experts"],
            routing=cfg["routing"],
            routing_dropout=cfg["routing_dropout"],
        )

        self.inlet = CondConv(1, ch[0], dim=dim, **cc)
        self.down = nn.ModuleList(
            DownBlock(ch[i], ch[i + 1], dim, norm=cfg["norm"], **cc) for i in range(self.levels)
        )
        coarse = tuple(s // 2**self.levels for s in self.input_shape)
        self.bottleneck = ConditionalBottleneck(ch[self.levels], coarse, cfg["latent_dim"])
        # up[j] maps level k+j+1 back to level k+j; applied from the deepest level upwards
        self.up = nn.ModuleList(
            UpBlock(ch[i + 1], ch[i], dim, norm=cfg["norm"], **cc)
            for i in range(first_up, self.levels)
        )
        self.head = CondConv(ch[first_up], dim, dim=dim, zero_init=True, **cc)

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``SimulatorNet.from_config(net.config)`` rebuilds."""
        cfg = dict(self._cfg)
        cfg["input_shape"] = list(cfg["input_shape"])
        cfg["channels"] = list(cfg["channels"])
        return cfg

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SimulatorNet:
        """Build from a config dict (e.g. read from JSON), validating it first.

        Missing keys take the constructor defaults except ``input_shape``, which is required.
        Raises :class:`CounterwarpError` for unknown keys or invalid values.
        """
        if not isinstance(cfg, dict):
            raise CounterwarpError(f"SimulatorNet config must be a dict, got {type(cfg).__name__}.")
        known = set(_DEFAULTS) | {"input_shape"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise CounterwarpError(
                f"SimulatorNet config has unknown keys {unknown}; known keys: {sorted(known)}."
            )
        if "input_shape" not in cfg:
            raise CounterwarpError("SimulatorNet config needs 'input_shape' (e.g. [64, 64, 64]).")
        full = _validated({**_DEFAULTS, **cfg})
        return cls(**full)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | float) -> torch.Tensor:
        """Predict the raw field.

        Args:
            x: ``(B, 1, *S)`` images (z-scored, background 0), ``S == input_shape``.
            condition: ``(B,)`` directions in {-1, +1} (+1 inject, -1 remove), or a scalar
                applied to the whole batch.

        Returns:
            ``(B, d, *S)`` displacement (``field="displacement"``) or stationary velocity
            (``field="velocity"``), in voxels; channel ``i`` moves along spatial axis ``i``.
            Exactly zero at initialisation.
        """
        expected = (1, *self.input_shape)
        if x.ndim != self.dim + 2 or tuple(x.shape[1:]) != expected:
            raise CounterwarpError(
                f"SimulatorNet expects images of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}. Resample the images to the simulator's input_shape."
            )
        c = torch.as_tensor(condition, dtype=x.dtype, device=x.device)
        if c.ndim == 0:
            c = c.expand(x.shape[0])
        if c.shape != (x.shape[0],):
            raise CounterwarpError(
                f"condition must have shape ({x.shape[0]},), got {tuple(c.shape)}."
            )
        direction = c
        if self._cfg["antisymmetric"]:
            c = torch.ones_like(c)

        h = self.inlet(x, c)
        skips = [h]
        for block in self.down:
            h = block(h, c)
            skips.append(h)
        h = self.bottleneck(skips.pop(), c)
        for block in reversed(self.up):
            h = block(h, c) + skips.pop()
        # the field leaves the network in float32 even under bf16 autocast: displacements of
        # a few voxels need more than bf16's 8-bit mantissa for smooth Jacobians
        factor = self.field_downsize
        out = self.head(h, c).float() * factor  # in voxels of the input grid
        with torch.autocast(device_type=out.device.type, enabled=False):
            if self.max_displacement is not None:
                m = self.max_displacement
                out = m * torch.tanh(out / m)
            if self._cfg["smoothing_sigma"] > 0:  # sigma in input voxels, on the coarse grid
                out = gaussian_smooth(out, self._cfg["smoothing_sigma"] / factor)
            if factor > 1:
                out = F.interpolate(
                    out, size=self.input_shape, mode=UPSAMPLE_MODE[self.dim],
                    align_corners=False,
                )
            if self._cfg["brain_margin"] is not None:
                out = out * soft_brain_mask(x, self._cfg["brain_margin"])
            if self._cfg["antisymmetric"]:
                out = out * direction.float().view(-1, *([1] * (out.ndim - 1)))
        return out

    def displacements(self, raw_field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Turn the network output into displacements.

        Args:
            raw_field: ``(B, d, *S)`` output of :meth:`forward`, in voxels.

        Returns:
            ``(u, u_inverse)``, both ``(B, d, *S)`` in voxels. For ``field="displacement"``:
            ``(raw_field, None)`` (no exact inverse). For ``field="velocity"``:
            ``(exp(v), exp(-v))`` by scaling and squaring; warping with ``u`` and then with
            ``u_inverse`` returns (up to interpolation) the original image.
        """
        if self.field == "displacement":
            return raw_field, None
        steps = self.integration_steps
        return integrate_velocity(raw_field, steps), integrate_velocity(-raw_field, steps)


def soft_brain_mask(images: torch.Tensor, margin: float) -> torch.Tensor:
    """Where a field may move: 1 in the brain (non-zero voxels) dilated by ``margin``
    voxels, fading smoothly to 0 over about as many voxels more.

    Args:
        images: ``(B, 1, *S)`` images with background exactly 0.
        margin: voxels, > 0.

    Returns:
        ``(B, 1, *S)`` float32 in [0, 1].
    """
    inside = (images != 0).float()
    size = 2 * math.ceil(margin) + 1
    pool = F.max_pool3d if images.ndim == 5 else F.max_pool2d
    dilated = pool(inside, kernel_size=size, stride=1, padding=size // 2)
    return gaussian_smooth(dilated, margin / 2).clamp(0.0, 1.0)


def _constructor_defaults() -> dict[str, Any]:
    """The keyword defaults of :class:`SimulatorNet` (the paper's reference network)."""
    parameters = inspect.signature(SimulatorNet.__init__).parameters
    return {
        name: p.default for name, p in parameters.items() if name not in ("self", "input_shape")
    }


_DEFAULTS: dict[str, Any] = _constructor_defaults()


def simulate(
    net: SimulatorNet, images: torch.Tensor, condition: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Warp ``images`` (B, 1, *S) in direction ``condition`` (B,) of +-1 with ``net``.

    ``net`` is a :class:`SimulatorNet` or anything with its ``forward`` and
    ``displacements`` (e.g. the ablation's two simulators). The geometry runs in float32
    even under autocast.

    Returns:
        ``(simulated (B, 1, *S), displacement (B, d, *S) in voxels, inverse displacement or
        None, raw field)``.
    """
    raw = net(images, condition)
    return (*warp_by_field(net, images, raw), raw)


def warp_by_field(
    net: SimulatorNet, images: torch.Tensor, raw_field: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Warp ``images`` (B, 1, *S) by ``net``'s raw field ``(B, d, *S)`` (its forward's
    output), in float32 even under autocast.

    Returns:
        ``(simulated (B, 1, *S), displacement (B, d, *S) in voxels, inverse or None)``.
    """
    with torch.autocast(device_type=raw_field.device.type, enabled=False):
        displacement, inverse = net.displacements(raw_field.float())
        return warp(images.float(), displacement), displacement, inverse
