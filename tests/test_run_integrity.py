"""Run folders that cannot lie: bindings between a run's files, staged (transactional)
updates, and failures (NaN, exception, Ctrl-C, SIGTERM, SIGKILL, a full disk) that leave
every visible file of the run byte-identical (compared by sha256)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import counterwarp.train.checkpoint as checkpoint_module
import counterwarp.train.classifier as classifier_module
import counterwarp.train.simulator as simulator_module
import counterwarp.train.staging as staging_module
from counterwarp.cli import main
from counterwarp.data.synthetic import synth
from counterwarp.errors import CounterwarpError
from counterwarp.train.checkpoint import CHECKPOINT_NAME, LOG_NAME, load_checkpoint
from counterwarp.train.classifier import train_classifier
from counterwarp.train.staging import (
    CLASSIFIER_STAGING,
    FIT_STAGING,
    Staging,
    file_digest,
    recover_run,
)
from counterwarp.workflows.explain import explain_run
from counterwarp.workflows.fit import fit_run
from counterwarp.workflows.folder import (
    PROVENANCE_NAME,
    SIMULATOR_NAME,
    SPLIT_NAME,
    check_provenance,
    load_run_classifier,
    load_run_simulator,
)

TINY = {"steps": 2, "batch_size": 4, "channels": (4, 8, 8), "latent_dim": 16,
        "checkpoint_every": 1, "seed": 0}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny 2D cohort and a run folder with a classifier and a finished 2-step fit."""
    root = tmp_path_factory.mktemp("integrity")
    synth(root / "cohort", n=12, shape=(32, 32), dim=2, seed=5, progress=False)
    manifest = root / "cohort" / "manifest.csv"
    run = root / "run"
    train_classifier(manifest, run, epochs=1, progress=False)
    fit_run(manifest, run, progress=False, **TINY)
    return {"root": root, "manifest": manifest, "run": run}


def _copy(base: dict[str, Path], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    return run


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every visible file under ``folder`` (hidden files and folders skipped)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts)
    }


