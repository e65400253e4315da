"""Group maps of volume change: mean, voxel-wise one-sample t, FDR mask, region table.

The per-subject log volume change maps of one direction must lie in one space, voxel for
voxel. Two sources:

- the run's simulator, applied to the held-out (``split``) images of the run's manifest.
  The maps are on the model grid. This is a common space only because the images are
  affinely aligned to one template before counterwarp sees them (the synthetic cohort is
  built in MNI152 template space, so there voxels correspond across subjects); counterwarp
  does not register images, and refuses images whose model grids differ;
- a folder of maps already registered to one space by the user (``maps_dir``), e.g. an
  ``explain`` output folder of template-space images, or maps warped with ANTs / FSL.

Statistics per voxel over the N subjects' maps ``m_i``: mean, one-sample t
``mean / (sd / sqrt(N))`` (sd with N - 1 degrees of freedom), two-sided p from Student's t
with N - 1 degrees of freedom, and a Benjamini-Hochberg FDR mask at level ``q`` over the
brain voxels. The units of the mean are natural-log volume change (growth > 0); figures show
percent volume change ``100 * (exp(x) - 1)``.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from counterwarp._io import save_nifti_atomic, write_json_atomic, write_text_atomic
from counterwarp.errors import CounterwarpError
from counterwarp.stats.scores import region_means

__all__ = [
    "DIRECTIONS",
    "fdr_mask",
    "group_run",
    "group_statistics",
    "load_map_folder",
    "read_atlas_names",
    "region_table",
]

DIRECTIONS = ("inject", "remove")
SUBSETS = ("all", "healthy", "diseased")
REGION_COLUMNS = (
    "label", "name", "mean_log_volume_change", "percent_volume_change", "n_voxels",
    "sd_across_subjects", "t", "p",
)
_AFFINE_TOLERANCE_MM = 1e-3


# --------------------------------------------------------------------------- statistics


def fdr_mask(p_values: np.ndarray, q: float = 0.05, mask: np.ndarray | None = None) -> np.ndarray:
    """Benjamini-Hochberg: which p-values are discoveries at false discovery rate ``q``.

    Args:
        p_values: ``(*S)`` p-values in [0, 1] (non-finite ones are never discoveries).
        q: false discovery rate, in (0, 1).
        mask: ``(*S)`` bool, the voxels tested (default: all); the others are never
            discoveries and do not count as tests.

    Returns:
        ``(*S)`` bool array, True where the BH-adjusted p-value is ``<= q``.
    """
    if not 0 < q < 1:
        raise CounterwarpError(f"q (the false discovery rate) must be in (0, 1), got {q!r}")
    p = np.asarray(p_values, dtype=np.float64)
    tested = np.ones(p.shape, bool) if mask is None else np.asarray(mask, bool).copy()
    tested &= np.isfinite(p)
    out = np.zeros(p.shape, bool)
    if tested.any():
        adjusted = stats.false_discovery_control(np.clip(p[tested], 0.0, 1.0), method="bh")
        out[tested] = adjusted <= q
    return out


def group_statistics(
    maps: np.ndarray, mask: np.ndarray | None = None, q: float = 0.05
) -> dict[str, np.ndarray]:
    """Voxel-wise mean, one-sample t, two-sided p and FDR mask of N maps.

    Args:
        maps: ``(N, *S)`` per-subject maps (N >= 2), e.g. log volume change. Non-finite
            values are treated as missing at that voxel.
        mask: ``(*S)`` bool, the voxels to test (default all); FDR runs over these only.
        q: false discovery rate for the Benjamini-Hochberg mask.

    Returns:
        ``mean``, ``sd`` (N - 1 dof), ``t``, ``p`` (float64 ``(*S)``) and ``fdr`` (bool
        ``(*S)``). Where the t statistic is undefined (fewer than 2 finite values, or zero
        spread and zero mean) ``t = 0`` and ``p = 1``; zero spread with a non-zero mean gives
        ``t = +-inf`` and ``p = 0``. Outside ``mask``, ``t = 0``, ``p = 1``, ``fdr = False``.
    """
    values = np.asarray(maps, dtype=np.float64)
    if values.ndim < 2 or values.shape[0] < 2:
        raise CounterwarpError(
            f"a group analysis needs at least 2 maps, got an array of shape {values.shape}"
        )
    spatial = values.shape[1:]
    tested = np.ones(spatial, bool) if mask is None else np.asarray(mask, bool)
    if tested.shape != spatial:
        raise CounterwarpError(f"mask has shape {tested.shape}, the maps {spatial}")
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    filled = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / np.maximum(count, 1)
        squares = np.where(finite, (values - mean) ** 2, 0.0).sum(axis=0)
        sd = np.sqrt(squares / np.maximum(count - 1, 1))
        t = mean / (sd / np.sqrt(np.maximum(count, 1)))
    zero_spread = ~(sd > 0)
    t = np.where(zero_spread & (mean == 0), 0.0, t)
    t = np.where(zero_spread & (mean != 0), np.copysign(np.inf, mean), t)
    t = np.where(count >= 2, t, 0.0)
    dof = np.maximum(count - 1, 1)
    p = 2.0 * stats.t.sf(np.abs(t), dof)
    p = np.where(count >= 2, p, 1.0)
    t = np.where(tested, t, 0.0)
    p = np.where(tested, p, 1.0)
    mean = np.where(count > 0, mean, np.nan)
    return {"mean": mean, "sd": sd, "t": t, "p": p, "fdr": fdr_mask(p, q, tested)}


def read_atlas_names(path: str | Path) -> dict[int, str]:
    """``label -> name`` from a CSV with (at least) columns ``label,name``."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = set(reader.fieldnames or ())
            if not {"label", "name"} <= fields:
                raise CounterwarpError(
                    f"{path}: an atlas names CSV needs columns 'label,name', found "
                    f"{sorted(fields) or 'no header'}"
                )
            names: dict[int, str] = {}
            for line, row in enumerate(reader, start=2):
                try:
                    names[int(float(row["label"]))] = str(row["name"]).strip()
                except (TypeError, ValueError):
                    raise CounterwarpError(
                        f"{path}, line {line}: label {row['label']!r} is not an integer"
                    ) from None
    except OSError as error:
        raise CounterwarpError(f"cannot read atlas names {path}: {error}") from None
    return names


