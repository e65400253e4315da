"""Figures of volumes: world cuts shared by a subject's panels, letters from the affine,
colour scales that compare across panels, maps only inside the brain (tiny 16^3 shapes)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from counterwarp.errors import CounterwarpError
from counterwarp.report.display import (
    DEFAULT_VOLUME_CHANGE_LIMIT,
    colorbar_label,
    colorbar_range,
    draw_volume,
    new_figure,
    normalised_saliency,
    subject_cut_coords,
    volume_change_scale,
)
from counterwarp.report.figures import (
    draw_explanation,
    draw_methods,
    draw_saliency,
    explanation_panel,
    progression_gif,
    saliency_panel,
    stat_map_figure,
)

SHAPE = (16, 16, 16)
# 2 mm voxels, RAS, origin far from 0 so mm and voxel indices cannot coincide
AFFINE = np.array([[2.0, 0, 0, -20.0], [0, 2.0, 0, -30.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])


def _anatomy() -> np.ndarray:
    """A lopsided brain: a box from voxel (3, 4, 2) to (11, 12, 12) plus a bright lump on the
    right (voxels x = 12..14, 4..8 mm), z-scored-like values, zero outside."""
    rng = np.random.default_rng(0)
    image = np.zeros(SHAPE)
    box = np.clip(rng.normal(size=(9, 9, 11)), -3, 3)
    image[3:12, 4:13, 2:13] = np.where(box == 0, 0.1, box)  # no background inside
    image[12:15, 6:9, 5:8] = 10.0  # the brightest voxels
    return image


def _bump(centre: tuple[int, int, int], amplitude: float) -> np.ndarray:
    grid = np.indices(SHAPE).astype(float)
    r2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return amplitude * np.exp(-r2 / 4.0)


def _las_copy(values: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same volume stored with axis 0 running right -> left (LAS)."""
    flipped = affine.copy()
    flipped[:, 0] = -affine[:, 0]
    flipped[:3, 3] = affine[:3, :3] @ np.array([values.shape[0] - 1, 0, 0]) + affine[:3, 3]
    return values[::-1].copy(), flipped


def test_remove_and_inject_panels_share_world_cuts_whatever_the_maps() -> None:
    anatomy = _anatomy()
    inject = _bump((5, 6, 4), 0.4)  # peaks far apart
    remove = _bump((10, 11, 10), -0.3)
    assert np.unravel_index(np.argmax(np.abs(inject)), SHAPE) != np.unravel_index(
        np.argmax(np.abs(remove)), SHAPE)
    first = draw_explanation(anatomy, anatomy, inject, affine=AFFINE, title="inject")
    second = draw_explanation(anatomy, anatomy, remove, affine=AFFINE, title="remove")
    expected = subject_cut_coords(anatomy, AFFINE)
    assert first.cut_coords == second.cut_coords == expected
    for drawing in (first, second):
        assert len(drawing.displays) == 4
        for display in drawing.displays.values():
            assert tuple(display.cut_coords) == pytest.approx(expected)
    # the cut is a property of the anatomy: neither map's peak (in mm) is on it
    for values in (inject, remove):
        peak = np.unravel_index(np.argmax(np.abs(values)), SHAPE)
        peak_mm = (AFFINE @ np.array([*peak, 1.0]))[:3]
        assert not np.allclose(peak_mm, expected)


def test_cut_coordinates_are_the_brain_centre_in_mm() -> None:
    anatomy = np.zeros(SHAPE)
    anatomy[4:11, 2:9, 6:15] = 1.0  # centre voxel (7, 5, 10)
    cuts = subject_cut_coords(anatomy, AFFINE)
    assert cuts == pytest.approx((2 * 7 - 20.0, 2 * 5 - 30.0, 2 * 10 - 10.0))
    assert not np.allclose(cuts, (7, 5, 10))  # not voxel indices
    assert subject_cut_coords(anatomy) == pytest.approx((7.0, 5.0, 10.0))  # no affine: 1 mm


