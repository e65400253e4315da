"""``counterwarp fit --ensemble K`` / ``counterwarp ensemble``: how much a map depends on
the simulator's seed.

The run's simulator is member 0; members 1 .. K-1 are fitted for the same classifier on
the same training images with seeds ``seed + 1`` ... (saved as ``member-seed<S>.pt``). For
each direction, every member's group map is the mean log volume change of the valid
explanations of the direction's own held-out subjects (inject on healthy, remove on
diseased). Written per direction (``P = OUT/ensemble_<direction>``):

- ``P_mean.nii.gz``: the mean of the members' group maps (natural log, growth > 0);
- ``P_spread.nii.gz``: their voxel-wise standard deviation across members (ddof 1);
- ``P_regions.csv`` (with an atlas): per region the members' mean percent change, its
  sd and min / max over members;
- ``P_mean.png``, ``P_spread.png``;

and ``ensemble.json`` / ``ensemble.md`` with the seed-to-seed agreement: the Pearson
correlation of every pair of members' group maps within the brain.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from counterwarp._io import (
    json_safe,
    save_nifti_atomic,
    write_json_atomic,
    write_text_atomic,
    writing_folder,
)
from counterwarp._io.provenance import PROVENANCE_NAME, record, relative_to
from counterwarp.errors import CounterwarpError
from counterwarp.explain.assess import explain_in_batches
from counterwarp.explain.simulator import Simulator
from counterwarp.explain.validity import GROUP_SUBJECTS
from counterwarp.stats.scores import pearson, region_means

__all__ = ["ENSEMBLE_FOLDER", "REGION_COLUMNS", "ensemble_run"]

ENSEMBLE_FOLDER = "ensemble"
REGION_COLUMNS = ("label", "name", "percent_mean", "percent_sd", "percent_min",
                  "percent_max", "n_voxels")


def _percent(value: float) -> float:
    return 100.0 * math.expm1(value) if math.isfinite(value) else float("nan")


def _group_map(member: Simulator, images: torch.Tensor, direction: str) -> tuple[
        np.ndarray, int]:
    """(*S) mean log volume change of the valid explanations (all when fewer than 2 are
    valid) and the number of valid ones."""
    explanation = explain_in_batches(member, images, direction)
    valid = explanation.valid.numpy()
    changes = explanation.log_volume_change.numpy().astype(np.float64)
    chosen = changes[valid] if valid.sum() >= 2 else changes
    return chosen.mean(axis=0), int(valid.sum())


def ensemble_run(
    run: str | Path, out: str | Path | None = None, *, members: int = 3,
    manifest: str | Path | None = None, split: str = "test", steps: int | None = None,
    atlas: str | Path | None = None, atlas_names: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit ``members - 1`` more simulators and write the ensemble's maps and agreement.

    Args:
        run: a fitted run folder (its simulator is member 0).
        out: output folder (default ``RUN/ensemble``).
        members: ensemble size K (>= 2).
        manifest: images (default: the manifest in ``RUN/split.json``).
        split: held-out part whose subjects are mapped.
        steps: training steps of the new members (default: the run's).
        atlas, atlas_names: label image and names for the region table (default: the
            synthetic cohort's effect regions when the manifest's folder has them).

    Returns:
        ``ensemble.json``'s content.
    """
    from counterwarp.data.maps import load_atlas, read_atlas_names
    from counterwarp.data.preprocess import load_model_input
    from counterwarp.data.truth import REGIONS_NAME, REGIONS_TABLE_NAME, TRUTH_DIR
    from counterwarp.workflows.folder import (
        load_images,
        load_run_simulator,
        model_preprocessing,
        model_shape,
        read_split,
        rows_in_split,
    )

    if members < 2:
        raise CounterwarpError(f"--ensemble must be at least 2 members, got {members}")
    run = Path(run).expanduser()
    out = Path(out).expanduser() if out is not None else run / ENSEMBLE_FOLDER
    base, payload = load_run_simulator(run)
    manifest = Path(manifest) if manifest else Path(read_split(run).get("manifest") or "")
    if not manifest.name:
        raise CounterwarpError(f"{run}/split.json names no manifest; pass --manifest M")
    positive = payload.get("positive_label")
    shape, prep = model_shape(payload), model_preprocessing(payload)
    rows = rows_in_split(run, manifest, split, positive_label=positive)
    images, labels = load_images(rows, shape, progress=False, preprocessing=prep)
    affine = np.asarray(load_model_input(rows[0].path, shape, prep)[1].model_affine)
    train, _ = load_images(rows_in_split(run, manifest, "train+val", positive_label=positive),
                           shape, progress=False, preprocessing=prep)
    cohort_atlas = manifest.parent / TRUTH_DIR / REGIONS_NAME
    if atlas is None and cohort_atlas.is_file():
        atlas, atlas_names = cohort_atlas, manifest.parent / TRUTH_DIR / REGIONS_TABLE_NAME
    labels_map = load_atlas(atlas, shape, affine) if atlas is not None else None
    names = read_atlas_names(atlas_names) if atlas_names and Path(atlas_names).is_file() \
        else None
    brain = (images[:, 0].numpy() != 0).mean(0) >= 0.5
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"--out {out} exists and is not a folder")
    with writing_folder(out, "an ensemble", hint="move it away, or choose another --out"):
        out.mkdir(parents=True, exist_ok=True)
        seeds = [base.config.seed + k for k in range(members)]
        fitted = [base]
        for seed in tqdm(seeds[1:], desc="ensemble: members", disable=not progress):
            settings = {**base.config.to_dict(), "seed": seed,
                        **({"steps": steps} if steps else {})}
            member = Simulator(**settings).fit(base.classifier_, train, progress=progress)
            member.save(out / f"member-seed{seed}.pt")
            fitted.append(member)
        result: dict[str, Any] = {"run": str(run), "members": members, "seeds": seeds,
                                  "split": split, "directions": {}}
        for direction, group in GROUP_SUBJECTS.items():
            chosen = images[labels.numpy() == (0 if group == "healthy" else 1)]
            if len(chosen) < 2:
                continue
            maps, valid = zip(*(_group_map(m, chosen, direction) for m in fitted),
                              strict=True)
            result["directions"][direction] = _write_direction(
                out, direction, np.stack(maps), list(valid), len(chosen), group, brain,
                affine, images[:, 0].numpy().mean(0), labels_map, names)
        write_text_atomic(out / "ensemble.md", _markdown(result))
        write_json_atomic(out / "ensemble.json", json_safe(result))
        write_json_atomic(out / PROVENANCE_NAME, record(run=relative_to(run, out),
                                                        seeds=seeds))
    return result


