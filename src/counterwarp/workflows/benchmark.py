"""``counterwarp benchmark``: explanation methods scored against a synthetic cohort's truth.

On the held-out (``test``) subjects of a cohort written by ``counterwarp synth`` (which
stores every subject's true log volume change), every method makes one map per subject:

- the simulator, both directions, as log volume change of the anatomy (growth > 0):
  ``simulator_inject`` ("more diseased") as it is, and ``simulator_remove`` ("healthier")
  **negated**. Removing the disease undoes its volume change, so ``-remove`` should match
  the disease effect with a positive sign, like ``inject``;
- each saliency baseline of :data:`~counterwarp.explain.saliency.SALIENCY_METHODS`.

Scores (all from :mod:`counterwarp.stats.scores`):

- per held-out *diseased* subject (true map not all zero) and method: Pearson, Spearman,
  localisation AUROC of ``|map|`` for ``|truth| > threshold``, and the region-scale Pearson
  (both maps Gaussian-smoothed with ``sigma`` voxels within the mask), over brain voxels
  (preprocessed image != 0). Simulator maps are scored *signed*; saliency maps carry no
  sign of volume change, so for them the absolute values of both map and truth are
  correlated (they are judged on *where*, not *which way*);
- per method at group level: the mean map over all held-out subjects (signed for the
  simulator, mean of ``|map|`` for saliency) against the template-space effect map
  (``truth/effect_log_volume_change.nii.gz``, signed / absolute) within the template brain
  mask;
- the issue-3 metric, separately: the mean "inject" volume change over held-out *healthy*
  subjects against the effect map (voxel and region scale; from
  :func:`~counterwarp.explain.assess.assess_simulator`);
- the simulator's own behaviour: share moved by the margin, flips, mean logit shift,
  relative cycle error, folding share, mean ``|grad u|``.

The scoring core, :func:`score_methods`, is a pure function of arrays so it can be tested
with hand-made maps. :class:`TwoSimulators` is the "two separate simulators" arm of the
ablation study (``benchmarks/ablations.py``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from counterwarp._io import atomic_path, write_json_atomic, write_text_atomic
from counterwarp.data.manifest import ManifestRow
from counterwarp.data.preprocess import resample_linear
from counterwarp.errors import CounterwarpError
from counterwarp.explain.assess import assess_simulator, explain_in_batches
from counterwarp.explain.saliency import SALIENCY_METHODS, saliency_map
from counterwarp.explain.simulator import Simulator
from counterwarp.losses import mean_abs_gradient
from counterwarp.nn.simulator import SimulatorNet
from counterwarp.stats.scores import score_map

__all__ = [
    "METRICS",
    "SIMULATOR_METHODS",
    "CohortTruth",
    "TwoSimulators",
    "load_cohort_truth",
    "methods_figure",
    "run_benchmark",
    "score_methods",
    "simulator_metrics",
    "summary_table",
]

#: Map names of the simulator: inject as is, remove negated (see the module docstring).
SIMULATOR_METHODS: tuple[str, ...] = ("simulator_remove", "simulator_inject")
#: Scores computed for every (method, subject) and (method, group).
METRICS: tuple[str, ...] = ("pearson", "spearman", "auroc", "pearson_smoothed")
CSV_COLUMNS: tuple[str, ...] = (
    "method", "scope", "subject", "label", "signed", *METRICS,
)
TRUTH_DIR = "truth"
EFFECT_NAME = "effect_log_volume_change.nii.gz"
BRAIN_MASK_NAME = "brain_mask.nii.gz"
UNSIGNED_NOTE = (
    "Saliency maps carry no sign of volume change, so they are scored on magnitudes: the "
    "absolute value of the map is correlated with the absolute value of the true log volume "
    "change (per subject, and for the group the mean |map| against |effect|). The simulator "
    "is scored signed (growth > 0), with its 'remove' map negated so that it should match the "
    "disease effect; a signed correlation is the stricter test, since it must also get the "
    "direction of the change right."
)


def sign_used(method: str) -> str:
    """How a method's map enters the scores (a label for tables)."""
    if method == "simulator_remove":
        return "signed, negated (-remove)"
    if method in SIMULATOR_METHODS:
        return "signed"
    return "unsigned (|map| vs |truth|)"


