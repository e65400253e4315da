"""Streaming explain / saliency through a DataLoader, and ``--shard i/n`` for array jobs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from counterwarp.cli import main
from counterwarp.data.stream import parse_shard, shard_positions, table_name
from counterwarp.errors import CounterwarpError
from counterwarp.explain.simulator import Simulator
from counterwarp.workflows.explain import explain_run
from counterwarp.workflows.folder import load_run_classifier
from counterwarp.workflows.saliency import saliency_run
from test_saliency_run import _blob, _make_run, _write


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """A run folder (tiny classifier + simulator) and a manifest of 7 images of another
    cohort, two of them with the same file name (ids ``sub-01`` and ``sub-01_2``)."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    paths = [_write(root / "cohort" / "a" / f"sub-{i:02d}.nii.gz", _blob((32, 32), i % 2, rng))
             for i in range(6)]
    paths.append(_write(root / "cohort" / "b" / "sub-01.nii.gz", _blob((32, 32), 1, rng)))
    manifest = root / "cohort" / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(
        f"{p.relative_to(manifest.parent).as_posix()},{i % 2}\n" for i, p in enumerate(paths)))
    run = _make_run(root / "run", (32, 32))
    (run / "split.json").write_text(json.dumps({"train": [], "val": [], "test": []}))
    classifier, _ = load_run_classifier(run)
    images = torch.stack([torch.from_numpy(_blob((32, 32), i % 2, rng))[None] for i in range(8)])
    images = (images - images.mean()) / images.std()
    torch.manual_seed(0)
    simulator = Simulator(steps=1, batch_size=4, channels=(4, 8, 8), latent_dim=16)
    simulator.fit(classifier, images, progress=False).save(run / "simulator.pt")
    return run, manifest, paths


def _argv(command: str, run: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    if command == "explain":
        return ["explain", "--run", str(run), "--manifest", str(manifest), "--direction",
                "inject", "--out", str(out), *extra]
    return ["saliency", "--run", str(run), "--method", "gradient", "--manifest", str(manifest),
            "--out", str(out), *extra]


def _table(out: Path, name: str) -> list[dict[str, str]]:
    with open(out / name, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("command", ["explain", "saliency"])
def test_union_of_shards_equals_the_unsharded_run(
    command: str, world: tuple[Path, Path, list[Path]], tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    run, manifest, _ = world
    table = "summary.csv" if command == "explain" else "saliency_index.csv"
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(_argv(command, run, manifest, whole)) == 0
    for index in range(3):  # 7 inputs: shards of 3, 2 and 2; one reads with a worker process
        workers = ("--workers", "1") if index == 1 else ()
        assert main(_argv(command, run, manifest, sharded, "--shard", f"{index}/3",
                          *workers)) == 0
    assert "shard-2-of-3" in capsys.readouterr().out

    shard_tables = [table_name(table, (i, 3)) for i in range(3)]
    assert shard_tables[0] == table.replace(".csv", ".shard-0-of-3.csv")
    records = {table_name("provenance.json", (i, 3)) for i in range(3)}  # one per shard
    assert {p.name for p in sharded.iterdir()} == (
        {p.name for p in whole.iterdir()} - {table, "provenance.json"} | set(shard_tables)
        | records)
    shard_inputs = [set(json.loads((sharded / name).read_text())["inputs_sha256"])
                    for name in sorted(records)]
    assert set().union(*shard_inputs) == set(
        json.loads((whole / "provenance.json").read_text())["inputs_sha256"])
    rows = [row for name in shard_tables for row in _table(sharded, name)]
    expected = _table(whole, table)
    assert len(rows) == len(expected) == 7
    key = "id"
    for row in rows:  # the index holds absolute output paths; compare their names
        row.update({k: Path(row[k]).name for k in ("file", "panel") if k in row})
    for row in expected:
        row.update({k: Path(row[k]).name for k in ("file", "panel") if k in row})
    assert sorted(rows, key=lambda r: r[key]) == sorted(expected, key=lambda r: r[key])
    assert {"sub-01", "sub-01_2"} <= {row["id"] for row in rows}
    for path in whole.glob("*.nii.gz"):
        np.testing.assert_array_equal(nib.load(sharded / path.name).get_fdata(),
                                      nib.load(path).get_fdata())


def test_shard_with_no_inputs_writes_an_empty_table(
    world: tuple[Path, Path, list[Path]], tmp_path: Path
) -> None:
    run, manifest, _ = world
    rows = saliency_run(run, tmp_path, methods="gradient", manifest=manifest, shard="8/9",
                        progress=False)
    assert rows == []
    assert _table(tmp_path, "saliency_index.shard-8-of-9.csv") == []


@pytest.mark.parametrize("command", ["explain", "saliency"])
@pytest.mark.parametrize("value", ["3/2", "a/b", "0/0", "2/2", "-1/2", "1/2/3", "", "1"])
def test_bad_shard_is_one_line_naming_the_argument(
    command: str, value: str, world: tuple[Path, Path, list[Path]], tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    run, manifest, _ = world
    out = tmp_path / "out"
    assert main(_argv(command, run, manifest, out, f"--shard={value}")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"counterwarp {command}: error: --shard")
    assert not out.exists()


def test_bad_workers_is_refused(world: tuple[Path, Path, list[Path]], tmp_path: Path) -> None:
    run, manifest, _ = world
    with pytest.raises(CounterwarpError, match="--workers"):
        explain_run(run, tmp_path / "out", manifest=manifest, workers=-1, progress=False)
    assert not (tmp_path / "out").exists()


def test_unusable_voxels_stop_the_stream_and_say_what_was_written(
    world: tuple[Path, Path, list[Path]], tmp_path: Path
) -> None:
    run, _, paths = world
    values = np.asarray(nib.load(paths[0]).get_fdata(), dtype=np.float32)
    values[3, 3] = np.nan  # the header is fine: only reading the voxels shows it
    bad = _write(tmp_path / "nan.nii.gz", values)
    out = tmp_path / "out"
    with pytest.raises(CounterwarpError, match=r"nan\.nii\.gz: 1 NaN .* outputs of the 1 image"):
        saliency_run(run, out, methods="gradient", images=[paths[0], bad], progress=False)
    assert (out / "sub-00_gradient.nii.gz").exists() and not (out / "saliency_index.csv").exists()


def test_parse_shard_and_positions() -> None:
    assert parse_shard(None) is None
    assert parse_shard(" 1 / 4 ") == (1, 4)
    assert parse_shard((0, 1)) == (0, 1)
    assert shard_positions(7, (1, 3)) == [1, 4]
    assert shard_positions(3, None) == [0, 1, 2]
    assert sorted(p for i in range(4) for p in shard_positions(10, (i, 4))) == list(range(10))
    assert table_name("summary.csv", None) == table_name("summary.csv", (0, 1)) == "summary.csv"
    assert table_name("summary.csv", (2, 5)) == "summary.shard-2-of-5.csv"
    with pytest.raises(CounterwarpError, match="below 2"):
        parse_shard((2, 2))
