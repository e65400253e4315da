"""Data parallelism: N processes with the same global batch follow one process.

Two ways of starting processes:

- ``torchrun`` (``python -m torch.distributed.run --standalone``) runs the real commands
  (``train-classifier`` then ``fit``) in 2 CPU processes with gloo, end to end;
- a fork-based launcher (:func:`launch`) sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
  ``MASTER_ADDR`` / ``MASTER_PORT`` exactly as torchrun does and calls the API in 2 forked
  processes, which skips the interpreter start-up (about 3 s per process here) for the
  cheaper checks: resume under 2 processes, the alternating schedule, identical weights.

Tolerance. Dropout is switched off (its masks are drawn per rank, so with dropout N
processes match one process in distribution, not number for number). What remains is
float32 rounding: the batch is summed in two halves, the halves' gradients and BatchNorm
sums are then added by an all-reduce. Measured here: weights differ by at most 4e-6 (the
simulator) and 8e-6 (the classifier) after the runs below. A wrong reduction moves the
weights by a fraction of the learning rate (1e-3) per step: measured 2.7e-3 when gradients
are summed instead of averaged, 0.2 with per-rank BatchNorm statistics, 0.8 when both ranks
train on the same slice. ``atol = 1e-4`` sits ~10x above the rounding and ~25x below the
smallest of those. One exception: the classifier's convolution biases that feed a BatchNorm
(and the BN running means that absorb them) have an exactly zero gradient in theory; the
computed one is rounding noise that Adam's normalisation scales up towards the learning
rate (measured 3.6e-5), and they cannot change any output, so they get ``atol = 1e-3``.

A second exception, the simulator's first BatchNorm bias ``down.0.norm.bias`` in the torchrun
run (default ``antisymmetric=True``), where rounding picks a branch of the LeakyReLU:

- the network routes every layer on the constant condition +1, and the inlet's routing reads
  the mean of the image, which is 0 for every image (z-scored inside the brain, background 0),
  so the inlet applies one and the same kernel to every image. Its output in the background
  (input 0 under the whole kernel) is that kernel's bias ``b``, and its batch mean is
  ``b + sum(W) * mean(x) = b`` as well: the background voxels (about 40 % of them) sit exactly
  at the BatchNorm mean, i.e. at BatchNorm output = its bias;
- at step 2 that bias is still exactly 0 (at step 1 the zero-initialised head gives every
  other parameter a zero gradient, and Adam leaves a zero parameter with a zero gradient
  where it is), so those voxels sit on the kink of the following LeakyReLU: the sign of the
  rounding noise of ``x - mean`` (1e-9) picks the slope, 1 or 0.1, per image and channel;
- any other summation order flips some of those signs. Measured on that step's batch, the
  gradient of this bias (values up to 2.8e-3) moves by up to 1.9e-3 between one float32
  process and float64, by 1.8e-3 between two processes and float64, and by as much in ONE
  process when BatchNorm's mean is computed as GlobalBatchNorm does (sum / count) instead of
  by torch's kernel, while every other gradient moves by rounding only: at those voxels the
  normalised input is 0 (BatchNorm weight) and the inlet's input is 0 with mean 0 over the
  image (everything before it);
- at step 3 the bias is off 0 and the two runs' gradients of it agree to 1e-9 again; Adam
  carries that one step: measured 2.6e-4 in its first moment, 3.8e-4 in the weight. Started
  at bias 0.01 instead of 0 (off the kink), the same runs pass every check here unchanged:
  weights within 9e-6, moments within 2e-7 (on values up to 0.3), this bias's within 1e-9.

So ``down.0.norm.bias`` gets ``atol = 1e-3``, the learning rate (in these first steps Adam
moves a parameter by at most about the learning rate per step, and the runs differ in one
step's gradient), and its Adam moments are not compared.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest
import torch

from counterwarp import distributed, global_batchnorm
from counterwarp.cli import main
from counterwarp.errors import CounterwarpError
from counterwarp.nn.simulator import SimulatorNet
from counterwarp.train.checkpoint import CHECKPOINT_NAME, LOG_NAME
from counterwarp.train.config import FitConfig
from counterwarp.train.simulator import fit_simulator
from counterwarp.train.staging import FIT_STAGING
from distributed_worker import switch_off_dropout
from test_fit import TINY, BlobScorer, blob_images

ATOL = 1e-4
ATOL_LOOSE = 1e-3
"""For the parameters the module docstring names: BatchNorm-absorbed biases, and the simulator
bias that sits on a LeakyReLU kink at one step."""
AT_KINK = ("down.0.norm.bias",)
WORKER = Path(__file__).with_name("distributed_worker.py")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)


# --------------------------------------------------------------------------- launchers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _child(rank: int, world_size: int, port: int, target: Callable[..., None],
           args: tuple[Any, ...], errors: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    status = 0
    try:
        target(*args)
    except BaseException:  # noqa: BLE001 - reported to the parent, whatever it is
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        status = 1
    finally:
        os._exit(status)  # never run the parent's (pytest's) exit handlers in a fork


def launch(target: Callable[..., None], *args: Any, world_size: int = 2,
           timeout: float = 120.0) -> None:
    """Run ``target(*args)`` in ``world_size`` forked processes, as torchrun would.

    Raises AssertionError with the children's tracebacks if any fails or hangs.
    """
    context = multiprocessing.get_context("fork")
    errors = context.SimpleQueue()
    port = _free_port()
    processes = [
        context.Process(target=_child, args=(rank, world_size, port, target, args, errors))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    hung = [p for p in processes if p.is_alive()]
    for process in hung:
        process.kill()
        process.join()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not hung, f"{len(hung)} process(es) hung\n" + "\n".join(messages)
    assert all(p.exitcode == 0 for p in processes), "\n".join(messages) or "a process failed"


# --------------------------------------------------------------------------- comparisons


def _assert_close_state(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor],
                        loose: Collection[str] = ()) -> None:
    assert one.keys() == two.keys()
    for name in one:
        atol = ATOL_LOOSE if name in loose else ATOL
        torch.testing.assert_close(two[name].float(), one[name].float(), atol=atol, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _read_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _assert_same_log(one: Path, two: Path) -> None:
    """Per-step logged values (global means) agree; 'seconds' is wall time."""
    rows_one, rows_two = _read_rows(one), _read_rows(two)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("loss", "shift", "cycle", "smooth", "magnitude", "moved_share"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def _assert_same_moments(one: dict[str, Any], two: dict[str, Any],
                         skip: Collection[str] = ()) -> None:
    """Adam's first moments (running means of the gradients) of two checkpoints agree.

    Adam's steps hardly change when every gradient is scaled by the same factor, so the
    weights alone barely show gradients summed instead of averaged; the moments double.
    ``skip``: names of parameters whose moments are not compared.
    """
    names = ([n for n, _ in SimulatorNet.from_config(one["net_config"]).named_parameters()]
             if skip else [])
    for name in ("optimizer", "cycle_optimizer"):
        if name not in one:
            continue
        for key, moments in one[name]["state"].items():
            if skip and names[key] in skip:
                continue
            torch.testing.assert_close(two[name]["state"][key]["exp_avg"], moments["exp_avg"],
                                       atol=1e-6, rtol=1e-3, msg=lambda m, k=key: f"{k}: {m}")


def _checkpoint(run: Path) -> dict[str, Any]:
    return torch.load(run / CHECKPOINT_NAME, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- torchrun


def test_torchrun_train_classifier_and_fit_match_one_process(
    tmp_path: Path, toy_cohort: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = toy_cohort(n=20, shape=(32, 32))
    one, two = tmp_path / "one", tmp_path / "two"
    train = ["--manifest", str(manifest), "--epochs", "2", "--batch-size", "4"]
    fit = ["--manifest", str(manifest), "--steps", "4", "--batch-size", "4",
           "--checkpoint-every", "2"]
    commands = [["train-classifier", *train, "--out", str(two)], ["fit", *fit, "--run", str(two)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), json.dumps({"no_dropout": True, "commands": commands})],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-4000:]

    switch_off_dropout(monkeypatch.setattr)
    assert main(["train-classifier", *train, "--out", str(one)]) == 0
    assert main(["fit", *fit, "--run", str(one)]) == 0

    # rank 0 alone reported and wrote; nothing half-written or locked is left behind
    assert launched.stdout.count("wrote ") == 2, launched.stdout
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not [p for p in two.iterdir() if p.name.startswith(".")]
    assert (two / "split.json").read_text() == (one / "split.json").read_text()

    sim_one, sim_two = _checkpoint(one), _checkpoint(two)
    assert sim_two["step"] == 4
    _assert_same_moments(sim_one, sim_two, skip=AT_KINK)
    _assert_close_state(sim_one["state_dict"], sim_two["state_dict"], loose=AT_KINK)
    _assert_same_log(one / LOG_NAME, two / LOG_NAME)

    classifier_one = torch.load(one / "classifier.pt", weights_only=True)["state_dict"]
    classifier_two = torch.load(two / "classifier.pt", weights_only=True)["state_dict"]
    absorbed = {k for k in classifier_one
                if k.startswith("features.") and k.endswith((".0.bias", ".running_mean"))}
    _assert_close_state(classifier_one, classifier_two, absorbed)


# --------------------------------------------------------------------------- forked ranks


def _fit_and_dump(run: Path, settings: dict[str, Any], stop_at: int | None = None,
                  resume: bool = False) -> None:
    """One rank's part: fit on the blob images; write this rank's final weights."""

    class Killed(Exception):
        pass

    def stop(step: int, values: dict[str, float]) -> None:
        if step == stop_at:
            raise Killed

    try:
        result = fit_simulator(BlobScorer(), blob_images(12), FitConfig(**settings),
                               run_dir=run, resume=resume, progress=False, on_step=stop)
    except Killed:
        return
    rank = distributed.current().rank
    torch.save(result.net.state_dict(), run / f"rank{rank}_weights.pt")


def _rank_weights(run: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(run / f"rank{rank}_weights.pt", weights_only=True)


def test_resume_under_two_processes_is_exact(tmp_path: Path) -> None:
    """With dropout on: killed after step 4 (checkpoint at 3) and resumed == uninterrupted,
    bit for bit, which needs every rank's own random state in the checkpoint."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    launch(_fit_and_dump, whole, TINY)
    launch(_fit_and_dump, broken, TINY, 4)
    assert _checkpoint(broken / FIT_STAGING)["step"] == 3  # a killed fit's progress is staged
    assert not (broken / "rank0_weights.pt").exists()
    launch(_fit_and_dump, broken, TINY, None, True)
    for rank in (0, 1):
        expected, got = _rank_weights(whole, rank), _rank_weights(broken, rank)
        for name in expected:
            assert torch.equal(expected[name], got[name]), (rank, name)
    # every rank ends with the same weights
    for name, tensor in _rank_weights(whole, 0).items():
        assert torch.equal(tensor, _rank_weights(whole, 1)[name]), name
    assert [int(r["step"]) for r in _read_rows(broken / LOG_NAME)] == list(range(1, 7))