def region_table(
    maps: np.ndarray,
    labels: np.ndarray,
    names: dict[int, str] | None = None,
    mask: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Mean log volume change per atlas region, with a one-sample t over subjects.

    Args:
        maps: ``(N, *S)`` per-subject log volume change maps.
        labels: ``(*S)`` integer label image, 0 = no region.
        names: label -> region name.
        mask: ``(*S)`` bool brain mask; voxels outside it count in no region (nor in the
            ``outside`` row, which then means "brain voxels outside every region").

    Returns:
        Rows ordered as :func:`counterwarp.stats.scores.region_means` orders them (largest
        ``|mean|`` first, ``outside`` last), each with the keys of :data:`REGION_COLUMNS`:
        the region mean of the group mean map (natural log), its percent volume change, the
        voxel count, and the across-subject sd, t and two-sided p of the subjects' region
        means.
    """
    values = np.asarray(maps, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.shape != values.shape[1:]:
        raise CounterwarpError(
            f"the atlas has shape {labels.shape}, the maps {values.shape[1:]}: give an atlas "
            f"on the maps' grid"
        )
    inside = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-missing voxels give nan
        mean_map = np.where(inside, np.nanmean(values, axis=0), np.nan)
    rows: list[dict[str, Any]] = []
    for entry in region_means(mean_map, labels, names):
        label = int(entry["label"])  # type: ignore[arg-type]
        where = (labels == label) & inside & np.isfinite(mean_map)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_subject = np.array(
                [float(np.nanmean(m[where])) if where.any() else np.nan for m in values]
            )
        per_subject = per_subject[np.isfinite(per_subject)]
        if per_subject.size >= 2:
            sd = float(per_subject.std(ddof=1))
            if sd > 0:
                t = float(per_subject.mean() / (sd / math.sqrt(per_subject.size)))
                p = float(2.0 * stats.t.sf(abs(t), per_subject.size - 1))
            else:
                t, p = float("nan"), float("nan")
        else:
            sd, t, p = float("nan"), float("nan"), float("nan")
        mean = float(entry["mean"])  # type: ignore[arg-type]
        rows.append({
            "label": label,
            "name": entry["name"],
            "mean_log_volume_change": mean,
            "percent_volume_change": 100.0 * math.expm1(mean) if math.isfinite(mean)
            else float("nan"),
            "n_voxels": entry["n_voxels"],
            "sd_across_subjects": sd,
            "t": t,
            "p": p,
        })
    return rows


# --------------------------------------------------------------------------- inputs


def _is_nifti(path: Path) -> bool:
    return path.is_file() and (path.name.endswith(".nii") or path.name.endswith(".nii.gz"))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_map_folder(
    maps_dir: str | Path, direction: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a folder of per-subject maps that are already in one space.

    When the folder holds files named ``*_<direction>_log_volume_change.nii[.gz]`` (as
    ``counterwarp explain`` writes them) only those are read; otherwise every NIfTI file.

    Returns:
        ``(maps (N, *S) float64, affine (4, 4), ids)``, files in sorted order.

    Raises:
        CounterwarpError: no folder, fewer than 2 maps, an unreadable file, or maps whose
            shapes or affines differ (they are then not in one space).
    """
    folder = Path(maps_dir).expanduser()
    if not folder.is_dir():
        raise CounterwarpError(f"--maps {folder}: not a folder of NIfTI maps")
    files = sorted(p for p in folder.iterdir() if _is_nifti(p))
    if direction is not None:
        named = [p for p in files if _stem(p).endswith(f"_{direction}_log_volume_change")]
        if named:
            files = named
    if len(files) < 2:
        raise CounterwarpError(
            f"--maps {folder}: found {len(files)} NIfTI map(s); a group analysis needs at "
            f"least 2"
        )
    arrays: list[np.ndarray] = []
    affine: np.ndarray | None = None
    for path in files:
        try:
            image = nib.load(str(path))
            data = np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float64)
        except Exception as error:  # noqa: BLE001 - any reading failure is a bad file
            raise CounterwarpError(f"{path}: cannot be read as NIfTI ({error})") from None
        while data.ndim > 2 and data.shape[-1] == 1:
            data = data[..., 0]
        if not arrays:
            affine = np.asarray(image.affine, dtype=np.float64)
        else:
            if data.shape != arrays[0].shape:
                raise CounterwarpError(
                    f"--maps: {path.name} has shape {data.shape} but {files[0].name} has "
                    f"{arrays[0].shape}; all maps must be registered to one grid (same shape "
                    f"and affine)"
                )
            if not np.allclose(image.affine, affine, atol=_AFFINE_TOLERANCE_MM):
                raise CounterwarpError(
                    f"--maps: {path.name} has another affine than {files[0].name}; all maps "
                    f"must be registered to one grid (same shape and affine)"
                )
        if data.ndim not in (2, 3):
            raise CounterwarpError(
                f"--maps: {path.name} has shape {data.shape}; expected scalar 2D or 3D maps "
                f"(log volume change), not vector or 4D images"
            )
        arrays.append(data)
    assert affine is not None
    return np.stack(arrays), affine, [_stem(p) for p in files]


