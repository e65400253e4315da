"""``counterwarp prepare``: native T1 scans -> model-ready images in MNI152 space.

For each scan of the input (:func:`counterwarp.prepare.inputs.discover_scans`): load and
check it, reorient to RAS, strip the skull (:mod:`counterwarp.prepare.skullstrip`),
register it affinely to the MNI152 brain (:mod:`counterwarp.prepare.register`), resample
it onto the model grid (:mod:`counterwarp.prepare.grid`) and draw the registration check
(:mod:`counterwarp.prepare.qc`). See docs/prepare.md.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from counterwarp._io import (
    save_nifti_atomic,
    write_json_atomic,
    write_text_atomic,
    writing_folder,
)
from counterwarp._io.provenance import PROVENANCE_NAME, input_digests, package_version, relative_to
from counterwarp._io.provenance import record as provenance_record
from counterwarp.data.manifest import MANIFEST_NAME
from counterwarp.data.preprocess import image_spatial_shape, load_volume
from counterwarp.errors import CounterwarpError
from counterwarp.prepare.grid import MARGIN_MM, ModelGrid, model_grid
from counterwarp.prepare.inputs import Scan, discover_scans, input_kind, participants_without_scans
from counterwarp.prepare.qc import registration_figure
from counterwarp.prepare.register import (
    REGISTRATION_SETTINGS,
    Template,
    load_template,
    register_affine,
    to_template_grid,
    write_transform,
)
from counterwarp.prepare.skullstrip import SkullStripper, dice

#: The settings and timings file of a prepared folder.
PREPARE_JSON = "prepare.json"
#: Output file names of one scan, from its id.
SUFFIXES = {
    "image": "_space-MNI152_desc-preproc_T1w.nii.gz",
    "transform": "_from-T1w_to-MNI152_mode-image_xfm.tfm",
    "mask": "_desc-brain_mask.nii.gz",
    "qc": "_desc-registration_T1w.png",
}
#: Columns prepare adds to the output manifest (after the input's own).
ADDED_COLUMNS = ("native_path", "transform")
FOREIGN_HINT = "move it away, or choose another --out"


def prepare_scans(
    input: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    skull_strip: str = "deepbet",
    shape: Sequence[int] | None = (32, 32, 32),
    voxel_size: float | None = None,
    label_column: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare native T1 scans for the model: skull-strip, register to MNI152, resample.

    Args:
        input: a folder of NIfTI files, a manifest CSV (``path,label,...``; a folder holding
            ``manifest.csv`` too) or a BIDS dataset (``participants.tsv`` +
            ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``).
        out: the output folder (created; an existing one must hold no foreign files with
            the output names).
        skull_strip: ``"deepbet"`` or ``"none"`` (the scans are stripped already).
        shape: model grid ``(X, Y, Z)`` in voxels, or None to derive it from ``voxel_size``.
        voxel_size: isotropic voxel size in mm, or None to derive it from ``shape``; see
            :func:`counterwarp.prepare.grid.model_grid` for the rules.
        label_column: the column holding the label (``participants.tsv`` for BIDS, the
            manifest's for a CSV; default ``label``).
        progress: show a progress bar.

    Writes into ``out`` (``<id>`` = BIDS entities such as ``sub-01_ses-1``, or the file
    stem): ``<id>_space-MNI152_desc-preproc_T1w.nii.gz`` (the model-ready image, float32,
    RAS, zero outside the brain), ``<id>_from-T1w_to-MNI152_mode-image_xfm.tfm`` (ITK affine,
    LPS mm, maps MNI152 points to native points), ``<id>_desc-brain_mask.nii.gz`` (uint8,
    on the native scan's own grid), ``<id>_desc-registration_T1w.png`` (QC),
    ``manifest.csv`` (the input's labels and covariates, ``path`` to the prepared image,
    ``native_path`` and ``transform``, all relative to ``out``), ``prepare.json``
    (settings, per-scan seconds and registration metrics) and ``dataset_description.json``.

    Every scan is found and its header checked before anything is written; any failure
    later removes what this call wrote and restores what it replaced (``out`` is left as
    it was found; a new ``out`` is left absent).

    Returns:
        the ``prepare.json`` payload plus ``"out"`` and ``"manifest"`` (absolute paths).

    Raises:
        CounterwarpError: a missing input or scan (named with its row), a BIDS dataset
            without the label column, a non-3D or unreadable scan, bad ``shape`` /
            ``voxel_size``, deepbet missing, a failed registration.
    """
    stripper = SkullStripper(skull_strip)
    grid = model_grid(shape, voxel_size)
    scans = discover_scans(input, label_column)
    for scan in scans:
        spatial = image_spatial_shape(scan.path)
        if len(spatial) != 3:
            raise CounterwarpError(
                f"{scan.source}: {scan.path} has shape {spatial}; prepare needs 3D T1 scans"
            )
    out_path = Path(out).expanduser()
    if out_path.exists() and not out_path.is_dir():
        raise CounterwarpError(f"--out {out_path} exists and is not a folder; choose a folder")
    source = Path(input).expanduser().resolve()
    if source.is_dir() and out_path.resolve() == source:
        raise CounterwarpError(f"--out {out_path} is the input folder; choose another folder")
    stripper.check_available()
    with writing_folder(out_path, "prepared scans", hint=FOREIGN_HINT):
        return _prepare_into(out_path.resolve(), source, scans, stripper, grid, progress)


