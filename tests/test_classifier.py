"""The paper's CNN classifier, its checkpoints, the metrics and the training loop."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from counterwarp.errors import CounterwarpError
from counterwarp.nn.classifier import (
    Classifier,
    last_conv_layer,
    load_classifier,
    save_classifier,
)
from counterwarp.train.augment import augment_batch
from counterwarp.train.classifier import predict_logits, train_classifier
from counterwarp.train.common import auc, balanced_accuracy, binary_metrics, seed_everything

# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "shape, pools",
    [((32, 32), 4), ((16, 16, 16), 4), ((15, 17, 9), 3), ((6, 6, 6), 2), ((1, 8), 0)],
)
def test_outputs_one_logit_per_image(shape: tuple[int, ...], pools: int) -> None:
    torch.manual_seed(0)
    model = Classifier(shape)
    assert model.num_pools == pools
    assert model.dim == len(shape)
    logits = model(torch.randn(3, 1, *shape))
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()


def test_paper_architecture_and_last_conv() -> None:
    model = Classifier((32, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 16]
    assert model.feature_shape == (16, 2, 2, 2)
    assert last_conv_layer(model) is convs[-1]
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_gradients_reach_the_input_in_eval_mode() -> None:
    model = Classifier((16, 16)).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    images = torch.randn(2, 1, 16, 16, requires_grad=True)
    model(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_wrong_input_shape_is_explained() -> None:
    with pytest.raises(ValueError, match=r"expects \(B, 1, 16, 16\)"):
        Classifier((16, 16))(torch.randn(2, 1, 16, 15))


def test_config_round_trip() -> None:
    model = Classifier((12, 20), channels=(4, 8), hidden=10, dropout=0.1)
    config = json.loads(json.dumps(model.config))
    rebuilt = Classifier.from_config(config)
    assert rebuilt.config == model.config
    assert Classifier.from_config({"input_shape": [8, 8, 8]}).channels == (16, 32, 64, 16)


@pytest.mark.parametrize(
    "config, word",
    [
        ([16, 16], "must be a dict"),
        ({"channels": [4]}, "lacks 'input_shape'"),
        ({"input_shape": [16, 16], "depth": 3}, "unknown keys"),
        ({"input_shape": [16, 16, 16, 16]}, "input_shape"),
        ({"input_shape": [16, 0]}, "input_shape"),
        ({"input_shape": [16.0, 16.0]}, "input_shape"),
        ({"input_shape": "16x16"}, "input_shape"),
        ({"input_shape": [16, 16], "channels": []}, "channels"),
        ({"input_shape": [16, 16], "channels": [4, -1]}, "channels"),
        ({"input_shape": [16, 16], "hidden": True}, "hidden"),
        ({"input_shape": [16, 16], "hidden": 0}, "hidden"),
        ({"input_shape": [16, 16], "dropout": 1.0}, "dropout"),
        ({"input_shape": [16, 16], "dropout": "0.2"}, "dropout"),
    ],
)
def test_from_config_rejects_bad_config(config: object, word: str) -> None:
    with pytest.raises(CounterwarpError, match=word):
        Classifier.from_config(config)


# ---------------------------------------------------------------- checkpoints


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Classifier((16, 16, 16))
    model.train()
    model(torch.randn(4, 1, 16, 16, 16))  # move the BatchNorm running statistics
    model.eval()
    images = torch.randn(3, 1, 16, 16, 16)
    expected = model(images)
    path = save_classifier(tmp_path / "run" / "classifier.pt", model, {"positive_label": "AD"})
    loaded, info = load_classifier(path)
    assert not loaded.training
    assert "state_dict" not in info
    assert info["format"] == "counterwarp.classifier" and info["version"] == 1
    assert info["positive_label"] == "AD" and info["config"] == model.config
    torch.testing.assert_close(loaded(images), expected)
    raw = torch.load(path, weights_only=True)  # the file needs no pickled objects
    assert set(raw) >= {"format", "version", "config", "state_dict"}
    assert load_classifier(tmp_path / "run")[1]["config"] == model.config  # folder accepted


def test_save_rejects_non_json_extra(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        save_classifier(tmp_path / "c.pt", Classifier((8, 8)), {"x": object()})
    with pytest.raises(ValueError, match="reserved"):
        save_classifier(tmp_path / "c.pt", Classifier((8, 8)), {"config": {}})


class _NotAllowed:
    pass


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(CounterwarpError, match="checkpoint not found"):
        load_classifier(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CounterwarpError, match=r"corrupt\.pt: cannot read"):
        load_classifier(corrupt)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "counterwarp.classifier", "thing": _NotAllowed()}, pickled)
    with pytest.raises(
        CounterwarpError, match=r"pickled\.pt: cannot read it safely: .*plain weights"
    ):
        load_classifier(pickled)
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(CounterwarpError, match="not a counterwarp classifier checkpoint"):
        load_classifier(other)
    future = tmp_path / "future.pt"
    save_classifier(future, Classifier((8, 8)))
    payload = torch.load(future, weights_only=True)
    torch.save({**payload, "version": 99}, future)
    with pytest.raises(CounterwarpError, match="version 99"):
        load_classifier(future)
    mismatched = tmp_path / "mismatched.pt"
    torch.save({**payload, "version": 1, "config": Classifier((8, 8), hidden=5).config}, mismatched)
    with pytest.raises(CounterwarpError, match="do not match"):
        load_classifier(mismatched)


# ---------------------------------------------------------------- metrics


def test_auc_with_ties_and_missing_class() -> None:
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert auc([0.0, 1.0, 1.0], [0, 0, 1]) == pytest.approx(0.75)
    assert auc(torch.tensor([3.0, 1.0]), torch.tensor([0, 1])) == 0.0
    assert np.isnan(auc([0.1, 0.2], [1, 1]))


def test_balanced_accuracy_and_metrics() -> None:
    assert balanced_accuracy([1, 1, 1, 1], [1, 1, 1, 0]) == pytest.approx(0.5)
    assert balanced_accuracy([1, 0, 0, 0], [1, 1, 0, 0]) == pytest.approx(0.75)
    metrics = binary_metrics(np.array([-2.0, 1.0, 3.0, -1.0]), np.array([0, 1, 1, 1]))
    assert metrics["n"] == 4 and metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert metrics["auc"] == pytest.approx(1.0)  # every positive logit above the negative
    assert binary_metrics([0.5], [1])["auc"] is None
    json.dumps(metrics)


# ---------------------------------------------------------------- training


def test_augmentation_keeps_orientation_and_shape() -> None:
    generator = seed_everything(0)
    images = torch.zeros(4, 1, 12, 12)
    images[:, :, 3:9, 2:5] = 1.0  # a block on the left only
    same = augment_batch(images, generator, max_shift=0, intensity_range=0.0, noise_std=0.0)
    torch.testing.assert_close(same, images)
    moved = augment_batch(images, generator, max_shift=2, intensity_range=0.1, noise_std=0.05)
    assert moved.shape == images.shape
    left, right = moved[..., :6].abs().sum(), moved[..., 6:].abs().sum()
    assert left > 5 * right  # never flipped
    for index in range(4):  # shifted by at most 2 voxels: the block stays whole
        assert int((moved[index] != 0).sum()) == 18
        assert 0.85 * 18 < float(moved[index].sum()) < 1.15 * 18


@pytest.mark.parametrize("shape", [(16, 16), (12, 12, 12)])
def test_deformation_augmentation_is_a_smooth_random_warp(shape: tuple[int, ...]) -> None:
    generator = seed_everything(0)
    images = torch.zeros(3, 1, *shape)
    images[(slice(None), slice(None), *(slice(n // 4, 3 * n // 4) for n in shape))] = 1.0
    plain = dict(max_shift=0, intensity_range=0.0, noise_std=0.0)
    warped = augment_batch(images, generator, deform_std=1.0, **plain)
    again = augment_batch(images, seed_everything(0), deform_std=1.0, **plain)
    torch.testing.assert_close(warped, again)  # reproducible from the generator
    assert not torch.allclose(warped, images)  # the block's edges moved
    assert not torch.allclose(warped[0], warped[1])  # one field per image
    # a warp moves intensity, it does not create any: values stay within [0, 1], the
    # block keeps roughly its volume and the far background stays 0
    assert float(warped.min()) >= 0.0 and float(warped.max()) <= 1.0 + 1e-6
    ratio = warped.sum(dim=tuple(range(1, warped.ndim))) / images[0].sum()
    assert torch.all((ratio > 0.6) & (ratio < 1.4))
    torch.testing.assert_close(
        augment_batch(images, generator, deform_std=0.0, **plain), images
    )


def test_train_classifier_learns_and_writes_run(
    toy_cohort: Callable[..., Path], tmp_path: Path
) -> None:
    manifest = toy_cohort(n=64, shape=(32, 32), seed=1, effect=1.5, images_per_subject=2)
    run = tmp_path / "run"
    metrics = train_classifier(manifest, run, epochs=12, batch_size=8, seed=0, progress=False)
    assert metrics["test"]["balanced_accuracy"] >= 0.8
    assert metrics["val"]["n"] > 0 and metrics["test"]["n"] > 0
    assert metrics["train_logit_std"] > 0
    assert 1 <= metrics["best_epoch"] <= 12

    split = json.loads((run / "split.json").read_text())
    # stored relative to the run folder, so the project can be moved as a whole
    assert (run / split["manifest"]).resolve() == manifest.resolve()
    subjects = {
        part: {item["subject"] for item in split[part]} for part in ("train", "val", "test")
    }
    assert not subjects["train"] & subjects["val"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]
    assert sum(len(split[p]) for p in ("train", "val", "test")) == 64
    assert not any(Path(item["path"]).is_absolute() for item in split["test"])
    assert all((run / item["path"]).is_file() for item in split["test"])

    on_disk = json.loads((run / "classifier_metrics.json").read_text())
    assert on_disk["test"] == metrics["test"]
    with open(run / "classifier_log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    assert len(log) == 12 and {"epoch", "train_loss", "val_auc"} <= set(log[0])

    model, info = load_classifier(run / "classifier.pt")
    assert info["input_shape"] == [32, 32] and info["positive_label"] is None
    assert info["train_logit_std"] == pytest.approx(metrics["train_logit_std"])
    from counterwarp.data.manifest import ManifestDataset, read_manifest

    rows = read_manifest(manifest)
    paths = [str(r.path) for r in rows]
    test_rows = [rows[paths.index(str((run / item["path"]).resolve()))] for item in split["test"]]
    logits = predict_logits(model, ManifestDataset(test_rows), batch_size=5)
    assert logits.shape == (len(test_rows),)
    np.testing.assert_allclose(logits.mean(), metrics["test"]["logit_mean"], rtol=1e-4, atol=1e-5)


def test_train_classifier_3d_smoke_with_resampling(
    toy_cohort: Callable[..., Path], tmp_path: Path
) -> None:
    manifest = toy_cohort(n=20, shape=(12, 14, 12), seed=2)
    metrics = train_classifier(
        manifest,
        tmp_path / "run3d",
        epochs=2,
        batch_size=4,
        shape=(16, 16, 16),
        progress=False,
        select_by="val_auc",
    )
    assert metrics["training"]["select_by"] == "val_auc"
    assert metrics["input_shape"] == [16, 16, 16]
    assert (tmp_path / "run3d" / "classifier.pt").is_file()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1}, "batch size"),
        ({"lr": -1.0}, "learning rate"),
        ({"fractions": (0.8, 0.2, 0.0)}, "fractions"),
        ({"augmentation": {"max_shift": -1}}, "max_shift"),
        ({"augmentation": {"flip": 1}}, "unknown augmentation"),
        ({"augmentation": {"noise_std": 2.0}}, "noise_std"),
        ({"augmentation": {"deform_std": -0.5}}, "deform_std"),
        ({"select_by": "val_accuracy"}, "select_by"),
    ],
)
def test_train_classifier_rejects_bad_arguments(tmp_path: Path, kwargs: dict, word: str) -> None:
    with pytest.raises(CounterwarpError, match=word):
        train_classifier(tmp_path / "m.csv", tmp_path / "run", progress=False, **kwargs)


def test_configure_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from counterwarp.train.common import available_cpus, configure_torch_threads

    before = torch.get_num_threads()
    try:
        assert configure_torch_threads(1) == 1 and torch.get_num_threads() == 1
        assert configure_torch_threads(10_000) == available_cpus()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_torch_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert 1 <= configure_torch_threads() <= available_cpus()
    finally:
        torch.set_num_threads(before)
