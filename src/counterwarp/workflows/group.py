"""Group maps of volume change: mean, effect size, voxel-wise one-sample t, FDR mask, a
sign-flip permutation test with family-wise error control, and a region table with
bootstrap intervals.

By default a direction's group holds the subjects whose explanation answers its question
(``inject`` on healthy subjects, ``remove`` on diseased ones) and of those only the valid
explanations (:mod:`counterwarp.explain.validity`), with the counts stated.

The per-subject log volume change maps of one direction must lie in one space, voxel for
voxel. Two sources:

- the run's simulator, applied to the held-out (``split``) images of the run's manifest
  (:mod:`counterwarp.workflows.group_inputs`, which says when those form one space);
- a folder of maps already registered to one space by the user (``maps_dir``), e.g. an
  ``explain`` output folder of template-space images, or maps warped with ANTs / FSL
  (read by :mod:`counterwarp.data.maps`).

Statistics (:mod:`counterwarp.stats.group`) per voxel over the N subjects' maps ``m_i``:
mean, one-sample t ``mean / (sd / sqrt(N))`` (sd with N - 1 degrees of freedom), two-sided
p from Student's t with N - 1 degrees of freedom, and a Benjamini-Hochberg FDR mask at level
``q`` over the brain voxels. The units of the mean are natural-log volume change (growth >
0); figures show percent volume change ``100 * (exp(x) - 1)``. The permutation test and
the bootstrap: :mod:`counterwarp.workflows.group_inference`.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from counterwarp._io import (
    json_safe,
    save_nifti_atomic,
    write_json_atomic,
    write_text_atomic,
    writing_folder,
)
from counterwarp._io.provenance import PROVENANCE_NAME, merged_record, relative_to
from counterwarp.data.maps import load_atlas, load_map_folder, read_atlas_names
from counterwarp.errors import CounterwarpError
from counterwarp.nn.simulator import DIRECTIONS
from counterwarp.stats.group import REGION_COLUMNS, group_statistics, region_table
from counterwarp.workflows.group_inference import group_inference, with_intervals
from counterwarp.workflows.group_inputs import SUBSETS, maps_from_simulator, resolve_subset

__all__ = ["SUBSETS", "group_run"]


# --------------------------------------------------------------------------- figures


def _group_figures(
    out: Path, direction: str, result: dict[str, np.ndarray], anatomy: np.ndarray | None,
    brain: np.ndarray, affine: np.ndarray, n: int, q: float, fwe: np.ndarray | None,
) -> list[Path]:
    """The mean and significance-masked mean figures of one direction (drawn by
    report.figures): masked by the TFCE family-wise error test when it ran (``fwe``), else
    by the FDR mask.

    Both are cut at the centre of the tested brain mask and share one colour limit: the
    98th percentile of ``|mean percent change|`` in the brain (robust to a few voxels).
    """
    from counterwarp.report.figures import (
        percent_volume_change,
        stat_map_figure,
        subject_cut_coords,
        symmetric_limit,
    )

    percent = np.where(brain, percent_volume_change(np.nan_to_num(result["mean"])), 0.0)
    cuts = subject_cut_coords(brain.astype(np.float32), affine)
    limit = symmetric_limit(percent[brain], percentile=98.0) if brain.any() else 1.0
    label = f"mean volume change (%), {direction}\n(limit: 98th pct of |mean|)"
    common = {"anatomy": anatomy, "affine": affine, "brain": brain, "cut_coords": cuts,
              "colorbar_label": label, "limit": limit, "threshold": 0.05 * limit}
    first = stat_map_figure(percent, out / f"group_{direction}_mean.png",
                            title=f"group mean, {direction} (n = {n})", **common)
    shown = result["fdr"] if fwe is None else fwe
    test = f"FDR q = {q:g}" if fwe is None else "FWE p < 0.05 (TFCE, sign flips)"
    n_significant = int(shown.sum())
    title = f"{test}: {n_significant} voxels" if n_significant else f"no voxel survives {test}"
    second = stat_map_figure(percent, out / f"group_{direction}_mean_significant.png",
                             show=shown, title=f"group mean, {direction}, {title}",
                             **common)
    return [first, second]


# --------------------------------------------------------------------------- workflow


def _write_regions_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    columns = [*REGION_COLUMNS, *(k for k in ("percent_ci_low", "percent_ci_high")
                                  if rows and k in rows[0])]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return write_text_atomic(path, buffer.getvalue())


def _readme(direction: str, summary: dict[str, Any]) -> str:
    prefix = f"group_{direction}"
    lines = [
        f"counterwarp group maps, direction {direction!r} "
        f"({'more diseased' if direction == 'inject' else 'healthier'})",
        "",
        f"subjects: {summary['n_subjects']}   source: {summary['source']}",
        *([f"left out: {summary['n_invalid']} of {summary['n_explained']} explanations "
           "were invalid (the logit did not move past the margin, or the warp folds)"]
          if summary.get("n_invalid") and not summary.get("invalid_included") else []),
        f"space: {summary['space']}",
        f"tested: {summary['permutation']['what_is_tested']}",
        *([f"warning: {summary['permutation']['warning']}"]
          if summary["permutation"].get("warning") else []),
        "",
        f"{prefix}_mean.nii.gz      mean log volume change (natural log; growth > 0;",
        "                          percent change = 100 * (exp(value) - 1))",
        f"{prefix}_t.nii.gz         voxel-wise one-sample t (mean / (sd / sqrt(n)), "
        f"{summary['n_subjects'] - 1} dof); 0 where all maps agree (zero spread: "
        f"{summary['n_zero_spread_voxels']} brain voxels, p = 1, never FDR-significant)",
        f"{prefix}_p.nii.gz         two-sided p-values of t",
        f"{prefix}_fdr_mask.nii.gz  1 where Benjamini-Hochberg FDR q = {summary['q']:g} "
        "rejects zero change (tests over brain voxels only)",
        f"{prefix}_brain_mask.nii.gz  voxels tested",
        f"{prefix}_effect_size.nii.gz  Cohen's d = mean / sd over subjects (0 at zero "
        "spread)",
    ]
    if summary["permutation"].get("tested"):
        lines += [
            f"{prefix}_fwe_tfce_logp.nii.gz, {prefix}_fwe_t_logp.nii.gz  -log10 family-wise "
            f"error p of TFCE / max-t ({summary['permutation']['n_permutations']} sign flips)",
            f"{prefix}_fwe_tfce_mask.nii.gz, {prefix}_fwe_t_mask.nii.gz  1 where FWE p < "
            f"{summary['permutation']['alpha']:g}",
        ]
    if summary.get("anatomy"):
        lines.append(f"{prefix}_mean_anatomy.nii.gz  mean z-scored image (figure background)")
    if summary.get("subjects_file"):
        lines.append(f"{prefix}_subjects.nii.gz  per-subject maps stacked along the 4th axis "
                     f"(order: {prefix}_summary.json 'ids')")
    if summary.get("regions"):
        lines.append(f"{prefix}_regions.csv  mean log volume change per atlas region, sorted "
                     "by |effect|, with a 95 % bootstrap interval over subjects of its "
                     "percent change; 'outside' = brain voxels in no region")
    lines += [
        f"{prefix}_mean.png, {prefix}_mean_significant.png  orthogonal views through the centre of "
        "the brain mask (mm), percent volume change over the mean anatomy (L/R/A/P/S/I)",
        "",
        "All NIfTI files carry the affine of the maps they were computed from.",
    ]
    return "\n".join(lines) + "\n"


def group_run(
    run: str | Path | None,
    out: str | Path,
    *,
    direction: str = "inject",
    maps_dir: str | Path | None = None,
    manifest: str | Path | None = None,
    split: str = "test",
    subset: str = "auto",
    valid_only: bool = True,
    atlas: str | Path | None = None,
    atlas_names: str | Path | None = None,
    mask: str | Path | None = None,
    q: float = 0.05,
    permutations: int = 1000,
    seed: int = 0,
    figures: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Group maps of one direction's log volume change; writes NIfTI, CSV, PNG, JSON.

    Args:
        run: run folder with ``classifier.pt``, ``split.json`` and ``simulator.pt`` (unused,
            may be None, when ``maps_dir`` is given).
        out: output folder.
        direction: ``"inject"`` or ``"remove"``.
        maps_dir: folder of per-subject maps already in one space (see
            :func:`load_map_folder`); default: compute them with the run's simulator.
        manifest: manifest to draw images from (default: the one in ``RUN/split.json``).
        split: part(s) of the run's split to use (default ``test``: held-out subjects).
        subset: ``auto`` (default: healthy subjects for ``inject``, diseased ones for
            ``remove``), ``all``, ``healthy`` or ``diseased`` subjects by manifest label
            (simulator maps only).
        valid_only: leave out invalid explanations (the logit did not move past the
            margin, or the warp folds); their number is stated (simulator maps only).
        atlas: integer label image (0 = no region) on the maps' grid (3D atlases on another
            grid are resampled, nearest neighbour). The synthetic cohort's
            ``truth/effect_regions.nii.gz`` works.
        atlas_names: CSV with columns ``label,name`` (e.g. ``truth/effect_regions.csv``).
        mask: brain mask NIfTI on the maps' grid; default: voxels non-zero in at least half
            the images (simulator maps), or voxels where any map is non-zero (``maps_dir``).
        q: false discovery rate of the Benjamini-Hochberg mask.
        permutations: sign flips of the permutation test (family-wise error by max-t and
            by TFCE, :mod:`counterwarp.stats.permutation`) and bootstrap resamples of the
            region intervals; 0 skips both.
        seed: seed of the sign flips and the bootstrap.
        figures: also write the PNG figures.
        progress: show progress bars.

    Writes (``P = OUT/group_<direction>``): ``P_mean.nii.gz``, ``P_t.nii.gz``,
    ``P_p.nii.gz``, ``P_fdr_mask.nii.gz``, ``P_brain_mask.nii.gz``,
    ``P_mean_anatomy.nii.gz`` (simulator maps), ``P_subjects.nii.gz`` (3D maps),
    ``P_effect_size.nii.gz``, ``P_fwe_{tfce,t}_{logp,mask}.nii.gz`` (permutation test),
    ``P_regions.csv`` (with ``atlas``), ``P_mean.png``, ``P_mean_significant.png``,
    ``P_summary.json`` and ``P_README.txt``.

    Returns:
        The summary written to ``P_summary.json``: counts, the space, file paths and (with an
        atlas) the region rows.

    Voxels whose maps all agree (zero spread) get no t (``t = 0``, ``p = 1``), are never
    FDR discoveries, are counted in ``n_zero_spread_voxels`` and reported in one warning
    line on stderr. Writing holds ``out``'s lock (a second writer is refused), refuses to
    replace a file there that no counterwarp command created, and undoes its writes when
    one fails (a full disk).
    """
    if direction not in DIRECTIONS:
        raise CounterwarpError(f"--direction {direction!r}: use inject or remove")
    subset = resolve_subset(subset, direction)
    if not 0 < q < 1:
        raise CounterwarpError(f"--q must be in (0, 1), got {q!r}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"--out {out} exists and is not a folder")
    with writing_folder(out, "group maps", hint="move it away, or choose another --out"):
        return _group_into(
            run, out, direction=direction, maps_dir=maps_dir, manifest=manifest, split=split,
            subset=subset, valid_only=valid_only, atlas=atlas, atlas_names=atlas_names,
            mask=mask, q=q, permutations=permutations, seed=seed, figures=figures,
            progress=progress,
        )


def _group_into(
    run: str | Path | None, out: Path, *, direction: str, maps_dir: str | Path | None,
    manifest: str | Path | None, split: str, subset: str, valid_only: bool,
    atlas: str | Path | None,
    atlas_names: str | Path | None, mask: str | Path | None, q: float, permutations: int,
    seed: int, figures: bool, progress: bool,
) -> dict[str, Any]:
    """The body of :func:`group_run`, run while holding ``out``'s lock and transaction."""
    if maps_dir is not None:
        maps, affine, ids = load_map_folder(maps_dir, direction)
        finite = np.isfinite(maps)
        data: dict[str, Any] = {
            "maps": maps, "affine": affine, "ids": ids, "anatomy": None,
            "brain": np.any(finite & (maps != 0), axis=0),
            "source": f"maps in {Path(maps_dir).expanduser()}",
            "space": "the common space of the given maps (registered by the user)",
        }
    else:
        if run is None:
            raise CounterwarpError("give a run folder (--run) or a folder of maps (--maps)")
        data = maps_from_simulator(Path(run), direction, manifest, split, subset, progress,
                                   valid_only)
    maps, affine = data["maps"], data["affine"]
    spatial = maps.shape[1:]
    brain = np.asarray(data["brain"], bool)
    if mask is not None:
        brain = load_atlas(mask, spatial, affine) > 0
    names = read_atlas_names(atlas_names) if atlas_names is not None else None
    labels = load_atlas(atlas, spatial, affine) if atlas is not None else None
    if not brain.any():
        raise CounterwarpError("the brain mask is empty: no voxel to test")

    result = group_statistics(maps, brain, q)
    n_zero_spread = int(result["zero_spread"][brain].sum())
    if n_zero_spread:
        sys.stderr.write(
            f"counterwarp group: warning: {n_zero_spread} of {int(brain.sum())} brain voxels "
            f"have the same value in all {maps.shape[0]} maps ({direction}); they get no t "
            f"(t = 0, p = 1) and are not tested for FDR\n"
        )
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"group_{direction}"

    def save(suffix: str, array: np.ndarray, dtype: type = np.float32) -> str:
        path = Path(f"{prefix}_{suffix}.nii.gz")
        save_nifti_atomic(path, nib.Nifti1Image(np.asarray(array).astype(dtype), affine))
        return str(path)

    files = {
        "mean": save("mean", np.nan_to_num(result["mean"])),
        "t": save("t", np.nan_to_num(result["t"], posinf=1e6, neginf=-1e6)),
        "p": save("p", result["p"]),
        "fdr_mask": save("fdr_mask", result["fdr"], np.uint8),
        "brain_mask": save("brain_mask", brain, np.uint8),
    }
    permutation, inference_files, fwe = group_inference(
        maps, brain, affine, permutations=permutations, seed=seed, direction=direction,
        save=save)
    files.update(inference_files)
    if data["anatomy"] is not None:
        files["mean_anatomy"] = save("mean_anatomy", data["anatomy"])
    if maps.ndim == 4:
        files["subjects"] = save("subjects", np.moveaxis(maps, 0, -1))
    mean_in_brain = result["mean"][brain]
    summary: dict[str, Any] = {
        "direction": direction,
        "n_subjects": int(maps.shape[0]),
        "ids": list(data["ids"]),
        "subjects": data.get("subset", "given maps"),
        "n_explained": data.get("n_explained"),
        "n_invalid": data.get("n_invalid"),
        "invalid_ids": data.get("invalid_ids", []),
        "invalid_included": data.get("invalid_included"),
        "source": data["source"],
        "space": data["space"],
        "shape": list(spatial),
        "q": q,
        "n_brain_voxels": int(brain.sum()),
        "n_zero_spread_voxels": n_zero_spread,
        "n_fdr_voxels": int(result["fdr"].sum()),
        "n_fdr_voxels_positive": int((result["fdr"] & (result["mean"] > 0)).sum()),
        "n_fdr_voxels_negative": int((result["fdr"] & (result["mean"] < 0)).sum()),
        "mean_abs_log_volume_change_in_brain": float(np.nanmean(np.abs(mean_in_brain))),
        "permutation": permutation,
        "anatomy": data["anatomy"] is not None,
        "subjects_file": "subjects" in files,
        "files": files,
    }
    if labels is not None:
        rows = with_intervals(region_table(maps, labels, names, brain), maps, labels, names,
                              brain, permutations, seed)
        regions_path = Path(f"{prefix}_regions.csv")
        _write_regions_csv(regions_path, rows)
        files["regions"] = str(regions_path)
        summary["regions"] = rows
    if figures:
        pngs = _group_figures(out, direction, result, data["anatomy"], brain, affine,
                              int(maps.shape[0]), q, fwe)
        files["figure_mean"], files["figure_significant"] = (str(p) for p in pngs)
    write_text_atomic(Path(f"{prefix}_README.txt"), _readme(direction, summary))
    files["readme"] = f"{prefix}_README.txt"
    files.update({key: Path(value).name for key, value in files.items()})  # relative to out
    write_json_atomic(Path(f"{prefix}_summary.json"), json_safe(summary))
    from counterwarp.workflows.folder import run_digests

    inputs = {"run": relative_to(run, out)} if run is not None else {
        "maps": relative_to(maps_dir, out)}
    write_json_atomic(out / PROVENANCE_NAME, merged_record(out, f"group {direction}", {
        **inputs, "q": q, "subjects": subset, "n_maps": int(maps.shape[0]),
        **(run_digests(run) if run is not None else {}),
    }))
    return summary
