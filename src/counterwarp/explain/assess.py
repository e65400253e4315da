"""How well a fitted simulator does its job on a set of images (and, for synthetic
cohorts, how well its volume-change maps match the known truth)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from counterwarp.explain.simulator import Explanation, Simulator
from counterwarp.losses import mean_abs_gradient
from counterwarp.stats.scores import pearson, smooth


def explain_in_batches(
    simulator: Simulator, images: torch.Tensor, direction: str, batch_size: int = 16
) -> Explanation:
    """``simulator.explain`` over (N, 1, *S) images in chunks; one concatenated Explanation."""
    return explain_directions_in_batches(simulator, images, (direction,), batch_size)[direction]


def explain_directions_in_batches(
    simulator: Simulator, images: torch.Tensor, directions: tuple[str, ...],
    batch_size: int = 16,
) -> dict[str, Explanation]:
    """``simulator.explain_directions`` over (N, 1, *S) images in chunks:
    ``{direction: one concatenated Explanation}``."""
    parts = [
        simulator.explain_directions(images[i : i + batch_size], directions)
        for i in range(0, images.shape[0], batch_size)
    ]
    names = ("image", "simulated", "displacement", "log_volume_change", "logit_before",
             "logit_after", "moved", "folding")
    return {
        direction: Explanation(
            direction=direction, margin=parts[0][direction].margin,
            **{name: torch.cat([getattr(p[direction], name) for p in parts]) for name in names},
        )
        for direction in directions
    }


def _share(values: torch.Tensor) -> float | None:
    return float(values.float().mean()) if values.numel() else None


def assess_simulator(
    simulator: Simulator,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    truth_effect: np.ndarray | None = None,
    brain_mask: np.ndarray | None = None,
    sigma: float = 1.5,
) -> dict[str, Any]:
    """Success shares, flips, folding, cycle error and (optionally) agreement with the truth.

    Args:
        images: (N, 1, *S) preprocessed held-out images.
        labels: (N,) 0/1 true labels, used to pick the healthy subjects for the truth score
            (the classifier's predictions are used when None).
        truth_effect: (*S) true log volume change of the disease effect (template space).
        brain_mask: (*S) bool, voxels to score (default: non-zero voxels of the first image).
        sigma: Gaussian sigma in voxels for the region-scale correlation.

    Returns:
        A JSON-able dict (see keys below; shares are in [0, 1]).
    """
    explained = explain_directions_in_batches(simulator, images, ("remove", "inject"))
    remove, inject = explained["remove"], explained["inject"]
    predicted_diseased = remove.logit_before > 0
    brain = images[:, 0] != 0
    variance = float(images[:, 0][brain].var())
    cycled = torch.cat([
        simulator.cycle(images[i : i + 16], "inject") for i in range(0, len(images), 16)
    ])
    cycle_mse = float(((cycled - images) ** 2)[:, 0][brain].mean())
    result: dict[str, Any] = {
        "n": int(images.shape[0]),
        "margin": remove.margin,
        "n_predicted_diseased": int(predicted_diseased.sum()),
        "n_predicted_healthy": int((~predicted_diseased).sum()),
        "remove_moved_share": _share(remove.moved[predicted_diseased]),
        "inject_moved_share": _share(inject.moved[~predicted_diseased]),
        "remove_flips": int((remove.logit_after[predicted_diseased] <= 0).sum()),
        "inject_flips": int((inject.logit_after[~predicted_diseased] > 0).sum()),
        "mean_logit_shift_remove": float((remove.logit_after - remove.logit_before).mean()),
        "mean_logit_shift_inject": float((inject.logit_after - inject.logit_before).mean()),
        "folding_share_mean": float(torch.cat([remove.folding, inject.folding]).mean()),
        "folding_share_max": float(torch.cat([remove.folding, inject.folding]).max()),
        "cycle_mse": cycle_mse,
        "cycle_error_relative": cycle_mse / variance if variance > 0 else None,
    }
    if truth_effect is not None:
        healthy = (labels == 0) if labels is not None else ~predicted_diseased
        if int(healthy.sum()) > 0:
            mean_change = inject.log_volume_change[healthy].mean(0).numpy()
            mask = brain_mask if brain_mask is not None else images[0, 0].numpy() != 0
            result["n_healthy_scored"] = int(healthy.sum())
            result["inject_truth_pearson_voxel"] = pearson(mean_change, truth_effect, mask)
            result["inject_truth_pearson_region"] = pearson(
                smooth(mean_change, sigma), smooth(truth_effect, sigma), mask
            )
    return result


def simulator_metrics(
    simulator: Simulator,
    images: torch.Tensor,
    labels: torch.Tensor,
    effect: np.ndarray,
    template_mask: np.ndarray,
    sigma: float = 1.5,
    batch_size: int = 16,
) -> dict[str, Any]:
    """How the simulator behaves on ``images`` (N, 1, *S): assess_simulator + mean |grad u|.

    Returns the dict of :func:`assess_simulator` (shares moved by the margin, flips, mean
    logit shifts, folding, relative cycle error, and the agreement of the mean "inject" map
    of the healthy images with the true effect, ``inject_truth_pearson_voxel`` / ``_region``)
    plus ``mean_abs_grad_u_remove``, ``mean_abs_grad_u_inject`` and ``mean_abs_grad_u``
    (their mean; voxels per voxel) and ``moved_share`` (pooled share of images moved by the
    margin in their asked direction: remove for those the classifier calls diseased, inject
    for the others).
    """
    result = assess_simulator(
        simulator, images, labels, truth_effect=effect, brain_mask=template_mask, sigma=sigma
    )
    for direction in ("remove", "inject"):
        grads = [
            float(mean_abs_gradient(
                explain_in_batches(simulator, images[i : i + batch_size], direction).displacement
            )) * min(batch_size, images.shape[0] - i)
            for i in range(0, images.shape[0], batch_size)
        ]
        result[f"mean_abs_grad_u_{direction}"] = sum(grads) / images.shape[0]
    result["mean_abs_grad_u"] = (
        result["mean_abs_grad_u_remove"] + result["mean_abs_grad_u_inject"]
    ) / 2
    moved, counted = 0.0, 0
    for share, count in (
        (result["remove_moved_share"], result["n_predicted_diseased"]),
        (result["inject_moved_share"], result["n_predicted_healthy"]),
    ):
        if share is not None:
            moved += share * count
            counted += count
    result["moved_share"] = moved / counted if counted else None
    return result
