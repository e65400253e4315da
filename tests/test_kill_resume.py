"""Faults during ``fit``: SIGKILL at random moments, a kill inside a checkpoint save, a NaN
loss, and a second process writing the same run folder.

The kills are real: ``fit`` runs in a subprocess (a tiny driver script calling
:func:`counterwarp.workflows.fit.fit_run` with ``resume=True``, because the tiny network's
``channels`` / ``latent_dim`` are not CLI options) and is killed with SIGKILL. Every run, the
uninterrupted reference included, goes through the same driver with one thread, so the
resumed weights must equal the reference's exactly.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from counterwarp._io import LOCK_NAME, folder_lock
from counterwarp.cli import main
from counterwarp.data.synthetic import synth
from counterwarp.errors import CounterwarpError
from counterwarp.train.checkpoint import CHECKPOINT_NAME, LOG_NAME, load_checkpoint
from counterwarp.train.classifier import train_classifier
from counterwarp.train.config import FitConfig
from counterwarp.train.simulator import fit_simulator
from counterwarp.train.staging import FIT_STAGING
from counterwarp.workflows.fit import fit_run

STEPS = 30
WANTED_KILLS = 4  # 3 at random moments, 1 inside a checkpoint save
TINY = {"steps": STEPS, "batch_size": 4, "channels": (4, 8, 8), "latent_dim": 16,
        "checkpoint_every": 1, "seed": 0}

DRIVER = """
import io, os, sys, time
from pathlib import Path

import torch

import counterwarp.train.simulator as training
from counterwarp.workflows.fit import fit_run

manifest, run, signals, mode, n = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), \\
    sys.argv[4], int(sys.argv[5])
calls = [0]
if mode == "save":
    # From the n-th torch.save on: write half of the bytes, say so, then hang, so that the
    # test can SIGKILL the process in the middle of a checkpoint save.
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < n:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])  # f: the open temporary file
        f.flush()
        os.fsync(f.fileno())
        (signals / "in_save").write_text(str(f.name))
        time.sleep(300)

    torch.save = slow_save
elif mode == "log":
    # Hang at the n-th log write: the checkpoint of that step is saved, its log row is not.
    real_write_log = training.write_log

    def slow_write_log(*args, **kwargs):
        calls[0] += 1
        if calls[0] < n:
            return real_write_log(*args, **kwargs)
        (signals / "in_log").write_text("")
        time.sleep(300)

    training.write_log = slow_write_log
fit_run(manifest, run, resume=True, progress=False, **SETTINGS)
print("finished", flush=True)
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A tiny 2D cohort, a run folder with a classifier, the driver, and a reference run."""
    root = tmp_path_factory.mktemp("faults")
    synth(root / "cohort", n=12, shape=(32, 32), dim=2, seed=5, progress=False)
    base = root / "base"
    train_classifier(root / "cohort" / "manifest.csv", base, epochs=1, progress=False)
    driver = root / "driver.py"
    driver.write_text(DRIVER.replace("**SETTINGS", ", ".join(
        f"{key}={value!r}" for key, value in TINY.items())), encoding="utf-8")
    signals = root / "signals"
    signals.mkdir()
    paths = {"root": root, "manifest": root / "cohort" / "manifest.csv", "base": base,
             "driver": driver, "signals": signals}
    reference = root / "reference"
    shutil.copytree(base, reference)
    paths["reference"] = reference
    _REFERENCE[str(reference)] = _launch(paths, reference)  # runs while the tests kill
    yield paths
    leftover = _REFERENCE.pop(str(reference), None)
    if leftover is not None:
        leftover.kill()
        leftover.communicate()


_REFERENCE: dict[str, subprocess.Popen] = {}


def _reference(paths: dict[str, Path]) -> Path:
    """The uninterrupted run (waits for it the first time)."""
    process = _REFERENCE.get(str(paths["reference"]))
    if process is not None:
        out, err = process.communicate(timeout=300)
        assert "finished" in out, err
        del _REFERENCE[str(paths["reference"])]
    return paths["reference"]


def _launch(paths: dict[str, Path], run: Path, mode: str = "normal",
            n: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(paths["driver"]), str(paths["manifest"]), str(run),
         str(paths["signals"]), mode, str(n)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _finish(paths: dict[str, Path], run: Path) -> None:
    out, err = _launch(paths, run).communicate(timeout=300)
    assert "finished" in out, err


def _stamp(path: Path) -> tuple[int, int] | None:
    """Identity of the file now at ``path`` (inode and mtime: inode numbers get reused)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "simulator.pt", map_location="cpu", weights_only=True)["state_dict"]


