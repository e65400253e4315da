"""Tests of counterwarp.stats.scores on hand-made maps with known answers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from counterwarp.errors import CounterwarpError
from counterwarp.stats.scores import (
    localisation_auroc,
    pearson,
    region_means,
    score_map,
    smooth,
    spearman,
)


@pytest.fixture()
def truth() -> np.ndarray:
    """(16, 16, 16) log volume change: a growing blob, a shrinking blob, zero elsewhere."""
    grid = np.stack(np.meshgrid(*(np.arange(16),) * 3, indexing="ij"))
    grow = np.exp(-((grid - np.array([5, 5, 8])[:, None, None, None]) ** 2).sum(0) / 6.0)
    shrink = np.exp(-((grid - np.array([11, 10, 8])[:, None, None, None]) ** 2).sum(0) / 4.0)
    return 0.4 * grow - 0.3 * shrink


def test_identical_and_negated(truth: np.ndarray) -> None:
    assert pearson(truth, truth) == pytest.approx(1.0)
    assert pearson(truth, -truth) == pytest.approx(-1.0)
    assert spearman(truth, truth) == pytest.approx(1.0)
    assert spearman(truth, -truth) == pytest.approx(-1.0)


def test_monotone_transform() -> None:
    x = np.linspace(-2.0, 2.0, 200).reshape(10, 20)
    y = np.exp(3.0 * x)
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.95


def test_auroc_known(truth: np.ndarray) -> None:
    assert localisation_auroc(np.abs(truth), truth) == pytest.approx(1.0)
    # sign of the map is irrelevant: AUROC ranks |map|
    assert localisation_auroc(-np.abs(truth), truth) == pytest.approx(1.0)
    assert localisation_auroc(1.0 / (1.0 + np.abs(truth)), truth) == pytest.approx(0.0)
    noise = np.random.default_rng(0).normal(size=truth.shape)
    assert localisation_auroc(noise, truth) == pytest.approx(0.5, abs=0.06)


def test_auroc_ties_and_empty_class(truth: np.ndarray) -> None:
    # a constant map ties every voxel: AUROC exactly 0.5
    assert localisation_auroc(np.ones_like(truth), truth) == pytest.approx(0.5)
    assert math.isnan(localisation_auroc(truth, np.zeros_like(truth)))
    assert math.isnan(localisation_auroc(truth, np.ones_like(truth)))


def test_auroc_small_exact() -> None:
    truth = np.array([0.0, 0.0, 1.0, 1.0])
    score = np.array([0.1, 0.3, 0.2, 0.4])
    # pairs (pos, neg): (0.2>0.1) (0.2<0.3) (0.4>0.1) (0.4>0.3) -> 3 / 4
    assert localisation_auroc(score, truth) == pytest.approx(0.75)


def test_mask_restricts_voxels(truth: np.ndarray) -> None:
    mask = np.zeros(truth.shape, dtype=bool)
    mask[2:14, 2:14, 4:12] = True
    wrong_outside = truth.copy()
    wrong_outside[~mask] = np.random.default_rng(1).normal(size=int((~mask).sum()))
    assert pearson(wrong_outside, truth, mask) == pytest.approx(1.0)
    assert spearman(wrong_outside, truth, mask) == pytest.approx(1.0)
    assert localisation_auroc(np.abs(wrong_outside), truth, mask) == pytest.approx(1.0)
    assert pearson(wrong_outside, truth) < 0.9
    scores = score_map(wrong_outside, truth, mask, signed=True)
    assert scores["pearson"] == pytest.approx(1.0)
    assert scores["pearson_smoothed"] == pytest.approx(1.0)


def test_unsigned_scoring_ignores_sign(truth: np.ndarray) -> None:
    flipped = -truth
    signed = score_map(truth, truth, None, signed=True)
    unsigned = score_map(flipped, truth, None, signed=False)
    assert set(signed) == {"pearson", "spearman", "auroc", "pearson_smoothed"}
    for key in signed:
        assert unsigned[key] == pytest.approx(signed[key])
    assert score_map(flipped, truth, None, signed=True)["pearson"] == pytest.approx(-1.0)


def test_smooth() -> None:
    volume = np.zeros((9, 9, 9))
    volume[4, 4, 4] = 1.0
    out = smooth(volume, 1.5)
    assert out.shape == volume.shape
    assert out.sum() == pytest.approx(1.0)
    assert out[4, 4, 4] == out.max() < 1.0
    mask = np.zeros(volume.shape, dtype=bool)
    mask[2:7, 2:7, 2:7] = True
    constant = np.where(mask, 2.0, 100.0)
    masked = smooth(constant, 1.5, mask)
    np.testing.assert_allclose(masked[mask], 2.0)  # nothing bleeds in from outside
    assert np.all(masked[~mask] == 0.0)


def test_region_means_exact() -> None:
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[0, :2] = 1
    labels[1:3, 1:3] = 2
    labels[3, 3] = 7
    values = np.arange(16, dtype=float).reshape(4, 4)
    rows = region_means(values, labels, {1: "left", 2: "right"})
    assert [r["name"] for r in rows] == ["label 7", "right", "left", "outside"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["left"]["mean"] == pytest.approx(0.5)
    assert by_name["right"]["mean"] == pytest.approx((5 + 6 + 9 + 10) / 4)
    assert by_name["label 7"]["mean"] == pytest.approx(15.0)
    outside = [v for v, k in zip(values.ravel(), labels.ravel(), strict=True) if k == 0]
    assert by_name["outside"]["mean"] == pytest.approx(np.mean(outside))
    assert by_name["outside"]["n_voxels"] == len(outside)
    assert by_name["right"]["label"] == 2


def test_region_means_sorted_by_magnitude() -> None:
    labels = np.array([1, 1, 2, 2, 3, 0])
    values = np.array([1.0, 1.0, -5.0, -5.0, 3.0, 9.0])
    rows = region_means(values, labels)
    assert [r["label"] for r in rows] == [2, 3, 1, 0]


def test_constant_input_gives_nan_without_warning(truth: np.ndarray) -> None:
    constant = np.full(truth.shape, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(pearson(constant, truth))
        assert math.isnan(spearman(constant, truth))
        assert math.isnan(pearson(truth, constant))
        assert math.isnan(pearson(np.ones(1), np.ones(1)))
        scores = score_map(constant, truth, None, signed=True)
    assert math.isnan(scores["pearson"]) and math.isnan(scores["pearson_smoothed"])
    assert scores["auroc"] == pytest.approx(0.5)


def test_non_finite_voxels_are_ignored(truth: np.ndarray) -> None:
    holed = truth.copy()
    holed[0, 0, 0] = np.nan
    assert pearson(holed, truth) == pytest.approx(1.0)


def test_shape_mismatch_is_user_error() -> None:
    with pytest.raises(CounterwarpError, match="shape"):
        pearson(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(CounterwarpError, match="mask"):
        pearson(np.zeros((3, 3)), np.zeros((3, 3)), np.ones((2, 2), dtype=bool))
