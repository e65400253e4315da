"""Sign-flip inference: FWE control on noise, power and sign on consistent blobs, the
zero-spread refusal, the 2**N bound, effect sizes and bootstrap intervals of region means."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from counterwarp.errors import CounterwarpError
from counterwarp.stats.permutation import (
    all_zero_spread,
    bootstrap_region_intervals,
    effect_size_map,
    sign_flip_inference,
    zero_spread,
)

SHAPE = (10, 10, 10)
POSITIVE = (slice(2, 5), slice(2, 5), slice(2, 5))
NEGATIVE = (slice(5, 8), slice(5, 8), slice(6, 9))


def _mask() -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    return mask


def _region(where: tuple[slice, ...]) -> np.ndarray:
    out = np.zeros(SHAPE, bool)
    out[where] = True
    return out


def _noise(seed: int, n: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *SHAPE))


def test_noise_family_wise_error_rate_is_controlled():
    """Max-t FWE: across 40 pure-noise groups, few have any significant voxel (about 5 %
    expected; an uncorrected test at 0.05 would flag every one of them)."""
    mask = _mask()
    flagged = [sign_flip_inference(_noise(seed), mask, np.eye(4), n_permutations=200,
                                   tfce=False, seed=seed)["fwe_t"].any() for seed in range(40)]
    assert sum(flagged) <= 6
    noise = _noise(100)
    result = sign_flip_inference(noise, mask, np.eye(4), n_permutations=200)
    assert result["tested"] and "warning" not in result
    assert result["fwe_t"].sum() <= 2
    assert result["fwe_tfce"].sum() <= 0.05 * mask.sum()
    d = effect_size_map(noise, mask)
    assert np.median(np.abs(d[mask])) < 0.5 and np.abs(d).max() < 2.5


def test_consistent_blobs_survive_with_their_sign():
    maps = _noise(1)
    maps[(slice(None), *POSITIVE)] += 3.0
    maps[(slice(None), *NEGATIVE)] -= 3.0
    mask, pos, neg = _mask(), _region(POSITIVE), _region(NEGATIVE)
    result = sign_flip_inference(maps, mask, np.eye(4), n_permutations=300)
    background = mask & ~pos & ~neg
    assert result["fwe_tfce"][pos].mean() > 0.8 and result["fwe_tfce"][neg].mean() > 0.8
    assert result["fwe_t"][pos | neg].mean() > 0.5
    assert result["fwe_tfce"][background].mean() < 0.05
    assert result["fwe_t"][background].mean() < 0.02
    assert (result["t"][pos] > 0).all() and (result["t"][neg] < 0).all()
    assert (result["tfce"][pos] > 0).all() and (result["tfce"][neg] < 0).all()
    assert np.allclose(result["t"][mask], stats.ttest_1samp(maps, 0.0, axis=0).statistic[mask])
    outside = ~mask
    assert not result["fwe_t"][outside].any() and not result["fwe_tfce"][outside].any()
    assert not result["t"][outside].any() and not result["logp_fwe_tfce"][outside].any()
    assert result["smallest_p"] == pytest.approx(1 / 301)
    assert result["n_distinct_flips"] == 2**9
    d = effect_size_map(maps, mask)
    assert d[pos].mean() > 2.0 and d[neg].mean() < -2.0
    assert np.median(np.abs(d[background])) < 0.5


def test_identical_maps_are_not_tested():
    same = np.repeat(_noise(2)[:1] + 1.0, 6, axis=0)
    mask = _mask()
    assert all_zero_spread(same, mask)
    assert (zero_spread(same, mask) == mask).all()
    result = sign_flip_inference(same, mask, np.eye(4), n_permutations=50)
    assert result["tested"] is False and "zero spread" in result["warning"]
    for key in ("fwe_t", "fwe_tfce", "t", "tfce", "logp_fwe_t", "logp_fwe_tfce"):
        assert not result[key].any(), key
    assert not effect_size_map(same, mask).any()
    varied = same.copy()
    varied[0, 5, 5, 5] += 1.0
    assert not all_zero_spread(varied, mask)


def test_zero_spread_voxels_are_left_out_of_the_test():
    """A region every subject shares exactly (t would be infinite) is not declared
    significant; the test still runs on the voxels that vary."""
    maps = _noise(3)
    maps[(slice(None), *POSITIVE)] = 0.7
    result = sign_flip_inference(maps, _mask(), np.eye(4), n_permutations=100)
    assert result["tested"]
    assert result["n_tested_voxels"] == _mask().sum() - 27
    assert not result["fwe_t"][POSITIVE].any() and not result["fwe_tfce"][POSITIVE].any()
    assert np.isfinite(result["t"]).all() and not result["t"][POSITIVE].any()


def test_few_subjects_bound_the_smallest_p():
    maps = _noise(4, n=4)
    maps[(slice(None), *POSITIVE)] += 10.0
    result = sign_flip_inference(maps, _mask(), np.eye(4), n_permutations=1000, tfce=False)
    assert result["n_permutations"] == 16 and result["n_distinct_flips"] == 8
    assert result["smallest_p"] == pytest.approx(1 / 8)
    assert "warning" in result and not result["fwe_t"].any()
    assert result["logp_fwe_t"].max() <= np.log10(8) + 1e-12


def test_same_seed_same_result():
    maps = _noise(5)
    first = sign_flip_inference(maps, _mask(), np.eye(4), n_permutations=100, tfce=False)
    again = sign_flip_inference(maps, _mask(), np.eye(4), n_permutations=100, tfce=False)
    other = sign_flip_inference(maps, _mask(), np.eye(4), n_permutations=100, tfce=False,
                                seed=1)
    assert np.array_equal(first["logp_fwe_t"], again["logp_fwe_t"])
    assert not np.array_equal(first["logp_fwe_t"], other["logp_fwe_t"])


def test_effect_size_is_mean_over_sd():
    maps = np.zeros((2, *SHAPE))
    maps[0], maps[1] = 1.0, 3.0  # mean 2, sd sqrt(2)
    maps[:, 4, 4, 4] = (-1.0, 2.0)  # mean 0.5, sd sqrt(4.5)
    maps[:, 3, 3, 3] = (5.0, 5.0)  # zero spread
    d = effect_size_map(maps, _mask())
    assert d[5, 5, 5] == pytest.approx(2 / np.sqrt(2))
    assert d[4, 4, 4] == pytest.approx(0.5 / np.sqrt(4.5))
    assert d[3, 3, 3] == 0.0 and d[0, 0, 0] == 0.0


def _region_maps(n: int, scale: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label 1 shifted by 0.3, label 2 pure noise; both with subject-level noise."""
    rng = np.random.default_rng(seed)
    maps = scale * (rng.normal(size=(n, *SHAPE)) + rng.normal(size=(n, 1, 1, 1)) * 0.3)
    labels = np.zeros(SHAPE, int)
    labels[POSITIVE] = 1
    labels[:, :, 8:] = 2
    maps[:, labels == 1] += 0.3
    return maps, labels


