"""Scores of explanation maps against a ground-truth map (numpy in, floats out).

All functions are pure. Maps are arrays of one shape (2D or 3D voxels); a ``mask`` (bool,
same shape) restricts scoring to its voxels, typically the brain. Voxels where either map is
not finite (NaN, inf) are left out. A score that is undefined (constant input, fewer than
two voxels, an empty class) is ``nan``, never an exception or a warning.

Two scales are scored (see ``docs/method.md``, "what a small 2D probe showed"): voxel-wise,
and region scale after Gaussian smoothing, because inside uniform tissue a volume change cannot
be seen in the image and only boundary motion can be localised precisely.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage, stats

from counterwarp.errors import CounterwarpError

__all__ = [
    "localisation_auroc",
    "pearson",
    "region_means",
    "score_map",
    "smooth",
    "spearman",
]


def _as_array(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        raise CounterwarpError(f"{name} must be an array of voxels, got a scalar")
    return array


def _paired(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Flattened values of ``a`` and ``b`` inside ``mask`` where both are finite."""
    a = _as_array(a, "map")
    b = _as_array(b, "truth")
    if a.shape != b.shape:
        raise CounterwarpError(f"maps to compare differ in shape: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != a.shape:
            raise CounterwarpError(f"mask has shape {mask.shape}, the maps {a.shape}")
        keep &= mask.astype(bool)
    return a[keep], b[keep]


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1D float arrays; nan if undefined."""
    if x.size < 2:
        return float("nan")
    x = x - x.mean()
    y = y - y.mean()
    norm = np.sqrt(np.dot(x, x) * np.dot(y, y))
    if not norm > 0:
        return float("nan")
    return float(np.clip(np.dot(x, y) / norm, -1.0, 1.0))


def pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two maps of the same shape within ``mask``; nan if undefined."""
    x, y = _paired(a, b, mask)
    return _correlation(x, y)


def spearman(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Spearman rank correlation (ties get average ranks) within ``mask``; nan if undefined."""
    x, y = _paired(a, b, mask)
    if x.size < 2:
        return float("nan")
    return _correlation(stats.rankdata(x), stats.rankdata(y))


def localisation_auroc(
    map: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None = None,
    threshold: float = 0.05,
) -> float:
    """How well ``|map|`` ranks changed voxels above unchanged ones, within ``mask``.

    Positives are voxels with ``|truth| > threshold`` (truth in its own units, e.g. log volume
    change), negatives the rest. AUROC = Mann-Whitney U / (n_pos * n_neg) with average ranks
    for ties, so 1 = every changed voxel scores higher, 0.5 = chance, 0 = reversed.

    Returns:
        AUROC in [0, 1]; nan if either class is empty.
    """
    score, target = _paired(map, truth, mask)
    positive = np.abs(target) > threshold
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(np.abs(score))
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def smooth(
    volume: np.ndarray, sigma_voxels: float = 1.5, mask: np.ndarray | None = None
) -> np.ndarray:
    """Gaussian-smoothed copy of a map (float64, same shape), sd ``sigma_voxels`` voxels.

    With ``mask``, smoothing is normalised to the mask (``G*(v m) / G*m``) so values outside
    it do not bleed in, and the result is 0 outside the mask. Non-finite voxels count as 0.
    """
    values = np.nan_to_num(_as_array(volume, "volume"), nan=0.0, posinf=0.0, neginf=0.0)
    if sigma_voxels < 0:
        raise CounterwarpError(f"sigma_voxels must be >= 0, got {sigma_voxels}")
    if mask is None:
        return ndimage.gaussian_filter(values, sigma_voxels)
    weight = np.asarray(mask).astype(np.float64)
    if weight.shape != values.shape:
        raise CounterwarpError(f"mask has shape {weight.shape}, the volume {values.shape}")
    numerator = ndimage.gaussian_filter(values * weight, sigma_voxels)
    denominator = ndimage.gaussian_filter(weight, sigma_voxels)
    out = np.zeros_like(values)
    inside = (weight > 0) & (denominator > 0)
    out[inside] = numerator[inside] / denominator[inside]
    return out


def score_map(
    map: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None,
    signed: bool,
    threshold: float = 0.05,
    sigma: float = 1.5,
) -> dict[str, float]:
    """Score one explanation map against the ground-truth change map.

    Args:
        map: explanation, e.g. a log volume change or a saliency map, shape ``S``.
        truth: true log volume change, shape ``S``.
        mask: bool ``S`` (e.g. brain), or None for all voxels.
        signed: True for maps that say grow (+) vs shrink (-) (counterwarp's volume change).
            False for saliency maps, which carry no sign of volume change: then both the map
            and the truth are replaced by their magnitudes before correlating, so a map is
            judged on *where*, not *which way*.
        threshold: ``|truth|`` above which a voxel counts as changed (for the AUROC).
        sigma: Gaussian sd in voxels for the region-scale score.

    Returns:
        ``pearson``, ``spearman`` (voxel-wise), ``auroc`` (localisation, always on
        ``|map|``), ``pearson_smoothed`` (both maps smoothed within the mask, region scale).
    """
    a = _as_array(map, "map")
    t = _as_array(truth, "truth")
    if not signed:
        a, t = np.abs(a), np.abs(t)
    return {
        "pearson": pearson(a, t, mask),
        "spearman": spearman(a, t, mask),
        "auroc": localisation_auroc(a, t, mask, threshold=threshold),
        "pearson_smoothed": pearson(smooth(a, sigma, mask), smooth(t, sigma, mask), mask),
    }


def region_means(
    map: np.ndarray,
    labels: np.ndarray,
    names: Mapping[int, str] | None = None,
) -> list[dict[str, object]]:
    """Mean of a map in each labelled region.

    Args:
        map: values, shape ``S``.
        labels: integer label image, shape ``S``; 0 = unlabelled.
        names: label -> region name; missing labels are named ``"label <k>"``.

    Returns:
        One dict per nonzero label, ``{"label", "name", "mean", "n_voxels"}``, sorted by
        ``|mean|`` descending (nan means last), then one ``"outside"`` entry (label 0: every
        unlabelled voxel), always last. Non-finite map values are left out of the means.
    """
    values = _as_array(map, "map")
    labels = np.asarray(labels)
    if labels.shape != values.shape:
        raise CounterwarpError(f"labels have shape {labels.shape}, the map {values.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise CounterwarpError("labels must be integers (a label image, not a map)")
        labels = labels.astype(np.int64)
    names = dict(names or {})
    finite = np.isfinite(values)

    def entry(label: int, name: str, where: np.ndarray) -> dict[str, object]:
        selected = values[where & finite]
        mean = float(selected.mean()) if selected.size else float("nan")
        return {"label": label, "name": name, "mean": mean, "n_voxels": int(selected.size)}

    regions = [
        entry(int(k), names.get(int(k), f"label {int(k)}"), labels == k)
        for k in np.unique(labels)
        if k != 0
    ]
    regions.sort(key=lambda r: (np.isnan(r["mean"]), -abs(r["mean"])))  # type: ignore[arg-type]
    regions.append(entry(0, names.get(0, "outside"), labels == 0))
    return regions