def _max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
               for k in a)


def _log(run: Path) -> list[dict[str, str]]:
    with open(run / LOG_NAME, newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _compare_with_reference(run: Path, reference: Path) -> tuple[float, list[int]]:
    """Assert equal weights, log rows equal to the reference's where present, nothing left
    behind; return the max abs weight difference and the steps missing from the log."""
    ours, theirs = _state(run), _state(reference)
    difference = _max_abs_difference(ours, theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), (name, difference)
    expected = {row["step"]: row for row in _log(reference)}
    logged = _log(run)
    steps = [int(row["step"]) for row in logged]
    assert steps == sorted(set(steps)) and set(steps) <= set(range(1, STEPS + 1)), steps
    assert all(row == expected[row["step"]] for row in logged)  # same losses, step by step
    hidden = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    assert hidden == [], f"temporaries or a lock left behind: {hidden}"
    return difference, sorted(set(range(1, STEPS + 1)) - set(steps))


def _kill_at_random_moment(prepared: dict[str, Path], run: Path, rng: random.Random) -> None:
    """Launch fit; let it save 1 to 4 more checkpoints, then SIGKILL it at a random moment of
    the next step (training or saving). Counting saves makes the kills land at any speed."""
    checkpoint = run / FIT_STAGING / CHECKPOINT_NAME  # a fit's progress is staged
    process = _launch(prepared, run)
    saves, wanted, last = 0, rng.randint(1, 4), _stamp(checkpoint)
    step_seconds, saved_at = 0.05, None  # a step's duration, measured between two saves
    deadline = time.monotonic() + 120
    while process.poll() is None and saves < wanted:
        assert time.monotonic() < deadline, "fit made no progress"
        now = _stamp(checkpoint)
        if now != last:
            saves, last = saves + 1, now
            if saved_at is not None:
                step_seconds = time.monotonic() - saved_at
            saved_at = time.monotonic()
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, min(step_seconds, 0.5)))
    assert process.poll() is None, "fit finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def _kill_inside_a_save(prepared: dict[str, Path], run: Path, rng: random.Random) -> None:
    """Launch fit; SIGKILL it halfway through writing its 1st to 3rd checkpoint; check that
    the torn bytes sit in a temporary file and the checkpoint on disk is the previous one."""
    in_save = prepared["signals"] / "in_save"
    in_save.unlink(missing_ok=True)
    staged = run / FIT_STAGING / CHECKPOINT_NAME
    before = load_checkpoint(staged)["step"] if staged.exists() else None
    n = rng.randint(1, 3)
    process = _launch(prepared, run, "save", n)
    deadline = time.monotonic() + 120
    while not in_save.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.005)
    torn = Path(in_save.read_text())
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert torn.parent == staged.parent and torn.name.startswith(f".{CHECKPOINT_NAME}.") \
        and torn.exists()
    with pytest.raises(Exception):  # noqa: B017 - any failure: the bytes are torn
        torch.load(torn, weights_only=True)
    expected = (before or 0) + n - 1
    if expected:
        assert int(load_checkpoint(staged)["step"]) == expected
    else:
        assert not staged.exists()


def test_fit_killed_at_random_moments_resumes_to_identical_weights(
    prepared: dict[str, Path], tmp_path: Path
) -> None:
    """Three SIGKILLs at random moments and one inside a checkpoint save, in random order;
    after each the checkpoint loads; the resumed run ends with the reference's weights."""
    run = tmp_path / "run"
    shutil.copytree(prepared["base"], run)
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    plan = ["random"] * (WANTED_KILLS - 1) + ["inside_save"]
    rng.shuffle(plan)
    kills: list[tuple[str, int]] = []
    for how in plan:
        if how == "random":
            _kill_at_random_moment(prepared, run, rng)
        else:
            _kill_inside_a_save(prepared, run, rng)
        checkpoint = run / FIT_STAGING / CHECKPOINT_NAME  # absent only if the first save tore
        step = int(load_checkpoint(checkpoint)["step"]) if checkpoint.exists() else 0
        kills.append((how, step))  # load_checkpoint: never half-written, it always loads
    steps = [step for _, step in kills]
    assert steps == sorted(steps) and 0 < steps[-1] < STEPS, (seed, kills)
    _finish(prepared, run)  # also removes the torn temporary (stale lock taken over)
    difference, missing = _compare_with_reference(run, _reference(prepared))
    assert difference == 0.0
    print(f"\nkills survived: {len(kills)} {kills} (seed {seed}); resumed weights vs "
          f"uninterrupted: max abs difference {difference}; log rows lost: {missing}")


