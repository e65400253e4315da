"""Scores of explanation maps against a known volume change, per subject and per group.

Pure: arrays in, numbers out. Simulator maps (:data:`SIMULATOR_METHODS`) are log volume
change of the anatomy and are scored *signed*; saliency maps carry no sign of volume change
and are scored on magnitudes (``|map|`` against ``|truth|``). The per-map metrics come from
:func:`counterwarp.stats.scores.score_map`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from counterwarp.errors import CounterwarpError
from counterwarp.stats.scores import score_map

__all__ = [
    "METRICS",
    "SIMULATOR_METHODS",
    "format_number",
    "is_signed",
    "markdown_cell",
    "score_methods",
    "sign_used",
    "summary_table",
]

#: Map names of the simulator: inject as is, remove negated (see the module docstring).
SIMULATOR_METHODS: tuple[str, ...] = ("simulator_remove", "simulator_inject")
#: Scores computed for every (method, subject) and (method, group).
METRICS: tuple[str, ...] = ("pearson", "spearman", "auroc", "pearson_smoothed")


def sign_used(method: str) -> str:
    """How a method's map enters the scores (a label for tables)."""
    if method == "simulator_remove":
        return "signed, negated (-remove)"
    if method in SIMULATOR_METHODS:
        return "signed"
    return "unsigned (|map| vs |truth|)"


def is_signed(method: str) -> bool:
    """True for maps that say grow (+) vs shrink (-), i.e. the simulator's."""
    return method in SIMULATOR_METHODS


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def score_methods(
    maps: Mapping[str, np.ndarray],
    truths: np.ndarray,
    brains: np.ndarray,
    effect: np.ndarray,
    template_mask: np.ndarray,
    *,
    signed: Mapping[str, bool] | None = None,
    ids: Sequence[str] | None = None,
    threshold: float = 0.05,
    sigma: float = 1.5,
) -> dict[str, dict[str, Any]]:
    """Score every method's maps against the truth, per diseased subject and for the group.

    Pure: arrays in, floats out.

    Args:
        maps: method -> ``(N, *S)`` maps, one per subject, already in the orientation to be
            scored (e.g. the simulator's "remove" map negated).
        truths: ``(N, *S)`` true log volume change per subject (all zero for healthy ones).
        brains: ``(N, *S)`` bool, voxels scored per subject (brain of each image).
        effect: ``(*S)`` template-space effect map (log volume change at unit severity).
        template_mask: ``(*S)`` bool, voxels scored for the group map.
        signed: method -> True to score the signed map (volume change), False to score
            magnitudes (saliency). Default: :func:`is_signed` of the name.
        ids: N subject ids (default ``"0", "1", ...``).
        threshold: ``|truth|`` above which a voxel counts as changed (AUROC), natural log.
        sigma: Gaussian sd in voxels for the region-scale Pearson.

    Returns:
        method -> ``{"signed": bool, "sign_used": str, "group": {metric: float},
        "subjects": {id: {metric: float}}, "subject_median": {metric: float},
        "n_subjects": int}``. Subjects whose truth is zero inside their brain (healthy) are
        not scored individually; they still enter the group mean map. Undefined scores are
        nan.
    """
    truths = np.asarray(truths, dtype=np.float64)
    brains = np.asarray(brains).astype(bool)
    n = truths.shape[0]
    if brains.shape != truths.shape:
        raise CounterwarpError(f"brains have shape {brains.shape}, the truths {truths.shape}")
    if np.shape(effect) != truths.shape[1:] or np.shape(template_mask) != truths.shape[1:]:
        raise CounterwarpError(
            f"effect {np.shape(effect)} and template_mask {np.shape(template_mask)} must have "
            f"the subjects' spatial shape {truths.shape[1:]}"
        )
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise CounterwarpError(f"{len(ids)} ids for {n} subjects")
    diseased = [bool(np.any(truths[i][brains[i]] != 0)) for i in range(n)]
    results: dict[str, dict[str, Any]] = {}
    for method, values in maps.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != truths.shape:
            raise CounterwarpError(
                f"maps of {method!r} have shape {values.shape}, the truths {truths.shape}"
            )
        use_sign = is_signed(method) if signed is None else bool(signed[method])
        subjects = {
            ids[i]: score_map(values[i], truths[i], brains[i], use_sign, threshold, sigma)
            for i in range(n)
            if diseased[i]
        }
        group_map = values.mean(0) if use_sign else np.abs(values).mean(0)
        group = score_map(group_map, effect, template_mask, use_sign, threshold, sigma)
        results[method] = {
            "signed": use_sign,
            "sign_used": sign_used(method) if signed is None else (
                "signed" if use_sign else "unsigned (|map| vs |truth|)"
            ),
            "group": group,
            "subjects": subjects,
            "subject_median": {
                m: _median([s[m] for s in subjects.values()]) for m in METRICS
            },
            "n_subjects": len(subjects),
        }
    return results


def summary_table(scores: Mapping[str, Mapping[str, Any]]) -> str:
    """The paper-ready markdown table of :func:`score_methods` results, one row per method."""
    lines = [
        "| method | sign used | group Pearson | group Spearman | group AUROC | "
        "group Pearson (smoothed) | subject median Pearson | subject median AUROC |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, result in scores.items():
        group, median = result["group"], result["subject_median"]
        numbers = [
            group["pearson"], group["spearman"], group["auroc"], group["pearson_smoothed"],
            median["pearson"], median["auroc"],
        ]
        cells = [method, result["sign_used"], *(format_number(v) for v in numbers)]
        lines.append("| " + " | ".join(markdown_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def markdown_cell(text: str) -> str:
    """A markdown table cell: pipes escaped so they do not split the cell."""
    return str(text).replace("|", "\\|")


def format_number(value: Any, digits: int = 3) -> str:
    """A number for a table: ``digits`` decimals, ints and bools as they are, ``-`` for
    None / nan / inf."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"

