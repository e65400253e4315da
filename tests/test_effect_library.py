"""Built-in effect specs: loadable by name, anatomically placed, with the truth they promise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from counterwarp.data.effect_library import (
    BUILTIN_EFFECTS,
    builtin_effect_names,
    builtin_effect_spec,
)
from counterwarp.data.effects import (
    EffectSpec,
    default_effect_spec,
    effect_deformation,
    load_effect_spec,
    region_label_map,
)
from counterwarp.data.synthetic import synth
from counterwarp.data.template import SyntheticGrid, Template, make_grid
from counterwarp.errors import CounterwarpError

NAMES = builtin_effect_names()
NEW = ("cortical_thinning", "hippocampal_atrophy_csf", "asymmetric", "partly_read")


@pytest.fixture(scope="module")
def grid() -> SyntheticGrid:
    # 32^3 (about 6 mm voxels): at 16^3 the 8 mm regions would hold a voxel or none
    return make_grid((32, 32, 32), 3)


@pytest.fixture(scope="module")
def brain(grid: SyntheticGrid) -> np.ndarray:
    _, inside = Template(grid).sample(grid.voxel_coordinates())
    return inside


def test_names() -> None:
    assert NAMES == tuple(BUILTIN_EFFECTS)
    assert NAMES[0] == "default" and set(NEW) <= set(NAMES) and len(set(NAMES)) == len(NAMES)
    assert builtin_effect_spec("default") == default_effect_spec()
    assert all(builtin_effect_spec(n) != default_effect_spec() for n in NEW)


@pytest.mark.parametrize("name", NAMES)
def test_loads_by_name_and_round_trips(name: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no file of that name exists here
    spec = builtin_effect_spec(name)
    assert load_effect_spec(name) == spec
    assert load_effect_spec(Path(name)) == spec
    assert EffectSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert builtin_effect_spec(name) is not builtin_effect_spec(name)  # fresh objects
    for region in spec.regions:
        assert abs(region.log_volume_change) <= 0.9
        assert min(region.radii_mm) >= 8.0


def test_a_real_file_wins_over_a_builtin_name(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    custom = builtin_effect_spec("partly_read")
    Path("asymmetric").write_text(json.dumps(custom.to_dict()))
    assert load_effect_spec("asymmetric") == custom
    assert load_effect_spec(Path("asymmetric")) == custom


def test_unknown_name_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for spec in ("no_such_effect", missing):
        with pytest.raises(CounterwarpError) as caught:
            load_effect_spec(spec)
        message = str(caught.value)
        assert "\n" not in message and str(spec) in message
        assert all(name in message for name in NAMES), message
    with pytest.raises(CounterwarpError, match="cortical_thinning.*partly_read"):
        builtin_effect_spec("no_such_effect")


@pytest.mark.parametrize("name", NAMES)
def test_regions_lie_in_the_brain(name: str, grid: SyntheticGrid, brain: np.ndarray) -> None:
    spec = builtin_effect_spec(name)
    labels = region_label_map(spec, grid)
    for index, region in enumerate(spec.regions, start=1):
        inside = labels == index
        assert inside.sum() >= 2, region.name
        assert brain[inside].mean() >= 0.8, region.name


@pytest.mark.parametrize("name", NAMES)
def test_truth_follows_the_spec(name: str, grid: SyntheticGrid) -> None:
    """The true change inside each region has the sign of its nominal change."""
    spec = builtin_effect_spec(name)
    labels = region_label_map(spec, grid)
    _, truth = effect_deformation(spec, grid)
    for index, region in enumerate(spec.regions, start=1):
        mean = truth[labels == index].mean()
        assert np.sign(mean) == np.sign(region.log_volume_change), (region.name, mean)
        assert abs(mean) > 0.5 * abs(region.log_volume_change), (region.name, mean)


def test_asymmetric_is_left_only(grid: SyntheticGrid, brain: np.ndarray) -> None:
    spec = builtin_effect_spec("asymmetric")
    assert all(r.center_mm[0] < 0 for r in spec.regions)
    _, truth = effect_deformation(spec, grid)
    x = grid.mm_coordinates()[0]
    left, right = truth[brain & (x < 0)], truth[brain & (x > 0)]
    assert abs(left.mean()) >= 5 * abs(right.mean())
    assert np.abs(left).mean() >= 5 * np.abs(right).mean()
    # the default is symmetric, so the same measure would fail it
    _, symmetric = effect_deformation(default_effect_spec(), grid)
    assert np.abs(symmetric[brain & (x < 0)]).mean() < 2 * np.abs(symmetric[brain & (x > 0)]).mean()


def test_signs_of_the_specs() -> None:
    csf = [r.log_volume_change for r in builtin_effect_spec("hippocampal_atrophy_csf").regions]
    assert min(csf) < 0 < max(csf)
    thinning = builtin_effect_spec("cortical_thinning").regions
    assert len(thinning) >= 3 and all(r.log_volume_change < 0 for r in thinning)
    partly = sorted(abs(r.log_volume_change) for r in builtin_effect_spec("partly_read").regions)
    assert partly[0] <= 0.2 and partly[-1] >= 0.6  # one weak part, one strong


def test_synth_accepts_a_builtin_name(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    synth(out, n=3, shape=(16, 16, 16), seed=0, effect_spec="asymmetric", progress=False)
    cohort = json.loads((out / "cohort.json").read_text())
    assert EffectSpec.from_dict(cohort["effect_spec"]) == builtin_effect_spec("asymmetric")
    table = (out / "truth" / "effect_regions.csv").read_text()
    assert "left_lateral_ventricle" in table and "right_" not in table
