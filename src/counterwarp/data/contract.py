"""The input contract of a classifier: what it expects to be fed and which output to explain.

A researcher who brings a model states this once, in a JSON file (``classifier.json``);
the run folder records it and every command prepares images by it::

    {
      "input_shape": [32, 32, 32],          # model grid in voxels (2 or 3 sizes)
      "channels": 1,                         # the image is repeated into C input channels
      "intensity": "zscore-brain",           # or "minmax", "none", {"mean": m, "sd": s}
      "orientation": "RAS",                  # axis codes the model was trained in, or null
      "output": "logit",                     # or "class", "regression"
      "class_index": 2,                      # with "output": "class": which of C outputs
      "unit": "years",                       # with "output": "regression": the target's unit
      "positive_label": "AD"                 # the manifest label of the positive class
    }

Intensity normalisations (per image, on the model grid, after resampling):

- ``zscore-brain``: z-score over the non-zero voxels, background stays 0 (the paper's, and
  what ``train-classifier`` uses);
- ``minmax``: ``(x - min) / (max - min)`` over the whole image, into [0, 1];
- ``none``: the file's intensities as stored;
- ``{"mean": m, "sd": s}``: ``(x - m) / s`` with fixed numbers (e.g. a dataset's).

Orientation: axis codes (``"RAS"``, ``"LAS"``, ``"PIR"``, ...: where each array axis
points, as nibabel's ``aff2axcodes`` writes them) reorient every 3D image to that
orientation first, so the model sees the anatomy the way it was trained whatever the file's
own orientation; outputs go back to the file's grid. Without the key a 3D model gets
:data:`CANONICAL_ORIENTATION` (RAS), as counterwarp's own classifier does; ``null`` feeds
the voxel array as stored.

Outputs: ``logit`` (one number per image, or index ``class_index`` of C outputs when given),
``class`` (C class logits: the explained score is the log-odds of class ``class_index``
against the rest, ``z_k - log sum_{j != k} exp z_j``; for softmax models, pass the logits),
``regression`` (one predicted value, in ``unit``; the margin is in that unit too).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from counterwarp.errors import CounterwarpError

#: The intensity normalisations by name (a fixed ``{"mean", "sd"}`` is the fourth kind).
INTENSITIES = ("zscore-brain", "minmax", "none")
#: The orientation every 3D image is brought to before a network sees it (unless a
#: classifier's contract names another, or null).
CANONICAL_ORIENTATION = "RAS"
#: What the explained score is: one logit, the log-odds of one class, or a regression value.
OUTPUTS = ("logit", "class", "regression")
_KEYS = ("input_shape", "channels", "intensity", "orientation", "output", "class_index",
         "unit", "positive_label")
_AXIS_PAIRS = ("LR", "PA", "IS")


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes a model input beyond resampling to the grid.

    Attributes:
        intensity: one of :data:`INTENSITIES`, or ``(mean, sd)`` for a fixed z-score.
        orientation: axis codes (``"RAS"``) to reorient 3D images to, or None (as stored).
    """

    intensity: str | tuple[float, float] = "zscore-brain"
    orientation: str | None = None


