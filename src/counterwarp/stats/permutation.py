"""Group inference on per-subject maps by sign flipping, with family-wise error control.

What is tested is the **consistency of the maps across subjects**. Null hypothesis at a
voxel: each subject's value (e.g. its log volume change) is symmetric about 0, so flipping
the sign of a whole subject map leaves the joint distribution of the data unchanged. Each
permutation draws one random sign per subject, recomputes the one-sample t map
(``mean / (sd / sqrt(N))``, N - 1 dof) and keeps its maximum ``|t|`` over the brain (and
the maximum ``|TFCE|``, Smith & Nichols 2009); a voxel's family-wise error (FWE) p-value
is the share of permutations whose maximum reaches its own value, so ``p_fwe <= alpha``
bounds the chance of **any** false positive in the brain by ``alpha`` (strong control for
max-t; TFCE's control is at the level of the whole TFCE map).

What it does NOT test: that a disease changes the anatomy there, that the classifier is
right, or that the maps are correct. Maps that repeat one pattern in every subject pass it
whatever that pattern means; a map value symmetric about 0 in the population but skewed
in the sample is not what it guards against either (sign flipping needs exchangeable,
independent subjects). Effect sizes (:func:`effect_size_map`) and bootstrap intervals of
region means (:func:`bootstrap_region_intervals`) describe magnitude; they control no
error rate.

With N subjects there are only ``2**N`` sign patterns, and for the two-sided test a
pattern and its mirror image give the same maximum ``|t|`` and ``|TFCE|``, so the null
distribution has at most ``2**(N - 1)`` distinct values and no FWE p can be smaller than
``1 / 2**(N - 1)`` (with N = 5, 1/16 > 0.05: nothing can be significant).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from counterwarp.errors import CounterwarpError
from counterwarp.stats.group import group_statistics
from counterwarp.stats.scores import region_means

__all__ = [
    "all_zero_spread",
    "bootstrap_region_intervals",
    "effect_size_map",
    "sign_flip_inference",
    "zero_spread",
]


def _spread(maps: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The maps as float64 ``(N, *S)`` and :func:`group_statistics` of them in ``mask``.

    Raises CounterwarpError for fewer than 2 maps or a mask of another shape.
    """
    values = np.asarray(maps, dtype=np.float64)
    return values, group_statistics(values, np.asarray(mask, bool))


def zero_spread(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(*S)`` bool: masked voxels whose finite values agree in all N maps ``(N, *S)``.

    The definition of :func:`counterwarp.stats.group.group_statistics` (values at most 8
    float64 epsilons of their magnitude apart), reused, not repeated. False outside mask.
    """
    return _spread(maps, mask)[1]["zero_spread"]


def all_zero_spread(maps: np.ndarray, mask: np.ndarray) -> bool:
    """True when no voxel in ``mask`` varies across the N maps ``(N, *S)``.

    E.g. every subject got the same map, or the mask is empty: then there is nothing a
    test could say and no significance may be reported. Voxels with fewer than 2 finite
    values count as not varying.
    """
    _, result = _spread(maps, mask)
    return not bool(np.any(np.asarray(mask, bool) & (result["sd"] > 0)))


def effect_size_map(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Cohen's d per voxel: ``mean / sd`` (sd with ddof 1) over N maps ``(N, *S)``.

    Args:
        maps: per-subject maps (N >= 2), e.g. log volume change (units cancel: d is unitless).
            Non-finite values are left out at their voxel.
        mask: ``(*S)`` bool, the voxels of interest.

    Returns:
        ``(*S)`` float64 d; 0 outside ``mask``, at zero-spread voxels and where fewer than 2
        values are finite.
    """
    _, result = _spread(maps, mask)
    sd = result["sd"]
    defined = np.asarray(mask, bool) & (sd > 0) & ~result["zero_spread"]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(defined, result["mean"] / np.where(defined, sd, 1.0), 0.0)
    return np.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)