def is_signed(method: str) -> bool:
    """True for maps that say grow (+) vs shrink (-), i.e. the simulator's."""
    return method in SIMULATOR_METHODS


# ----------------------------------------------------------------------------- scoring core


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def score_methods(
    maps: Mapping[str, np.ndarray],
    truths: np.ndarray,
    brains: np.ndarray,
    effect: np.ndarray,
    template_mask: np.ndarray,
    *,
    signed: Mapping[str, bool] | None = None,
    ids: Sequence[str] | None = None,
    threshold: float = 0.05,
    sigma: float = 1.5,
) -> dict[str, dict[str, Any]]:
    """Score every method's maps against the truth, per diseased subject and for the group.

    Pure: arrays in, floats out.

    Args:
        maps: method -> ``(N, *S)`` maps, one per subject, already in the orientation to be
            scored (e.g. the simulator's "remove" map negated).
        truths: ``(N, *S)`` true log volume change per subject (all zero for healthy ones).
        brains: ``(N, *S)`` bool, voxels scored per subject (brain of each image).
        effect: ``(*S)`` template-space effect map (log volume change at unit severity).
        template_mask: ``(*S)`` bool, voxels scored for the group map.
        signed: method -> True to score the signed map (volume change), False to score
            magnitudes (saliency). Default: :func:`is_signed` of the name.
        ids: N subject ids (default ``"0", "1", ...``).
        threshold: ``|truth|`` above which a voxel counts as changed (AUROC), natural log.
        sigma: Gaussian sd in voxels for the region-scale Pearson.

    Returns:
        method -> ``{"signed": bool, "sign_used": str, "group": {metric: float},
        "subjects": {id: {metric: float}}, "subject_median": {metric: float},
        "n_subjects": int}``. Subjects whose truth is zero inside their brain (healthy) are
        not scored individually; they still enter the group mean map. Undefined scores are
        nan.
    """
    truths = np.asarray(truths, dtype=np.float64)
    brains = np.asarray(brains).astype(bool)
    n = truths.shape[0]
    if brains.shape != truths.shape:
        raise CounterwarpError(f"brains have shape {brains.shape}, the truths {truths.shape}")
    if np.shape(effect) != truths.shape[1:] or np.shape(template_mask) != truths.shape[1:]:
        raise CounterwarpError(
            f"effect {np.shape(effect)} and template_mask {np.shape(template_mask)} must have "
            f"the subjects' spatial shape {truths.shape[1:]}"
        )
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise CounterwarpError(f"{len(ids)} ids for {n} subjects")
    diseased = [bool(np.any(truths[i][brains[i]] != 0)) for i in range(n)]
    results: dict[str, dict[str, Any]] = {}
    for method, values in maps.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != truths.shape:
            raise CounterwarpError(
                f"maps of {method!r} have shape {values.shape}, the truths {truths.shape}"
            )
        use_sign = is_signed(method) if signed is None else bool(signed[method])
        subjects = {
            ids[i]: score_map(values[i], truths[i], brains[i], use_sign, threshold, sigma)
            for i in range(n)
            if diseased[i]
        }
        group_map = values.mean(0) if use_sign else np.abs(values).mean(0)
        group = score_map(group_map, effect, template_mask, use_sign, threshold, sigma)
        results[method] = {
            "signed": use_sign,
            "sign_used": sign_used(method) if signed is None else (
                "signed" if use_sign else "unsigned (|map| vs |truth|)"
            ),
            "group": group,
            "subjects": subjects,
            "subject_median": {
                m: _median([s[m] for s in subjects.values()]) for m in METRICS
            },
            "n_subjects": len(subjects),
        }
    return results