def test_a_las_copy_gives_the_same_cuts_and_the_same_pictures() -> None:
    anatomy = _anatomy()
    change = _bump((12, 7, 6), 0.5)  # on the lump, on the right
    las_anatomy, las_affine = _las_copy(anatomy, AFFINE)
    las_change, _ = _las_copy(change, AFFINE)
    assert not np.allclose(las_anatomy, anatomy)  # the stored arrays really differ
    ras = draw_explanation(anatomy, anatomy, change, affine=AFFINE)
    las = draw_explanation(las_anatomy, las_anatomy, las_change, affine=las_affine)
    assert las.cut_coords == pytest.approx(ras.cut_coords)
    for name in ("original", "volume change"):
        for direction in ("x", "y", "z"):
            left = [np.ma.filled(im.get_array(), np.nan)
                    for im in ras.displays[name].axes[direction].ax.images]
            right = [np.ma.filled(im.get_array(), np.nan)
                     for im in las.displays[name].axes[direction].ax.images]
            assert len(left) == len(right) >= 1
            for a, b in zip(left, right, strict=True):
                np.testing.assert_allclose(a, b, equal_nan=True)
    # and the right-hand lump (x = 4..8 mm) is drawn on the right (neurological view)
    for drawing in (ras, las):
        image = drawing.displays["original"].axes["y"].ax.images[-1]  # the anatomy
        coronal = np.ma.filled(image.get_array(), -np.inf)
        left, right, _, _ = image.get_extent()
        column = int(np.argmax(coronal.max(axis=0)))
        x_mm = left + (column + 0.5) * (right - left) / coronal.shape[1]
        assert 3.0 <= x_mm <= 9.0  # the box ends at x = 2 mm; the cut is at x = -2 mm


def test_views_carry_orientation_letters() -> None:
    drawing = draw_explanation(_anatomy(), _anatomy(), np.zeros(SHAPE), affine=AFFINE)
    display = drawing.displays["original"]
    letters = {d: {t.get_text() for t in cut.ax.texts} for d, cut in display.axes.items()}
    assert {"P", "A", "S", "I"} <= letters["x"]
    assert {"L", "R", "S", "I"} <= letters["y"]
    assert {"L", "R", "A", "P"} <= letters["z"]


def test_volume_change_bar_is_percent_and_fixed_for_both_directions() -> None:
    anatomy = _anatomy()
    strong = draw_explanation(anatomy, anatomy, _bump((6, 7, 5), 1.5), affine=AFFINE)
    weak = draw_explanation(anatomy, anatomy, _bump((9, 9, 9), -0.05), affine=AFFINE)
    for drawing in (strong, weak):
        display = drawing.displays["volume change"]
        assert "%" in colorbar_label(display)
        assert colorbar_range(display) == pytest.approx(
            (-DEFAULT_VOLUME_CHANGE_LIMIT, DEFAULT_VOLUME_CHANGE_LIMIT))
        assert len(drawing.colorbar_labels()) == 4  # one per map
    custom = draw_explanation(anatomy, anatomy, np.zeros(SHAPE), affine=AFFINE, limit=20)
    assert colorbar_range(custom.displays["volume change"]) == pytest.approx((-20, 20))
    assert "20" in colorbar_label(custom.displays["volume change"])


def test_maps_are_drawn_only_inside_the_brain() -> None:
    anatomy = _anatomy()
    brain = anatomy != 0
    cuts = subject_cut_coords(anatomy, AFFINE)
    masks = []
    for overlay in (np.full(SHAPE, 30.0), np.where(brain, 30.0, 0.0)):
        figure = new_figure(9.5, 2.4)
        display = draw_volume(figure, (0, 0, 1, 1), anatomy, cuts, affine=AFFINE,
                              overlay=overlay, scale=volume_change_scale())
        masks.append([np.ma.getmaskarray(cut.ax.images[-1].get_array())
                      for cut in display.axes.values()])
    for everywhere, inside in zip(*masks, strict=True):
        np.testing.assert_array_equal(everywhere, inside)
        assert not everywhere.all()  # something was drawn


def test_saliency_panel_shares_the_subject_cuts_and_one_normalised_scale() -> None:
    anatomy = _anatomy()
    maps = {"gradient": 1e-4 * _bump((5, 6, 4), 1.0), "gradcam": 50.0 * _bump((10, 9, 9), 1.0),
            "zeros": np.zeros(SHAPE)}
    drawing = draw_saliency(anatomy, maps, affine=AFFINE)
    explanation = draw_explanation(anatomy, anatomy, _bump((5, 6, 4), 0.3), affine=AFFINE)
    assert drawing.cut_coords == explanation.cut_coords == subject_cut_coords(anatomy, AFFINE)
    labels = drawing.colorbar_labels()
    assert set(labels) == {"image", *maps}  # one bar per map
    method_labels = {labels[name] for name in maps}
    assert len(method_labels) == 1 and "99.5" in method_labels.pop()
    for name in maps:
        assert colorbar_range(drawing.displays[name]) == pytest.approx((0.0, 1.0))
        assert tuple(drawing.displays[name].cut_coords) == pytest.approx(drawing.cut_coords)


