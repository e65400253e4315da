"""Bad inputs, tried systematically on every entry point; untrusted files.

Each case of :data:`CLI_CASES` feeds one thing users get wrong to one command through
``counterwarp.cli.main([...])`` and checks what the user sees and what is left on disk:

- exit status 2 and exactly one visible line on stderr, ``counterwarp <command>: error: ...``,
  that names the culprit (the file, the line, the option);
- nothing written: no new, changed or removed file anywhere under the test's folders
  (which also rules out ``*.tmp`` / hidden temporaries and lock files).

:data:`API_CASES` does the same for the Python API (a :class:`CounterwarpError` naming the
culprit), :func:`test_quirky_manifest_works_everywhere` checks the quirks that must *work*,
and the last section checks untrusted files (crafted pickles, bad configs, hostile paths).
``docs/reliability.md`` lists every case with the message the user sees.
"""

from __future__ import annotations

import builtins
import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from counterwarp.cli import main
from counterwarp.data.synthetic import synth
from counterwarp.errors import CounterwarpError
from counterwarp.explain.simulator import Simulator
from counterwarp.nn.classifier import Classifier, load_classifier
from counterwarp.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from counterwarp.train.classifier import train_classifier
from counterwarp.workflows.fit import fit_run

TINY_FIT = {"steps": 2, "batch_size": 4, "channels": (4, 8, 8), "latent_dim": 16,
            "checkpoint_every": 1}
