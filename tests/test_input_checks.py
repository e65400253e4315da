"""Inputs checked before any work: every bad input is refused up front, by name.

Each bad image, label, size or checkpoint config below is refused with one
:class:`CounterwarpError` line that names the file / row / argument and says what to do;
through the command line (``counterwarp.cli.main``) the exit status is 2 and nothing is
created, changed or removed (the same snapshot check as ``tests/test_reliability.py``).
Each case is one that used to be read as good, stretched, allocated or crashed on.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import toy_brain
from counterwarp import limits
from counterwarp.cli import main
from counterwarp.data.manifest import read_manifest
from counterwarp.data.preprocess import image_spatial_shape, load_volume
from counterwarp.errors import CounterwarpError
from counterwarp.nn import classifier as classifier_module
from counterwarp.nn import simulator as simulator_module
from counterwarp.nn.classifier import Classifier, load_classifier
from counterwarp.nn.simulator import SimulatorNet
from counterwarp.train.classifier import train_classifier
from counterwarp.workflows.fit import fit_run
from counterwarp.workflows.folder import rows_in_split
from test_reliability import edit_checkpoint, snapshot, visible_lines, write_manifest

SHAPE = (16, 16, 16)
TINY_FIT = {"steps": 2, "batch_size": 4, "channels": (4, 8, 8), "latent_dim": 16}
# labels of the cohort: 6 diseased (AD), 4 controls (CN), 2 MCI, used as healthy only when
# --negative-labels says so
LABELS = ["AD", "CN", "AD", "CN", "AD", "MCI", "AD", "CN", "AD", "MCI", "AD", "CN"]


# --------------------------------------------------------------------------- bad images


def _good_array(seed: int = 0) -> np.ndarray:
    return toy_brain(SHAPE, 0, np.random.default_rng(seed))


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _corrupt_gzip(path: Path) -> Path:
    """A real .nii.gz re-compressed with stored deflate blocks, one payload byte flipped in
    the voxel data: nibabel reads it without a word (one voxel wrong), only the gzip CRC
    at the end of the stream tells."""
    good = _nifti(path.with_name("source.nii.gz"), _good_array(1))
    raw = gzip.decompress(good.read_bytes())
    compressed = bytearray(gzip.compress(raw, compresslevel=0))
    compressed[len(compressed) - 8 - 2000] ^= 0xFF  # inside the voxels, before the trailer
    path.write_bytes(bytes(compressed))
    good.unlink()
    silently = nib.load(str(path)).get_fdata()  # the premise: nibabel alone does not notice
    assert int((silently != _good_array(1)).sum()) == 1
    return path


def _with_sform(path: Path, affine: np.ndarray) -> Path:
    """A 16^3 image whose header holds ``affine`` as its sform (nibabel refuses to write a
    NaN / zero affine itself, so the header fields are set directly)."""
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"] = 2, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    nib.save(nib.Nifti1Image(_good_array(2), None, header), str(path))
    return path


def _declares_huge(path: Path) -> Path:
    """A small .nii.gz whose header declares 2048^3 uint8 voxels (8 GiB) over 4 KiB of data."""
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), code=2)
    header["vox_offset"] = 352
    blob = header.binaryblock + b"\0" * 4 + bytes(range(256)) * 16
    path.write_bytes(gzip.compress(blob))
    return path


def _thin(path: Path) -> Path:
    return _nifti(path, _good_array(3)[:, 7:8, :])  # (16, 1, 16): one coronal voxel thick


def _complex(path: Path) -> Path:
    array = _good_array(4).astype(np.complex64)
    return _nifti(path, array + 1j * array)


def _rgb(path: Path) -> Path:
    array = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    array["R"] = np.clip(_good_array(5), 0, 255).astype(np.uint8)
    return _nifti(path, array)


def _symlink_loop(path: Path) -> Path:
    partner = path.with_name("loop-partner.nii.gz")
    partner.symlink_to(path.name)
    path.symlink_to(partner.name)
    return path


BAD_IMAGES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    # kind: (maker, words the message must hold besides the file's name)
    "gzip_crc": (_corrupt_gzip, ("gzip", "corrupt", "Re-copy")),
    "complex": (_complex, ("complex-valued", "magnitude")),
    "rgb": (_rgb, ("RGB/vector image", "grayscale")),
    "one_voxel_thick": (_thin, ("(16, 1, 16)", "axis 1 is one voxel thick", "(X, Y, 1)")),
    "affine_nan": (lambda p: _with_sform(p, np.full((4, 4), np.nan)), ("NaN or infinite",)),
    "affine_inf": (lambda p: _with_sform(p, np.diag([np.inf, 1.0, 1.0, 1.0])),
                   ("NaN or infinite",)),
    "affine_zero": (lambda p: _with_sform(p, np.zeros((4, 4))), ("singular",)),
    "declares_2048_cubed": (_declares_huge, ("2048 x 2048 x 2048", "GiB", "available")),
    "symlink_loop": (_symlink_loop, ("symbolic-link loop",)),
}


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """A 16^3 cohort labelled AD / CN / MCI, a run trained on it with ``--positive-label AD
    --negative-labels CN,MCI`` and fitted, and one file per bad-image kind."""

    root: Path
    manifest: Path
    run: Path
    images: list[Path]
    bad: dict[str, Path]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("input checks")
    rng = np.random.default_rng(0)
    images = []
    for index, label in enumerate(LABELS):
        path = root / "images" / f"sub-{index:02d}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        images.append(_nifti(path, toy_brain(SHAPE, int(label == "AD"), rng)))
    manifest = write_manifest(root / "manifest.csv",
                              [(str(p), label) for p, label in zip(images, LABELS, strict=True)])
    run = root / "run"
    train_classifier(manifest, run, epochs=1, batch_size=4, positive_label="AD",
                     negative_labels="CN,MCI", progress=False)
    fit_run(manifest, run, progress=False, **TINY_FIT)  # reads the run's label mapping back
    bad_folder = root / "bad"
    bad_folder.mkdir()
    bad = {kind: make(bad_folder / f"{kind}.nii.gz") for kind, (make, _) in BAD_IMAGES.items()}
    return World(root, manifest, run, images, bad)


@contextlib.contextmanager
def refused(world: World, scratch: Path, capsys: pytest.CaptureFixture,
            command: str, culprits: tuple[str, ...]) -> Iterator[list[str]]:
    """Run the ``argv`` appended to the yielded list; then check exit 2, one stderr line
    naming every culprit, and no file created, changed or removed."""
    argv: list[str] = []
    capsys.readouterr()
    before = snapshot(world.root, scratch)
    yield argv
    code = main(argv)
    err = capsys.readouterr().err
    lines = visible_lines(err)
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"counterwarp {command}: error: "), lines[0]
    for culprit in culprits:
        assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
    assert snapshot(world.root, scratch) == before
    assert not (scratch / "out").exists()


def _rows(world: World, extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [*((str(p), label) for p, label in zip(world.images, LABELS, strict=True)), *extra]


def _train_argv(manifest: Path, scratch: Path, *extra: str) -> list[str]:
    return ["train-classifier", "--manifest", str(manifest), "--out", str(scratch / "out"),
            "--epochs", "1", "--batch-size", "4", "--positive-label", "AD",
            "--negative-labels", "CN,MCI", *extra]


# --------------------------------------------------------------------------- image cases


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_bad_image_refused_by_both_readers(kind: str, world: World) -> None:
    """The cheap check every command runs first and the full reader refuse it alike."""
    path = world.bad[kind]
    words = BAD_IMAGES[kind][1]
    for reader in (image_spatial_shape, load_volume):
        with pytest.raises(CounterwarpError) as caught:
            reader(path)
        message = str(caught.value)
        assert path.name in message and "\n" not in message
        for word in words:
            assert word in message, (reader.__name__, message)


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_bad_image_in_manifest_refused_by_train_classifier(
    kind: str, world: World, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """One bad row among good ones: refused before the run folder exists."""
    bad = world.bad[kind]
    manifest = write_manifest(tmp_path / "m.csv", _rows(world, [(str(bad), "AD")]))
    culprits = (bad.name, *BAD_IMAGES[kind][1])
    if kind == "symlink_loop":
        culprits += (f"line {len(LABELS) + 2}",)
    with refused(world, tmp_path, capsys, "train-classifier", culprits) as argv:
        argv += _train_argv(manifest, tmp_path)


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_bad_image_refused_by_explain(
    kind: str, world: World, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Given as an argument to explain: refused before --out exists (a NaN / zero affine
    used to fail at save time and leave an empty --out)."""
    bad = world.bad[kind]
    with refused(world, tmp_path, capsys, "explain", (bad.name, *BAD_IMAGES[kind][1])) as argv:
        argv += ["explain", "--run", str(world.run), str(world.images[0]), str(bad),
                 "--direction", "inject", "--out", str(tmp_path / "out")]


