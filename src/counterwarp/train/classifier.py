"""Train the paper's CNN classifier on a manifest and write it into a run folder.

Files written to the run folder ``out``:

- ``split.json``: the subject-level stratified train / val / test split,
- ``classifier.pt``: checkpoint (see :func:`counterwarp.nn.classifier.save_classifier`) with
  ``input_shape``, ``preprocessing``, ``positive_label``, training settings and the training
  logit spread,
- ``classifier_metrics.json``: accuracy, balanced accuracy, AUC, n and logit statistics on
  train / val / test for the kept weights (see ``select_by``),
- ``classifier_log.csv``: one line per epoch.

They are staged in ``out/.classifier-staging`` and swapped in together at the end
(:mod:`counterwarp.train.staging`): a failed or killed training leaves ``out`` as it was.
``classifier.pt`` records ``split_sha256``; a trained ``out`` is retrained only with
``overwrite=True``, after which its old ``simulator.pt`` is refused until ``fit`` reruns.

Training: Adam (weight decay 1e-4, cosine learning-rate decay to 5% of ``lr``),
BCE-with-logits (positive class weighted by the class ratio), BatchNorm statistics
recomputed over the unaugmented training part before each validation. By default the
weights kept are those of the last epoch (``select_by="last"``); the cosine schedule has
converged by then, and the validation metrics stay an unbiased held-out estimate.

Why not the best validation epoch: with about 30 validation subjects both the AUC and the
loss are noisy, and they tend to pick an early epoch (8-12 of 30) whose decision threshold
is still moving. On the default synthetic cohort (n=200, 32^3, seeds 0-3, same splits) the
held-out balanced accuracy averaged 0.89 selecting by validation AUC (ties by loss), 0.92
by validation loss, 0.93 with the last epoch. ``select_by="val_auc"`` and ``"val_loss"``
remain available.

Augmentation never flips (disease effects may be left/right specific): per image a random
intensity scale in ``[0.9, 1.1]`` and Gaussian noise (sd 0.05 in z-score units) on the
non-zero voxels. Integer translations (``max_shift`` voxels per axis, zero filled) are
available but off by default: on the default synthetic cohort (32^3, 5.9 mm voxels) a
one-voxel shift is about as large as the disease effect, learning started about ten epochs
later, and held-out balanced accuracy was 0.83-0.90 with shifts vs 0.90-0.93 without
(seed 0, several runs).

Under ``torchrun`` (see :mod:`counterwarp.distributed`) ``batch_size`` is the global batch:
every rank iterates over the same shuffled, augmented global batches and trains on its
contiguous slice; gradients are averaged, BatchNorm uses global statistics (the
recalibration runs on every rank over the whole training part, unsynchronised). Validation
runs on every rank, and only rank 0 writes files. Dropout masks are drawn from a per-rank
random stream, so with dropout an N-process run matches a 1-process one in distribution,
not number for number.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset, Subset

from counterwarp import __version__, distributed, global_batchnorm
from counterwarp._io import folder_lock, write_json_atomic, write_text_atomic
from counterwarp._io.provenance import (
    PROVENANCE_NAME,
    merged_record,
    relative_to,
    staged_digests,
)
from counterwarp.data.manifest import (
    SPLIT_PARTS,
    ManifestDataset,
    read_manifest,
    resolve_manifest_path,
)
from counterwarp.data.preprocess import PREPROCESSING_INFO
from counterwarp.data.split import split_by_subject, split_on_disk, split_record
from counterwarp.errors import CounterwarpError
from counterwarp.nn.classifier import CLASSIFIER_NAME, Classifier, save_classifier
from counterwarp.train.augment import augment_batch, augmentation_settings
from counterwarp.train.common import (
    auc,
    binary_metrics,
    choose_device,
    configure_torch_threads,
    seed_everything,
)
from counterwarp.train.guards import (
    check_arguments,
    check_not_trained,
    check_split,
    check_training_loss,
)
from counterwarp.train.staging import CLASSIFIER_STAGING, Staging, disk_errors, file_digest

WEIGHT_DECAY = 1e-4
"""Adam weight decay (L2) of the classifier's parameters."""
FINAL_LR_FRACTION = 0.05
"""The learning rate decays along a cosine from ``lr`` to ``FINAL_LR_FRACTION * lr``."""
RECALIBRATE_BATCHNORM = True
"""Before each validation, recompute the BatchNorm running statistics exactly over the
(unaugmented) training part, so the decision threshold does not drift with the last batches."""

