"""Output folders that cannot lie: one writer per folder, the user's umask, no foreign file
replaced, errors naming the user's path with nothing half-written, sound group statistics
and refused inputs that do not exist.

Tiny runs (2D 32 x 32, one untrained classifier, a one-step simulator) so the whole file
runs in well under a minute.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from counterwarp._io import LOCK_NAME, atomic_path, lock_name, owned_files
from counterwarp.cli import main
from counterwarp.data.derivatives import output_name
from counterwarp.errors import CounterwarpError
from counterwarp.explain.simulator import Simulator
from counterwarp.workflows.folder import load_run_classifier, load_run_simulator
from test_saliency_run import _blob, _make_run, _write

SHAPE = (32, 32)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run folder (tiny classifier + one-step simulator), three images of another
    cohort, and a folder of three 16^3 maps for ``group --maps``."""
    root = tmp_path_factory.mktemp("writers")
    rng = np.random.default_rng(0)
    images = [_write(root / "images" / f"sub-{i}.nii.gz", _blob(SHAPE, i % 2, rng))
              for i in range(3)]
    run = _make_run(root / "run", SHAPE)
    (run / "split.json").write_text(json.dumps({"train": [], "val": [], "test": []}))
    classifier, _ = load_run_classifier(run)
    batch = torch.stack([torch.from_numpy(_blob(SHAPE, i % 2, rng))[None] for i in range(4)])
    batch = (batch - batch.mean()) / batch.std()
    torch.manual_seed(0)
    simulator = Simulator(steps=1, batch_size=4, channels=(4, 8, 8), latent_dim=16)
    simulator.fit(classifier, batch, progress=False).save(run / "simulator.pt")
    maps = root / "maps"
    for i in range(3):
        _write(maps / f"sub-{i}.nii.gz", rng.normal(0.2, 0.1, (16, 16, 16)).astype(np.float32))
    return {"root": root, "run": run, "images": images, "maps": maps}


