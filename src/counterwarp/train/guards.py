"""Checks that stop a classifier training before it writes anything misleading.

:func:`check_arguments` and :func:`check_split` refuse bad settings and splits up front;
:func:`check_not_trained` refuses to retrain a run that holds a classifier unless asked to
overwrite it; :func:`check_training_loss` stops a classifier training whose loss went
NaN/Inf or exploded, naming the likely setting (``--lr``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from counterwarp.data.manifest import SPLIT_PARTS, ManifestRow
from counterwarp.errors import CounterwarpError
from counterwarp.nn.classifier import CLASSIFIER_NAME

__all__ = [
    "EXPLODING_LOSS",
    "check_arguments",
    "check_not_trained",
    "check_split",
    "check_training_loss",
]

EXPLODING_LOSS = 1e4
"""A mean training loss (BCE with logits, positive class weighted by the class ratio) above
this stops the training as diverged. An untrained network scores about ln 2 (0.7) times the
class weight; a loss of 1e4 needs logits about 1e4 on the wrong side, far past where the
sigmoid saturates (|logit| ~ 17 in float32), which only weights that blew up produce."""


def check_not_trained(out: Path, overwrite: bool) -> None:
    """Refuse to retrain into ``out`` when it holds a classifier, unless ``overwrite``."""
    if not overwrite and (out / CLASSIFIER_NAME).exists():
        raise CounterwarpError(
            f"{out / CLASSIFIER_NAME} exists: {out} already holds a trained classifier; pass "
            f"--overwrite to retrain it (the new files replace the old ones only when training "
            f"completes, and the run's simulator must then be refitted) or choose another --out"
        )


def check_training_loss(train_loss: float, epoch: int, lr: float, out: Path) -> None:
    """Stop a training whose mean loss of ``epoch`` went NaN/Inf or exploded (above
    :data:`EXPLODING_LOSS`), in one line naming the learning rate ``lr`` as the likely cause
    and saying that ``out`` is unchanged."""
    if math.isfinite(train_loss) and train_loss <= EXPLODING_LOSS:
        return
    what = (f"became {'NaN' if math.isnan(train_loss) else 'Inf'}" if not
            math.isfinite(train_loss) else
            f"exploded to {train_loss:.3g} (above {EXPLODING_LOSS:g}, which needs logits "
            f"~1e4 on the wrong side: the weights diverged)")
    raise CounterwarpError(
        f"the classifier's training loss {what} in epoch {epoch}; likely cause: the learning "
        f"rate; lower --lr (now {lr:g}); the run folder {out} is unchanged"
    )


def check_arguments(
    epochs: int, batch_size: int, lr: float, fractions: Sequence[float]
) -> tuple[float, float, float]:
    """The training arguments checked; returns ``fractions`` as three floats."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise CounterwarpError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise CounterwarpError(
            f"batch size must be an integer >= 2 (BatchNorm needs 2 images), got {batch_size!r}"
        )
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise CounterwarpError(f"learning rate must be a positive number, got {lr!r}")
    if len(fractions) != 3:
        raise CounterwarpError(f"fractions must be (train, val, test), got {tuple(fractions)}")
    parts = tuple(float(f) for f in fractions)
    if any(not math.isfinite(f) or f <= 0 for f in parts) or abs(sum(parts) - 1) > 1e-6:
        raise CounterwarpError(
            f"fractions {parts} must be three positive numbers summing to 1 (train, val, test)"
        )
    return parts  # type: ignore[return-value]


def check_split(rows: list[ManifestRow], split: dict[str, list[int]], manifest: Path) -> None:
    """Refuse a split with an empty part or a training part of one class."""
    for name in SPLIT_PARTS:
        if not split[name]:
            raise CounterwarpError(
                f"manifest {manifest}: too few subjects ({len({r.subject for r in rows})}) for a "
                f"train / val / test split ({name} would be empty); add images or change "
                "the fractions."
            )
    train_labels = {rows[i].label for i in split["train"]}
    if len(train_labels) < 2:
        raise CounterwarpError(
            f"manifest {manifest}: the training part has only label {train_labels.pop()}; "
            "add subjects of the other class."
        )