def sign_flip_inference(
    maps: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    n_permutations: int = 1000,
    tfce: bool = True,
    alpha: float = 0.05,
    seed: int = 0,
    n_jobs: int = 1,
) -> dict[str, Any]:
    """Two-sided sign-flip permutation test of the group mean, FWE by max-t (and TFCE).

    Runs ``nilearn.mass_univariate.permuted_ols`` with ``tested_vars`` = a column of ones
    (intercept only, no confounds, ``model_intercept=False``) and ``target_vars`` = the
    ``(N, V)`` tested voxels. nilearn (0.14, ``permuted_least_squares.py``) detects this
    design (``intercept_test``: one regressor with one unique value) and then, instead of
    shuffling rows, multiplies every subject's row by a random sign (``randint(2) * 2 - 1``
    per subject and permutation, drawn with replacement, not enumerated); its t is the
    one-sample t with N - 1 dof. p-values are ``(1 + #{perm: max >= observed}) /
    (n_perm + 1)`` (the observed data count as one permutation).

    Tested voxels: ``mask`` minus zero-spread voxels (identical values give an infinite
    t under almost every flip) and minus voxels with a non-finite value in any map. TFCE
    uses 6-connected neighbourhoods among the tested voxels (nilearn's
    ``calculate_tfce``: E = 0.5, H = 2, 100 height steps).

    Number of permutations: with N subjects there are ``2**N`` sign patterns; since
    random draws past ``2**N`` add Monte-Carlo precision but no resolution, at most
    ``2**N`` are drawn. For the two-sided test mirror patterns give the same null maximum,
    so only ``2**(N - 1)`` distinct flips exist (``n_distinct_flips``) and the exact
    permutation p is never below ``1 / 2**(N - 1)``; the Monte-Carlo p is clipped to that
    bound (conservative), so ``smallest_p = max(1 / (n_perm + 1), 1 / 2**(N - 1))``.

    Args:
        maps: ``(N, *S)`` per-subject maps (N >= 2), e.g. log volume change; 3D ``S`` for
            TFCE.
        mask: ``(*S)`` bool, the voxels tested (the brain): the family of the FWE control.
        affine: ``(4, 4)`` voxel-to-world matrix of the maps (mm), for nilearn's masker.
        n_permutations: sign patterns to draw (>= 1; capped at ``2**N``).
        tfce: also run TFCE (needs 3D maps; much slower than max-t alone).
        alpha: FWE level of the returned masks, in (0, 1).
        seed: ``random_state`` of nilearn.
        n_jobs: joblib workers of nilearn.

    Returns:
        ``t`` (one-sample t), ``logp_fwe_t`` (-log10 FWE p of max-t), ``fwe_t`` (bool,
        ``p_fwe <= alpha``); with ``tfce`` also ``tfce``, ``logp_fwe_tfce``, ``fwe_tfce``:
        all ``(*S)``, 0 / False outside the tested voxels. Plus ``tested`` (bool),
        ``n_tested_voxels``, ``n_subjects``, ``n_permutations`` (drawn), ``n_distinct_flips``
        (``2**(N - 1)``), ``smallest_p``, ``alpha``, ``method``; and ``warning`` (text)
        when nothing was tested (``tested`` False, all masks False) or when ``smallest_p >
        alpha`` (nothing can be significant).
    """
    values, stats = _spread(maps, mask)
    mask = np.asarray(mask, bool)
    n, shape = values.shape[0], values.shape[1:]
    if n_permutations < 1:
        raise CounterwarpError(f"n_permutations must be >= 1, got {n_permutations}")
    if not 0 < alpha < 1:
        raise CounterwarpError(f"alpha must be in (0, 1), got {alpha!r}")
    if tfce and len(shape) != 3:
        raise CounterwarpError(f"TFCE needs 3D maps, got maps of shape {shape}: use tfce=False")
    n_perm = int(min(n_permutations, 2**n))
    distinct = 2 ** (n - 1)
    smallest = max(1.0 / (n_perm + 1), 1.0 / distinct)
    kinds = ("t", "tfce") if tfce else ("t",)
    result: dict[str, Any] = {
        "tested": False, "n_tested_voxels": 0, "n_subjects": n, "n_permutations": n_perm,
        "n_distinct_flips": distinct, "smallest_p": smallest, "alpha": alpha,
        "method": f"two-sided sign-flip permutation test of the mean (nilearn permuted_ols, "
                  f"intercept only), FWE by max-{' and max-'.join(kinds)}",
    }
    for kind in kinds:
        result[kind] = np.zeros(shape)
        result[f"logp_fwe_{kind}"] = np.zeros(shape)
        result[f"fwe_{kind}"] = np.zeros(shape, bool)
    tested = mask & (stats["sd"] > 0) & ~stats["zero_spread"] & np.isfinite(values).all(0)
    if not tested.any():  # all_zero_spread, or no voxel with complete data
        result["warning"] = (
            f"no masked voxel varies across the {n} maps (zero spread, or no complete data):"
            " nothing was tested and no significance is reported")
        return result

    import nibabel as nib
    from nilearn.maskers import NiftiMasker
    from nilearn.mass_univariate import permuted_ols

    masker = None
    if tfce:
        image = nib.Nifti1Image(tested.astype(np.uint8), np.asarray(affine, np.float64))
        masker = NiftiMasker(mask_img=image).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # nilearn's deprecations
        out = permuted_ols(
            np.ones((n, 1)), values[:, tested], model_intercept=False, n_perm=n_perm,
            two_sided_test=True, random_state=int(seed), n_jobs=int(n_jobs), masker=masker,
            tfce=tfce, output_type="dict")
    bound = math.log10(distinct)  # -log10 of the smallest exact permutation p
    for kind in kinds:
        score = np.zeros(shape)
        score[tested] = np.asarray(out[kind], np.float64).reshape(-1)
        logp = np.zeros(shape)
        logp[tested] = np.minimum(np.asarray(out[f"logp_max_{kind}"]).reshape(-1), bound)
        result[kind] = score
        result[f"logp_fwe_{kind}"] = logp
        result[f"fwe_{kind}"] = tested & (10.0 ** -logp <= alpha * (1 + 1e-9))
    result.update({"tested": True, "n_tested_voxels": int(tested.sum())})
    if smallest > alpha:
        result["warning"] = (
            f"with {n} subjects the smallest attainable p is {smallest:.3g} > alpha = "
            f"{alpha}: no voxel can be significant")
    return result