def _write_direction(
    out: Path, direction: str, maps: np.ndarray, valid: list[int], n: int, group: str,
    brain: np.ndarray, affine: np.ndarray, anatomy: np.ndarray,
    labels_map: np.ndarray | None, names: dict[int, str] | None,
) -> dict[str, Any]:
    """One direction's maps, region table and figures; its part of ``ensemble.json``."""
    from counterwarp.report.figures import percent_volume_change, stat_map_figure

    prefix = f"ensemble_{direction}"
    mean, spread = maps.mean(0), maps.std(0, ddof=1)
    for name, values in (("mean", mean), ("spread", spread)):
        save_nifti_atomic(out / f"{prefix}_{name}.nii.gz",
                          nib.Nifti1Image(np.where(brain, values, 0).astype(np.float32), affine))
    pairs = [pearson(maps[i], maps[j], brain)
             for i, j in itertools.combinations(range(len(maps)), 2)]
    part: dict[str, Any] = {
        "subjects": group, "n_subjects": n, "n_valid_per_member": valid,
        "agreement_pairs": pairs, "agreement_mean": float(np.mean(pairs)),
        "agreement_min": float(np.min(pairs)),
        "mean_spread_in_brain": float(spread[brain].mean()),
    }
    if maps.ndim == 4:
        percent = np.where(brain, percent_volume_change(mean), 0.0)
        limit = float(np.percentile(np.abs(percent[brain]), 98)) or 1.0
        stat_map_figure(percent, out / f"{prefix}_mean.png", anatomy=anatomy, affine=affine,
                        brain=brain, limit=limit, threshold=0.05 * limit,
                        title=f"ensemble mean, {direction} ({len(maps)} seeds)")
        spread_percent = np.where(brain, 100.0 * spread, 0.0)
        stat_map_figure(spread_percent, out / f"{prefix}_spread.png", anatomy=anatomy,
                        affine=affine, brain=brain,
                        colorbar_label="sd across seeds (% of volume, approx.)",
                        title=f"spread across seeds, {direction}")
    if labels_map is not None:
        per_member = [{int(r["label"]): r for r in region_means(np.where(brain, m, np.nan),
                                                                 labels_map, names)}
                      for m in maps]
        rows = []
        for label, first in per_member[0].items():
            values = np.array([_percent(float(p[label]["mean"])) for p in per_member])
            rows.append({"label": label, "name": first["name"],
                         "percent_mean": float(values.mean()),
                         "percent_sd": float(values.std(ddof=1)),
                         "percent_min": float(values.min()),
                         "percent_max": float(values.max()), "n_voxels": first["n_voxels"]})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=REGION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})
        write_text_atomic(out / f"{prefix}_regions.csv", buffer.getvalue())
        part["regions"] = rows
    return part


def _markdown(result: dict[str, Any]) -> str:
    from counterwarp.stats.benchmark_scores import format_number as f

    lines = ["# Ensemble over simulator seeds", "",
             f"{result['members']} simulators (seeds {result['seeds']}) for the classifier "
             f"of `{result['run']}`; group maps of valid explanations of held-out subjects.",
             "", "| direction | subjects | valid per member | seed-to-seed agreement, mean "
             "(min) | mean spread (log) |", "|---|---|---|---|---|"]
    for direction, part in result["directions"].items():
        lines.append(f"| {direction} | {part['n_subjects']} {part['subjects']} | "
                     f"{part['n_valid_per_member']} | {f(part['agreement_mean'])} "
                     f"({f(part['agreement_min'])}) | {f(part['mean_spread_in_brain'])} |")
    for direction, part in result["directions"].items():
        if part.get("regions"):
            lines += ["", f"## Regions, {direction} (percent volume change over seeds)", "",
                      "| region | mean | sd | min | max |", "|---|---|---|---|---|"]
            lines += [f"| {r['name']} | {f(r['percent_mean'], 1)} | {f(r['percent_sd'], 1)} "
                      f"| {f(r['percent_min'], 1)} | {f(r['percent_max'], 1)} |"
                      for r in part["regions"]]
    return "\n".join(lines) + "\n"
