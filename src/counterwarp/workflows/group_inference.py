"""The inferential part of ``counterwarp group``: effect size, permutation FWE test,
bootstrap intervals of the region table, and the zero-spread refusal.

What is tested is the **consistency of the explanation across subjects**: whether the
simulator's volume change at a voxel has the same sign in the subjects' maps more often
than sign flipping would give (:mod:`counterwarp.stats.permutation`). It is not a test
that the disease changes the anatomy there, nor that the classifier is right: a simulator
that always draws the same pattern passes it whatever the patterns mean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from counterwarp.stats.permutation import (
    all_zero_spread,
    bootstrap_region_intervals,
    effect_size_map,
    sign_flip_inference,
)

__all__ = ["WHAT_IS_TESTED", "group_inference", "with_intervals"]

WHAT_IS_TESTED = (
    "consistency of the explanation across subjects: a sign-flip permutation test of each "
    "voxel's mean volume change (H0: every subject's value is symmetric about zero), with "
    "family-wise error control by TFCE and by max-t over the brain. It does not test that "
    "the disease changes the anatomy there, nor that the classifier is right."
)


def group_inference(
    maps: np.ndarray, brain: np.ndarray, affine: np.ndarray, *, permutations: int, seed: int,
    direction: str, save: Callable[[str, np.ndarray, type], str], alpha: float = 0.05,
) -> tuple[dict[str, Any], dict[str, str], np.ndarray | None]:
    """Effect size and FWE maps of ``maps`` ``(N, *S)`` (log volume change) in ``brain``.

    ``save(suffix, array, dtype)`` writes one NIfTI of the group and returns its path.

    Returns:
        (the ``permutation`` part of the summary, the files written, the ``(*S)`` bool
        mask of TFCE-FWE-significant voxels or None when not tested).
    """
    files = {"effect_size": save("effect_size", effect_size_map(maps, brain), np.float32)}
    part: dict[str, Any] = {"what_is_tested": WHAT_IS_TESTED, "alpha": alpha,
                            "tested": False}
    if all_zero_spread(maps, brain):
        part["warning"] = (
            f"every brain voxel has the same value in all {maps.shape[0]} maps ({direction}): "
            "zero spread, so no test can say anything; no significance is reported"
        )
        sys.stderr.write(f"counterwarp group: warning: {part['warning']}\n")
        return part, files, None
    if permutations <= 0 or maps.ndim != 4:
        part["warning"] = ("permutation test skipped (--permutations 0)" if permutations <= 0
                           else "permutation test needs 3D maps (TFCE works on volumes)")
        return part, files, None
    result = sign_flip_inference(maps, brain, affine, n_permutations=permutations,
                                 tfce=True, alpha=alpha, seed=seed)
    part.update({key: result[key] for key in ("tested", "n_permutations", "method",
                                               "smallest_p") if key in result})
    if "warning" in result:
        part["warning"] = result["warning"]
    if not result.get("tested"):
        return part, files, None
    mean = np.nanmean(maps, axis=0)
    for kind in ("t", "tfce"):
        significant = np.asarray(result[f"fwe_{kind}"], bool) & brain
        part[f"n_fwe_voxels_{kind}"] = int(significant.sum())
        part[f"n_fwe_voxels_{kind}_positive"] = int((significant & (mean > 0)).sum())
        part[f"n_fwe_voxels_{kind}_negative"] = int((significant & (mean < 0)).sum())
        files[f"fwe_{kind}_logp"] = save(f"fwe_{kind}_logp", result[f"logp_fwe_{kind}"],
                                         np.float32)
        files[f"fwe_{kind}_mask"] = save(f"fwe_{kind}_mask", significant, np.uint8)
    return part, files, np.asarray(result["fwe_tfce"], bool) & brain


def with_intervals(
    rows: list[dict[str, Any]], maps: np.ndarray, labels: np.ndarray,
    names: dict[int, str] | None, brain: np.ndarray, resamples: int, seed: int,
) -> list[dict[str, Any]]:
    """The region rows with 95 % percentile-bootstrap intervals (over subjects) of the
    region's mean percent volume change: ``percent_ci_low``, ``percent_ci_high``."""
    if resamples <= 0 or maps.shape[0] < 2:
        return rows
    intervals = {int(r["label"]): r for r in bootstrap_region_intervals(
        maps, labels, brain, names=names, n_boot=resamples, seed=seed)}
    out = []
    for row in rows:
        interval = intervals.get(int(row["label"]), {})
        out.append({**row, "percent_ci_low": interval.get("percent_ci_low", float("nan")),
                    "percent_ci_high": interval.get("percent_ci_high", float("nan"))})
    return out