def _without_dropout_then(target: Callable[..., None], *args: Any) -> None:
    switch_off_dropout(setattr)  # in the forked rank only
    target(*args)


def test_alternating_schedule_with_two_processes_matches_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two optimisers and two backward passes per step; BatchNorm in the network."""
    settings = {**TINY, "schedule": "alternating", "cycle_warmup": 2}
    launch(_without_dropout_then, _fit_and_dump, tmp_path / "two", settings)
    switch_off_dropout(monkeypatch.setattr)
    one = fit_simulator(BlobScorer(), blob_images(12), FitConfig(**settings),
                        run_dir=tmp_path / "one", progress=False)
    _assert_same_moments(_checkpoint(tmp_path / "one"), _checkpoint(tmp_path / "two"))
    _assert_close_state(one.net.state_dict(), _rank_weights(tmp_path / "two", 1))
    _assert_same_log(tmp_path / "one" / LOG_NAME, tmp_path / "two" / LOG_NAME)


# --------------------------------------------------------------------------- units


def test_global_batch_must_split_evenly() -> None:
    group = distributed.ProcessGroup(rank=1, world_size=2)
    group.check_batch_size(4)
    with pytest.raises(CounterwarpError, match=r"batch_size=5 .* divisible .* \(2\)"):
        group.check_batch_size(5)
    assert group.local_slice(torch.arange(6)).tolist() == [3, 4, 5]
    assert distributed.ProcessGroup().local_slice(torch.arange(3)).tolist() == [0, 1, 2]


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.environment() == (0, 1, 0)
    assert distributed.init() == distributed.ProcessGroup()  # no torchrun: nothing to join
    assert distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(CounterwarpError, match="WORLD_SIZE='two'"):
        distributed.environment()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(CounterwarpError, match="RANK=2 is not below WORLD_SIZE=2"):
        distributed.environment()


def test_global_batchnorm_is_plain_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4))
    keys = list(net.state_dict())
    reference = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4))
    reference.load_state_dict(net.state_dict())
    converted = global_batchnorm.convert_batchnorm(net)
    assert isinstance(converted[1], global_batchnorm.GlobalBatchNorm)
    assert list(converted.state_dict()) == keys
    x = torch.randn(3, 1, 6, 6, 6)
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted[1].running_mean, reference[1].running_mean)
    reverted = global_batchnorm.revert_batchnorm(converted)
    assert type(reverted[1]) is torch.nn.BatchNorm3d
    assert list(reverted.state_dict()) == keys
    torch.testing.assert_close(reverted[1].running_var, reference[1].running_var)
