"""The paper's CNN classifier (2D or 3D), its configuration and its checkpoint format.

Architecture (Liu et al., IPMI 2021): four blocks ``Conv(k=3, pad=1) -> BatchNorm -> ReLU ->
MaxPool(2)`` with 16, 32, 64, 16 channels, then ``flatten -> Linear(hidden) -> ReLU ->
Dropout -> Linear(1)``. It returns one logit per image (positive = diseased).

Small inputs: a ``MaxPool(2)`` halves every spatial size (rounding down). When the smallest
input size cannot be halved four times (``min(input_shape) < 16``), only the first
``floor(log2(min(input_shape)))`` blocks pool and the last blocks keep their resolution,
so no size ever drops below 1. The flatten size is computed from the input shape.

Every ReLU is its own non-inplace module, so hook-based saliency methods (Captum's guided
backprop, Grad-CAM) work on it.
"""

from __future__ import annotations

import json
import math
import operator
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from counterwarp._io import save_torch_atomic
from counterwarp.errors import CounterwarpError
from counterwarp.limits import check_fits, check_grid

CHECKPOINT_FORMAT = "counterwarp.classifier"
CHECKPOINT_VERSION = 1
#: File name of a classifier checkpoint inside a run folder.
CLASSIFIER_NAME = "classifier.pt"
_CONFIG_KEYS = ("input_shape", "channels", "hidden", "dropout")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int_tuple(values: Any) -> Any:
    """Tuple of Python ints from a sequence of integer-like values (numpy ints included);
    anything else is returned unchanged for :func:`_validate_config` to reject."""
    try:
        return tuple(operator.index(value) for value in values)
    except TypeError:
        return values


def _validate_config(
    input_shape: Any, channels: Any, hidden: Any, dropout: Any
) -> tuple[tuple[int, ...], tuple[int, ...], int, float]:
    """Check types and ranges; return normalised values or raise CounterwarpError."""
    if (
        not isinstance(input_shape, (list, tuple))
        or len(input_shape) not in (2, 3)
        or not all(_is_int(n) and n >= 1 for n in input_shape)
    ):
        raise CounterwarpError(
            f"classifier input_shape must be 2 or 3 positive integers, got {input_shape!r}"
        )
    if (
        not isinstance(channels, (list, tuple))
        or len(channels) < 1
        or not all(_is_int(c) and c >= 1 for c in channels)
    ):
        raise CounterwarpError(
            f"classifier channels must be a non-empty list of positive integers, got {channels!r}"
        )
    if not _is_int(hidden) or hidden < 1:
        raise CounterwarpError(f"classifier hidden must be a positive integer, got {hidden!r}")
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not math.isfinite(dropout)
        or not 0.0 <= dropout < 1.0
    ):
        raise CounterwarpError(f"classifier dropout must be a number in [0, 1), got {dropout!r}")
    _check_size(tuple(input_shape), tuple(channels), int(hidden))
    return tuple(input_shape), tuple(channels), int(hidden), float(dropout)