def _prepare_into(out: Path, source: Path, scans: list[Scan], stripper: SkullStripper,
                  grid: ModelGrid, progress: bool) -> dict[str, Any]:
    """The body of :func:`prepare_scans`, run while holding ``out``'s lock and transaction."""
    template = load_template()
    records, rows = [], []
    bar = tqdm(scans, desc="prepare", unit="scan", disable=not progress)
    try:
        for scan in bar:
            bar.set_postfix_str(scan.id)
            record = _prepare_one(out, scan, stripper, grid, template)
            records.append(record)
            rows.append(_manifest_row(out, scan))
    except BaseException:
        bar.leave = False  # no half-drawn bar above the one-line error
        raise
    finally:
        bar.close()
    manifest = out / MANIFEST_NAME
    write_text_atomic(manifest, _manifest_text(rows))
    payload = _settings(out, source, stripper, grid)
    payload["scans"] = records
    if payload["input_kind"] == "bids":
        payload["participants_without_t1w"] = participants_without_scans(source, scans)
    write_json_atomic(out / PREPARE_JSON, payload)
    write_json_atomic(out / "dataset_description.json", {
        "Name": "counterwarp prepare", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "counterwarp prepare", "Version": package_version("counterwarp")}],
    })
    write_json_atomic(out / PROVENANCE_NAME, provenance_record(
        skull_strip=stripper.method, inputs_sha256=input_digests([s.path for s in scans], out)))
    return {**payload, "out": str(out), "manifest": str(manifest)}


def _settings(out: Path, source: Path, stripper: SkullStripper, grid: ModelGrid
              ) -> dict[str, Any]:
    return {
        "input": relative_to(source, out),
        "input_kind": input_kind(source),
        "skull_strip": stripper.method,
        "grid": {
            "shape": list(grid.shape), "voxel_size_mm": grid.voxel_size,
            "affine": np.round(grid.affine, 6).tolist(), "orientation": "RAS",
            "margin_mm": MARGIN_MM, "template_brain_inside": round(grid.brain_inside, 4),
        },
        "template": "MNI152 2009 T1 and brain mask shipped in nilearn "
                    "(nilearn.datasets.load_mni152_template / load_mni152_brain_mask), 2 mm",
        "registration": REGISTRATION_SETTINGS,
        "resampling": "linear, after Gaussian smoothing sigma = (grid voxel - native voxel)/2 "
                      "mm; zero outside the brain mask (mask resampled linearly, >= 0.5)",
        "transform_convention": "ITK AffineTransform (.tfm), LPS mm, maps MNI152 points to "
                                "native scan points (resamples native into MNI152)",
        "versions": {name: package_version(name) for name in
                     ("counterwarp", "SimpleITK", "nilearn", "nibabel", "deepbet")},
    }


