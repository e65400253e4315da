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
- inject vs truth on healthy subjects, separately: the mean "inject" volume change over
  held-out *healthy* subjects against the effect map (voxel and region scale; from
  :func:`~counterwarp.explain.assess.assess_simulator`);
- the simulator's own behaviour: share moved by the margin, flips, mean logit shift,
  relative cycle error, folding share, mean ``|grad u|``;
- what the classifier reads (:mod:`counterwarp.explain.sensitivity`).

The scoring core, :func:`~counterwarp.stats.benchmark_scores.score_methods`, is a pure
function of arrays; this module runs the methods, and writes the tables and the figure.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from counterwarp._io import json_safe, write_json_atomic, write_text_atomic, writing_folder
from counterwarp._io.provenance import PROVENANCE_NAME, record, relative_to
from counterwarp.data.manifest import MANIFEST_NAME
from counterwarp.data.truth import check_cohort, load_cohort_truth
from counterwarp.errors import CounterwarpError
from counterwarp.explain.assess import simulator_metrics
from counterwarp.explain.saliency import SALIENCY_METHODS, saliency_map
from counterwarp.explain.sensitivity import classifier_region_sensitivity
from counterwarp.explain.simulator import Simulator
from counterwarp.stats.benchmark_scores import (
    METRICS,
    SIMULATOR_METHODS,
    is_signed,
    score_methods,
    summary_table,
)
from counterwarp.stats.benchmark_scores import format_number as _fmt
from counterwarp.stats.benchmark_scores import markdown_cell as _md
from counterwarp.workflows.classifier import CONTRACT_NAME
from counterwarp.workflows.folder import CLASSIFIER_NAME, SIMULATOR_NAME, run_digests

__all__ = ["methods_figure", "run_benchmark"]

CSV_COLUMNS: tuple[str, ...] = (
    "method", "scope", "subject", "label", "signed", *METRICS,
)
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
METHODS_FIGURE = "methods_figure.png"
#: Every file the benchmark writes into its output folder.
RESULT_NAMES: tuple[str, ...] = (RESULTS_CSV, RESULTS_JSON, RESULTS_MD, METHODS_FIGURE)
UNSIGNED_NOTE = (
    "Saliency maps carry no sign of volume change, so they are scored on magnitudes: the "
    "absolute value of the map is correlated with the absolute value of the true log volume "
    "change (per subject, and for the group the mean |map| against |effect|). The simulator "
    "is scored signed (growth > 0), with its 'remove' map negated so that it should match the "
    "disease effect; a signed correlation is the stricter test, since it must also get the "
    "direction of the change right."
)


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
    affine: np.ndarray | None = None,
) -> Path:
    """PNG: the true map, then every method's map, same subject, same cuts and scales.

    Drawn by :func:`counterwarp.report.figures.methods_figure` (see there): ``image``,
    ``truth`` (true log volume change) and each of ``maps`` (method -> map as scored) are
    ``(*S)`` arrays on the model grid, whose voxel-to-world matrix is ``affine`` (mm).
    """
    from counterwarp.report.figures import methods_figure as draw

    return draw(image, truth, maps, path, signed={m for m in maps if is_signed(m)},
                labels=labels, affine=affine, title=title, columns_2d=columns_2d)


# ----------------------------------------------------------------------------- workflow


def _chosen_methods(methods: str | Sequence[str] | None) -> list[str]:
    if methods is None:
        return list(SALIENCY_METHODS)
    if not isinstance(methods, str) and len(methods) == 0:
        return []
    from counterwarp.workflows.saliency import parse_methods

    return parse_methods(methods)


def _write_csv(path: Path, scores: Mapping[str, Mapping[str, Any]], labels: Mapping[str, int],
               inject_healthy: Mapping[str, Any]) -> Path:
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
        "signed": True, "pearson": cell(inject_healthy.get("pearson_voxel")), "spearman": "",
        "auroc": "", "pearson_smoothed": cell(inject_healthy.get("pearson_region")),
    })
    return write_text_atomic(path, buffer.getvalue())