def _cohort_space_note(manifest: Path) -> str:
    if (manifest.parent / "cohort.json").is_file():
        return (
            "MNI152 template space: the synthetic cohort is built on the MNI152 template grid, "
            "so voxels correspond across subjects (maps on the classifier's model grid)"
        )
    return (
        "the common model grid of the input images; this is one space only if the images "
        "were affinely registered to one template beforehand (counterwarp does not "
        "register images)"
    )


def _maps_from_simulator(
    run: Path, direction: str, manifest: str | Path | None, split: str, subset: str,
    progress: bool,
) -> dict[str, Any]:
    """Per-subject maps of ``direction`` from the run's simulator, with mean anatomy."""
    import torch

    from counterwarp.data.manifest import image_id
    from counterwarp.data.preprocess import load_model_input
    from counterwarp.workflows.folder import (
        load_run_simulator,
        model_shape,
        read_split,
        rows_in_split,
    )

    split_info = read_split(run)
    if manifest is None:
        recorded = split_info.get("manifest")
        if not recorded:
            raise CounterwarpError(
                f"{run / 'split.json'} names no manifest; pass --manifest M (or --maps DIR)"
            )
        manifest = Path(recorded)
    manifest = Path(manifest)
    simulator, payload = load_run_simulator(run)
    rows = rows_in_split(run, manifest, split, positive_label=payload.get("positive_label"))
    if subset != "all":
        wanted = 0 if subset == "healthy" else 1
        rows = [row for row in rows if int(row.label) == wanted]
    if len(rows) < 2:
        raise CounterwarpError(
            f"group analysis needs at least 2 images; the {split!r} part of the split has "
            f"{len(rows)} ({subset} subjects)"
        )
    shape = model_shape(payload)
    tensors, affines, ids = [], [], []
    for row in tqdm(rows, desc="group: load", disable=not progress):
        tensor, volume = load_model_input(row.path, shape)
        tensors.append(tensor)
        affines.append(volume.model_affine)
        ids.append(image_id(row.path))
    for path_row, affine in zip(rows, affines, strict=True):
        if not np.allclose(affine, affines[0], atol=_AFFINE_TOLERANCE_MM):
            raise CounterwarpError(
                f"{path_row.path} lies on another grid (affine) than {rows[0].path}: the images "
                f"are not in one space. Register them to a template, run `counterwarp "
                f"explain`, and pass the registered maps with --maps DIR"
            )
    images = torch.stack(tensors)  # (N, 1, *S)
    changes = []
    for start in tqdm(range(0, len(rows), 8), desc=f"group: {direction}",
                      disable=not progress):
        explanation = simulator.explain(images[start : start + 8], direction)
        changes.append(explanation.log_volume_change.numpy())
    image_values = images[:, 0].numpy().astype(np.float64)
    return {
        "maps": np.concatenate(changes).astype(np.float64),
        "affine": np.asarray(affines[0], dtype=np.float64),
        "ids": ids,
        "anatomy": image_values.mean(axis=0),
        "brain": (image_values != 0).mean(axis=0) >= 0.5,
        "source": f"simulator of {run} on the {split!r} part of {manifest} ({subset} subjects)",
        "space": _cohort_space_note(manifest),
    }