def _prepare_one(out: Path, scan: Scan, stripper: SkullStripper, grid: ModelGrid,
                 template: Template) -> dict[str, Any]:
    """Prepare one scan; write its image, transform, mask and QC figure; its record."""
    import nibabel as nib

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    loaded = load_volume(scan.path)
    native = nib.Nifti1Image(loaded.data, loaded.affine)
    ras = nib.as_closest_canonical(native)
    lap("load")
    brain, mask = stripper(ras, where=f"{scan.source} ({scan.path.name})")
    lap("skull_strip")
    registration = register_affine(brain, template)
    lap("register")
    image = to_template_grid(brain, registration.transform, grid.shape, grid.affine)
    inside = to_template_grid(_as_float(mask), registration.transform, grid.shape,
                              grid.affine, smooth=False)
    values = np.where(np.asarray(inside.dataobj) >= 0.5, np.asarray(image.dataobj), 0)
    save_nifti_atomic(out / f"{scan.id}{SUFFIXES['image']}",
                      nib.Nifti1Image(values.astype(np.float32), grid.affine))
    write_transform(registration.transform, out / f"{scan.id}{SUFFIXES['transform']}")
    save_nifti_atomic(out / f"{scan.id}{SUFFIXES['mask']}", _on_file_grid(mask, native))
    lap("resample")
    fine = to_template_grid(brain, registration.transform, template.brain.shape,
                            template.brain.affine, smooth=False)
    fine_mask = to_template_grid(_as_float(mask), registration.transform,
                                 template.brain.shape, template.brain.affine, smooth=False)
    overlap = dice(np.asarray(fine_mask.dataobj) >= 0.5, np.asarray(template.mask.dataobj) > 0)
    registration_figure(fine, template.brain, out / f"{scan.id}{SUFFIXES['qc']}",
                        title=f"{scan.id}: MI {registration.metric:.3f}, mask Dice "
                              f"{overlap:.3f}")
    lap("qc")
    zooms = np.linalg.norm(np.asarray(native.affine)[:3, :3], axis=0)
    return {
        "id": scan.id,
        "native_path": _relative(scan.path, out),
        "seconds": {**seconds, "total": round(sum(seconds.values()), 3)},
        "registration": {
            "metric_mattes_mi": registration.metric, "iterations": registration.iterations,
            "stop": registration.stop, "brain_mask_dice_mni152": round(overlap, 4),
        },
        "brain_volume_ml": round(float(np.asarray(mask.dataobj).sum() * np.prod(zooms)) / 1e3,
                                 2),
    }


def _as_float(mask: Any) -> Any:
    import nibabel as nib

    return nib.Nifti1Image(np.asarray(mask.dataobj, dtype=np.float32), mask.affine)


def _on_file_grid(mask: Any, native: Any) -> Any:
    """The RAS-reoriented ``mask`` back in the axis order of the native file (uint8)."""
    import nibabel as nib
    from nibabel import orientations

    back = orientations.ornt_transform(
        orientations.io_orientation(mask.affine), orientations.io_orientation(native.affine)
    )
    values = orientations.apply_orientation(np.asarray(mask.dataobj), back)
    image = nib.Nifti1Image(np.ascontiguousarray(values, dtype=np.uint8), native.affine)
    image.header.set_data_dtype(np.uint8)
    return image


def _relative(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _manifest_row(out: Path, scan: Scan) -> dict[str, str]:
    row = {"path": f"{scan.id}{SUFFIXES['image']}", "label": scan.label,
           "subject": scan.subject or scan.id}
    row.update({k: v for k, v in scan.columns.items()
                if k.lower() not in {"path", "label", "subject", *ADDED_COLUMNS}})
    row["native_path"] = _relative(scan.path, out)
    row["transform"] = f"{scan.id}{SUFFIXES['transform']}"
    return row


def _manifest_text(rows: list[dict[str, str]]) -> str:
    """The output manifest: path,label,subject, the input's other columns, native_path,
    transform (a column missing from a row is left empty)."""
    columns: list[str] = []
    for row in rows:
        columns += [name for name in row if name not in columns and name not in ADDED_COLUMNS]
    columns += list(ADDED_COLUMNS)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