def test_true_2d_images_stay_allowed(tmp_path: Path) -> None:
    """Only a one-voxel axis among the spatial ones is refused: (X, Y) and (X, Y, 1) are 2D."""
    slice_ = _good_array(6)[:, :, 8]
    assert load_volume(_nifti(tmp_path / "flat.nii.gz", slice_)).shape == (16, 16)
    assert load_volume(_nifti(tmp_path / "s.nii.gz", slice_[:, :, None])).shape == (16, 16)
    with pytest.raises(CounterwarpError, match=r"line\.nii\.gz.*axis 0 is one voxel thick"):
        load_volume(_nifti(tmp_path / "line.nii.gz", slice_[:1, :]))


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    "labels, words",
    [
        # MCI used to become healthy without a word
        (["AD", "CN", "MCI"], ("'MCI' (lines 4, 7)", "neither the positive label 'AD'",
                              "--negative-labels")),
        # 'ad' is not 'AD': refused, with a hint at the case
        (["AD", "ad", "CN"], ("'ad' (lines 3, 6)", "compared exactly", "--negative-labels")),
    ],
    ids=["unknown_value_MCI", "case_variant_ad"],
)
def test_label_neither_positive_nor_known_healthy_refused(
    labels: list[str], words: tuple[str, ...], world: World, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    rows = [(str(p), labels[i % 3]) for i, p in enumerate(world.images[:6])]
    manifest = write_manifest(tmp_path / "labels.csv", rows)
    with refused(world, tmp_path, capsys, "train-classifier", ("labels.csv", *words)) as argv:
        argv += _train_argv(manifest, tmp_path)[:-2]  # without --negative-labels


def test_negative_labels_say_which_values_are_healthy(world: World) -> None:
    rows = read_manifest(world.manifest, positive_label="AD", negative_labels="CN,MCI")
    assert [row.label for row in rows] == [int(label == "AD") for label in LABELS]
    assert read_manifest(world.manifest, "AD", ["MCI", "CN"])[5].label == 0
    with pytest.raises(CounterwarpError, match=r"'MCI' \(lines 7, 11\).*--negative-labels"):
        read_manifest(world.manifest, positive_label="AD")
    with pytest.raises(CounterwarpError, match=r"'CN' \(lines 3, 5, 9, 13\)"):
        read_manifest(world.manifest, positive_label="AD", negative_labels="MCI")
    with pytest.raises(CounterwarpError, match="--negative-labels names the positive label"):
        read_manifest(world.manifest, positive_label="AD", negative_labels="CN,MCI,AD")
    with pytest.raises(CounterwarpError, match="--negative-labels needs --positive-label"):
        read_manifest(world.manifest, negative_labels="CN")


def test_run_keeps_its_label_mapping(world: World, tmp_path: Path) -> None:
    """Later commands read the manifest with the run's positive AND negative labels (the
    fixture's fit already did); a run without them refuses the MCI rows."""
    assert json.loads((world.run / "split.json").read_text())["negative_labels"] == "CN,MCI"
    rows = rows_in_split(world.run, world.manifest, "all", positive_label="AD")
    assert {row.label for row in rows if row.line - 2 in (5, 9)} == {0}
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    split = json.loads((run / "split.json").read_text())
    del split["negative_labels"]
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(CounterwarpError, match="'MCI'"):
        rows_in_split(run, world.manifest, "all", positive_label="AD")


# --------------------------------------------------------------------------- sizes


def test_shape_beyond_the_voxel_cap_refused(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    culprits = ("--shape 1000 1000 1000", "1,000,000,000 voxels", "GiB", "available")
    with refused(world, tmp_path, capsys, "train-classifier", culprits) as argv:
        argv += _train_argv(world.manifest, tmp_path, "--shape", "1000", "1000", "1000")
    with refused(world, tmp_path, capsys, "synth", culprits) as argv:
        argv += ["synth", "--out", str(tmp_path / "out"), "--n", "4", "--shape", "1000",
                 "1000", "1000"]


def test_shape_beyond_available_memory_refused(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below the cap but more than the memory there is: the cache of 12 images of 128^3
    (96 MiB) on a machine with 64 MiB free."""
    monkeypatch.setattr(limits, "available_memory", lambda: 64 * 2**20)
    culprits = ("caching 12 images of 128 x 128 x 128", "0.0938 GiB", "0.0625 GiB of memory "
                "available", "smaller --shape")
    with refused(world, tmp_path, capsys, "train-classifier", culprits) as argv:
        argv += _train_argv(world.manifest, tmp_path, "--shape", "128", "128", "128")


def test_voxel_cap_is_configurable(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COUNTERWARP_MAX_VOXELS", "4000")
    with pytest.raises(CounterwarpError, match=r"sub-00\.nii\.gz.*4,096 voxels.*limit of 4,000"):
        image_spatial_shape(world.images[0])
    monkeypatch.setenv("COUNTERWARP_MAX_VOXELS", "4096")
    assert image_spatial_shape(world.images[0]) == SHAPE


def test_available_memory_read_from_meminfo_with_fallbacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  100 kB\nMemAvailable:   2048 kB\n")
    assert limits._meminfo_available(meminfo) == 2048 * 1024
    assert limits._meminfo_available(tmp_path / "absent") is None
    monkeypatch.setattr(limits, "_meminfo_available", lambda: None)
    monkeypatch.setattr(limits, "_cgroup_available", lambda: None)
    monkeypatch.setattr(limits, "_sysconf_available", lambda: None)
    assert limits.available_memory() is None
    assert "available memory unknown" in limits.describe_available()
    limits.check_grid((64, 64, 64), "fine")  # only the cap applies then
    monkeypatch.setattr(limits, "_sysconf_available", lambda: 5 * 2**30)
    monkeypatch.setattr(limits, "_cgroup_available", lambda: 2**30)
    assert limits.available_memory() == 2**30  # the tighter of system and cgroup


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def no_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building any conv layer fails the test: validation must come before allocation."""

    def allocated(*args: object, **kwargs: object) -> None:
        raise AssertionError("a layer was built before the config was validated")

    monkeypatch.setattr(classifier_module.nn, "Conv3d", allocated)
    monkeypatch.setattr(simulator_module, "CondConv", allocated)


HUGE_CONFIGS = {
    # kind: (config change, words)
    "input_4096_cubed": ({"input_shape": [4096, 4096, 4096]},
                         ("input_shape [4096, 4096, 4096]", "68,719,476,736 voxels", "GiB")),
    "hidden_2_to_the_40": ({"hidden": 2**40}, ("hidden 1099511627776", "weights", "GiB")),
}


@pytest.mark.parametrize("kind", list(HUGE_CONFIGS))
def test_classifier_config_too_large_refused_before_allocation(
    kind: str, no_layers: None
) -> None:
    change, words = HUGE_CONFIGS[kind]
    with pytest.raises(CounterwarpError) as caught:
        Classifier.from_config({"input_shape": list(SHAPE), **change})
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_simulator_config_too_large_refused_before_allocation(no_layers: None) -> None:
    with pytest.raises(CounterwarpError, match=r"input_shape \[4096, 4096, 4096\].*GiB"):
        SimulatorNet.from_config({"input_shape": [4096, 4096, 4096]})
    with pytest.raises(CounterwarpError, match=r"latent_dim 1073741824.*weights.*GiB"):
        SimulatorNet.from_config({"input_shape": [64, 64, 64], "latent_dim": 2**30})


@pytest.mark.parametrize("file, key", [("classifier.pt", "config"),
                                       ("simulator.pt", "net_config")])
def test_checkpoint_asking_for_4096_cubed_refused_by_explain(
    file: str, key: str, world: World, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    edit_checkpoint(run / file, lambda p: p[key].update(input_shape=[4096, 4096, 4096]))
    assert torch.load(run / file, weights_only=True)[key]["input_shape"] == [4096] * 3
    with refused(world, tmp_path, capsys, "explain",
                 (file, "input_shape [4096, 4096, 4096]", "GiB", "available")) as argv:
        argv += ["explain", "--run", str(run), str(world.images[0]), "--direction", "inject",
                 "--out", str(tmp_path / "out")]
    if file == "classifier.pt":  # the API names the file too
        with pytest.raises(CounterwarpError, match=r"classifier\.pt: classifier input_shape"):
            load_classifier(run / file)