def _fail_on_call(n: int, error: BaseException, real: Callable) -> Callable:
    """A stand-in for ``real`` that raises ``error`` on its ``n``-th call."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return real(*args, **kwargs)

    return wrapper


def _full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


# --------------------------------------------------------------------------- fit failures


def test_fit_nan_from_a_huge_margin_names_the_margin_and_changes_nothing(base, tmp_path):
    run = _copy(base, tmp_path)
    before = hashes(run)
    with pytest.raises(CounterwarpError) as caught:
        fit_run(base["manifest"], run, progress=False, **{**TINY, "margin": 1e308})
    message = str(caught.value)
    assert "\n" not in message
    assert "the shift loss became Inf at step 1" in message and "--margin" in message
    assert "--lr" not in message  # not blamed on the learning rate
    assert "had not written a checkpoint yet" in message and "last good" not in message
    assert hashes(run) == before
    assert load_checkpoint(run / CHECKPOINT_NAME)["step"] == 2  # the older fit's, kept


def test_fit_nan_after_finite_steps_names_the_learning_rate(base, tmp_path):
    run = _copy(base, tmp_path)
    before = hashes(run)
    with pytest.raises(CounterwarpError) as caught:
        fit_run(base["manifest"], run, progress=False, **{**TINY, "steps": 12, "lr": 1e6})
    message = str(caught.value)
    assert "became NaN" in message or "became Inf" in message
    assert "lower --lr (now 1e+06)" in message and "--margin" not in message
    assert "the last good checkpoint (step" in message and "unchanged" in message
    assert hashes(run) == before
    staged = load_checkpoint(run / FIT_STAGING / CHECKPOINT_NAME)  # the claim is true
    assert all(torch.isfinite(t).all() for t in staged["state_dict"].values())


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()],
                         ids=["exception", "ctrl-c"])
def test_fit_interrupted_changes_nothing_and_resume_continues_from_the_staged_step(
    error, base, tmp_path, monkeypatch
):
    run = _copy(base, tmp_path)
    before = hashes(run)
    settings = {**TINY, "steps": 5}
    monkeypatch.setattr(simulator_module, "train_step",
                        _fail_on_call(4, error, simulator_module.train_step))
    with pytest.raises(type(error)):
        fit_run(base["manifest"], run, progress=False, **settings)
    assert hashes(run) == before
    assert load_checkpoint(run / FIT_STAGING / CHECKPOINT_NAME)["step"] == 3
    monkeypatch.undo()
    steps: list[int] = []
    real = simulator_module.train_step
    monkeypatch.setattr(simulator_module, "train_step",
                        lambda *a, **k: steps.append(a[-1]) or real(*a, **k))
    fit_run(base["manifest"], run, resume=True, progress=False, **settings)
    assert steps == [3, 4]  # continued from the staged step 3, not from 0 nor the old fit
    assert load_checkpoint(run / CHECKPOINT_NAME)["step"] == 5
    assert not (run / FIT_STAGING).exists()
    log = (run / LOG_NAME).read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["1", "2", "3", "4", "5"]


def test_fit_killed_changes_nothing(base, tmp_path):
    run = _copy(base, tmp_path)
    before = hashes(run)
    driver = (
        "import sys\nfrom counterwarp.workflows.fit import fit_run\n"
        f"fit_run(sys.argv[1], sys.argv[2], progress=False, **{ {**TINY, 'steps': 10**6}!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", driver, str(base["manifest"]), str(run)],
                               env=env, stderr=subprocess.PIPE)
    staged = run / FIT_STAGING / CHECKPOINT_NAME
    deadline = time.monotonic() + 120
    while not (staged.exists() and load_checkpoint(staged)["step"] >= 2):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the fit made no progress"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert hashes(run) == before


@pytest.mark.parametrize("target, n", [("torch.save", 1), ("torch.save", 3), ("log", 2)],
                         ids=["first-checkpoint", "simulator.pt", "log"])
def test_fit_disk_full_is_one_line_naming_the_file_and_changes_nothing(
    target, n, base, tmp_path, monkeypatch
):
    # a 2-step fit saves: checkpoint 1, checkpoint 2, simulator.pt; writes log 1, log 2
    run = _copy(base, tmp_path)
    before = hashes(run)
    if target == "torch.save":
        monkeypatch.setattr(torch, "save", _fail_on_call(n, _full(), torch.save))
    else:
        monkeypatch.setattr(checkpoint_module, "write_text_atomic",
                            _fail_on_call(n, _full(), checkpoint_module.write_text_atomic))
    with pytest.raises(CounterwarpError) as caught:
        fit_run(base["manifest"], run, progress=False, **TINY)
    message = str(caught.value)
    named = {1: CHECKPOINT_NAME, 3: SIMULATOR_NAME}[n] if target == "torch.save" else LOG_NAME
    assert "\n" not in message and "no space left" in message
    assert f"{run / named} " in message and "unchanged" in message
    assert hashes(run) == before


# --------------------------------------------------------------------------- train-classifier


def test_train_classifier_into_a_trained_run_is_refused_without_overwrite(base, tmp_path,
                                                                          capsys):
    run = _copy(base, tmp_path)
    before = hashes(run)
    code = main(["train-classifier", "--manifest", str(base["manifest"]), "--out", str(run),
                 "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "classifier.pt exists" in err[0] and "--overwrite" in err[0]
    assert hashes(run) == before


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), _full()],
                         ids=["exception", "ctrl-c", "disk-full-in-training"])
def test_retraining_interrupted_changes_nothing(error, base, tmp_path, monkeypatch):
    run = _copy(base, tmp_path)
    before = hashes(run)
    monkeypatch.setattr(classifier_module, "augment_batch",
                        _fail_on_call(3, error, classifier_module.augment_batch))
    with pytest.raises((type(error), CounterwarpError)):
        train_classifier(base["manifest"], run, epochs=3, seed=1, progress=False,
                         overwrite=True)
    assert hashes(run) == before
    assert not (run / CLASSIFIER_STAGING).exists()


@pytest.mark.parametrize("which", ["split", "classifier"])
def test_retraining_disk_full_is_one_line_naming_the_file_and_changes_nothing(
    which, base, tmp_path, monkeypatch
):
    run = _copy(base, tmp_path)
    before = hashes(run)
    if which == "split":
        monkeypatch.setattr(classifier_module, "write_json_atomic",
                            _fail_on_call(1, _full(), classifier_module.write_json_atomic))
    else:
        monkeypatch.setattr(torch, "save", _fail_on_call(1, _full(), torch.save))
    with pytest.raises(CounterwarpError) as caught:
        train_classifier(base["manifest"], run, epochs=1, seed=1, progress=False,
                         overwrite=True)
    named = SPLIT_NAME if which == "split" else "classifier.pt"
    message = str(caught.value)
    assert "\n" not in message and "no space left" in message
    assert f"{run / named} " in message and "unchanged" in message
    assert hashes(run) == before


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_retraining_killed_changes_nothing(how, base, tmp_path):
    run = _copy(base, tmp_path)
    before = hashes(run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "counterwarp", "train-classifier", "--manifest",
         str(base["manifest"]), "--out", str(run), "--epochs", "500", "--overwrite"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    staged_log = run / CLASSIFIER_STAGING / "classifier_log.csv"
    deadline = time.monotonic() + 120
    while not staged_log.exists():  # at least one epoch trained and logged
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the training made no progress"
        time.sleep(0.05)
    os.kill(process.pid, how)
    process.communicate()
    assert process.returncode != 0
    assert hashes(run) == before


def test_retraining_with_an_exploding_loss_stops_and_changes_nothing(base, tmp_path):
    run = _copy(base, tmp_path)
    before = hashes(run)
    with pytest.raises(CounterwarpError, match=r"training loss (exploded|became).*--lr"):
        train_classifier(base["manifest"], run, epochs=3, lr=1e6, progress=False,
                         overwrite=True)
    assert hashes(run) == before


def test_finished_retraining_makes_the_old_simulator_stale(base, tmp_path):
    run = _copy(base, tmp_path)
    old = hashes(run)
    train_classifier(base["manifest"], run, epochs=1, seed=1, progress=False, overwrite=True)
    new = hashes(run)
    assert all(new[name] != old[name] for name in ("classifier.pt", SPLIT_NAME))
    assert new[SIMULATOR_NAME] == old[SIMULATOR_NAME]
    assert not (run / CLASSIFIER_STAGING).exists()
    with pytest.raises(CounterwarpError, match=r"simulator\.pt was fitted for another .*"
                                               r"classifier\.pt \(retrained since\); rerun "
                                               r"`counterwarp fit --manifest"):
        load_run_simulator(run)
    with pytest.raises(CounterwarpError, match=r"simulator_checkpoint\.pt was written for "
                                               r"another classifier.*without --resume"):
        fit_run(base["manifest"], run, resume=True, progress=False, **TINY)
    fit_run(base["manifest"], run, progress=False, **TINY)  # a fresh fit binds it again
    simulator, _ = load_run_simulator(run)
    assert simulator.provenance_["classifier_sha256"] == file_digest(run / "classifier.pt")


# --------------------------------------------------------------------------- bindings


def test_a_split_that_is_not_the_classifiers_is_refused(base, tmp_path):
    run = _copy(base, tmp_path)
    split = json.loads((run / SPLIT_NAME).read_text())
    split["train"], split["test"] = split["test"], split["train"]  # valid, but another split
    (run / SPLIT_NAME).write_text(json.dumps(split))
    with pytest.raises(CounterwarpError, match=r"split\.json is not the split .*classifier\.pt "
                                               r"was trained on.*--overwrite"):
        load_run_classifier(run)


def test_runs_written_before_bindings_are_accepted(base, tmp_path):
    run = _copy(base, tmp_path)
    for name, key in (("classifier.pt", "split_sha256"), (SIMULATOR_NAME, "classifier_sha256")):
        payload = torch.load(run / name, weights_only=True)
        assert key in payload  # written by this version
        del payload[key]
        torch.save(payload, run / name)
    (run / SPLIT_NAME).write_text((run / SPLIT_NAME).read_text() + "\n")  # other bytes
    simulator, payload = load_run_simulator(run)
    assert simulator.margin_ > 0 and payload["config"]["input_shape"] == [32, 32]


def test_explain_output_records_its_simulator_and_is_refused_after_a_refit(base, tmp_path):
    run = _copy(base, tmp_path)
    out = tmp_path / "explain"
    explain_run(run, out, manifest=base["manifest"], split="test", direction="inject",
                progress=False)
    provenance = json.loads((out / PROVENANCE_NAME).read_text())
    assert provenance["simulator_sha256"] == file_digest(run / SIMULATOR_NAME)
    assert provenance["classifier_sha256"] == file_digest(run / "classifier.pt")
    assert provenance["split_sha256"] == file_digest(run / SPLIT_NAME)
    check_provenance(out, run)
    fit_run(base["manifest"], run, progress=False, **{**TINY, "seed": 1})
    with pytest.raises(CounterwarpError, match=r"was made by another .*simulator\.pt"):
        check_provenance(out, run)


def test_an_interrupted_swap_is_finished_by_the_next_writer(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("a", "b", "c"):
        (run / name).write_text("old " + name)
    staging = Staging(run, FIT_STAGING)
    staging.start()
    for name in ("a", "b", "c"):
        (staging / name).write_text("new " + name)
    # os.replace call 1 writes the commit marker, call 2 moves "a", call 3 ("b") is killed
    monkeypatch.setattr(staging_module.os, "replace",
                        _fail_on_call(3, KeyboardInterrupt(), os.replace))
    with pytest.raises(KeyboardInterrupt):
        staging.commit(["a", "b", "c"])
    assert [(run / n).read_text() for n in "abc"] == ["new a", "old b", "old c"]  # half done
    monkeypatch.undo()
    recover_run(run)
    assert [(run / n).read_text() for n in "abc"] == ["new a", "new b", "new c"]
    assert not staging.folder.exists()


# --------------------------------------------------------------------------- resume


def test_resume_with_other_settings_names_each_difference(base, tmp_path):
    run = _copy(base, tmp_path)
    with pytest.raises(CounterwarpError) as caught:
        fit_run(base["manifest"], run, resume=True, progress=False,
                **{**TINY, "lr": 0.01, "w_smooth": 3.0})
    message = str(caught.value)
    assert "other settings" in message
    assert "lr 0.001 -> 0.01" in message and "w_smooth 1.0 -> 3.0" in message
    assert "steps" not in message.split("other settings")[1].split(";")[0]


def test_resume_with_more_steps_extends_a_finished_fit_exactly(base, tmp_path):
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    shutil.copytree(base["run"], straight)
    shutil.copytree(base["run"], extended)
    settings = {**TINY, "checkpoint_every": 2}
    fit_run(base["manifest"], straight, progress=False, **{**settings, "steps": 5})
    fit_run(base["manifest"], extended, progress=False, **{**settings, "steps": 3})
    fit_run(base["manifest"], extended, resume=True, progress=False, **{**settings, "steps": 5})
    ours = torch.load(extended / SIMULATOR_NAME, weights_only=True)["state_dict"]
    theirs = torch.load(straight / SIMULATOR_NAME, weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert load_checkpoint(extended / CHECKPOINT_NAME)["step"] == 5
    rows = [r.split(",")[0] for r in (extended / LOG_NAME).read_text().splitlines()[1:]]
    assert rows == ["1", "2", "3", "4", "5"]


def test_resume_with_more_steps_is_refused_with_the_cosine_schedule(base, tmp_path):
    run = _copy(base, tmp_path)
    settings = {**TINY, "lr_schedule": "cosine"}
    fit_run(base["manifest"], run, progress=False, **settings)
    before = hashes(run)
    with pytest.raises(CounterwarpError, match=r"steps 2 -> 4 \(the cosine learning-rate "
                                               r"schedule depends on the number of steps"):
        fit_run(base["manifest"], run, resume=True, progress=False, **{**settings, "steps": 4})
    assert hashes(run) == before


def test_report_refuses_a_named_explain_folder_of_an_older_simulator(base, tmp_path):
    from counterwarp.workflows.report import report_run

    run = _copy(base, tmp_path)
    out = run.parent / "explain"  # where the report looks for explain outputs itself
    explain_run(run, out, manifest=base["manifest"], split="test", progress=False)
    fit_run(base["manifest"], run, progress=False, **{**TINY, "seed": 1})
    with pytest.raises(CounterwarpError, match=r"was made by another .*simulator\.pt"):
        report_run(run, tmp_path / "named.html", explain_dir=out, compute=False,
                   progress=False)
    found = report_run(run, tmp_path / "found.html", compute=False, progress=False)
    assert str(out) not in found.read_text(encoding="utf-8")  # the stale folder is not used