def _parameter_count(
    input_shape: tuple[int, ...], channels: tuple[int, ...], hidden: int
) -> int:
    """Number of parameters :class:`Classifier` would allocate (computed, not built)."""
    kernel = 3 ** len(input_shape)
    widths = (1, *channels)
    pairs = zip(widths[:-1], widths[1:], strict=True)
    conv = sum(kernel * c_in * c_out + 3 * c_out for c_in, c_out in pairs)
    pools = min(len(channels), int(math.floor(math.log2(min(input_shape)))))
    flat = channels[-1] * math.prod(n // 2**pools for n in input_shape)
    return conv + flat * hidden + 2 * hidden + 1


def _check_size(input_shape: tuple[int, ...], channels: tuple[int, ...], hidden: int) -> None:
    """Refuse a configuration whose input grid or weights cannot fit, before allocating."""
    shape = list(input_shape)
    check_grid(
        input_shape, f"classifier input_shape {shape}", bytes_per_voxel=4 * (1 + channels[0]),
        fix="The checkpoint's config is damaged or made for another machine; retrain the "
        "classifier on a smaller --shape.",
    )
    n_parameters = _parameter_count(input_shape, channels, hidden)
    check_fits(
        f"classifier config (input_shape {shape}, channels {list(channels)}, hidden {hidden}) "
        f"asks for {n_parameters:,} weights",
        4 * n_parameters,
        "The checkpoint's config is damaged or made for another machine; retrain the "
        "classifier with a smaller --shape.",
    )


class Classifier(nn.Module):
    """The paper's CNN: conv blocks then a small MLP, one logit per image.

    Args:
        input_shape: spatial shape ``(H, W)`` or ``(D, H, W)`` in voxels; 2 or 3 axes
            select 2D or 3D convolutions.
        channels: output channels of the conv blocks (default the paper's 16-32-64-16).
        hidden: width of the hidden fully connected layer.
        dropout: dropout probability before the last layer.

    Input ``(B, 1, *input_shape)`` float32 images; output ``(B,)`` logits.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: tuple[int, ...] = (16, 32, 64, 16),
        hidden: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        input_shape, channels, hidden, dropout = _validate_config(
            _as_int_tuple(input_shape), _as_int_tuple(channels), hidden, dropout
        )
        self.input_shape: tuple[int, ...] = input_shape
        self.channels: tuple[int, ...] = channels
        self.hidden = hidden
        self.dropout = dropout
        self.dim = len(input_shape)
        conv = nn.Conv2d if self.dim == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if self.dim == 2 else nn.BatchNorm3d
        pool = nn.MaxPool2d if self.dim == 2 else nn.MaxPool3d
        self.num_pools = min(len(channels), int(math.floor(math.log2(min(input_shape)))))
        blocks: list[nn.Module] = []
        in_channels = 1
        feature_shape = list(input_shape)
        for index, out_channels in enumerate(channels):
            layers: list[nn.Module] = [
                conv(in_channels, out_channels, kernel_size=3, padding=1),
                norm(out_channels),
                nn.ReLU(),
            ]
            if index < self.num_pools:
                layers.append(pool(2))
                feature_shape = [n // 2 for n in feature_shape]
            blocks.append(nn.Sequential(*layers))
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.feature_shape: tuple[int, ...] = (in_channels, *feature_shape)
        flat_size = math.prod(self.feature_shape)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat_size, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``Classifier.from_config(model.config)`` rebuilds it."""
        return {
            "input_shape": list(self.input_shape),
            "channels": list(self.channels),
            "hidden": self.hidden,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config: Any) -> Classifier:
        """Build a classifier from :attr:`config`; raises CounterwarpError on a bad config."""
        if not isinstance(config, dict):
            raise CounterwarpError(f"classifier config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise CounterwarpError(
                f"classifier config has unknown keys {unknown}; allowed: {list(_CONFIG_KEYS)}"
            )
        if "input_shape" not in config:
            raise CounterwarpError("classifier config lacks 'input_shape'")
        defaults = {"channels": [16, 32, 64, 16], "hidden": 64, "dropout": 0.2}
        merged = {**defaults, **config}
        input_shape, channels, hidden, dropout = _validate_config(
            merged["input_shape"], merged["channels"], merged["hidden"], merged["dropout"]
        )
        return cls(input_shape, channels, hidden, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *input_shape)`` images -> ``(B,)`` logits."""
        expected = (1, *self.input_shape)
        if images.dim() != self.dim + 2 or tuple(images.shape[1:]) != expected:
            raise CounterwarpError(
                f"classifier expects (B, {', '.join(str(n) for n in expected)}) images, "
                f"got {tuple(images.shape)}"
            )
        return self.head(self.features(images)).squeeze(1)


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The last ``Conv2d`` / ``Conv3d`` module of ``model`` (the usual Grad-CAM layer)."""
    last: nn.Module | None = None
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            last = module
    if last is None:
        raise CounterwarpError(
            f"{type(model).__name__} has no Conv2d / Conv3d layer, which Grad-CAM needs; pass "
            "target_layer=<the module whose output to use> or choose another saliency method"
        )
    return last


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


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU when it has none."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


@torch.no_grad()
def predict_in_batches(
    classifier: nn.Module, images: torch.Tensor, batch_size: int = 32
) -> torch.Tensor:
    """Logits (N,) float32 on the CPU of ``images`` (N, 1, *S), in batches, without
    gradients; each batch is moved to the classifier's device."""
    device = module_device(classifier)
    chunks = [
        classifier_logits(classifier, images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def save_classifier(
    path: str | os.PathLike[str], model: Classifier, extra: dict[str, Any] | None = None
) -> Path:
    """Write a classifier checkpoint atomically.

    The file holds ``{"format": "counterwarp.classifier", "version": 1, "config": ...,
    "state_dict": ..., **extra}``; ``extra`` must be JSON-able (it is loaded with
    ``weights_only=True``) and must not reuse those four keys.
    """
    extra = dict(extra or {})
    clashing = sorted(set(extra) & {"format", "version", "config", "state_dict"})
    if clashing:
        raise CounterwarpError(f"extra keys {clashing} are reserved in a classifier checkpoint")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as error:
        raise CounterwarpError(f"checkpoint extra must be JSON-able: {error}") from error
    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config,
        "state_dict": state_dict,
        **extra,
    }
    return save_torch_atomic(path, payload)


def load_classifier(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[Classifier, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_classifier` (``torch.load(weights_only=True)``).

    Returns:
        ``(model in eval mode on map_location, payload without "state_dict")``.

    Raises:
        CounterwarpError: missing file, unreadable / corrupt file, not a counterwarp
            classifier checkpoint, newer format version, or weights not matching the config.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / CLASSIFIER_NAME
    if not path.is_file():
        raise CounterwarpError(
            f"classifier checkpoint not found: {path}. Train one with "
            "`counterwarp train-classifier --manifest M --out RUN`."
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        # weights_only refusals of a pickled object name a global that is "not an allowed
        # global" / an "Unsupported global"; other unpickling errors mean a damaged file.
        unsafe = isinstance(error, pickle.UnpicklingError) and any(
            marker in str(error) for marker in ("allowed global", "Unsupported global")
        )
        raise CounterwarpError(
            f"{path}: cannot read it safely: it holds objects other than plain weights, "
            "which counterwarp never unpickles (only weights-only checkpoints load)."
            if unsafe
            else f"{path}: cannot read the classifier checkpoint ({type(error).__name__}). The "
            "file is corrupt, truncated, or not a counterwarp checkpoint; retrain or re-copy it."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CounterwarpError(
            f"{path} is not a counterwarp classifier checkpoint (format {found!r}, expected "
            f"{CHECKPOINT_FORMAT!r})."
        )
    version = payload.get("version")
    if not _is_int(version) or version > CHECKPOINT_VERSION:
        raise CounterwarpError(
            f"{path}: classifier checkpoint version {version!r} is not supported by this "
            f"counterwarp (up to {CHECKPOINT_VERSION}); upgrade counterwarp."
        )
    try:
        model = Classifier.from_config(payload.get("config"))
    except CounterwarpError as error:
        raise CounterwarpError(f"{path}: {error}") from None
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict):
        raise CounterwarpError(f"{path}: classifier checkpoint has no weights (state_dict)")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CounterwarpError(
            f"{path}: the weights do not match the stored configuration ({error})"
        ) from error
    model.to(map_location)
    model.eval()
    info = {key: value for key, value in payload.items() if key != "state_dict"}
    return model, info
