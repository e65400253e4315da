"""An independent "oracle" classifier: another architecture and seed, trained on the
same training images as the explained classifier.

A simulator can move the explained classifier's logit with a warp that is adversarial to
that one network (a pattern only it reads). An oracle trained independently on the same
task did not see that warp: if the simulated images move the oracle's logit the same way,
the warp carries the disease pattern itself, not a quirk of one network.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from counterwarp.errors import CounterwarpError
from counterwarp.explain.assess import explain_directions_in_batches
from counterwarp.explain.simulator import Simulator
from counterwarp.nn.classifier import Classifier, predict_in_batches
from counterwarp.train.augment import AUGMENTATION, augment_batch
from counterwarp.train.common import auc

__all__ = ["ORACLE_CHANNELS", "oracle_agreement", "train_oracle"]

#: The oracle's conv channels: half the paper's CNN, so it is another network.
ORACLE_CHANNELS = (8, 16, 32, 8)


def train_oracle(
    images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 20, batch_size: int = 16,
    lr: float = 1e-3, seed: int = 1, hidden: int = 32, device: torch.device | None = None,
    progress: bool = True,
) -> Classifier:
    """Train a smaller CNN (:data:`ORACLE_CHANNELS`) on ``images`` (N, 1, *S), ``labels``
    (N,) 0/1, with the explained classifier's augmentation; returns it frozen, eval mode."""
    n_positive = int(labels.sum())
    if n_positive == 0 or n_positive == len(labels):
        raise CounterwarpError("the oracle needs healthy and diseased training images")
    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(tuple(images.shape[2:]), ORACLE_CHANNELS, hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor((len(labels) - n_positive) / n_positive, device=device))
    for _ in tqdm(range(epochs), desc="sanity: oracle classifier", disable=not progress):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - 1, batch_size):
            chosen = order[start : start + batch_size]
            if len(chosen) < 2:
                continue
            batch = augment_batch(images[chosen], generator, **AUGMENTATION).to(device)
            optimizer.zero_grad(set_to_none=True)
            criterion(model(batch), labels[chosen].float().to(device)).backward()
            optimizer.step()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _logits(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """``(N,)`` logits of ``images`` (N, 1, *S), without gradients."""
    return predict_in_batches(model, images, batch_size=16).numpy()


def oracle_agreement(
    oracle: nn.Module, simulator: Simulator, images: torch.Tensor, labels: torch.Tensor,
    train_images: torch.Tensor,
) -> dict[str, Any]:
    """Does the oracle move the same way as the explained classifier on simulated images?

    Healthy held-out images (label 0) are warped "inject", diseased ones "remove".

    Returns:
        ``oracle_test_auroc``; per direction the share of images whose oracle logit moved
        the asked way (up for inject, down for remove), the mean oracle logit shift in sd
        of the oracle's training logits, and the same share and shift for the explained
        classifier (its own logits, in sd of its training logits).
    """
    assert simulator.classifier_ is not None
    labels = labels.long()
    result: dict[str, Any] = {"oracle_channels": list(ORACLE_CHANNELS),
                              "oracle_test_auroc": auc(_logits(oracle, images), labels)}
    oracle_sd = float(np.std(_logits(oracle, train_images))) or 1.0
    own_sd = float(np.std(_logits(simulator.classifier_, train_images))) or 1.0
    for direction, group, sign in (("inject", 0, 1.0), ("remove", 1, -1.0)):
        chosen = images[labels == group]
        if len(chosen) == 0:
            continue
        explanation = explain_directions_in_batches(simulator, chosen, (direction,))[direction]
        shift = _logits(oracle, explanation.simulated) - _logits(oracle, chosen)
        own = (explanation.logit_after - explanation.logit_before).numpy()
        result[direction] = {
            "n": len(chosen),
            "oracle_moved_share": float(np.mean(sign * shift > 0)),
            "oracle_mean_shift_sd": float(np.mean(shift) / oracle_sd),
            "classifier_moved_share": float(np.mean(sign * own > 0)),
            "classifier_mean_shift_sd": float(np.mean(own) / own_sd),
        }
    return result