def _load_atlas(
    atlas: str | Path, shape: tuple[int, ...], affine: np.ndarray
) -> np.ndarray:
    """Integer label image on the maps' grid (3D atlases on another grid: nearest resampling)."""
    path = Path(atlas).expanduser()
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata())
    except Exception as error:  # noqa: BLE001 - any reading failure is a bad file
        raise CounterwarpError(f"--atlas {path}: cannot be read as NIfTI ({error})") from None
    while data.ndim > len(shape) and data.shape[-1] == 1:
        data = data[..., 0]
    same_grid = data.shape == shape and np.allclose(image.affine, affine, atol=1e-3)
    if not same_grid:
        if data.ndim != 3 or len(shape) != 3:
            raise CounterwarpError(
                f"--atlas {path}: shape {data.shape} differs from the maps' {shape}; give a "
                f"label image on the maps' grid"
            )
        from nilearn.image import resample_img

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resampled = resample_img(
                nib.Nifti1Image(data.astype(np.float32), image.affine), target_affine=affine,
                target_shape=shape, interpolation="nearest", force_resample=True,
                copy_header=True,
            )
        data = np.asarray(resampled.get_fdata())
    if not np.all(np.mod(data, 1) == 0):
        raise CounterwarpError(f"--atlas {path}: not a label image (non-integer values)")
    return data.astype(np.int64)


# --------------------------------------------------------------------------- figures