def bootstrap_region_intervals(
    maps: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    names: Mapping[int, str] | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Percentile-bootstrap interval, over subjects, of each region's group mean.

    Each subject's region mean (of its finite voxels) is one observation; ``n_boot``
    resamples of the N subjects with replacement (one ``(n_boot, N)`` index array from
    ``numpy.random.default_rng(seed)``) give the distribution of their mean, and the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles bound the interval. A subject
    without data in a region is left out of that region's resample means.

    Args:
        maps: ``(N, *S)`` per-subject log volume change (natural log).
        labels: ``(*S)`` integer label image, 0 = no region.
        mask: ``(*S)`` bool brain mask (default: every voxel); voxels outside it count in
            no region.
        names: label -> region name (default ``"label <k>"``, and ``"outside"`` for 0).
        n_boot: bootstrap resamples (>= 1).
        level: coverage of the interval, in (0, 1).
        seed: seed of the resampling.

    Returns:
        Rows in :func:`counterwarp.stats.scores.region_means`' order (largest ``|mean|``
        first), one per label > 0 present, then an ``outside`` row (label 0: masked
        voxels in no region) only if there are such voxels. Keys: ``label, name,
        mean_log_volume_change, ci_low, ci_high`` (natural log), ``percent_volume_change,
        percent_ci_low, percent_ci_high`` (``100 * (exp(x) - 1)``), ``n_subjects`` (with
        data), ``n_voxels``. Undefined values are nan (the interval needs 2 subjects).
    """
    values = np.asarray(maps, dtype=np.float64)
    labels = np.asarray(labels)
    if values.ndim < 2 or values.shape[0] < 1 or labels.shape != values.shape[1:]:
        raise CounterwarpError(
            f"need maps (N, *S) and labels (*S): got maps {values.shape}, labels "
            f"{labels.shape}")
    inside = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    if inside.shape != labels.shape:
        raise CounterwarpError(f"mask has shape {inside.shape}, the maps {labels.shape}")
    if n_boot < 1 or not 0 < level < 1:
        raise CounterwarpError(f"need n_boot >= 1 and level in (0, 1), got {n_boot}, {level}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-missing voxels give nan
        mean_map = np.where(inside, np.nanmean(values, axis=0), np.nan)
    entries = [e for e in region_means(mean_map, labels, names)
               if int(e["label"]) != 0 or int(e["n_voxels"]) > 0]  # type: ignore[call-overload]
    n = values.shape[0]
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    tail = 50.0 * (1.0 - level)
    rows: list[dict[str, Any]] = []
    for entry in entries:
        label = int(entry["label"])  # type: ignore[call-overload]
        where = (labels == label) & inside & np.isfinite(mean_map)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            subject = np.nanmean(values[:, where], axis=1) if where.any() else np.full(n, np.nan)
            mean = float(np.nanmean(subject))
            boot = np.nanmean(subject[draws], axis=1)  # (n_boot,)
            low, high = (np.nanpercentile(boot, [tail, 100.0 - tail])
                         if np.isfinite(subject).sum() >= 2 else (np.nan, np.nan))
        rows.append({
            "label": label, "name": entry["name"], "mean_log_volume_change": mean,
            "ci_low": float(low), "ci_high": float(high),
            "percent_volume_change": 100.0 * math.expm1(mean) if math.isfinite(mean)
            else float("nan"),
            "percent_ci_low": 100.0 * float(np.expm1(low)),
            "percent_ci_high": 100.0 * float(np.expm1(high)),
            "n_subjects": int(np.isfinite(subject).sum()), "n_voxels": int(where.sum()),
        })
    return rows