@dataclass(frozen=True)
class ClassifierContract:
    """A classifier's input contract and explained output (see the module doc).

    Attributes:
        input_shape: model grid in voxels, ``(H, W)`` or ``(D, H, W)``.
        channels: input channels the model takes (the one image is repeated into each).
        intensity: as :attr:`Preprocessing.intensity`.
        orientation: as :attr:`Preprocessing.orientation`.
        output: one of :data:`OUTPUTS`.
        class_index: the class whose score is explained (``class``, or ``logit`` of C).
        unit: the regression target's unit (``regression``), e.g. ``"years"``.
        positive_label: the manifest label meaning "positive" (diseased), or None.
    """

    input_shape: tuple[int, ...]
    channels: int = 1
    intensity: str | tuple[float, float] = "zscore-brain"
    orientation: str | None = None
    output: str = "logit"
    class_index: int | None = None
    unit: str | None = None
    positive_label: str | None = None
    source: str = field(default="", compare=False)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(intensity=self.intensity, orientation=self.orientation)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, the one :func:`parse_contract` reads back."""
        values = asdict(self)
        values.pop("source")
        values["input_shape"] = list(self.input_shape)
        if isinstance(self.intensity, tuple):
            values["intensity"] = {"mean": self.intensity[0], "sd": self.intensity[1]}
        return values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_orientation(codes: Any, where: str) -> str:
    """``codes`` as three upper-case axis codes naming each anatomical axis once."""
    text = codes.upper() if isinstance(codes, str) else ""
    pairs = sorted(next((p for p in _AXIS_PAIRS if c in p), "?") for c in text)
    if len(text) != 3 or pairs != sorted(_AXIS_PAIRS):
        raise CounterwarpError(
            f"{where}: orientation {codes!r} is not three axis codes naming L/R, A/P and S/I "
            "once each (e.g. \"RAS\", \"LAS\", \"PIR\"), or null for the array as stored"
        )
    return text


def _intensity(value: Any, where: str) -> str | tuple[float, float]:
    if isinstance(value, str) and value in INTENSITIES:
        return value
    if isinstance(value, dict) and set(value) == {"mean", "sd"}:
        mean, sd = value["mean"], value["sd"]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mean, sd))
        if numbers and math.isfinite(mean) and math.isfinite(sd) and sd > 0:
            return float(mean), float(sd)
    raise CounterwarpError(
        f"{where}: intensity {value!r} is not one of {', '.join(INTENSITIES)} or "
        "{\"mean\": M, \"sd\": S} with a finite M and S > 0"
    )


def parse_contract(values: Any, where: str = "classifier contract") -> ClassifierContract:
    """Check a contract given as a dict (from JSON); ``where`` names it in every error."""
    if not isinstance(values, dict):
        raise CounterwarpError(f"{where}: expected a JSON object, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_KEYS))
    if unknown:
        raise CounterwarpError(f"{where}: unknown key(s) {unknown}; allowed: {list(_KEYS)}")
    shape = values.get("input_shape")
    if (not isinstance(shape, list) or len(shape) not in (2, 3)
            or not all(_is_int(n) and n >= 1 for n in shape)):
        raise CounterwarpError(
            f"{where}: input_shape must list 2 or 3 positive sizes in voxels (e.g. [32, 32, "
            f"32]), got {shape!r}"
        )
    channels = values.get("channels", 1)
    if not _is_int(channels) or channels < 1:
        raise CounterwarpError(f"{where}: channels must be a positive integer, got {channels!r}")
    orientation = values.get("orientation", CANONICAL_ORIENTATION if len(shape) == 3 else None)
    if orientation is not None:
        orientation = check_orientation(orientation, where)
        if len(shape) != 3:
            raise CounterwarpError(f"{where}: orientation applies to 3D models only; use null")
    output = values.get("output", "logit")
    if output not in OUTPUTS:
        raise CounterwarpError(f"{where}: output {output!r} is not one of {', '.join(OUTPUTS)}")
    class_index = values.get("class_index")
    if class_index is not None and (not _is_int(class_index) or class_index < 0):
        raise CounterwarpError(
            f"{where}: class_index must be a non-negative integer, got {class_index!r}"
        )
    if output == "class" and class_index is None:
        raise CounterwarpError(f"{where}: output \"class\" needs class_index (0-based)")
    if output == "regression" and class_index is not None:
        raise CounterwarpError(f"{where}: a regression output has no class_index; remove it")
    unit, positive = values.get("unit"), values.get("positive_label")
    for key, value in (("unit", unit), ("positive_label", positive)):
        if value is not None and not isinstance(value, (str, int)):
            raise CounterwarpError(f"{where}: {key} must be a string, got {value!r}")
    return ClassifierContract(
        input_shape=tuple(shape), channels=channels,
        intensity=_intensity(values.get("intensity", "zscore-brain"), where),
        orientation=orientation, output=output, class_index=class_index,
        unit=None if unit is None else str(unit),
        positive_label=None if positive is None else str(positive), source=where,
    )


def read_contract(path: str | os.PathLike[str]) -> ClassifierContract:
    """Read and check a ``classifier.json`` contract file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CounterwarpError(
            f"classifier contract not found: {path}. Write a JSON file with at least "
            "{\"input_shape\": [32, 32, 32]} (see `counterwarp fit --help`)."
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CounterwarpError(f"{path}: not a readable JSON contract ({error})") from None
    return parse_contract(values, str(path))


def normalise_intensity(values: np.ndarray, intensity: str | tuple[float, float]) -> np.ndarray:
    """Apply one normalisation of :class:`Preprocessing` to a ``(*S)`` image.

    Returns a float32 array of the same shape (see the module doc for each kind).
    """
    from counterwarp.data.preprocess import zscore_in_brain

    values = np.asarray(values, dtype=np.float32)
    if intensity == "zscore-brain":
        return zscore_in_brain(values)
    if intensity == "none":
        return values.copy()
    if intensity == "minmax":
        low, high = float(values.min()), float(values.max())
        span = high - low if high > low else 1.0
        return ((values - low) / span).astype(np.float32)
    mean, sd = intensity
    return ((values - mean) / sd).astype(np.float32)