def test_saliency_normalisation_ignores_units_and_the_outside() -> None:
    brain = _anatomy() != 0
    values = _bump((6, 7, 7), 1.0) - 0.3
    values[~brain] = 1e6  # huge values outside the brain must not set the scale
    a = normalised_saliency(values, brain)
    b = normalised_saliency(-1000.0 * values, brain)
    np.testing.assert_allclose(a, b)
    assert a.max() == pytest.approx(1.0) and a.min() == 0.0
    assert np.all(a[~brain] == 0)
    assert np.mean(a[brain] == 1.0) <= 0.01  # clipped above the 99.5th percentile only


def test_benchmark_figure_uses_the_subject_cuts_for_every_method() -> None:
    anatomy = _anatomy()
    truth = _bump((10, 10, 10), 0.5)
    drawing = draw_methods(anatomy, truth, {"simulator_inject": _bump((5, 5, 5), 0.2),
                                            "gradient": _bump((6, 6, 9), 1.0)},
                           signed={"simulator_inject"}, affine=AFFINE)
    assert drawing.cut_coords == subject_cut_coords(anatomy, AFFINE)
    for display in drawing.displays.values():
        assert tuple(display.cut_coords) == pytest.approx(drawing.cut_coords)
    labels = drawing.colorbar_labels()
    assert labels["truth"] == labels["simulator_inject"] and "%" in labels["truth"]
    assert "99.5" in labels["gradient"]


def test_two_dimensional_slices_are_cut_at_their_plane() -> None:
    image = _anatomy()[:, 8, :]  # (X, Z) coronal slice
    drawing = draw_saliency(image, {"gradient": image ** 2})
    assert drawing.cut_coords == (0.0,)  # no affine: coronal at y = 0 mm
    assert {cut.direction for cut in drawing.displays["image"].axes.values()} == {"y"}
    affine = np.array([[2.4, 0, 0, -75.0], [0, 0, 2.4, -22.0], [0, 2.4, 0, -60.0], [0, 0, 0, 1]])
    drawing = draw_explanation(image, image, np.zeros(image.shape), affine=affine)
    assert drawing.cut_coords == pytest.approx((-22.0,))


def test_explicit_cuts_win_and_are_checked(tmp_path) -> None:
    anatomy = _anatomy()
    drawing = draw_explanation(anatomy, anatomy, np.zeros(SHAPE), affine=AFFINE,
                               cut_coords=(-4.0, -14.0, 6.0))
    assert tuple(drawing.displays["volume change"].cut_coords) == (-4.0, -14.0, 6.0)
    with pytest.raises(CounterwarpError, match="cut_coords"):
        draw_explanation(anatomy, anatomy, np.zeros(SHAPE), cut_coords=(1.0,))
    with pytest.raises(CounterwarpError, match="shape"):
        saliency_panel(anatomy, {"bad": np.zeros((3, 3, 3))}, tmp_path / "x.png")


def test_writers_leave_pngs_and_no_pyplot_figures(tmp_path) -> None:
    before = plt.get_fignums()
    anatomy = _anatomy()
    paths = [
        explanation_panel(anatomy, anatomy, _bump((6, 6, 6), 0.2), tmp_path / "a.png",
                          affine=AFFINE),
        saliency_panel(anatomy, {"gradient": anatomy}, tmp_path / "b.png", affine=AFFINE),
        stat_map_figure(_bump((6, 6, 6), 10.0), tmp_path / "c.png", anatomy=anatomy,
                        affine=AFFINE, show=anatomy > 0),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gif = progression_gif(tmp_path / "p.gif", np.stack([anatomy] * 3),
                          np.stack([_bump((6, 6, 6), t) for t in (0.0, 0.1, 0.2)]),
                          affine=AFFINE)
    with Image.open(gif) as animation:
        assert animation.n_frames == 3
    assert plt.get_fignums() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "p.gif"]