def _markdown(
    scores: Mapping[str, Mapping[str, Any]], simulator: Mapping[str, Any],
    inject_healthy: Mapping[str, Any], info: Mapping[str, Any],
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
        "Inject vs truth on healthy subjects (mean 'inject' log volume change over the "
        f"{inject_healthy.get('n_healthy', 0)} held-out healthy subjects vs the effect map): "
        f"Pearson {_fmt(inject_healthy.get('pearson_voxel'))} voxel-wise, "
        f"{_fmt(inject_healthy.get('pearson_region'))} at region scale "
        f"(sigma {info['sigma']}).",
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
    brought = (run / CONTRACT_NAME).is_file()  # a classifier trained elsewhere
    for name, command in ((CLASSIFIER_NAME, f"train-classifier --manifest DATA/manifest.csv "
                                            f"--out {run}` and then `counterwarp fit"),
                          (SIMULATOR_NAME, f"fit --manifest DATA/manifest.csv --run {run}")):
        if not (run / name).is_file() and not (brought and name == CLASSIFIER_NAME):
            raise CounterwarpError(f"--run {run}: no {name}; run `counterwarp {command}` first")


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
    classifier: Any = None,
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
        classifier: a :class:`~counterwarp.workflows.classifier.ClassifierSource`
            (``--classifier``); it must be the one the run's simulator was fitted for.
            Hook-based methods (guided backprop, Grad-CAM) are left out for a TorchScript
            or torch.export classifier, which has no modules to hook.
        seed: seeds torch's RNG for the maps (SmoothGrad noise), so reruns give the same
            numbers; the caller's RNG state is restored afterwards.

    Writes:
        ``OUT/results.csv`` (one row per method x diseased subject, one group row per method,
        and the inject-vs-truth-on-healthy row ``scope=group_healthy``), ``OUT/results.json``
        (everything), ``OUT/results.md`` (tables for a paper) and ``OUT/methods_figure.png``
        (one row per method, one diseased held-out subject, cut at the centre of its brain in
        mm, as its explanation and saliency panels).

    Returns:
        The ``results.json`` payload: ``methods`` (see
        :func:`~counterwarp.stats.benchmark_scores.score_methods`),
        ``inject_vs_truth_healthy``, ``simulator`` (see
        :func:`~counterwarp.explain.assess.simulator_metrics`), settings and the paths
        written.

    Raises:
        CounterwarpError: not a ``synth`` cohort, no classifier / simulator in the run, bad
            method names or occlusion patch, ``out`` an existing file or written by another
            process, a file there with a result's name that no counterwarp command created.
            Nothing is written; a failed write (full disk) takes back what this call wrote.
    """
    data, run, out = Path(data).expanduser(), Path(run).expanduser(), Path(out).expanduser()
    chosen = _chosen_methods(methods)
    if not (math.isfinite(threshold) and threshold >= 0):
        raise CounterwarpError(f"threshold must be a number >= 0, got {threshold!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise CounterwarpError(f"sigma must be a number >= 0 (voxels), got {sigma!r}")
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"--out {out} exists and is not a folder; choose a folder path")
    with writing_folder(out, "benchmark results", hint="move it away, or choose another --out"):
        return _benchmark_into(data, run, out, chosen, occlusion_patch, threshold, sigma,
                               progress, device, seed, classifier)


def _benchmark_into(data: Path, run: Path, out: Path, chosen: list[str], occlusion_patch: int,
                    threshold: float, sigma: float, progress: bool, device: str | None,
                    seed: int, classifier: Any = None) -> dict[str, Any]:
    """The body of :func:`run_benchmark`, run while holding ``out``'s lock and transaction."""
    from counterwarp.data.preprocess import load_volume
    from counterwarp.nn.classifier import last_conv_layer
    from counterwarp.train.common import choose_device
    from counterwarp.workflows.folder import (
        load_images,
        load_run_simulator,
        model_preprocessing,
        model_shape,
        rows_in_split,
    )
    from counterwarp.workflows.saliency import check_occlusion_patch, hookable_methods

    check_cohort(data)
    _validate_run(run)
    simulator, payload = load_run_simulator(run, source=classifier)
    chosen = hookable_methods(chosen, payload, progress)
    shape = model_shape(payload)
    check_occlusion_patch(chosen, occlusion_patch, shape)
    rows = rows_in_split(run, data / MANIFEST_NAME, "test",
                         positive_label=payload.get("positive_label"))
    truth = load_cohort_truth(data, rows, shape)
    images, labels = load_images(rows, shape, progress=False,
                                 preprocessing=model_preprocessing(payload))
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
    inject_healthy = {
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
    _write_csv(out / RESULTS_CSV, scores, label_of, inject_healthy)
    write_text_atomic(
        out / RESULTS_MD, _markdown(scores, sim, inject_healthy, info, sensitivity)
    )
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
        out / METHODS_FIGURE, labels=figure_labels,
        affine=load_volume(rows[shown].path, shape).model_affine,
        title=f"{shown_id} (held out{', diseased' if diseased_ids else ''}): "
              f"true log volume change and each method's map",
    )
    result: dict[str, Any] = {
        **info,
        "methods": {m: json_safe(scores[m]) for m in all_methods},
        "inject_vs_truth_healthy": json_safe(inject_healthy),
        "simulator": json_safe(sim),
        "classifier_region_sensitivity": json_safe(sensitivity),
        "figure_subject": shown_id,
        "unsigned_note": UNSIGNED_NOTE,
        "outputs": list(RESULT_NAMES),
    }
    write_json_atomic(out / RESULTS_JSON, result)
    write_json_atomic(out / PROVENANCE_NAME, record(
        run=relative_to(run, out), data=relative_to(data, out), methods=list(chosen),
        seed=seed, **run_digests(run)))
    return result