def test_bootstrap_intervals():
    maps, labels = _region_maps(12)
    rows = {r["label"]: r for r in bootstrap_region_intervals(maps, labels, n_boot=500)}
    assert set(rows) == {0, 1, 2} and rows[0]["name"] == "outside"
    for row in rows.values():
        assert row["ci_low"] <= row["mean_log_volume_change"] <= row["ci_high"]
        assert row["n_subjects"] == 12
        assert row["percent_ci_low"] == pytest.approx(100 * np.expm1(row["ci_low"]))
    assert rows[1]["n_voxels"] == 27 and rows[1]["ci_low"] > 0
    assert rows[2]["ci_low"] < 0 < rows[2]["ci_high"]
    subject_means = maps[:, labels == 1].mean(axis=1)
    assert rows[1]["mean_log_volume_change"] == pytest.approx(subject_means.mean())

    def width(rows: list[dict], label: int = 1) -> float:
        row = next(r for r in rows if r["label"] == label)
        return row["ci_high"] - row["ci_low"]

    half = bootstrap_region_intervals(*_region_maps(12, scale=0.5), n_boot=500)
    assert width(half, 2) == pytest.approx(0.5 * width(list(rows.values()), 2))
    small = bootstrap_region_intervals(*_region_maps(8), n_boot=500)
    large = bootstrap_region_intervals(*_region_maps(80), n_boot=500)
    assert width(large) < 0.6 * width(small)

    again = bootstrap_region_intervals(maps, labels, n_boot=500)
    assert again == bootstrap_region_intervals(maps, labels, n_boot=500)
    assert again[0]["ci_low"] != bootstrap_region_intervals(maps, labels, n_boot=500,
                                                            seed=1)[0]["ci_low"]
    inside = labels > 0
    masked = bootstrap_region_intervals(maps, labels, inside, n_boot=50)
    assert [r["label"] for r in masked] == [1, 2]


def test_one_map_is_refused():
    with pytest.raises(CounterwarpError, match="at least 2"):
        sign_flip_inference(_noise(0)[:1], _mask(), np.eye(4))
    with pytest.raises(CounterwarpError, match="at least 2"):
        effect_size_map(_noise(0)[:1], _mask())