def summary_table(scores: Mapping[str, Mapping[str, Any]]) -> str:
    """The paper-ready markdown table of :func:`score_methods` results, one row per method."""
    lines = [
        "| method | sign used | group Pearson | group Spearman | group AUROC | "
        "group Pearson (smoothed) | subject median Pearson | subject median AUROC |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, result in scores.items():
        group, median = result["group"], result["subject_median"]
        cells = [
            method, result["sign_used"], _fmt(group["pearson"]), _fmt(group["spearman"]),
            _fmt(group["auroc"]), _fmt(group["pearson_smoothed"]), _fmt(median["pearson"]),
            _fmt(median["auroc"]),
        ]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(lines)


def _md(text: str) -> str:
    """A markdown table cell: pipes escaped so they do not split the cell."""
    return str(text).replace("|", "\\|")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    value = float(value)
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- cohort truth


@dataclass
class CohortTruth:
    """Ground truth of held-out subjects, on the model grid.

    Attributes:
        truths: ``(N, *S)`` float32 true log volume change per subject (zero if healthy).
        effect: ``(*S)`` float32 template-space effect, unit severity.
        template_mask: ``(*S)`` bool template brain mask.
        ids: N subject ids (image file names without NIfTI suffixes).
    """

    truths: np.ndarray
    effect: np.ndarray
    template_mask: np.ndarray
    ids: list[str]


def _nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _truth_dir(data: Path) -> Path:
    """``DATA/truth`` after checking the cohort folder; a clear error otherwise."""
    if not data.is_dir():
        raise CounterwarpError(
            f"--data {data}: no such folder; make a cohort with `counterwarp synth --out {data}`"
        )
    if not (data / "manifest.csv").is_file():
        raise CounterwarpError(
            f"--data {data}: no manifest.csv; the benchmark needs a cohort made by "
            f"`counterwarp synth --out {data}`"
        )
    truth = data / TRUTH_DIR
    missing = [
        name for name in (EFFECT_NAME, BRAIN_MASK_NAME) if not (truth / name).is_file()
    ]
    if not truth.is_dir() or missing:
        what = "no truth/ folder" if not truth.is_dir() else f"no truth/{missing[0]}"
        raise CounterwarpError(
            f"--data {data}: {what}. The benchmark scores maps against the known volume change "
            f"that `counterwarp synth` writes; the data must come from `counterwarp synth "
            f"--out {data}`"
        )
    return truth


def _subject_truth_paths(truth_dir: Path, rows: Sequence[ManifestRow]) -> list[Path]:
    paths = [truth_dir / f"{_nifti_stem(row.path)}_log_volume_change.nii.gz" for row in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CounterwarpError(
            f"{missing[0]} not found ({len(missing)} subject truth file(s) missing): the data "
            f"must come from `counterwarp synth`, with the images of its manifest.csv"
        )
    return paths


def _read_on_grid(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import nibabel as nib

    try:
        values = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    except Exception as error:  # noqa: BLE001 - any read failure is a bad file
        raise CounterwarpError(
            f"{path}: cannot read it ({type(error).__name__}); re-run `counterwarp synth`"
        ) from None
    if not np.isfinite(values).all():
        raise CounterwarpError(
            f"{path}: {int((~np.isfinite(values)).sum())} NaN/Inf value(s) in a truth map; "
            "re-run `counterwarp synth`"
        )
    while values.ndim > len(shape) and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != len(shape):
        raise CounterwarpError(
            f"{path} has shape {values.shape}; the classifier's grid is {shape} "
            f"({len(shape)}D). Use the cohort the run was trained on"
        )
    return resample_linear(values, shape)


def load_cohort_truth(
    data: str | Path, rows: Sequence[ManifestRow], shape: tuple[int, ...]
) -> CohortTruth:
    """Read the truth of ``rows`` (images of a ``synth`` cohort) onto the model grid ``shape``.

    Maps on another grid are resampled linearly, as the images are; the mask is re-thresholded
    at 0.5.
    """
    truth_dir = _truth_dir(Path(data))
    paths = _subject_truth_paths(truth_dir, rows)
    truths = np.stack([_read_on_grid(p, shape) for p in paths]) if paths else np.zeros(
        (0, *shape), np.float32
    )
    effect = _read_on_grid(truth_dir / EFFECT_NAME, shape)
    mask = _read_on_grid(truth_dir / BRAIN_MASK_NAME, shape) > 0.5
    return CohortTruth(truths, effect, mask, [_nifti_stem(row.path) for row in rows])


# ------------------------------------------------------------------- what the classifier reads


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
    import json

    from counterwarp.data.synthetic import EffectSpec, effect_deformation, make_grid
    from counterwarp.geometry.warp import warp
    from counterwarp.train.simulator import classifier_logits

    try:
        cohort = json.loads((Path(data) / "cohort.json").read_text())
        spec = EffectSpec.from_dict(cohort["effect_spec"])
        shape, strength = tuple(int(n) for n in cohort["shape"]), float(cohort["effect"])
    except (OSError, ValueError, KeyError, TypeError, CounterwarpError):
        return None
    if shape != tuple(images.shape[2:]):
        return None
    grid = make_grid(shape, dim=len(shape))
    device = next(classifier.parameters()).device

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
    return rows


def _sensitivity_markdown(rows: list[dict[str, Any]] | None, margin: float | None) -> list[str]:
    if not rows:
        return []
    lines = [
        "## What the classifier reads",
        "",
        "Mean logit shift when the cohort's true effect (severity 1) is applied to the held-out "
        "healthy images (inject) or undone on the diseased ones (remove), for all regions and "
        "for each region alone. A region that does not move the logit is one the classifier "
        "ignores; a faithful simulator cannot show it"
        + (f" (the simulator's margin is {_fmt(margin, 2)} logits)." if margin else "."),
        "",
        "| true effect applied | logit shift, inject (healthy) | logit shift, remove (diseased) |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {_md(row['region'])} | {_fmt(row['inject_logit_shift'], 2)} | "
        f"{_fmt(row['remove_logit_shift'], 2)} |"
        for row in rows
    ]
    return [*lines, ""]


# ----------------------------------------------------------------------------- simulator


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

    Returns the dict of :func:`~counterwarp.explain.assess.assess_simulator` (shares moved by
    the margin, flips, mean logit shifts, folding, relative cycle error, and the issue-3
    ``inject_truth_pearson_voxel`` / ``_region`` on the healthy images) plus
    ``mean_abs_grad_u_remove``, ``mean_abs_grad_u_inject`` and ``mean_abs_grad_u`` (their
    mean; voxels per voxel) and ``moved_share`` (pooled share of images moved by the margin
    in their asked direction: remove for those the classifier calls diseased, inject for
    the others).
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


SIMULATOR_TABLE: tuple[tuple[str, str], ...] = (
    ("moved_share", "share moved by the margin (pooled)"),
    ("remove_moved_share", "share moved by the margin, remove (predicted diseased)"),
    ("inject_moved_share", "share moved by the margin, inject (predicted healthy)"),
    ("remove_flips", "flips to healthy (remove)"),
    ("inject_flips", "flips to diseased (inject)"),
    ("mean_logit_shift_remove", "mean logit shift, remove"),
    ("mean_logit_shift_inject", "mean logit shift, inject"),
    ("margin", "margin (logit)"),
    ("cycle_error_relative", "cycle error (MSE / brain intensity variance)"),
    ("folding_share_mean", "folding share, mean"),
    ("folding_share_max", "folding share, max"),
    ("mean_abs_grad_u", "mean |grad u| (voxels per voxel)"),
)


# ----------------------------------------------------------------------------- two simulators


class TwoSimulators(nn.Module):
    """Two separate, unconditional simulators behind the :class:`SimulatorNet` interface.

    The ablation baseline of the paper's robustness claim: one :class:`SimulatorNet` for
    "inject" and one for "remove", each with a single expert per layer routed on the
    condition alone (so within one net the condition is a constant and the net is
    unconditional). Each sample is dispatched by the sign of its condition (``c > 0``:
    inject net, else remove net). Trained with the same losses and batches as the coupled
    model (each net sees its half of every batch; the cycle loss sends the simulated image
    back through the *other* net), but with twice the parameters.

    Args:
        input_shape, field, channels, latent_dim, integration_steps, max_displacement,
            routing_dropout, smoothing_sigma: as for :class:`SimulatorNet`, used for both.
        num_experts, routing, antisymmetric: accepted for a drop-in constructor signature
            and ignored (always 1, ``"condition"`` and two independent fields).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        field: str = "displacement",
        channels: tuple[int, ...] = (16, 32, 64, 16, 16),
        latent_dim: int = 512,
        num_experts: int = 1,
        routing: str = "condition",
        integration_steps: int = 7,
        max_displacement: float | None = None,
        routing_dropout: float = 0.1,
        smoothing_sigma: float = 0.0,
        norm: str = "batch",
        antisymmetric: bool = False,
    ) -> None:
        super().__init__()
        del num_experts, routing, antisymmetric
        settings: dict[str, Any] = dict(
            field=field, channels=tuple(channels), latent_dim=latent_dim, num_experts=1,
            routing="condition", integration_steps=integration_steps,
            max_displacement=max_displacement, routing_dropout=routing_dropout,
            smoothing_sigma=smoothing_sigma, norm=norm,
        )
        self.inject_net = SimulatorNet(tuple(input_shape), **settings)  # type: ignore[arg-type]
        self.remove_net = SimulatorNet(tuple(input_shape), **settings)  # type: ignore[arg-type]
        self.input_shape = self.inject_net.input_shape
        self.field = self.inject_net.field
        self.dim = self.inject_net.dim

    @property
    def config(self) -> dict[str, Any]:
        """The nets' shared config plus ``"architecture": "two_simulators"`` (JSON-able)."""
        return {**self.inject_net.config, "architecture": "two_simulators"}

    def forward(self, x: torch.Tensor, condition: torch.Tensor | float) -> torch.Tensor:
        """``x`` (B, 1, *S), ``condition`` (B,) or scalar in {-1, +1} -> raw field (B, d, *S).

        Samples with ``c > 0`` go through the inject net, the others through the remove net.
        """
        c = torch.as_tensor(condition, dtype=x.dtype, device=x.device)
        if c.ndim == 0:
            c = c.expand(x.shape[0])
        if c.shape != (x.shape[0],):
            raise ValueError(f"condition must have shape ({x.shape[0]},), got {tuple(c.shape)}.")
        out = x.new_zeros((x.shape[0], self.dim, *x.shape[2:]))
        for net, chosen in ((self.inject_net, c > 0), (self.remove_net, c <= 0)):
            index = torch.nonzero(chosen).flatten()
            if index.numel():
                out = out.index_copy(0, index, net(x[index], c[index]))
        return out

    def displacements(self, raw_field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`SimulatorNet.displacements` (both nets use the same field type)."""
        return self.inject_net.displacements(raw_field)


# ----------------------------------------------------------------------------- figure


def methods_figure(
    image: np.ndarray,
    truth: np.ndarray,
    maps: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    labels: Mapping[str, str] | None = None,
    title: str = "",
    columns_2d: int = 5,
) -> Path:
    """PNG: the true map, then every method's map, same subject, same slices.

    3D: one row per map (the true map first), columns = sagittal, coronal and axial slices
    through the strongest true effect. 2D: one panel per map, read left to right and top to
    bottom (``columns_2d`` per row), the true map first.

    Args:
        image: ``(*S)`` anatomy (z-scored, background 0), drawn in gray under every map;
            overlays are shown inside the brain (``image != 0``) only, where they are scored.
        truth: ``(*S)`` true log volume change; 3D slices go through its strongest point
            (the centre when it is all zero).
        maps: method -> ``(*S)`` map as scored (simulator remove already negated). Signed
            maps (:func:`is_signed`) use a symmetric diverging colour map; saliency maps are
            shown as ``|map|`` (hot); each is scaled to its own 99.5th percentile.
        path: output PNG, written atomically.
        labels: method -> panel label (default: the method name).
        title: figure title.
        columns_2d: panels per row for 2D images.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from counterwarp.report.figures import orthogonal_slices, strongest_point, symmetric_limit

    image = np.asarray(image, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if image.ndim not in (2, 3) or truth.shape != image.shape:
        raise CounterwarpError(
            f"methods_figure: image {image.shape} and truth {truth.shape} must be one 2D or "
            f"3D shape"
        )
    point = (
        strongest_point(truth) if np.any(truth != 0) else tuple(s // 2 for s in truth.shape)
    )
    labels = dict(labels or {})
    panels: list[tuple[str, np.ndarray, bool]] = [("truth (log volume change)", truth, True)]
    for method, values in maps.items():
        panels.append((labels.get(method, method), np.asarray(values, np.float64),
                       is_signed(method)))
    brain = orthogonal_slices((image != 0).astype(np.float64), point)
    anatomy = orthogonal_slices(image, point)
    lo, hi = np.percentile(image, [1.0, 99.5]) if image.size else (0.0, 1.0)
    if image.ndim == 3:
        n_rows, n_cols, views = len(panels), 3, ("sagittal", "coronal", "axial")
        size = (2.6 * 3 + 1.6, 2.3 * n_rows + 0.6)
    else:
        n_cols = max(1, min(columns_2d, len(panels)))
        n_rows, views = math.ceil(len(panels) / n_cols), ("",)
        size = (2.7 * n_cols, 2.7 * n_rows + 0.6)
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()
    for k, (label, values, signed) in enumerate(panels):
        values = np.nan_to_num(values)
        if signed:
            limit = symmetric_limit(values)
            shown, cmap, vmin, vmax = values, "RdBu_r", -limit, limit
        else:
            shown = np.abs(values)
            limit = symmetric_limit(shown)
            cmap, vmin, vmax = "hot", 0.0, limit
        row_axes = axes[k] if image.ndim == 3 else [axes.flat[k]]
        for c, view in enumerate(orthogonal_slices(shown, point)):
            ax = row_axes[c]
            ax.set_axis_on()
            ax.imshow(anatomy[c], cmap="gray", origin="lower", vmin=lo, vmax=hi)
            hidden = (np.abs(view) < 0.05 * limit) | (brain[c] == 0)
            handle = ax.imshow(np.ma.masked_where(hidden, view), cmap=cmap, origin="lower",
                               vmin=vmin, vmax=vmax, alpha=0.85)
            if views[c] and k == 0:
                ax.set_title(views[c], fontsize=9)
        if image.ndim == 3:
            row_axes[0].set_ylabel(label, fontsize=8)
        else:
            row_axes[0].set_title(label, fontsize=8)
        bar = fig.colorbar(handle, ax=list(row_axes), fraction=0.05, pad=0.02, shrink=0.9)
        bar.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return Path(path)


# ----------------------------------------------------------------------------- workflow


def _chosen_methods(methods: str | Sequence[str] | None) -> list[str]:
    if methods is None:
        return list(SALIENCY_METHODS)
    if not isinstance(methods, str) and len(methods) == 0:
        return []
    from counterwarp.workflows.saliency import parse_methods

    return parse_methods(methods)


def _write_csv(path: Path, scores: Mapping[str, Mapping[str, Any]], labels: Mapping[str, int],
               issue3: Mapping[str, Any]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()

    def cell(value: Any) -> Any:
        if isinstance(value, float):
            return "" if not math.isfinite(value) else f"{value:.6g}"
        return "" if value is None else value

    for method, result in scores.items():
        for subject, values in result["subjects"].items():
            writer.writerow({
                "method": method, "scope": "subject", "subject": subject,
                "label": labels.get(subject, ""), "signed": result["signed"],
                **{m: cell(values[m]) for m in METRICS},
            })
        writer.writerow({
            "method": method, "scope": "group", "subject": "group", "label": "",
            "signed": result["signed"], **{m: cell(result["group"][m]) for m in METRICS},
        })
    writer.writerow({
        "method": "simulator_inject", "scope": "group_healthy", "subject": "group", "label": 0,
        "signed": True, "pearson": cell(issue3.get("pearson_voxel")), "spearman": "",
        "auroc": "", "pearson_smoothed": cell(issue3.get("pearson_region")),
    })
    return write_text_atomic(path, buffer.getvalue())


def _markdown(
    scores: Mapping[str, Mapping[str, Any]], simulator: Mapping[str, Any],
    issue3: Mapping[str, Any], info: Mapping[str, Any],
    sensitivity: list[dict[str, Any]] | None = None,
) -> str:
    lines = [
        "# counterwarp benchmark: explanation maps vs the true volume change",
        "",
        f"Cohort `{info['data']}`, run `{info['run']}`: {info['n_test']} held-out subjects "
        f"({info['n_test_diseased']} diseased, scored individually; "
        f"{info['n_test_healthy']} healthy). Changed voxels: |true log volume change| > "
        f"{info['threshold']}; region scale: Gaussian sigma {info['sigma']} voxels. Group: "
        f"mean map over all held-out subjects vs the template-space effect map, within the "
        f"template brain mask; subjects: brain voxels of each image.",
        "",
        summary_table(scores),
        "",
        "Issue-3 metric (mean 'inject' log volume change over the "
        f"{issue3.get('n_healthy', 0)} held-out healthy subjects vs the effect map): "
        f"Pearson {_fmt(issue3.get('pearson_voxel'))} voxel-wise, "
        f"{_fmt(issue3.get('pearson_region'))} at region scale (sigma {info['sigma']}).",
        "",
        "## The simulator on the held-out subjects",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    for key, label in SIMULATOR_TABLE:
        lines.append(f"| {_md(label)} | {_fmt(simulator.get(key))} |")
    lines += ["", *_sensitivity_markdown(sensitivity, simulator.get("margin")), UNSIGNED_NOTE, ""]
    return "\n".join(lines)


def _validate_run(run: Path) -> None:
    if not (run / "classifier.pt").is_file():
        raise CounterwarpError(
            f"--run {run}: no classifier.pt; run `counterwarp train-classifier --manifest "
            f"DATA/manifest.csv --out {run}` and then `counterwarp fit` first"
        )
    if not (run / "simulator.pt").is_file():
        raise CounterwarpError(
            f"--run {run}: no simulator.pt; run `counterwarp fit --manifest DATA/manifest.csv "
            f"--run {run}` first"
        )


def _fill_maps(
    maps: dict[str, np.ndarray], images: torch.Tensor, simulator: Simulator,
    classifier: nn.Module, target_layer: nn.Module | None, occlusion_patch: int,
    device: torch.device, ids: Sequence[str], bar: Any,
) -> None:
    """Compute every method's map of every image (N, 1, *S) into ``maps[method][i]``."""
    for i in range(images.shape[0]):
        batch = images[i : i + 1]
        for method in maps:
            bar.set_postfix_str(f"{ids[i]} {method}", refresh=False)
            if method in SIMULATOR_METHODS:
                direction = method.removeprefix("simulator_")
                change = simulator.explain(batch, direction).log_volume_change[0]
                values = -change if direction == "remove" else change
            else:
                values = saliency_map(
                    classifier, batch.to(device), method, target_layer=target_layer,
                    occlusion_patch=occlusion_patch,
                )[0].cpu()
            maps[method][i] = values.numpy()
            bar.update()


def run_benchmark(
    data: str | Path,
    run: str | Path,
    out: str | Path,
    *,
    methods: str | Sequence[str] | None = None,
    occlusion_patch: int = 4,
    threshold: float = 0.05,
    sigma: float = 1.5,
    progress: bool = True,
    device: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Score the run's simulator and saliency baselines against a ``synth`` cohort's truth.

    Args:
        data: cohort folder written by ``counterwarp synth`` (``manifest.csv``, ``truth/``).
        run: run folder with ``classifier.pt``, ``split.json`` and ``simulator.pt``; its
            ``test`` subjects are the held-out ones (a cohort the run never saw is used whole).
        out: output folder (created after every input has been checked).
        methods: saliency methods (names, comma-separated or a list, or ``"all"``); None =
            every method of :data:`SALIENCY_METHODS`, ``[]`` = the simulator alone.
        occlusion_patch: occlusion patch edge in model-grid voxels.
        threshold: ``|true log volume change|`` above which a voxel counts as changed.
        sigma: Gaussian sd (voxels) of the region-scale Pearson.
        progress: progress bar over subjects x methods (stderr).
        device: torch device; None = CUDA when available, else CPU.
        seed: seeds torch's RNG for the maps (SmoothGrad noise), so reruns give the same
            numbers; the caller's RNG state is restored afterwards.

    Writes:
        ``OUT/results.csv`` (one row per method x diseased subject, one group row per method,
        and the issue-3 row ``scope=group_healthy``), ``OUT/results.json`` (everything),
        ``OUT/results.md`` (tables for a paper) and ``OUT/methods_figure.png`` (one row per
        method, one diseased held-out subject, slices through its strongest true effect).

    Returns:
        The ``results.json`` payload: ``methods`` (see :func:`score_methods`),
        ``issue3_inject_healthy``, ``simulator`` (see :func:`simulator_metrics`), settings
        and the paths written.

    Raises:
        CounterwarpError: not a ``synth`` cohort, no classifier / simulator in the run, bad
            method names or occlusion patch, ``out`` an existing file. Nothing is written.
    """
    from counterwarp.nn.classifier import last_conv_layer
    from counterwarp.train.common import choose_device
    from counterwarp.workflows.folder import (
        load_images,
        load_run_simulator,
        model_shape,
        rows_in_split,
    )
    from counterwarp.workflows.saliency import check_occlusion_patch

    data, run, out = Path(data).expanduser(), Path(run).expanduser(), Path(out).expanduser()
    chosen = _chosen_methods(methods)
    if not (math.isfinite(threshold) and threshold >= 0):
        raise CounterwarpError(f"threshold must be a number >= 0, got {threshold!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise CounterwarpError(f"sigma must be a number >= 0 (voxels), got {sigma!r}")
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"--out {out} exists and is not a folder; choose a folder path")
    _truth_dir(data)
    _validate_run(run)
    simulator, payload = load_run_simulator(run)
    shape = model_shape(payload)
    check_occlusion_patch(chosen, occlusion_patch, shape)
    rows = rows_in_split(run, data / "manifest.csv", "test",
                         positive_label=payload.get("positive_label"))
    truth = load_cohort_truth(data, rows, shape)
    images, labels = load_images(rows, shape, progress=False)
    torch_device = choose_device(device)
    assert simulator.net_ is not None and simulator.classifier_ is not None
    simulator.net_.to(torch_device)
    classifier = simulator.classifier_.to(torch_device)
    target_layer = last_conv_layer(classifier) if "gradcam" in chosen else None

    n = images.shape[0]
    all_methods = [*SIMULATOR_METHODS, *chosen]
    maps = {m: np.zeros((n, *shape), np.float32) for m in all_methods}
    bar = tqdm(total=n * len(all_methods), desc="benchmark", disable=not progress)
    devices = [torch_device] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        _fill_maps(maps, images, simulator, classifier, target_layer, occlusion_patch,
                   torch_device, truth.ids, bar)
    bar.close()

    brains = images[:, 0].numpy() != 0
    scores = score_methods(
        maps, truth.truths, brains, truth.effect, truth.template_mask, ids=truth.ids,
        threshold=threshold, sigma=sigma,
    )
    sim = simulator_metrics(
        simulator, images, labels, truth.effect, truth.template_mask, sigma=sigma
    )
    issue3 = {
        "n_healthy": sim.pop("n_healthy_scored", 0),
        "pearson_voxel": sim.pop("inject_truth_pearson_voxel", None),
        "pearson_region": sim.pop("inject_truth_pearson_region", None),
        "sigma": sigma,
    }
    diseased_ids = [i for i in range(n) if np.any(truth.truths[i][brains[i]] != 0)]
    info = {
        "data": str(data), "run": str(run), "n_test": n,
        "n_test_diseased": len(diseased_ids), "n_test_healthy": n - len(diseased_ids),
        "threshold": threshold, "sigma": sigma, "occlusion_patch": occlusion_patch,
        "seed": seed,
    }

    sensitivity = classifier_region_sensitivity(classifier, images, labels, data)

    out.mkdir(parents=True, exist_ok=True)
    label_of = {s: int(labels[i]) for i, s in enumerate(truth.ids)}
    _write_csv(out / "results.csv", scores, label_of, issue3)
    write_text_atomic(out / "results.md", _markdown(scores, sim, issue3, info, sensitivity))
    # the figure: the diseased subject with the strongest effect (or the first subject)
    if diseased_ids:
        strength = [float(np.abs(truth.truths[i][brains[i]]).sum()) for i in diseased_ids]
        shown = diseased_ids[int(np.argmax(strength))]
    else:
        shown = 0
    shown_id = truth.ids[shown]
    figure_labels = {}
    for m in all_methods:
        r = scores[m]["subjects"].get(shown_id, {}).get("pearson")
        figure_labels[m] = f"{m}\n{'signed' if is_signed(m) else '|map|'}, r = {_fmt(r, 2)}"
    methods_figure(
        images[shown, 0].numpy(), truth.truths[shown], {m: maps[m][shown] for m in all_methods},
        out / "methods_figure.png", labels=figure_labels,
        title=f"{shown_id} (held out{', diseased' if diseased_ids else ''}): "
              f"true log volume change and each method's map",
    )
    result: dict[str, Any] = {
        **info,
        "methods": {m: _json_safe(scores[m]) for m in all_methods},
        "issue3_inject_healthy": _json_safe(issue3),
        "simulator": _json_safe(sim),
        "classifier_region_sensitivity": _json_safe(sensitivity),
        "figure_subject": shown_id,
        "unsigned_note": UNSIGNED_NOTE,
        "outputs": {
            name: str(out / name)
            for name in ("results.csv", "results.json", "results.md", "methods_figure.png")
        },
    }
    write_json_atomic(out / "results.json", result)
    return result


def _json_safe(value: Any) -> Any:
    """Replace nan / inf by None (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value