SHAPE = (32, 32)


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """Everything the cases read: a tiny 2D cohort, a fitted run, good and bad images.

    Attributes:
        root: folder holding everything below (watched for new files by every case).
        cohort: ``counterwarp synth`` cohort (12 subjects, 32 x 32).
        run: run folder with ``classifier.pt``, ``split.json``, ``simulator.pt`` and a
            simulator checkpoint.
        foreign: ``(path, label)`` of copies of the cohort's images, outside the run's split
            (so ``fit`` / ``explain`` use a manifest of them whole).
        bad: bad-image kind -> file.
    """

    root: Path
    cohort: Path
    run: Path
    foreign: list[tuple[Path, int]]
    bad: dict[str, Path] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return self.cohort / "manifest.csv"


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("reliability")
    cohort = root / "cohort"
    synth(cohort, n=12, shape=SHAPE, dim=2, seed=3, progress=False)
    run = root / "run"
    train_classifier(cohort / "manifest.csv", run, epochs=1, progress=False)
    fit_run(cohort / "manifest.csv", run, progress=False, **TINY_FIT)
    with open(cohort / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    foreign = []
    for row in rows:
        copy = root / "foreign" / f"f-{Path(row['path']).name}"
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(cohort / row["path"], copy)
        foreign.append((copy, int(row["label"])))
    first = nib.load(str(foreign[0][0]))
    data, affine = first.get_fdata().astype(np.float32), first.affine
    bad = root / "bad"
    bad.mkdir()
    nan, inf = data.copy(), data.copy()
    nan[10, 10] = np.nan
    inf[12, 12] = np.inf
    files = {
        "nan": _save(bad / "nan.nii.gz", nan, affine),
        "inf": _save(bad / "inf.nii.gz", inf, affine),
        "constant": _save(bad / "constant.nii.gz", np.full_like(data, 7.0), affine),
        "all_zero": _save(bad / "all_zero.nii.gz", np.zeros_like(data), affine),
        "four_d": _save(bad / "four_d.nii.gz", np.stack([data] * 2, -1)[:, :, None, :]
                        .repeat(3, axis=2), affine),
        "three_d": _save(bad / "three_d.nii.gz", np.stack([data] * 8, -1), affine),
        "unreadable": _save(bad / "unreadable.nii.gz", data, affine),
        "missing": bad / "missing.nii.gz",
    }
    good_bytes = foreign[0][0].read_bytes()
    files["empty"] = bad / "empty.nii.gz"
    files["empty"].write_bytes(b"")
    files["truncated"] = bad / "truncated.nii.gz"
    files["truncated"].write_bytes(good_bytes[: len(good_bytes) // 2])
    files["not_nifti"] = bad / "not_nifti.nii.gz"
    files["not_nifti"].write_text("path,label\nthis is a CSV file, not an image\n")
    files["folder"] = bad / "folder.nii.gz"
    files["folder"].mkdir()
    from counterwarp.workflows.folder import read_split

    train = read_split(run)["train"]  # paths resolved (split.json stores them relative)
    write_manifest(root / "train.csv", [(item["path"], str(item["label"])) for item in train])
    return World(root, cohort, run, foreign, files)


# --------------------------------------------------------------------------- helpers


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``roots``: path -> (size, mtime in ns)."""
    files = {}
    for root in roots:
        if root.exists():
            for path in root.rglob("*"):
                if path.is_file() or path.is_symlink():
                    stat = path.lstat()
                    files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def visible_lines(stderr: str) -> list[str]:
    """The non-blank lines a terminal shows (progress bars overwrite themselves with \\r)."""
    lines = [line.split("\r")[-1] for line in stderr.split("\n")]
    return [line for line in lines if line.strip()]


@contextlib.contextmanager
def denied(path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``path`` unreadable: chmod 000, or (as root, who reads anyway) fail its open()."""
    if os.geteuid() != 0:
        path.chmod(0)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    target = os.path.realpath(path)
    real_open, real_io_open = builtins.open, io.open

    def guard(opener: Callable) -> Callable:
        def open_(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == target:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
            return opener(file, *args, **kwargs)

        return open_

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", guard(real_open))
        patch.setattr(io, "open", guard(real_io_open))
        yield


def write_manifest(path: Path, rows: list[tuple[str, str]], header: str = "path,label") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(f"{p},{label}" for p, label in rows)]) + "\n",
                    encoding="utf-8")
    return path


def foreign_rows(world: World) -> list[tuple[str, str]]:
    return [(str(path), str(label)) for path, label in world.foreign]


class Evil:
    """Pickles into a call of ``open(marker, "w")``: loading it runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (builtins.open, (self.marker, "w"))


def edit_checkpoint(path: Path, change: Callable[[dict], object]) -> None:
    """Load a checkpoint (weights only), let ``change`` edit the dict in place, save it back."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    change(payload)
    torch.save(payload, path)


# --------------------------------------------------------------------------- CLI cases


@dataclass(frozen=True)
class Invocation:
    """What one case runs: the argv, the substrings the error must hold."""

    argv: list[str]
    culprits: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    """One bad input fed to one command."""

    id: str
    kind: str
    command: str
    build: Callable[[World, Path], Invocation]
    deny: Callable[[World, Path], Path] | None = None


def _argv(command: str, world: World, scratch: Path, *, manifest: Path | None = None,
          image: Path | None = None, run: Path | None = None, data: Path | None = None,
          extra: tuple[str, ...] = ()) -> list[str]:
    """argv of ``command`` with tiny settings (so a case that wrongly succeeds stays fast)."""
    run = run or world.run
    out = str(scratch / "out")
    if command == "train-classifier":
        return ["train-classifier", "--manifest", str(manifest or world.manifest),
                "--out", out, "--epochs", "1", *extra]
    if command == "fit":
        return ["fit", "--manifest", str(manifest or world.manifest), "--run", str(run),
                "--steps", "1", "--batch-size", "2", *extra]
    inputs = [str(image)] if image is not None else ["--manifest", str(manifest or world.manifest)]
    if command == "explain":
        return ["explain", "--run", str(run), *inputs, "--direction", "inject", "--out", out,
                *extra]
    if command == "saliency":
        return ["saliency", "--run", str(run), "--method", "gradient", *inputs, "--out", out,
                *extra]
    if command == "benchmark":
        return ["benchmark", "--data", str(data or world.cohort), "--run", str(run),
                "--methods", "gradient", "--out", out, *extra]
    raise AssertionError(command)


def _cohort_copy(world: World, scratch: Path) -> Path:
    copy = scratch / "cohort"
    shutil.copytree(world.cohort, copy)
    return copy


def _first_image(cohort: Path) -> Path:
    with open(cohort / "manifest.csv", newline="", encoding="utf-8") as handle:
        return cohort / next(csv.DictReader(handle))["path"]


# ---- 1. bad image files, to every command that reads images

IMAGE_FAULTS = {
    # kind: (what the message must say besides the file name)
    "missing": "not found",
    "unreadable": "ermission denied",
    "empty": "cannot read",
    "truncated": "truncated",
    "not_nifti": "cannot read as a NIfTI",
    "folder": "",
    "four_d": "4D",
    "three_d": "3D",
    "nan": "NaN",
    "inf": "infinite",
    "constant": "constant",
    "all_zero": "constant",
}


def _image_case(kind: str, command: str) -> Case:
    def build(world: World, scratch: Path) -> Invocation:
        bad = world.bad[kind]
        if command in ("train-classifier", "fit"):
            manifest = write_manifest(scratch / "m.csv", [*foreign_rows(world), (str(bad), "1")])
            return Invocation(_argv(command, world, scratch, manifest=manifest),
                              (bad.name, IMAGE_FAULTS[kind]))
        if command == "benchmark":
            data = _cohort_copy(world, scratch)
            target = _first_image(data)
            target.unlink()
            if kind == "folder":
                target.mkdir()
            elif kind != "missing":
                shutil.copy(bad, target)
            return Invocation(_argv(command, world, scratch, data=data),
                              (target.name, IMAGE_FAULTS[kind]))
        return Invocation(_argv(command, world, scratch, image=bad),
                          tuple(w for w in (bad.name, IMAGE_FAULTS[kind]) if w))

    def deny(world: World, scratch: Path) -> Path:
        return _first_image(scratch / "cohort") if command == "benchmark" else world.bad[kind]

    return Case(f"{command}-image-{kind}", f"image: {kind}", command, build,
                deny if kind == "unreadable" else None)


# ---- 2. bad manifests, to every command that reads one


def _manifest_text(world: World, kind: str) -> str | bytes | None:
    rows = foreign_rows(world)
    lines = [f"{p},{label}" for p, label in rows]
    good = "\n".join(["path,label", *lines]) + "\n"
    return {
        "manifest_missing": None,
        "manifest_empty": "",
        "manifest_header_only": "path,label\n",
        "manifest_no_label_column": "\n".join(["path,diagnosis", *lines]) + "\n",
        "manifest_not_utf8": b"path,label\n" + "\n".join(
            [*lines, "caf\xe9.nii.gz,1"]).encode("latin-1"),
        "manifest_is_nifti": world.foreign[0][0].read_bytes(),
        "label_not_binary": good + "extra.nii.gz,2\n",
        "label_strings": "\n".join(
            ["path,label", *(f"{p},{'AD' if label == '1' else 'CN'}" for p, label in rows)]),
        "single_class": "\n".join(["path,label", *(f"{p},0" for p, _ in rows)]) + "\n",
        "duplicate_path": good + f"{Path(rows[0][0]).parent}/./{Path(rows[0][0]).name},0\n",
        "empty_path_cell": good + ",1\n",
        "empty_label_cell": good + "extra.nii.gz,\n",
        "unreadable_manifest": good,
    }[kind]


MANIFEST_FAULTS = {
    # kind: what the message must say (the manifest's name is always required)
    "manifest_missing": "not found",
    "manifest_empty": "empty",
    "manifest_header_only": "no images",
    "manifest_no_label_column": "'label'",
    "manifest_not_utf8": "UTF-8",
    "manifest_is_nifti": "UTF-8",
    "label_not_binary": "'2' is not 0 or 1",
    "label_strings": "not 0 or 1",
    "single_class": "both classes",
    "duplicate_path": "list each image once",
    "empty_path_cell": "empty 'path'",
    "empty_label_cell": "empty 'label'",
    "unreadable_manifest": "ermission denied",
}


def _manifest_case(kind: str, command: str) -> Case:
    def build(world: World, scratch: Path) -> Invocation:
        text = _manifest_text(world, kind)
        if command == "benchmark":
            data = _cohort_copy(world, scratch)
            manifest = data / "manifest.csv"
            if kind == "manifest_missing":
                manifest.unlink()
                return Invocation(_argv(command, world, scratch, data=data),
                                  ("manifest.csv", str(data)))
        else:
            manifest = scratch / "bad manifest.csv"
        if isinstance(text, bytes):
            manifest.write_bytes(text)
        elif text is not None:
            manifest.write_text(text, encoding="utf-8")
        culprits: tuple[str, ...] = (manifest.name, MANIFEST_FAULTS[kind])
        if kind == "label_not_binary":
            culprits += ("line 14",)
        return Invocation(_argv(command, world, scratch, manifest=manifest,
                                data=manifest.parent if command == "benchmark" else None),
                          culprits)

    def deny(world: World, scratch: Path) -> Path:
        return (scratch / "cohort" / "manifest.csv" if command == "benchmark"
                else scratch / "bad manifest.csv")

    return Case(f"{command}-{kind}", f"manifest: {kind}", command, build,
                deny if kind == "unreadable_manifest" else None)


# ---- 3. run folders that are broken, foreign or from another version


def _run_copy(world: World, scratch: Path) -> Path:
    copy = scratch / "run"
    shutil.copytree(world.run, copy)
    return copy


RUN_FAULTS: dict[str, tuple[str, Callable[[Path, Path], None], tuple[str, ...]]] = {
    # kind: (file, how to break it given (run, marker), words the message must hold)
    "classifier_missing": ("classifier.pt", lambda run, _: (run / "classifier.pt").unlink(),
                           ()),
    "classifier_version_99": ("classifier.pt", lambda run, _: edit_checkpoint(
        run / "classifier.pt", lambda p: p.update(version=99)), ("version 99",)),
    "classifier_truncated": ("classifier.pt", lambda run, _: (run / "classifier.pt").write_bytes(
        (run / "classifier.pt").read_bytes()[:2000]), ("cannot read",)),
    "classifier_plain_state_dict": ("classifier.pt", lambda run, _: torch.save(
        torch.load(run / "classifier.pt", weights_only=True)["state_dict"],
        run / "classifier.pt"), ("not a counterwarp classifier",)),
    "classifier_config_wrong_type": ("", lambda run, _: edit_checkpoint(
        run / "classifier.pt", lambda p: p["config"].update(channels="abc")),
        ("classifier channels", "'abc'")),
    "classifier_config_out_of_range": ("", lambda run, _: edit_checkpoint(
        run / "classifier.pt", lambda p: p["config"].update(dropout=1.5)),
        ("classifier dropout", "1.5")),
    "classifier_pickle_code": ("classifier.pt", lambda run, marker: edit_checkpoint(
        run / "classifier.pt", lambda p: p.update(config=Evil(marker))), ("cannot read",)),
    "simulator_missing": ("simulator.pt", lambda run, _: (run / "simulator.pt").unlink(),
                          ("simulator",)),
    "simulator_version_99": ("simulator.pt", lambda run, _: edit_checkpoint(
        run / "simulator.pt", lambda p: p.update(version=99)), ("version 99",)),
    "simulator_truncated": ("simulator.pt", lambda run, _: (run / "simulator.pt").write_bytes(
        (run / "simulator.pt").read_bytes()[:2000]), ("cannot be loaded",)),
    "simulator_pickle_code": ("simulator.pt", lambda run, marker: edit_checkpoint(
        run / "simulator.pt", lambda p: p.update(margin=Evil(marker))), ("cannot be loaded",)),
    "simulator_settings_wrong_type": ("simulator.pt", lambda run, _: edit_checkpoint(
        run / "simulator.pt", lambda p: p["fit_config"].update(margin_sd="x")),
        ("invalid simulator settings",)),
    "simulator_settings_not_a_dict": ("simulator.pt", lambda run, _: edit_checkpoint(
        run / "simulator.pt", lambda p: p.update(fit_config="x")), ("settings",)),
    "simulator_net_config_out_of_range": ("simulator.pt", lambda run, _: edit_checkpoint(
        run / "simulator.pt", lambda p: p["net_config"].update(channels=[4, -8, 8])),
        ("channels", "-8")),
    "simulator_weights_of_other_shape": ("simulator.pt", lambda run, _: edit_checkpoint(
        run / "simulator.pt", lambda p: p["net_config"].update(input_shape=[64, 64])),
        ("weights do not match",)),
    "checkpoint_pickle_code": (CHECKPOINT_NAME, lambda run, marker: edit_checkpoint(
        run / CHECKPOINT_NAME, lambda p: p.update(margin=Evil(marker))), ("not a loadable",)),
    "checkpoint_other_format": (CHECKPOINT_NAME, lambda run, _: edit_checkpoint(
        run / CHECKPOINT_NAME, lambda p: p.update(format="other")),
        ("not a counterwarp simulator checkpoint",)),
    "split_missing": ("split.json", lambda run, _: (run / "split.json").unlink(),
                      ("not found",)),
    "split_not_json": ("split.json", lambda run, _: (run / "split.json").write_text("{"),
                       ("unreadable",)),
    "split_wrong_structure": ("split.json", lambda run, _: (run / "split.json").write_text(
        "[]"), ("split",)),
}
RUN_FAULT_COMMANDS = {
    "classifier": ("fit", "explain", "saliency", "benchmark"),
    "simulator": ("explain", "benchmark"),
    "checkpoint": ("fit",),
    "split": ("fit", "explain", "saliency", "benchmark"),
}


def _run_case(kind: str, command: str) -> Case:
    file, breaker, words = RUN_FAULTS[kind]

    def build(world: World, scratch: Path) -> Invocation:
        run = _run_copy(world, scratch)
        breaker(run, scratch / "PWNED")
        extra = ("--resume",) if kind.startswith("checkpoint") else ()
        manifest = world.manifest if command != "benchmark" else None
        culprits = tuple(w for w in (file, *words) if w)
        return Invocation(_argv(command, world, scratch, run=run, manifest=manifest,
                                extra=extra), culprits)

    return Case(f"{command}-{kind}", f"run folder: {kind}", command, build)


# ---- 4. bad options and other per-command mistakes


def _option_case(command: str, kind: str, extra: tuple[str, ...], culprits: tuple[str, ...],
                 *, replace: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> Case:
    def build(world: World, scratch: Path) -> Invocation:
        afile = scratch / "afile"
        afile.write_text("x")
        fill = {"{afile}": str(afile), "{cohort}": str(world.cohort),
                "{image}": str(world.foreign[0][0]), "{empty}": str(scratch / "nowhere"),
                "{foreign_dir}": str(world.foreign[0][0].parent),
                "{root}": str(world.root)}

        def sub(text: str) -> str:
            for key, value in fill.items():
                text = text.replace(key, value)
            return text

        if command == "synth":
            argv = ["synth", "--out", str(scratch / "out"), "--n", "4", "--dim", "2",
                    "--shape", "32", "32"]
        else:
            argv = _argv(command, world, scratch)
        for flag, value in (replace or {}).items():
            argv[argv.index(flag) + 1] = sub(value)
        for flag in drop:
            del argv[argv.index(flag) : argv.index(flag) + 2]
        argv += [sub(item) for item in extra]
        return Invocation(argv, tuple(sub(c) for c in culprits))

    return Case(f"{command}-{kind}", f"option: {command} {kind}", command, build)


OPTION_CASES = [
    _option_case("synth", "n_below_2", ("--n", "1"), ("n must be", "got 1")),
    _option_case("synth", "fraction_above_1", ("--diseased-fraction", "1.5"),
                 ("diseased_fraction", "1.5")),
    _option_case("synth", "negative_effect", ("--effect", "-1"), ("effect", "-1")),
    _option_case("synth", "negative_seed", ("--seed", "-1"), ("seed", "-1")),
    _option_case("synth", "shape_wrong_length", ("--shape", "32", "32", "32"), ("shape",)),
    _option_case("synth", "shape_too_small", ("--shape", "4", "4"), ("shape", "at least")),
    _option_case("synth", "effect_spec_missing", ("--effect-spec", "{empty}"),
                 ("{empty}",)),
    _option_case("synth", "effect_spec_not_json", ("--effect-spec", "{afile}"),
                 ("{afile}", "not valid JSON")),
    _option_case("synth", "out_is_a_file", (), ("{afile}", "not a folder"),
                 replace={"--out": "{afile}"}),
    _option_case("synth", "out_inside_a_file", (), ("{afile}", "Not a directory"),
                 replace={"--out": "{afile}/cohort"}),
    _option_case("train-classifier", "epochs_0", ("--epochs", "0"), ("epochs", "0")),
    _option_case("train-classifier", "batch_size_1", ("--batch-size", "1"),
                 ("batch size", "1")),
    _option_case("train-classifier", "lr_nan", ("--lr", "nan"), ("learning rate", "nan")),
    _option_case("train-classifier", "shape_wrong_length", ("--shape", "32"), ("shape", "2D")),
    _option_case("train-classifier", "positive_label_never_occurs",
                 ("--positive-label", "AD"), ("'AD'", "never occurs")),
    _option_case("train-classifier", "out_is_a_file", (), ("{afile}", "not a folder"),
                 replace={"--out": "{afile}"}),
    _option_case("train-classifier", "out_inside_a_file", (), ("{afile}", "Not a directory"),
                 replace={"--out": "{afile}/run"}),
    _option_case("train-classifier", "manifest_is_a_folder", (), ("{foreign_dir}", "folder"),
                 replace={"--manifest": "{foreign_dir}"}),
    _option_case("fit", "steps_0", ("--steps", "0"), ("steps", "0")),
    _option_case("fit", "lr_nan", ("--lr", "nan"), ("lr", "nan")),
    _option_case("fit", "margin_negative", ("--margin", "-1"), ("margin", "-1")),
    _option_case("fit", "checkpoint_every_0", ("--checkpoint-every", "0"),
                 ("checkpoint_every", "0")),
    _option_case("fit", "num_experts_0", ("--num-experts", "0"), ("num_experts", "0")),
    _option_case("fit", "unknown_split", ("--split", "training"), ("'training'",)),
    _option_case("fit", "unknown_device", ("--device", "tpu"), ("'tpu'",)),
    _option_case("fit", "run_folder_missing", (), ("{empty}", "classifier"),
                 replace={"--run": "{empty}"}),
    _option_case("explain", "nothing_to_explain", (), ("nothing to explain",),
                 drop=("--manifest",)),
    _option_case("saliency", "nothing_to_explain", (), ("nothing to explain",),
                 drop=("--manifest",)),
    _option_case("explain", "manifest_and_images", ("{image}",), ("not both",)),
    _option_case("explain", "progression_needs_velocity", ("--progression", "3"),
                 ("--progression", "velocity")),
    _option_case("explain", "progression_negative", ("--progression", "-3"),
                 ("--progression -3",)),
    _option_case("explain", "out_is_a_file", (), ("{afile}", "not a folder"),
                 replace={"--out": "{afile}"}),
    _option_case("explain", "unknown_split", ("--split", "testing"), ("'testing'",)),
    _option_case("explain", "split_part_absent_from_manifest", ("--split", "test"),
                 ("belongs to the 'test' part",), replace={"--manifest": "{root}/train.csv"}),
    _option_case("saliency", "unknown_method", (), ("'bogus'",),
                 replace={"--method": "bogus"}),
    _option_case("saliency", "occlusion_patch_0", ("--occlusion-patch", "0"),
                 ("--occlusion-patch", "got 0"), replace={"--method": "occlusion"}),
    _option_case("saliency", "out_is_a_file", (), ("{afile}", "not a folder"),
                 replace={"--out": "{afile}"}),
    _option_case("saliency", "unknown_device", ("--device", "tpu"), ("'tpu'",)),
    _option_case("saliency", "split_part_absent_from_manifest", ("--split", "test"),
                 ("belongs to the 'test' part",), replace={"--manifest": "{root}/train.csv"}),
    _option_case("benchmark", "data_missing", (), ("{empty}", "no such folder"),
                 replace={"--data": "{empty}"}),
    _option_case("benchmark", "data_not_a_synth_cohort", (), ("{root}", "counterwarp synth"),
                 replace={"--data": "{root}"}),
    _option_case("benchmark", "threshold_negative", ("--threshold", "-1"),
                 ("threshold", "-1")),
    _option_case("benchmark", "sigma_negative", ("--sigma", "-1"), ("sigma", "-1")),
    _option_case("benchmark", "unknown_method", (), ("'bogus'",),
                 replace={"--methods": "bogus"}),
    _option_case("benchmark", "out_is_a_file", (), ("{afile}", "not a folder"),
                 replace={"--out": "{afile}"}),
    _option_case("benchmark", "run_missing", (), ("{empty}", "classifier.pt"),
                 replace={"--run": "{empty}"}),
]


def _benchmark_truth_case(kind: str) -> Case:
    def build(world: World, scratch: Path) -> Invocation:
        data = _cohort_copy(world, scratch)
        truth = data / "truth" / f"{_first_image(data).name.split('.')[0]}_log_volume_change.nii.gz"
        if kind == "truth_missing":
            truth.unlink()
            words: tuple[str, ...] = ("not found",)
        else:
            values = nib.load(str(truth)).get_fdata().astype(np.float32)
            values[5, 5] = np.nan
            _save(truth, values, nib.load(str(truth)).affine)
            words = ("NaN",)
        return Invocation(_argv("benchmark", world, scratch, data=data), (truth.name, *words))

    return Case(f"benchmark-{kind}", f"benchmark: {kind}", "benchmark", build)


def _train_classifier_shape_case() -> Case:
    """Images of different shapes in one manifest, without --shape (the 2D / 3D mix is the
    ``three_d`` image case)."""

    def build(world: World, scratch: Path) -> Invocation:
        first = nib.load(str(world.foreign[0][0]))
        odd = _save(scratch / "bigger.nii.gz",
                    np.pad(first.get_fdata(), ((4, 4), (0, 8))), first.affine)
        manifest = write_manifest(scratch / "m.csv", [*foreign_rows(world), (str(odd), "1")])
        return Invocation(_argv("train-classifier", world, scratch, manifest=manifest),
                          ("bigger.nii.gz", "--shape"))

    kind = "shapes_differ_without_shape"
    return Case(f"train-classifier-{kind}", f"images: {kind}", "train-classifier", build)


CLI_CASES: list[Case] = [
    *(_image_case(kind, command) for kind in IMAGE_FAULTS
      for command in ("train-classifier", "fit", "explain", "saliency", "benchmark")),
    *(_manifest_case(kind, command) for kind in MANIFEST_FAULTS
      for command in ("train-classifier", "fit", "explain", "saliency", "benchmark")),
    *(_run_case(kind, command) for kind in RUN_FAULTS
      for command in RUN_FAULT_COMMANDS[kind.split("_")[0]]),
    *OPTION_CASES,
    _benchmark_truth_case("truth_missing"),
    _benchmark_truth_case("truth_nan"),
    _train_classifier_shape_case(),
]

def _params(cases: list[Case]) -> list:
    params = []
    for case in cases:
        params.append(pytest.param(case, id=case.id))
    return params


@pytest.mark.parametrize("case", _params(CLI_CASES))
def test_cli_bad_input(case: Case, world: World, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Exit 2, one visible stderr line naming the culprit, and nothing left on disk."""
    scratch = tmp_path / "scratch ü"  # non-ASCII on purpose
    scratch.mkdir()
    invocation = case.build(world, scratch)
    capsys.readouterr()
    before = snapshot(world.root, scratch)
    with contextlib.ExitStack() as stack:
        if case.deny is not None:
            stack.enter_context(denied(case.deny(world, scratch), monkeypatch))
        code = main(invocation.argv)
    err = capsys.readouterr().err
    lines = visible_lines(err)
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"counterwarp {case.command}: error: "), lines[0]
    for culprit in invocation.culprits:
        assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
    assert "\x1b" not in lines[0]
    assert not (scratch / "PWNED").exists(), "a crafted pickle ran code"
    after = snapshot(world.root, scratch)
    leftovers = {str(Path(p).relative_to(scratch)) for p in set(after) - set(before)
                 if Path(p).is_relative_to(scratch)}
    leftovers |= {p for p in set(after) - set(before) if not Path(p).is_relative_to(scratch)}
    changed = {p for p in set(before) & set(after) if before[p] != after[p]}
    removed = set(before) - set(after)
    assert not changed and not removed, (changed, removed)
    assert not leftovers, leftovers


def test_every_command_is_tried() -> None:
    """The table covers every command named in the issue, with many kinds of bad input."""
    commands = {case.command for case in CLI_CASES}
    assert commands == {"synth", "train-classifier", "fit", "explain", "saliency", "benchmark"}
    assert len({case.kind for case in CLI_CASES}) >= 60
    assert len({case.id for case in CLI_CASES}) == len(CLI_CASES)


# --------------------------------------------------------------------------- the Python API


class BlobScorer(nn.Module):
    """A classifier the package did not define: mean intensity in a central disc, (B, 1)."""

    def __init__(self) -> None:
        super().__init__()
        yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
        disc = ((yy - 16.0) ** 2 + (xx - 16.0) ** 2 < 36).float()
        self.register_buffer("weights", disc / disc.sum())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (8.0 * (images[:, 0] * self.weights).sum((1, 2)) - 5.0)[:, None]


class Returns(nn.Module):
    """A classifier whose output is ``make(images)``: wrong shapes, types, NaN ..."""

    def __init__(self, make: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        self.make = make

    def forward(self, images: torch.Tensor) -> object:
        return self.make(images)


def _blobs(n: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    images = []
    for i in range(n):
        radius = 3.0 + 5.0 * i / n
        disc = ((yy - 16.0) ** 2 + (xx - 16.0) ** 2 < radius**2).float()
        images.append(disc + 0.05 * torch.randn((32, 32), generator=generator))
    return torch.stack(images)[:, None]


API_TINY = {"steps": 1, "batch_size": 2, "channels": (4, 8, 8), "latent_dim": 16}


@pytest.fixture(scope="module")
def fitted() -> Simulator:
    return Simulator(**API_TINY).fit(BlobScorer(), _blobs(), progress=False)


API_CASES: dict[str, tuple[Callable[[Simulator], object], str]] = {
    # kind: (the call, a regex the CounterwarpError must match)
    "classifier_two_logits": (lambda _: Simulator(**API_TINY).fit(
        Returns(lambda x: x.flatten(1)[:, :2]), _blobs(), progress=False), r"shape \(8, 2\)"),
    "classifier_returns_tuple": (lambda _: Simulator(**API_TINY).fit(
        Returns(lambda x: (x.mean((1, 2, 3)),)), _blobs(), progress=False), r"tuple"),
    "classifier_returns_numpy": (lambda _: Simulator(**API_TINY).fit(
        Returns(lambda x: x.mean((1, 2, 3)).numpy()), _blobs(), progress=False), r"ndarray"),
    "classifier_extra_axes": (lambda _: Simulator(**API_TINY).fit(
        Returns(lambda x: x.mean((2, 3))[:, :, None]), _blobs(), progress=False),
        r"one logit per image"),
    "classifier_one_logit_per_batch": (lambda _: Simulator(**API_TINY).fit(
        Returns(lambda x: x.mean()), _blobs(), progress=False), r"shape \(\)"),
    "classifier_nan_logits": (lambda _: Simulator(**API_TINY).fit(
        Returns(lambda x: torch.full((x.shape[0],), float("nan"))), _blobs(), progress=False),
        r"NaN/Inf logits"),
    "classifier_inf_logits": (lambda _: Simulator(**API_TINY).fit(
        Returns(lambda x: torch.full((x.shape[0],), float("inf"))), _blobs(), progress=False),
        r"NaN/Inf logits"),
    "classifier_constant_logits": (lambda _: Simulator(**API_TINY).fit(
        Returns(lambda x: torch.zeros(x.shape[0])), _blobs(), progress=False), r"constant"),
    "images_without_channel_axis": (lambda _: Simulator(**API_TINY).fit(
        BlobScorer(), _blobs()[:, 0], progress=False), r"\(N, 1, \*S\)"),
    "images_two_channels": (lambda _: Simulator(**API_TINY).fit(
        BlobScorer(), _blobs().repeat(1, 2, 1, 1), progress=False), r"\(N, 1, \*S\)"),
    "images_single": (lambda _: Simulator(**API_TINY).fit(
        BlobScorer(), _blobs()[:1], progress=False), r"at least 2"),
    "images_not_a_tensor": (lambda _: Simulator(**API_TINY).fit(
        BlobScorer(), 42, progress=False), r"int"),
    "images_with_nan": (lambda _: Simulator(**API_TINY).fit(
        BlobScorer(), _blobs().index_fill(0, torch.tensor([0]), float("nan")),
        progress=False), r"NaN/Inf"),
    "setting_unknown": (lambda _: Simulator(stepz=3), r"unknown simulator settings: stepz"),
    "setting_out_of_range": (lambda _: Simulator(batch_size=0), r"batch_size"),
    "explain_wrong_shape": (lambda sim: sim.explain(torch.zeros(1, 1, 16, 16)),
                            r"do not match the simulator's input"),
    "explain_unknown_direction": (lambda sim: sim.explain(_blobs(1), "sideways"),
                                  r"'sideways'"),
    "explain_before_fit": (lambda _: Simulator().explain(_blobs(1)), r"not fitted"),
    "explain_with_wrong_classifier": (lambda sim: _rebound(sim).explain(_blobs(2)),
                                      r"one logit per image"),
}


def _rebound(simulator: Simulator) -> Simulator:
    """The fitted simulator bound to a classifier with a wrong output shape."""
    simulator.classifier_ = Returns(lambda x: x.flatten(1)[:, :3])
    return simulator


@pytest.mark.parametrize("kind", list(API_CASES))
def test_api_bad_input(kind: str, fitted: Simulator) -> None:
    call, pattern = API_CASES[kind]
    classifier = fitted.classifier_
    try:
        with pytest.raises(CounterwarpError, match=pattern) as caught:
            call(fitted)
    finally:
        fitted.classifier_ = classifier
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kind", ["nan", "four_d", "truncated", "missing"])
def test_api_workflows_raise_counterwarp_error(kind: str, world: World, tmp_path: Path) -> None:
    """The run-folder workflows raise the same catchable error as the CLI prints."""
    from counterwarp.workflows.explain import explain_run
    from counterwarp.workflows.saliency import saliency_run

    bad = world.bad[kind]
    with pytest.raises(CounterwarpError, match=re.escape(bad.name)):
        explain_run(world.run, tmp_path / "e", images=[bad], progress=False)
    with pytest.raises(CounterwarpError, match=re.escape(bad.name)):
        saliency_run(world.run, tmp_path / "s", methods="gradient", images=[bad],
                     progress=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- must work


def test_quirky_manifest_works_everywhere(world: World, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """BOM, semicolons, CRLF, blank lines, extra columns, header case, padded and float
    labels, repeated subjects, empty subject cells and non-ASCII / spaced paths: all work."""
    folder = tmp_path / "données ü"
    images = folder / "IRM sujets"
    images.mkdir(parents=True)
    lines = ["\ufeffPath;LABEL;Subject;âge;site", ""]
    for index, (path, label) in enumerate(world.foreign):
        name = f"süjet {index:02d} é.nii.gz"
        shutil.copy(path, images / name)
        subject = "" if index % 5 == 0 else f"s-{index // 2}"  # pairs share a subject
        shown = {0: " 0 ", 1: "1.0"}[label] if index % 3 == 0 else str(label)
        lines += [f"IRM sujets/{name};{shown};{subject};{60 + index};site ä, b", ""]
    manifest = folder / "manifest ü.csv"
    manifest.write_bytes("\r\n".join(lines).encode("utf-8"))

    run = tmp_path / "run ü"
    assert main(["train-classifier", "--manifest", str(manifest), "--out", str(run),
                 "--epochs", "1", "--batch-size", "4"]) == 0
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    part_of: dict[str, set[str]] = {}
    for part in ("train", "val", "test"):
        for item in split[part]:
            part_of.setdefault(item["subject"], set()).add(part)
    assert all(len(parts) == 1 for parts in part_of.values())  # subjects are never split
    assert sum(len(split[p]) for p in ("train", "val", "test")) == len(world.foreign)

    fitted_run = tmp_path / "fitted"
    shutil.copytree(world.run, fitted_run)
    assert main(["fit", "--manifest", str(manifest), "--run", str(fitted_run), "--steps", "1",
                 "--batch-size", "2", "--checkpoint-every", "1"]) == 0
    explain_out, saliency_out = tmp_path / "explain ü", tmp_path / "saliency ü"
    assert main(["explain", "--run", str(world.run), "--manifest", str(manifest),
                 "--direction", "inject", "--out", str(explain_out)]) == 0
    assert main(["saliency", "--run", str(world.run), "--method", "gradient",
                 "--manifest", str(manifest), "--out", str(saliency_out)]) == 0
    with open(explain_out / "summary.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(world.foreign)
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", row["id"]) for row in rows)
    assert len(list(saliency_out.glob("*_gradient.nii.gz"))) == len(world.foreign)

    data = tmp_path / "kohorte ü"
    shutil.copytree(world.cohort, data)
    assert main(["benchmark", "--data", str(data), "--run", str(world.run),
                 "--methods", "gradient", "--out", str(tmp_path / "bench ü")]) == 0
    assert (tmp_path / "bench ü" / "results.json").is_file()
    capsys.readouterr()


# --------------------------------------------------------------------------- untrusted files


def _craft(path: Path, payload: dict, marker: Path) -> None:
    """Save ``payload`` with a code-running object inside and prove the object is live."""
    torch.save(payload, path)
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists(), "the crafted pickle should run code when loaded unsafely"
    marker.unlink()


@pytest.mark.parametrize("target", ["classifier", "simulator", "checkpoint"])
def test_crafted_pickle_is_refused_and_never_runs(target: str, world: World,
                                                  tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = Evil(marker)
    if target == "classifier":
        path = tmp_path / "classifier.pt"
        good = torch.load(world.run / "classifier.pt", weights_only=True)
        _craft(path, {**good, "config": evil}, marker)
        with pytest.raises(CounterwarpError, match="classifier.pt"):
            load_classifier(path)
    elif target == "simulator":
        path = tmp_path / "simulator.pt"
        good = torch.load(world.run / "simulator.pt", weights_only=True)
        _craft(path, {**good, "extra": evil}, marker)
        with pytest.raises(CounterwarpError, match="cannot be loaded safely"):
            Simulator.load(path, BlobScorer())
    else:
        path = tmp_path / CHECKPOINT_NAME
        good = torch.load(world.run / CHECKPOINT_NAME, weights_only=True)
        _craft(path, {**good, "random_state": evil}, marker)
        with pytest.raises(CounterwarpError, match="not a loadable"):
            load_checkpoint(path)
    assert not marker.exists()


CLASSIFIER_CONFIGS = {
    "channels_string": {"channels": "abc"},
    "channels_zero": {"channels": [4, 0]},
    "input_shape_one_axis": {"input_shape": [32]},
    "input_shape_float": {"input_shape": [32.5, 32]},
    "input_shape_huge_negative": {"input_shape": [-(10**9), 32]},
    "hidden_bool": {"hidden": True},
    "dropout_one": {"dropout": 1.0},
    "dropout_nan": {"dropout": float("nan")},
    "unknown_key": {"activation": "gelu"},
}
SIMULATOR_CONFIGS = {
    "fit_steps_string": ("fit_config", {"steps": "many"}),
    "fit_margin_sd_string": ("fit_config", {"margin_sd": "x"}),
    "fit_lr_negative": ("fit_config", {"lr": -1.0}),
    "fit_channels_string": ("fit_config", {"channels": "ab"}),
    "fit_unknown_key": ("fit_config", {"turbo": True}),
    "net_channels_negative": ("net_config", {"channels": [4, -8, 8]}),
    "net_latent_zero": ("net_config", {"latent_dim": 0}),
    "net_field_unknown": ("net_config", {"field": "spline"}),
    "net_shape_not_poolable": ("net_config", {"input_shape": [31, 31]}),
    "net_unknown_key": ("net_config", {"depth": 9}),
}


@pytest.mark.parametrize("kind", list(CLASSIFIER_CONFIGS))
def test_classifier_config_validated_before_building(
    kind: str, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "classifier.pt"
    shutil.copy(world.run / "classifier.pt", path)
    edit_checkpoint(path, lambda p: p["config"].update(CLASSIFIER_CONFIGS[kind]))

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built from an invalid config")

    monkeypatch.setattr(Classifier, "__init__", built)
    with pytest.raises(CounterwarpError, match="classifier"):
        load_classifier(path)
    with pytest.raises(AssertionError, match="was built"):  # the spy works on a good file
        load_classifier(world.run / "classifier.pt")


@pytest.mark.parametrize("kind", list(SIMULATOR_CONFIGS))
def test_simulator_config_validated_before_building(
    kind: str, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from counterwarp.nn.simulator import SimulatorNet

    key, change = SIMULATOR_CONFIGS[kind]
    path = tmp_path / "simulator.pt"
    shutil.copy(world.run / "simulator.pt", path)
    edit_checkpoint(path, lambda p: p[key].update(change))

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("a network was built from an invalid config")

    monkeypatch.setattr(SimulatorNet, "__init__", built)
    with pytest.raises(CounterwarpError, match=re.escape(str(path))):
        Simulator.load(path, BlobScorer())
    with pytest.raises(AssertionError, match="was built"):  # the spy works on a good file
        Simulator.load(world.run / "simulator.pt", BlobScorer())


HOSTILE_NAMES = [
    "../../evil.nii.gz",        # resolves outside the manifest's folder
    "..hidden.nii.gz",          # leading dots
    ".dotfile.nii.gz",
    "sub/../../up.nii.gz",
    "a b/c:d*?.nii.gz",
    "ü/ñame with spaces.nii.gz",
    "....nii.gz",               # a name that is all dots
]


@pytest.mark.parametrize("command", ["explain", "saliency"])
def test_manifest_paths_cannot_write_outside_out(command: str, world: World,
                                                 tmp_path: Path) -> None:
    """Ids are sanitised: every output lands directly in --out, with a plain visible name."""
    base = tmp_path / "a" / "b"
    base.mkdir(parents=True)
    rows = []
    for index, name in enumerate(HOSTILE_NAMES):
        target = (base / name).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(world.foreign[index][0], target)
        rows.append((name, str(index % 2)))
    manifest = write_manifest(base / "m.csv", rows)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    argv = (["explain", "--run", str(world.run), "--direction", "both"] if command == "explain"
            else ["saliency", "--run", str(world.run), "--method", "gradient"])
    assert main([*argv, "--manifest", str(manifest), "--out", str(out)]) == 0
    new = [Path(p) for p in set(snapshot(tmp_path)) - set(before)
           if Path(p).parent != out / ".counterwarp"]  # counterwarp's list of its files
    assert new and all(p.parent == out for p in new), [str(p) for p in new]
    names = [p.name for p in new]
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) for name in names), names
    table = out / ("summary.csv" if command == "explain" else "saliency_index.csv")
    with open(table, newline="", encoding="utf-8") as handle:
        ids = {row["id"] for row in csv.DictReader(handle)}
    assert len(ids) == len(HOSTILE_NAMES), ids


DAMAGED_CHECKPOINTS: dict[str, Callable[[dict], object]] = {
    "settings_wrong_type": lambda p: p["fit_config"].update(margin_sd="x"),
    "weights_missing": lambda p: p.pop("state_dict"),
    "weights_incomplete": lambda p: p["state_dict"].pop(next(iter(p["state_dict"]))),
    "step_not_a_number": lambda p: p.update(step="abc"),
    "step_beyond_the_end": lambda p: p.update(step=10**6),
    "optimizer_missing": lambda p: p.pop("optimizer"),
    "random_state_wrong": lambda p: p.update(random_state={"torch": torch.zeros(3),
                                                           "sampler": torch.zeros(3)}),
}


@pytest.mark.parametrize("kind", list(DAMAGED_CHECKPOINTS))
def test_resume_from_a_damaged_checkpoint_is_a_clear_error(kind: str, world: World,
                                                           tmp_path: Path) -> None:
    """The checkpoint's settings match the fit's, so resuming reaches its contents."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    edit_checkpoint(run / CHECKPOINT_NAME, DAMAGED_CHECKPOINTS[kind])
    with pytest.raises(CounterwarpError, match=CHECKPOINT_NAME):
        fit_run(world.manifest, run, resume=True, progress=False, **TINY_FIT)
