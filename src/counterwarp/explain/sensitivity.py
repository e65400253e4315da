"""What a classifier reads: its logit shift when a cohort's *true* effect is applied.

A probe on a ``counterwarp synth`` cohort, independent of any explanation method: a region
whose true deformation does not move the logit is one the classifier ignores, so no faithful
explanation of that classifier can show it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from counterwarp.data.effects import EffectSpec, effect_deformation, integrate_velocity_array
from counterwarp.data.synthetic import age_confound_velocity
from counterwarp.data.template import make_grid
from counterwarp.data.truth import COHORT_NAME
from counterwarp.errors import CounterwarpError
from counterwarp.geometry.warp import warp
from counterwarp.nn.classifier import classifier_logits, module_device

__all__ = ["classifier_region_sensitivity"]


@torch.no_grad()
def classifier_region_sensitivity(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    data: str | Path,
    batch_size: int = 16,
) -> list[dict[str, Any]] | None:
    """Logit shift when the cohort's *true* effect is applied, all regions and one at a time.

    The truth maps say what the disease does; they do not say what the classifier learned to
    read. This probe tells the two apart: each region's true deformation (at the cohort's
    ``effect`` strength, severity 1) is applied to the held-out healthy images ("inject") and
    its exact inverse to the diseased ones ("remove"), and the mean logit shift is recorded.
    A region whose effect does not move the logit is one the classifier ignores, so no
    faithful explanation of *this classifier* can show it.

    Two more rows probe what is not the disease: the age confound over the difference of
    the groups' mean ages (the diseased are older: the whole brain shrinks a little, its
    outline moves inwards, and the ventricles grow), and the brain outline alone (the
    whole-brain shrinkage without the ventricles). A classifier that reads them can be
    explained by changes outside the disease's regions, e.g. at the frontal and occipital
    poles.

    Args:
        classifier: frozen, eval mode; maps (B, 1, *S) to logits.
        images: (N, 1, *S) preprocessed held-out images on the cohort's own grid.
        labels: (N,) 0 healthy / 1 diseased.
        data: the ``synth`` cohort folder (reads ``cohort.json``).

    Returns:
        One dict per row (``region``, ``inject_logit_shift`` over healthy images,
        ``remove_logit_shift`` over diseased images, logits), or None when the cohort has no
        ``cohort.json`` or the model grid differs from the cohort's grid.
    """
    try:
        cohort = json.loads((Path(data) / COHORT_NAME).read_text())
        spec = EffectSpec.from_dict(cohort["effect_spec"])
        shape, strength = tuple(int(n) for n in cohort["shape"]), float(cohort["effect"])
    except (OSError, ValueError, KeyError, TypeError, CounterwarpError):
        return None
    if shape != tuple(images.shape[2:]):
        return None
    grid = make_grid(shape, dim=len(shape))
    device = module_device(classifier)

    def mean_shift(subset: torch.Tensor, displacement: np.ndarray) -> float | None:
        if subset.shape[0] == 0:
            return None
        field = torch.from_numpy(displacement).float().to(device)[None]
        shifts = []
        for i in range(0, subset.shape[0], batch_size):
            x = subset[i : i + batch_size].to(device)
            moved = warp(x, field.expand(x.shape[0], *field.shape[1:]))
            shifts.append(classifier_logits(classifier, moved) - classifier_logits(classifier, x))
        return float(torch.cat(shifts).mean())

    healthy, diseased = images[labels == 0], images[labels == 1]
    rows = []
    choices = [("all regions", list(spec.regions))] + [(r.name, [r]) for r in spec.regions]
    for name, regions in choices:
        part = EffectSpec(regions=regions)
        rows.append({
            "region": name,
            "inject_logit_shift": mean_shift(healthy, effect_deformation(part, grid, strength)[0]),
            "remove_logit_shift": mean_shift(
                diseased, effect_deformation(part, grid, -strength)[0]
            ),
        })
    settings = cohort.get("settings") or {}
    years = float(settings.get("age_mean_diseased", 0.0)) - float(
        settings.get("age_mean_healthy", 0.0))
    if years > 0:
        centre = grid.voxels_to_mm(
            np.argwhere(images[:, 0].numpy().mean(0) != 0).mean(axis=0).reshape(-1, 1))[:, 0]
        for name, ventricles in ((f"age confound (+{years:g} years)", True),
                                 (f"brain outline (whole-brain shrinkage of +{years:g} years)",
                                  False)):
            rows.append({
                "region": name,
                "inject_logit_shift": mean_shift(healthy, integrate_velocity_array(
                    age_confound_velocity(years, grid, centre, ventricles))),
                "remove_logit_shift": mean_shift(diseased, integrate_velocity_array(
                    age_confound_velocity(-years, grid, centre, ventricles))),
            })
    return rows