def _ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 3D volume reoriented to RAS voxel order (for drawing), and its new affine."""
    if volume.ndim != 3:
        return volume, affine
    image = nib.as_closest_canonical(nib.Nifti1Image(volume.astype(np.float32), affine))
    return np.asarray(image.dataobj, dtype=np.float64), np.asarray(image.affine)


def _group_figures(
    out: Path, direction: str, result: dict[str, np.ndarray], anatomy: np.ndarray | None,
    brain: np.ndarray, affine: np.ndarray, n: int, q: float,
) -> list[Path]:
    from counterwarp.report.figures import percent_volume_change, stat_map_figure

    percent, ras_affine = _ras(
        np.where(brain, percent_volume_change(np.nan_to_num(result["mean"])), 0.0), affine
    )
    shown, _ = _ras(brain.astype(np.float64), affine)
    significant, _ = _ras(result["fdr"].astype(np.float64), affine)
    background = None if anatomy is None else _ras(anatomy, affine)[0]
    brain_ras = shown > 0.5
    limit = None
    if brain_ras.any():
        from counterwarp.report.figures import symmetric_limit

        limit = symmetric_limit(percent[brain_ras], percentile=98.0)  # robust to a few voxels
    label = f"mean volume change (%), {direction}"
    first = stat_map_figure(
        percent, out / f"group_{direction}_mean.png", anatomy=background, affine=ras_affine,
        colorbar_label=label, show=brain_ras, limit=limit,
        threshold=0.05 * (limit or 0.0), title=f"group mean, {direction} (n = {n})",
    )
    n_significant = int(result["fdr"].sum())
    fdr_title = (
        f"FDR q = {q:g}: {n_significant} voxels" if n_significant
        else f"no voxel survives FDR q = {q:g}"
    )
    second = stat_map_figure(
        percent, out / f"group_{direction}_mean_fdr.png", anatomy=background,
        affine=ras_affine, colorbar_label=label, show=significant > 0.5, limit=limit,
        threshold=0.05 * (limit or 0.0),
        point=None if n_significant else tuple(int(s) // 2 for s in percent.shape),
        title=f"group mean, {direction}, {fdr_title}",
    )
    return [first, second]


# --------------------------------------------------------------------------- workflow


def _write_regions_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REGION_COLUMNS, lineterminator="\n")
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
        f"space: {summary['space']}",
        "",
        f"{prefix}_mean.nii.gz      mean log volume change (natural log; growth > 0;",
        "                          percent change = 100 * (exp(value) - 1))",
        f"{prefix}_t.nii.gz         voxel-wise one-sample t (mean / (sd / sqrt(n)), "
        f"{summary['n_subjects'] - 1} dof)",
        f"{prefix}_p.nii.gz         two-sided p-values of t",
        f"{prefix}_fdr_mask.nii.gz  1 where Benjamini-Hochberg FDR q = {summary['q']:g} "
        "rejects zero change (tests over brain voxels only)",
        f"{prefix}_brain_mask.nii.gz  voxels tested",
    ]
    if summary.get("anatomy"):
        lines.append(f"{prefix}_mean_anatomy.nii.gz  mean z-scored image (figure background)")
    if summary.get("subjects_file"):
        lines.append(f"{prefix}_subjects.nii.gz  per-subject maps stacked along the 4th axis "
                     f"(order: {prefix}_summary.json 'ids')")
    if summary.get("regions"):
        lines.append(f"{prefix}_regions.csv  mean log volume change per atlas region, sorted "
                     "by |effect|; 'outside' = brain voxels in no region")
    lines += [
        f"{prefix}_mean.png, {prefix}_mean_fdr.png  orthogonal views through the strongest "
        "effect, percent volume change over the mean anatomy (L/R marked)",
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
    subset: str = "all",
    atlas: str | Path | None = None,
    atlas_names: str | Path | None = None,
    mask: str | Path | None = None,
    q: float = 0.05,
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
        subset: ``all``, ``healthy`` or ``diseased`` subjects by manifest label (simulator
            maps only).
        atlas: integer label image (0 = no region) on the maps' grid (3D atlases on another
            grid are resampled, nearest neighbour). The synthetic cohort's
            ``truth/effect_regions.nii.gz`` works.
        atlas_names: CSV with columns ``label,name`` (e.g. ``truth/effect_regions.csv``).
        mask: brain mask NIfTI on the maps' grid; default: voxels non-zero in at least half
            the images (simulator maps), or voxels where any map is non-zero (``maps_dir``).
        q: false discovery rate of the Benjamini-Hochberg mask.
        figures: also write the PNG figures.
        progress: show progress bars.

    Writes (``P = OUT/group_<direction>``): ``P_mean.nii.gz``, ``P_t.nii.gz``,
    ``P_p.nii.gz``, ``P_fdr_mask.nii.gz``, ``P_brain_mask.nii.gz``,
    ``P_mean_anatomy.nii.gz`` (simulator maps), ``P_subjects.nii.gz`` (3D maps),
    ``P_regions.csv`` (with ``atlas``), ``P_mean.png``, ``P_mean_fdr.png``,
    ``P_summary.json`` and ``P_README.txt``.

    Returns:
        The summary written to ``P_summary.json``: counts, the space, file paths and (with an
        atlas) the region rows.
    """
    if direction not in DIRECTIONS:
        raise CounterwarpError(f"--direction {direction!r}: use inject or remove")
    if subset not in SUBSETS:
        raise CounterwarpError(f"subset {subset!r}: use one of {', '.join(SUBSETS)}")
    if not 0 < q < 1:
        raise CounterwarpError(f"--q must be in (0, 1), got {q!r}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"--out {out} exists and is not a folder")
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
        data = _maps_from_simulator(Path(run), direction, manifest, split, subset, progress)
    maps, affine = data["maps"], data["affine"]
    spatial = maps.shape[1:]
    brain = np.asarray(data["brain"], bool)
    if mask is not None:
        brain = _load_atlas(mask, spatial, affine) > 0
    names = read_atlas_names(atlas_names) if atlas_names is not None else None
    labels = _load_atlas(atlas, spatial, affine) if atlas is not None else None
    if not brain.any():
        raise CounterwarpError("the brain mask is empty: no voxel to test")

    result = group_statistics(maps, brain, q)
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
    if data["anatomy"] is not None:
        files["mean_anatomy"] = save("mean_anatomy", data["anatomy"])
    if maps.ndim == 4:
        files["subjects"] = save("subjects", np.moveaxis(maps, 0, -1))
    mean_in_brain = result["mean"][brain]
    summary: dict[str, Any] = {
        "direction": direction,
        "n_subjects": int(maps.shape[0]),
        "ids": list(data["ids"]),
        "source": data["source"],
        "space": data["space"],
        "shape": list(spatial),
        "q": q,
        "n_brain_voxels": int(brain.sum()),
        "n_fdr_voxels": int(result["fdr"].sum()),
        "n_fdr_voxels_positive": int((result["fdr"] & (result["mean"] > 0)).sum()),
        "n_fdr_voxels_negative": int((result["fdr"] & (result["mean"] < 0)).sum()),
        "mean_abs_log_volume_change_in_brain": float(np.nanmean(np.abs(mean_in_brain))),
        "anatomy": data["anatomy"] is not None,
        "subjects_file": "subjects" in files,
        "files": files,
    }
    if labels is not None:
        rows = region_table(maps, labels, names, brain)
        regions_path = Path(f"{prefix}_regions.csv")
        _write_regions_csv(regions_path, rows)
        files["regions"] = str(regions_path)
        summary["regions"] = rows
    if figures:
        pngs = _group_figures(out, direction, result, data["anatomy"], brain, affine,
                              int(maps.shape[0]), q)
        files["figure_mean"], files["figure_fdr"] = (str(p) for p in pngs)
    write_text_atomic(Path(f"{prefix}_README.txt"), _readme(direction, summary))
    files["readme"] = f"{prefix}_README.txt"
    write_json_atomic(Path(f"{prefix}_summary.json"), _jsonable(summary))
    return summary


def _jsonable(value: Any) -> Any:
    """A copy of ``value`` that strict JSON accepts: non-finite floats become None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value
