"""Group statistics of per-subject maps: voxel-wise one-sample t, FDR, region table.

Pure: arrays in, arrays and numbers out. Per voxel over N maps ``m_i``: mean, one-sample t
``mean / (sd / sqrt(N))`` (sd with N - 1 degrees of freedom), two-sided p from Student's t
with N - 1 degrees of freedom, and a Benjamini-Hochberg FDR mask at level ``q``. A voxel
whose maps all agree (zero spread) has no t statistic: it gets ``t = 0``, ``p = 1`` and is
left out of the FDR tests, so it never survives.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats

from counterwarp.errors import CounterwarpError
from counterwarp.stats.scores import region_means

__all__ = ["REGION_COLUMNS", "fdr_mask", "group_statistics", "region_table"]

#: Keys of every :func:`region_table` row (and the columns of its CSV).
REGION_COLUMNS = (
    "label", "name", "mean_log_volume_change", "percent_volume_change", "n_voxels",
    "sd_across_subjects", "t", "p",
)


def fdr_mask(p_values: np.ndarray, q: float = 0.05, mask: np.ndarray | None = None) -> np.ndarray:
    """Benjamini-Hochberg: which p-values are discoveries at false discovery rate ``q``.

    Args:
        p_values: ``(*S)`` p-values in [0, 1] (non-finite ones are never discoveries).
        q: false discovery rate, in (0, 1).
        mask: ``(*S)`` bool, the voxels tested (default: all); the others are never
            discoveries and do not count as tests.

    Returns:
        ``(*S)`` bool array, True where the BH-adjusted p-value is ``<= q``.
    """
    if not 0 < q < 1:
        raise CounterwarpError(f"q (the false discovery rate) must be in (0, 1), got {q!r}")
    p = np.asarray(p_values, dtype=np.float64)
    tested = np.ones(p.shape, bool) if mask is None else np.asarray(mask, bool).copy()
    tested &= np.isfinite(p)
    out = np.zeros(p.shape, bool)
    if tested.any():
        adjusted = stats.false_discovery_control(np.clip(p[tested], 0.0, 1.0), method="bh")
        out[tested] = adjusted <= q
    return out


def group_statistics(
    maps: np.ndarray, mask: np.ndarray | None = None, q: float = 0.05
) -> dict[str, np.ndarray]:
    """Voxel-wise mean, one-sample t, two-sided p and FDR mask of N maps.

    Args:
        maps: ``(N, *S)`` per-subject maps (N >= 2), e.g. log volume change. Non-finite
            values are treated as missing at that voxel.
        mask: ``(*S)`` bool, the voxels to test (default all); FDR runs over these only.
        q: false discovery rate for the Benjamini-Hochberg mask.

    Returns:
        ``mean``, ``sd`` (N - 1 dof), ``t``, ``p`` (float64 ``(*S)``), ``fdr`` (bool
        ``(*S)``) and ``zero_spread`` (bool ``(*S)``, tested voxels whose finite values are
        all equal, up to rounding: at most 8 float64 epsilons of their magnitude apart).
        The t statistic is undefined at a zero-spread voxel (identical maps say nothing
        about the variability a t-test needs): there ``t = 0``, ``p = 1`` and ``sd = 0``,
        and the voxel is not one of the FDR tests, so it never survives. With fewer than 2
        finite values ``t = 0`` and ``p = 1``. Outside ``mask``, ``t = 0``, ``p = 1``,
        ``fdr = False``.
    """
    values = np.asarray(maps, dtype=np.float64)
    if values.ndim < 2 or values.shape[0] < 2:
        raise CounterwarpError(
            f"a group analysis needs at least 2 maps, got an array of shape {values.shape}"
        )
    spatial = values.shape[1:]
    tested = np.ones(spatial, bool) if mask is None else np.asarray(mask, bool)
    if tested.shape != spatial:
        raise CounterwarpError(f"mask has shape {tested.shape}, the maps {spatial}")
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    filled = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / np.maximum(count, 1)
        squares = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0)
        sd = np.sqrt(squares / np.maximum(count - 1, 1))
        t = mean / (sd / np.sqrt(np.maximum(count, 1)))
    high = np.where(finite, values, -np.inf).max(axis=0)
    low = np.where(finite, values, np.inf).min(axis=0)
    size = np.maximum(np.abs(high), np.abs(low))
    with np.errstate(invalid="ignore"):
        zero_spread = (count >= 2) & (high - low <= 8 * np.finfo(np.float64).eps * size)
    defined = (count >= 2) & ~zero_spread
    t = np.where(defined, t, 0.0)
    dof = np.maximum(count - 1, 1)
    p = 2.0 * stats.t.sf(np.abs(t), dof)
    p = np.where(defined, p, 1.0)
    t = np.where(tested, t, 0.0)
    p = np.where(tested, p, 1.0)
    sd = np.where(zero_spread, 0.0, sd)
    mean = np.where(count > 0, mean, np.nan)
    return {"mean": mean, "sd": sd, "t": t, "p": p,
            "fdr": fdr_mask(p, q, tested & ~zero_spread), "zero_spread": zero_spread & tested}


def region_table(
    maps: np.ndarray,
    labels: np.ndarray,
    names: dict[int, str] | None = None,
    mask: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Mean log volume change per atlas region, with a one-sample t over subjects.

    Args:
        maps: ``(N, *S)`` per-subject log volume change maps.
        labels: ``(*S)`` integer label image, 0 = no region.
        names: label -> region name.
        mask: ``(*S)`` bool brain mask; voxels outside it count in no region (nor in the
            ``outside`` row, which then means "brain voxels outside every region").

    Returns:
        Rows ordered as :func:`counterwarp.stats.scores.region_means` orders them (largest
        ``|mean|`` first, ``outside`` last), each with the keys of :data:`REGION_COLUMNS`:
        the region mean of the group mean map (natural log), its percent volume change, the
        voxel count, and the across-subject sd, t and two-sided p of the subjects' region
        means.
    """
    values = np.asarray(maps, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.shape != values.shape[1:]:
        raise CounterwarpError(
            f"the atlas has shape {labels.shape}, the maps {values.shape[1:]}: give an atlas "
            f"on the maps' grid"
        )
    inside = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-missing voxels give nan
        mean_map = np.where(inside, np.nanmean(values, axis=0), np.nan)
    rows: list[dict[str, Any]] = []
    for entry in region_means(mean_map, labels, names):
        label = int(entry["label"])  # type: ignore[arg-type]
        where = (labels == label) & inside & np.isfinite(mean_map)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_subject = np.array(
                [float(np.nanmean(m[where])) if where.any() else np.nan for m in values]
            )
        per_subject = per_subject[np.isfinite(per_subject)]
        if per_subject.size >= 2:
            sd = float(per_subject.std(ddof=1))
            if sd > 0:
                t = float(per_subject.mean() / (sd / math.sqrt(per_subject.size)))
                p = float(2.0 * stats.t.sf(abs(t), per_subject.size - 1))
            else:
                t, p = float("nan"), float("nan")
        else:
            sd, t, p = float("nan"), float("nan"), float("nan")
        mean = float(entry["mean"])  # type: ignore[arg-type]
        rows.append({
            "label": label,
            "name": entry["name"],
            "mean_log_volume_change": mean,
            "percent_volume_change": 100.0 * math.expm1(mean) if math.isfinite(mean)
            else float("nan"),
            "n_voxels": entry["n_voxels"],
            "sd_across_subjects": sd,
            "t": t,
            "p": p,
        })
    return rows