def _explain(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["explain", "--run", str(world["run"]), *map(str, world["images"]),
            "--direction", "inject", "--out", str(out), *extra]


def _saliency(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["saliency", "--run", str(world["run"]), "--method", "gradient",
            *map(str, world["images"]), "--out", str(out), *extra]


def _group(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["group", "--maps", str(world["maps"]), "--out", str(out), *extra]


def _snapshot(folder: Path) -> dict[str, str] | None:
    """sha256 of every file below ``folder`` (hidden ones included); None if it is absent."""
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    """The command's one-line error: the only stderr line from counterwarp (progress bars
    aside), and the last one."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("counterwarp ")]
    assert len(ours) == 1 and ours[0] == lines[-1], lines
    assert ours[0].startswith(f"counterwarp {command}: error: "), ours[0]
    return ours[0]


@contextmanager
def _holding(folder: Path, tag: str | None = None) -> Iterator[int]:
    """Another process holding ``folder``'s lock (the shard lock ``tag``); yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom counterwarp._io import folder_lock\n"
         "tag = sys.argv[2] or None\n"
         "with folder_lock(sys.argv[1], 'a test', tag=tag):\n"
         "    print('locked', flush=True)\n    sys.stdin.read()\n", str(folder), tag or ""],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


# ----------------------------------------------------------------------- one writer


@pytest.mark.parametrize("command", ["explain", "saliency", "group", "synth", "benchmark",
                                     "report", "demo"])
def test_a_second_writer_of_a_folder_is_refused(
    command: str, world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def demo_went_on(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo started its first step despite the lock")

    monkeypatch.setattr("counterwarp.workflows.demo.synth", demo_went_on)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    argv = {
        "explain": _explain(world, out),
        "saliency": _saliency(world, out),
        "group": _group(world, out),
        "synth": ["synth", "--out", str(out), "--n", "4", "--dim", "2", "--shape", "32", "32"],
        "benchmark": ["benchmark", "--data", str(world["root"] / "images"), "--run",
                      str(world["run"]), "--out", str(out)],
        "report": ["report", "--run", str(world["run"]), "--out", str(out / "report.html"),
                   "--no-compute"],
        "demo": ["demo", "--out", str(out), "--quick"],
    }[command]
    with _holding(out) as pid:
        before = _snapshot(out)
        assert main(argv) == 2
        line = _error_line(capsys, command)
        assert f"{out} is in use by another counterwarp process (pid {pid})" in line
        assert _snapshot(out) == before  # nothing written beside the holder's lock
    assert not (out / LOCK_NAME).exists()


def test_shards_share_a_folder_but_each_shard_has_one_writer(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    with _holding(out, "shard-0-of-2") as pid:
        assert main(_explain(world, out, "--shard", "0/2")) == 2  # the same shard again
        line = _error_line(capsys, "explain")
        assert f"in use by another counterwarp process (pid {pid})" in line
        assert main(_explain(world, out, "--shard", "1/2")) == 0  # its sibling shard runs
        capsys.readouterr()
        assert (out / "summary.shard-1-of-2.csv").is_file()
        assert main(_explain(world, out)) == 2  # an unsharded writer would mix with it
        line = _error_line(capsys, "explain")
        assert f"(pid {pid}), lock {lock_name('shard-0-of-2')}" in line
    with _holding(out) as pid:  # and while an unsharded writer holds it, no shard runs
        assert main(_explain(world, out, "--shard", "1/2")) == 2
        assert f"(pid {pid})" in _error_line(capsys, "explain")
    assert main(_explain(world, out, "--shard", "0/2")) == 0  # both shards' tables
    assert {p.name for p in out.glob("summary*.csv")} == {
        "summary.shard-0-of-2.csv", "summary.shard-1-of-2.csv"}
    assert not list(out.glob(".counterwarp*.lock"))


# ----------------------------------------------------------------------- umask


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_are_created_with_the_users_umask(
    umask: int, mode: int, world: dict[str, Path], tmp_path: Path
) -> None:
    previous = os.umask(umask)
    try:
        assert main(_explain(world, tmp_path / "out")) == 0
        assert main(_group(world, tmp_path / "group")) == 0
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path).rglob("*") if p.is_file()]
    assert len(files) > 10
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(mode)}


# ----------------------------------------------------------------------- foreign files


def test_synth_refuses_to_replace_a_foreign_file_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cohort"
    foreign = out / "images" / "sub-0001.nii.gz"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"someone else's scan")
    argv = ["synth", "--out", str(out), "--n", "4", "--dim", "2", "--shape", "32", "32"]
    before = _snapshot(out)
    assert main(argv) == 2
    line = _error_line(capsys, "synth")
    assert f"{foreign} exists and was not written there by counterwarp" in line
    assert "--overwrite" in line
    assert _snapshot(out) == before  # the truth maps written before it were taken back
    assert main([*argv, "--overwrite"]) == 0
    assert nib.load(foreign).shape == (32, 32)
    assert main(argv) == 0  # its own earlier cohort is replaced without asking
    assert "images/sub-0001.nii.gz" in owned_files(out)


def test_explain_reruns_into_its_own_folder_but_refuses_foreign_files(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert main(_explain(world, out)) == 0
    assert main(_explain(world, out)) == 0  # a rerun into its own --out is fine
    other = tmp_path / "other"
    other.mkdir()
    foreign = other / output_name("sub-1", "inject", "logjac")
    foreign.write_bytes(b"the user's own map")
    before = _snapshot(other)
    capsys.readouterr()
    assert main(_explain(world, other)) == 2
    line = _error_line(capsys, "explain")
    assert f"{foreign} exists and was not written there by counterwarp" in line
    assert _snapshot(other) == before  # sub-0's maps, written first, were removed again


# ----------------------------------------------------------------------- disk full


def _disk_full_on_call(monkeypatch: pytest.MonkeyPatch, failing_call: int) -> None:
    """``nibabel.save`` writes normally, except that call ``failing_call`` writes half a
    file and then fails as a full disk does."""
    real_save = nib.save
    calls = {"n": 0}

    def save(image: object, filename: object) -> None:
        calls["n"] += 1
        if calls["n"] == failing_call:
            Path(str(filename)).write_bytes(b"\x1f\x8b partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(image, filename)

    monkeypatch.setattr(nib, "save", save)


#: command -> (a file its first save writes, the save call that fails: after some files
#: of this run were already replaced)
DISK_FULL = {"explain": (output_name("sub-0", "inject", "simulated"), 4),
             "saliency": ("sub-0_gradient.nii.gz", 2),
             "group": ("group_inject_mean.nii.gz", 4)}


@pytest.mark.parametrize("command", sorted(DISK_FULL))
def test_disk_full_names_the_users_path_and_leaves_the_folder_as_it_was(
    command: str, world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make = {"explain": _explain, "saliency": _saliency, "group": _group}[command]
    out = tmp_path / "out"
    assert main(make(world, out)) == 0  # an earlier run's outputs ...
    first, failing_call = DISK_FULL[command]
    (out / first).write_bytes(b"an earlier version")  # ... one unlike what comes now
    before = _snapshot(out)
    capsys.readouterr()
    _disk_full_on_call(monkeypatch, failing_call)
    assert main(make(world, out)) == 2
    line = _error_line(capsys, command)
    assert line.endswith(": No space left on device"), line
    written = Path(line.split(": error: ", 1)[1].rsplit(": ", 1)[0])
    assert written.parent == out and not written.name.startswith(".")  # the user's path
    assert written.name.endswith(".nii.gz")
    assert _snapshot(out) == before  # byte-identical: replaced files restored, no partials
    fresh = tmp_path / "fresh"
    _disk_full_on_call(monkeypatch, failing_call=1)
    assert main(make(world, fresh)) == 2
    assert not fresh.exists()  # a folder the command created is gone again
    capsys.readouterr()


def test_atomic_path_turns_an_error_on_the_temporary_into_one_naming_the_file(
    tmp_path: Path,
) -> None:
    final = tmp_path / "map.nii.gz"
    with pytest.raises(OSError) as raised:
        with atomic_path(final) as tmp:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp))
    assert raised.value.filename == str(final) and raised.value.errno == errno.EACCES
    assert isinstance(raised.value, PermissionError)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- group statistics


def test_group_voxels_without_spread_get_no_t_and_never_survive(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    maps = tmp_path / "maps"
    for i in range(4):
        values = np.full((16, 16, 16), 0.1, np.float32)  # identical in every map ...
        values[:8] = rng.normal(1.0, 0.05, (8, 16, 16))  # ... except a strong real effect
        _write(maps / f"sub-{i}.nii.gz", values)
    out = tmp_path / "group"
    assert main(["group", "--maps", str(maps), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines()
                if line.startswith("counterwarp group: warning")]
    assert warnings == ["counterwarp group: warning: 2048 of 4096 brain voxels have the same "
                        "value in all 4 maps (inject); they get no t (t = 0, p = 1) and are "
                        "not tested for FDR"]
    assert "2048 of 4096 voxels survive FDR" in captured.out
    t = nib.load(out / "group_inject_t.nii.gz").get_fdata()
    p = nib.load(out / "group_inject_p.nii.gz").get_fdata()
    fdr = nib.load(out / "group_inject_fdr_mask.nii.gz").get_fdata()
    assert np.all(t[8:] == 0) and np.all(p[8:] == 1) and not fdr[8:].any()
    assert np.all(np.abs(t[:8]) > 10) and fdr[:8].all()
    summary = json.loads((out / "group_inject_summary.json").read_text())
    assert summary["n_zero_spread_voxels"] == 2048


def test_a_group_of_fewer_than_two_maps_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    maps = tmp_path / "maps"
    _write(maps / "sub-0.nii.gz", np.ones((16, 16, 16), np.float32))
    out = tmp_path / "group"
    assert main(["group", "--maps", str(maps), "--out", str(out)]) == 2
    assert "a group analysis needs at least 2" in _error_line(capsys, "group")
    assert not out.exists()


# ----------------------------------------------------------------------- report, messages


@pytest.mark.parametrize("flag", ["--benchmark", "--explain", "--saliency"])
def test_report_refuses_a_given_input_that_does_not_exist(
    flag: str, world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = world["run"]
    before = _snapshot(run)
    nowhere = tmp_path / "nowhere"
    assert main(["report", "--run", str(run), flag, str(nowhere), "--no-compute"]) == 2
    assert f"{flag} {nowhere}: no such" in _error_line(capsys, "report")
    assert _snapshot(run) == before  # no report.html


def test_report_refuses_a_benchmark_folder_without_results(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["report", "--run", str(world["run"]), "--benchmark", str(tmp_path),
                 "--no-compute"]) == 2
    assert "holds no results.md" in _error_line(capsys, "report")


def test_shape_advice_points_at_a_command_that_has_the_flag(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    volume = _write(tmp_path / "volume.nii.gz", _blob((16, 16, 16), 1, np.random.default_rng(2)))
    assert main(["explain", "--run", str(world["run"]), str(volume), "--out",
                 str(tmp_path / "out")]) == 2
    line = _error_line(capsys, "explain")
    assert "does not fit a 3D image" in line and "`counterwarp train-classifier --shape" in line
    assert "--shape" not in line.replace("train-classifier --shape", "")  # explain has none
    simulator, _ = load_run_simulator(world["run"])
    with pytest.raises(CounterwarpError, match="resample them to that grid") as raised:
        simulator.explain(torch.zeros(1, 1, 16, 16), "inject")
    assert "--shape" not in str(raised.value)


def test_the_demo_reruns_into_its_own_folder(tmp_path):
    """A second demo into the same --out regenerates it (its run is its own to retrain)."""
    from counterwarp.workflows.demo import run_demo

    sizes = {
        "synth": {"n": 24, "dim": 2, "shape": (32, 32)},
        "classifier": {"epochs": 1, "batch_size": 8},
        "fit": {"steps": 2, "batch_size": 4, "channels": (4, 8, 8), "latent_dim": 16},
    }
    first = run_demo(tmp_path / "demo", progress=False, sizes=sizes)
    classifier = tmp_path / "demo" / "run" / "classifier.pt"
    stamp = classifier.stat().st_mtime_ns
    second = run_demo(tmp_path / "demo", progress=False, sizes=sizes)
    assert classifier.stat().st_mtime_ns != stamp
    assert set(first) == set(second)