#: Files the classifier's training writes into its run folder (and ``CLASSIFIER_NAME``).
SPLIT_NAME = "split.json"
CLASSIFIER_LOG_NAME = "classifier_log.csv"
CLASSIFIER_METRICS_NAME = "classifier_metrics.json"

LOG_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_auc",
    "val_balanced_accuracy",
    "best",
    "lr",
    "seconds",
)


def _batches(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, batch_size: int = 32) -> np.ndarray:
    """Logits of ``model`` (in eval mode) for every item of ``dataset``, in order.

    Args:
        model: returns ``(B,)`` logits for ``(B, 1, *spatial)`` images; its training mode is
            restored afterwards.
        dataset: items are ``(image, label)`` or ``image``, image ``(1, *spatial)``.
        batch_size: images per forward pass.

    Returns:
        ``(N,)`` float32 logits.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[np.ndarray] = []
    try:
        for batch in _batches(dataset, batch_size):
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            logits = model(images.to(device)).reshape(-1)
            outputs.append(logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not outputs:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)


SELECTION_RULES: dict[str, str] = {
    "val_loss": "lowest validation loss",
    "val_auc": "highest validation AUC, ties by lower validation loss",
    "last": "the last epoch",
}
"""How the kept epoch is chosen (``select_by`` of :func:`train_classifier`)."""


def _is_better(rule: str, candidate: tuple[float, float], best: tuple[float, float] | None) -> bool:
    """Whether ``candidate`` (val AUC, val loss) beats ``best`` under ``rule``."""
    if best is None or rule == "last":
        return True
    cand_auc, cand_loss = candidate
    best_auc, best_loss = best
    if (
        rule == "val_auc"
        and math.isfinite(cand_auc)
        and math.isfinite(best_auc)
        and cand_auc != best_auc
    ):
        return cand_auc > best_auc
    return cand_loss < best_loss


def _log_text(records: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


@distributed.in_process_group
def train_classifier(
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    shape: tuple[int, ...] | None = None,
    positive_label: str | None = None,
    negative_labels: str | Sequence[str] | None = None,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    progress: bool = True,
    device: str | torch.device | None = None,
    augmentation: dict[str, float] | None = None,
    select_by: str = "last",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train the paper's CNN on a manifest; keep the weights chosen by ``select_by``.

    Args:
        manifest: CSV with ``path,label`` (+ ``subject``) columns.
        out: run folder (created); receives ``split.json``, ``classifier.pt``,
            ``classifier_metrics.json`` and ``classifier_log.csv``.
        epochs: passes over the training part.
        batch_size: images per step (>= 2); under torchrun the global batch, divisible
            by the number of processes.
        lr: Adam learning rate.
        seed: seeds the split, the initialisation, the data order and the augmentation.
        shape: model grid ``(H, W)`` / ``(D, H, W)`` in voxels; None keeps the images' own
            (common) shape.
        positive_label: label value meaning diseased when labels are not 0/1.
        negative_labels: the values meaning healthy beside ``positive_label`` ("CN,HC" or a
            list; see :func:`~counterwarp.data.manifest.read_manifest`); kept in split.json.
        fractions: (train, val, test) fractions of subjects, all positive.
        progress: show progress bars (stderr).
        device: "cpu", "cuda", ...; None picks CUDA when available.
        augmentation: overrides of :data:`AUGMENTATION` (keys ``max_shift``,
            ``intensity_range``, ``noise_std``); ``{"intensity_range": 0, "noise_std": 0}``
            turns augmentation off.
        select_by: which epoch's weights to keep: "last" (default), "val_loss" (lowest
            validation loss) or "val_auc" (highest validation AUC, ties by lower loss).
        overwrite: retrain into an ``out`` that already holds a classifier (refused
            otherwise); the new files replace the old ones only once all are written.

    Raises:
        CounterwarpError: bad arguments or data, ``out`` already trained (without
            ``overwrite``), a training loss that became NaN/Inf or exploded (above
            :data:`EXPLODING_LOSS`), a full disk; ``out`` is then unchanged.

    Returns:
        the content of ``classifier_metrics.json``: ``{"test": {...}, "val": {...},
        "train": {...}, "best_epoch": int, "train_logit_mean": float, "train_logit_std":
        float, ...}``; each part has ``accuracy``, ``balanced_accuracy``, ``auc``, ``n``,
        ``logit_mean``, ``logit_std``.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    fractions = check_arguments(epochs, batch_size, lr, fractions)
    augment_settings = augmentation_settings(augmentation)
    if select_by not in SELECTION_RULES:
        raise CounterwarpError(f"select_by {select_by!r} is not one of {sorted(SELECTION_RULES)}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"--out {out} exists and is not a folder")
    check_not_trained(out, overwrite)
    threads = configure_torch_threads()
    generator = seed_everything(seed)
    group = distributed.current()
    group.check_batch_size(batch_size, "batch size")
    progress = progress and group.is_main
    chosen_device = choose_device(distributed.local_device(device))

    rows = read_manifest(manifest, positive_label, negative_labels)
    manifest_path = resolve_manifest_path(manifest)
    split = split_by_subject(rows, fractions, seed)
    check_split(rows, split, manifest_path)
    if len(split["train"]) <= batch_size:  # one batch of the whole part: it must split too
        group.check_batch_size(len(split["train"]), "the training part's size")

    dataset = ManifestDataset(rows, shape=shape, cache=True)
    dataset.preload(progress=progress)
    lock = folder_lock(out, "a classifier") if group.is_main else contextlib.nullcontext()
    staging = Staging(out, CLASSIFIER_STAGING)
    note = f"the run folder {out} is unchanged"
    with lock, staging.discarded_on_failure(group.is_main):
        if group.is_main:
            check_not_trained(out, overwrite)  # again, under the lock
            staging.start()  # first finishes a swap a killed command left half done
        record = split_record(rows, split, manifest_path, seed, fractions, positive_label,
                              negative_labels)
        if group.is_main:
            with disk_errors(out / SPLIT_NAME, note):
                write_json_atomic(staging / SPLIT_NAME, split_on_disk(record, out))
        parts = {name: Subset(dataset, split[name]) for name in SPLIT_PARTS}
        labels = {name: dataset.labels[split[name]] for name in SPLIT_PARTS}

        model = Classifier(dataset.spatial_shape).to(chosen_device)
        if group.distributed:
            model = global_batchnorm.convert_batchnorm(model)
            group.broadcast_module(model)
            group.seed_per_rank(seed)  # own dropout masks per rank
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=epochs, eta_min=FINAL_LR_FRACTION * lr
        )
        n_positive = int(labels["train"].sum())
        pos_weight = torch.tensor((len(labels["train"]) - n_positive) / n_positive)
        criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight.to(chosen_device))
        val_labels = torch.from_numpy(labels["val"]).float()
        train_loader = DataLoader(
            parts["train"],
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            num_workers=0,
            drop_last=len(parts["train"]) > batch_size,
        )

        best_key: tuple[float, float] | None = None
        best_state: dict[str, torch.Tensor] = {}
        best_epoch = 0
        log_records: list[dict[str, Any]] = []
        bar = tqdm(range(1, epochs + 1), desc="training classifier", disable=not progress)
        for epoch in bar:
            epoch_started = time.perf_counter()
            model.train()
            loss_sum, seen = 0.0, 0
            for images, targets in train_loader:
                images = augment_batch(images.to(chosen_device), generator, **augment_settings)
                targets = targets.to(chosen_device)
                images, targets = group.local_slice(images), group.local_slice(targets)
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(images), targets)
                loss.backward()
                group.average_gradients(model.parameters())
                optimizer.step()
                loss_sum += float(loss.detach()) * len(targets)
                seen += len(targets)
            loss_sum, seen = group.sum_values(loss_sum, seen)
            train_loss = loss_sum / max(seen, 1)
            check_training_loss(train_loss, epoch, lr, out)
            epoch_lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if RECALIBRATE_BATCHNORM:
                with global_batchnorm.local_batchnorm(model):  # every rank sees the whole part
                    update_bn(_batches(parts["train"], 2 * batch_size), model, chosen_device)
            val_logits = torch.from_numpy(predict_logits(model, parts["val"], 2 * batch_size))
            val_loss = float(criterion(val_logits.to(chosen_device), val_labels.to(chosen_device)))
            val_auc = auc(val_logits, val_labels)
            val_metrics = binary_metrics(val_logits, val_labels)
            improved = _is_better(select_by, (val_auc, val_loss), best_key)
            if improved:
                best_key, best_epoch = (val_auc, val_loss), epoch
                best_state = copy.deepcopy(model.state_dict())
            log_records.append(
                {
                    "epoch": epoch,
                    "train_loss": f"{train_loss:.6f}",
                    "val_loss": f"{val_loss:.6f}",
                    "val_auc": "" if not math.isfinite(val_auc) else f"{val_auc:.6f}",
                    "val_balanced_accuracy": val_metrics["balanced_accuracy"],
                    "best": int(improved),
                    "lr": f"{epoch_lr:.3g}",
                    "seconds": f"{time.perf_counter() - epoch_started:.3f}",
                }
            )
            if group.is_main:
                with disk_errors(out / CLASSIFIER_LOG_NAME, note):
                    write_text_atomic(staging / CLASSIFIER_LOG_NAME, _log_text(log_records))
            bar.set_postfix(loss=f"{train_loss:.3f}", val_auc=f"{val_auc:.3f}")
        bar.close()

        model.load_state_dict(best_state)
        if group.distributed:
            model = global_batchnorm.revert_batchnorm(model)
        training_settings = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": WEIGHT_DECAY,
            "final_lr_fraction": FINAL_LR_FRACTION,
            "fractions": list(fractions),
            "augmentation": augment_settings,
            "recalibrate_batchnorm": RECALIBRATE_BATCHNORM,
            "select_by": select_by,
            "selection": SELECTION_RULES[select_by],
        }
        model.eval()
        metrics: dict[str, Any] = {}
        for name in ("test", "val", "train"):
            logits = predict_logits(model, parts[name], 2 * batch_size)
            metrics[name] = binary_metrics(logits, labels[name])
            if name == "train":
                metrics["train"]["logit_mean_by_label"] = {
                    str(c): float(logits[labels[name] == c].mean()) for c in (0, 1)
                }
        metrics.update(
            {
                "best_epoch": best_epoch,
                "epochs": epochs,
                "train_logit_mean": metrics["train"]["logit_mean"],
                "train_logit_std": metrics["train"]["logit_std"],
                "input_shape": list(dataset.spatial_shape),
                "positive_label": positive_label,
                "seed": seed,
                "training": training_settings,
                "device": str(chosen_device),
                "threads": threads,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        if group.is_main:
            with disk_errors(out / CLASSIFIER_NAME, note):
                save_classifier(
                    staging / CLASSIFIER_NAME,
                    model,
                    {
                        "input_shape": list(dataset.spatial_shape),
                        "dim": dataset.dim,
                        "preprocessing": dict(PREPROCESSING_INFO),
                        "orientation": dataset.preprocessing.orientation,
                        "positive_label": positive_label,
                        "manifest": relative_to(manifest_path, out),
                        "seed": seed,
                        "training": training_settings,
                        "best_epoch": best_epoch,
                        "train_logit_mean": metrics["train_logit_mean"],
                        "train_logit_std": metrics["train_logit_std"],
                        "counterwarp_version": __version__,
                        "split_sha256": file_digest(staging / SPLIT_NAME),
                    },
                )
            with disk_errors(out / CLASSIFIER_METRICS_NAME, note):
                write_json_atomic(staging / CLASSIFIER_METRICS_NAME, metrics)
                digests = staged_digests(staging.folder, manifest_path,
                                         (CLASSIFIER_NAME, SPLIT_NAME))
                write_json_atomic(staging / PROVENANCE_NAME, merged_record(
                    out, "train-classifier", {"seed": seed, **digests}, drop=("fit",)))
            staging.commit([SPLIT_NAME, CLASSIFIER_LOG_NAME, CLASSIFIER_METRICS_NAME,
                            CLASSIFIER_NAME, PROVENANCE_NAME])
        return metrics