def test_kill_between_checkpoint_and_log_loses_no_log_row(
    prepared: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(prepared["base"], run)
    in_log = prepared["signals"] / "in_log"
    in_log.unlink(missing_ok=True)
    process = _launch(prepared, run, "log", 3)  # killed while writing step 3's log rows
    deadline = time.monotonic() + 120
    while not in_log.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the log write never started"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    # the log is written before its checkpoint: the last checkpoint is still step 2's
    assert int(load_checkpoint(run / FIT_STAGING / CHECKPOINT_NAME)["step"]) == 2
    fit_run(prepared["manifest"], run, resume=True, progress=False, **TINY)
    steps = [int(row["step"]) for row in _log(run)]
    assert steps == list(range(1, STEPS + 1)), f"log rows lost: {set(range(1, 31)) - set(steps)}"


class PoisonedScorer(nn.Module):
    """Mean intensity in a central disc, (B, 1); from call ``poison_from`` on, NaN or Inf."""

    def __init__(self, poison_from: int, value: float) -> None:
        super().__init__()
        yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
        disc = ((yy - 16.0) ** 2 + (xx - 16.0) ** 2 < 36).float()
        self.register_buffer("weights", disc / disc.sum())
        self.poison_from, self.value, self.calls = poison_from, value, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = (8.0 * (images[:, 0] * self.weights).sum((1, 2)) - 5.0)[:, None]
        return torch.full_like(logits, self.value) if self.calls >= self.poison_from else logits


def _discs(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    radii = 3.0 + 5.0 * torch.rand(n, generator=generator)
    return torch.stack([((yy - 16.0) ** 2 + (xx - 16.0) ** 2 < r**2).float() for r in radii])[
        :, None
    ]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_or_inf_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    value: float, tmp_path: Path
) -> None:
    # call 1 computes the training logits; step k calls the classifier once more (joint)
    config = FitConfig(**{**TINY, "steps": 8})
    classifier = PoisonedScorer(poison_from=1 + 4, value=value)
    with pytest.raises(CounterwarpError, match=r"NaN/Inf at step 4; .*the last good checkpoint"):
        fit_simulator(classifier, _discs(8), config, run_dir=tmp_path, progress=False)
    state = load_checkpoint(tmp_path / FIT_STAGING / CHECKPOINT_NAME)  # staged, for --resume
    assert int(state["step"]) == 3
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    assert [int(row["step"]) for row in _log(tmp_path / FIT_STAGING)] == [1, 2, 3]
    # the kept checkpoint is usable: a healthy classifier resumes from step 3 to the end
    healthy = PoisonedScorer(poison_from=10**9, value=value)
    resumed = fit_simulator(healthy, _discs(8), config, run_dir=tmp_path, resume=True,
                            progress=False)
    assert [int(row["step"]) for row in resumed.history] == list(range(1, 9))


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(
    prepared: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(prepared["base"], run)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom counterwarp._io import folder_lock\n"
         "with folder_lock(sys.argv[1], 'a simulator'):\n"
         "    print('locked', flush=True)\n    time.sleep(300)\n", str(run)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        code = main(["fit", "--manifest", str(prepared["manifest"]), "--run", str(run),
                     "--steps", "1", "--batch-size", "2"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2
        assert f"in use by another counterwarp process (pid {holder.pid})" in err, err
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # untouched
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, naming a dead pid
        holder.wait()
    assert (run / LOCK_NAME).read_text().split()[0] == str(holder.pid)
    fit_run(prepared["manifest"], run, progress=False, **{**TINY, "steps": 2})
    assert (run / "simulator.pt").is_file() and not (run / LOCK_NAME).exists()


def test_lock_of_another_host_is_never_judged_stale(tmp_path: Path) -> None:
    """On a shared file system a pid written by another host cannot be checked from here."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_NAME
    lock.write_text(f"{dead.pid} other-node-17\n")
    with pytest.raises(CounterwarpError, match=rf"host other-node-17 \(pid {dead.pid}\)"):
        with folder_lock(tmp_path):
            pass
    lock.write_text(f"{dead.pid} {socket.gethostname()}\n")  # same host, dead pid: stale
    with folder_lock(tmp_path) as held:
        assert held.read_text().split() == [str(os.getpid()), socket.gethostname()]
    assert not lock.exists()
