"""``counterwarp explain``: the run's simulator applied to images, maps written to a folder.

Each function reads what earlier commands wrote into the run folder, does one job, writes
its outputs atomically and returns a summary the CLI prints.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from counterwarp import __version__
from counterwarp._io import (
    ForeignFileError,
    save_nifti_atomic,
    shard_tag,
    write_json_atomic,
    write_text_atomic,
    writing_folder,
)
from counterwarp.data.derivatives import (
    DATASET_DESCRIPTION_NAME,
    dataset_description,
    output_name,
    unique_output_ids,
)
from counterwarp.data.preprocess import (
    LoadedVolume,
    read_input_voxels,
    resolve_image_path,
    restore_to_input,
)
from counterwarp.data.stream import (
    Shard,
    check_headers,
    check_workers,
    parse_shard,
    shard_positions,
    stopped_early,
    stream_images,
    table_name,
)
from counterwarp.errors import CounterwarpError
from counterwarp.explain.simulator import Explanation
from counterwarp.explain.validity import invalid_reason
from counterwarp.geometry.itk_field import (
    itk_field_image,
    pull_back_linear,
    ras_to_lps,
    voxel_offsets,
    world_displacement,
)
from counterwarp.report.figures import explanation_panel
from counterwarp.workflows.classifier import ClassifierSource
from counterwarp.workflows.folder import (
    EXPLAIN_SUMMARY_NAME,
    load_run_simulator,
    model_preprocessing,
    model_shape,
    rows_in_split,
)

if TYPE_CHECKING:
    import nibabel as nib

SUMMARY_COLUMNS = (
    "id", "path", "label", "direction", "logit_before", "logit_after", "probability_before",
    "probability_after", "logit_shift", "margin", "moved_by_margin", "prediction_flipped",
    "folding_share", "valid", "invalid_reason", "mean_abs_log_volume_change",
)


@dataclass
class ExplainInput:
    """One image to explain: where it came from and its label if known."""

    path: Path
    label: int | None
    native: tuple[Path, Path] | None = None  # (native scan, .tfm) of a prepared image


def explain_inputs(
    run: Path, manifest: str | Path | None, split: str, images: list[str | Path] | None,
    positive_label: str | None, native: bool = False,
) -> list[ExplainInput]:
    """The images to explain; with ``native``, each with the native scan and transform its
    prepared manifest row names (:func:`~counterwarp.workflows.native.native_pair`)."""
    from counterwarp.data.manifest import resolve_manifest_path
    from counterwarp.workflows.native import native_pair

    if manifest is not None and images:
        raise CounterwarpError("give either --manifest or image files, not both")
    if native and manifest is None:
        raise CounterwarpError("--native needs --manifest: the manifest.csv that "
                               "`counterwarp prepare` wrote")
    if manifest is not None:
        rows = rows_in_split(run, manifest, split, positive_label=positive_label)
        folder = resolve_manifest_path(manifest).parent
        return [ExplainInput(row.path, row.label, native_pair(
            row.extras, folder, f"{manifest} line {row.line}") if native else None)
            for row in rows]
    if not images:
        raise CounterwarpError("nothing to explain: give --manifest M or one or more images")
    return [ExplainInput(resolve_image_path(p), None) for p in images]


def unique_ids(inputs: list[ExplainInput]) -> list[str]:
    """The output ``<id>`` of each input (:func:`~counterwarp.data.derivatives.
    unique_output_ids`): its image id minus a BIDS suffix, unique (also case-blind)."""
    return unique_output_ids([item.path for item in inputs])


def shard_inputs(
    inputs: list[ExplainInput], shard: Shard | None, shape: tuple[int, ...]
) -> tuple[list[ExplainInput], list[str]]:
    """The inputs of ``shard`` and their ids, after a cheap check of their headers.

    Ids are made unique over ALL inputs first, so shards sharing an output folder never
    write the same file and together write exactly what an unsharded run writes.
    """
    ids = unique_ids(inputs)
    positions = shard_positions(len(inputs), shard)
    mine = [inputs[p] for p in positions]
    check_headers([item.path for item in mine], shape)
    return mine, [ids[p] for p in positions]


def explain_run(
    run: str | Path,
    out: str | Path,
    *,
    manifest: str | Path | None = None,
    split: str = "test",
    images: list[str | Path] | None = None,
    direction: str = "both",
    panels: bool = True,
    progression: int = 0,
    progress: bool = True,
    shard: str | Shard | None = None,
    workers: int = 0,
    classifier: ClassifierSource | None = None,
    native: bool = False,
) -> list[dict[str, Any]]:
    """Explain images with the run's simulator; write NIfTI maps, PNG panels, summary.csv.

    ``native`` (``--native``, a manifest written by ``counterwarp prepare``): also write
    every map in the subject's native scan space (:mod:`counterwarp.workflows.native`).

    ``classifier`` (``--classifier``) must be the classifier the run's simulator was
    fitted for; by default the run's own is used.

    Per image and direction (names from :mod:`counterwarp.data.derivatives`), all NIfTI
    files on the input's grid with the input's affine (see :func:`input_grid_maps`):
    ``<id>_desc-<direction>_simulated.nii.gz`` (the input warped, its own intensities),
    ``<id>_desc-<direction>_logjac.nii.gz`` (log volume change, 0 outside the brain),
    ``<id>_desc-<direction>_xfm.nii.gz`` (ITK / ANTs displacement field, LPS mm) and the
    figure ``<id>_desc-<direction>_panel.png``; with ``progression=N`` (velocity-field
    simulators) also ``<id>_desc-<direction>_progression.gif``. ``out``
    also gets a BIDS ``dataset_description.json``.

    Images are read one at a time through a DataLoader (``workers`` background processes
    read ahead; see :mod:`counterwarp.data.stream`). ``shard="i/n"`` explains only inputs
    ``i, i+n, i+2n, ...`` and writes ``summary.shard-<i>-of-<n>.csv`` instead of
    ``summary.csv``, so the shards of an array job can share ``out``. Every setting, the
    run and every input's header are checked before anything is written (an ``out`` that
    did not exist is left absent); an image whose voxel data turn out unusable stops the
    run when it is reached, keeping the outputs of the images before it.

    Writing holds the lock of ``out`` (each shard its own, see
    :func:`~counterwarp._io.folder_lock`): a second writer is refused. A file in ``out``
    with the name of an output that no counterwarp command created there is refused, never
    replaced (re-running into an earlier ``out`` is fine). Any other failure while writing
    (a full disk) removes what this call wrote and restores what it replaced.
    """
    shard = parse_shard(shard)
    check_workers(workers)
    run, out = Path(run), Path(out)
    if out.exists() and not out.is_dir():
        raise CounterwarpError(f"--out {out} exists and is not a folder; choose a folder path")
    directions = ("remove", "inject") if direction == "both" else (direction,)
    if any(d not in ("remove", "inject") for d in directions):
        raise CounterwarpError(f"--direction {direction!r}: use remove, inject or both")
    with writing_folder(out, "explanations", tag=shard_tag(shard), hint=FOREIGN_HINT) as held:
        return _explain_into(
            held, run, out, manifest=manifest, split=split, images=images,
            directions=directions, panels=panels, progression=progression, progress=progress,
            shard=shard, workers=workers, classifier=classifier, native=native,
        )


#: How a refusal to replace a file counterwarp did not write ends.
FOREIGN_HINT = "move it away, or choose another --out"


def _explain_into(
    transaction: Any, run: Path, out: Path, *, manifest: str | Path | None, split: str,
    images: list[str | Path] | None, directions: tuple[str, ...], panels: bool,
    progression: int, progress: bool, shard: Shard | None, workers: int,
    classifier: ClassifierSource | None = None, native: bool = False,
) -> list[dict[str, Any]]:
    """The body of :func:`explain_run`, run while holding ``out``'s lock and transaction."""
    from counterwarp.explain.progression import check_progression_supported
    from counterwarp.workflows.progression import write_progression

    simulator, payload = load_run_simulator(run, source=classifier)
    if progression:
        check_progression_supported(simulator, progression)
    shape = model_shape(payload)
    inputs = explain_inputs(run, manifest, split, images, payload.get("positive_label"),
                            native)
    mine, ids = shard_inputs(inputs, shard, shape)
    table = table_name(EXPLAIN_SUMMARY_NAME, shard)
    summary: list[dict[str, Any]] = []
    done = 0
    bar = tqdm(total=len(mine) * len(directions), desc="explain", disable=not progress)
    try:
        for k, tensor, volume in stream_images([item.path for item in mine], shape, workers,
                                              model_preprocessing(payload)):
            native = read_input_voxels(volume)  # the file's own voxels, for both directions
            if not done:  # once the first image has loaded
                out.mkdir(parents=True, exist_ok=True)
                write_json_atomic(out / DATASET_DESCRIPTION_NAME,
                                  dataset_description(__version__))
            explanations = simulator.explain_directions(tensor.unsqueeze(0), directions)
            for name, explanation in explanations.items():
                summary.append(
                    _write_explanation(out, ids[k], mine[k], volume, explanation, panels,
                                       payload.get("contract"), native)
                )
                if progression:
                    write_progression(out, ids[k], simulator, tensor, name, progression,
                                      affine=volume.model_affine)
                bar.update()
            done += 1
    except ForeignFileError:
        bar.leave = False
        raise  # nothing kept: the transaction takes back this call's files
    except CounterwarpError as error:
        bar.leave = False  # no half-drawn bar above the one-line error
        if done:
            transaction.keep()  # the finished images' outputs stay, as the message says
        raise stopped_early(error, done, out, table) from None
    finally:
        bar.close()
    write_summary_csv(out / table, summary)
    from counterwarp.workflows.folder import write_provenance  # the digests of what was used

    write_provenance(out, simulator, [item.path for item in mine], shard)
    return summary


def _write_explanation(
    out: Path, image_id_: str, item: ExplainInput, volume: LoadedVolume,
    explanation: Explanation, panel: bool, contract: dict[str, Any] | None = None,
    native: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write one explanation's maps and panel; its row of ``summary.csv``. A regression
    contract's score is a prediction in its unit: no probability, no flipped prediction.
    ``native``: the input file's voxels (:func:`read_input_voxels`), if already read."""
    regression = (contract or {}).get("output") == "regression"
    score = "prediction" if regression else "logit"
    unit = f" {contract['unit']}" if regression and contract.get("unit") else ""
    direction = explanation.direction
    change = explanation.log_volume_change[0].numpy()
    maps = input_grid_maps(volume, explanation.displacement[0].numpy(), change, native)
    for kind, image in (("simulated", maps.simulated), ("logjac", maps.log_volume_change),
                        ("xfm", maps.field)):
        save_nifti_atomic(out / output_name(image_id_, direction, kind), image)
    if item.native is not None:
        from counterwarp.workflows.native import write_native_outputs

        write_native_outputs(out, image_id_, direction, maps, item.path, *item.native)
    moved, folding = bool(explanation.moved[0]), float(explanation.folding[0])
    reason = invalid_reason(moved, folding)
    if panel:
        explanation_panel(
            explanation.image[0, 0].numpy(), explanation.simulated[0, 0].numpy(), change,
            out / output_name(image_id_, direction, "panel"),
            title=f"{image_id_}: {explanation.direction} "
                  f"({score} {float(explanation.logit_before[0]):+.2f} -> "
                  f"{float(explanation.logit_after[0]):+.2f}{unit})",
            affine=volume.model_affine,
            invalid=reason,
        )
    before, after = float(explanation.logit_before[0]), float(explanation.logit_after[0])
    brain = explanation.image[0, 0].numpy() != 0
    probability = (lambda value: float(torch.sigmoid(torch.tensor(value)))) if not regression \
        else (lambda value: "")
    return {
        "id": image_id_,
        "path": str(item.path),
        "label": "" if item.label is None else item.label,
        "direction": explanation.direction,
        "logit_before": before,
        "logit_after": after,
        "probability_before": probability(before),
        "probability_after": probability(after),
        "logit_shift": after - before,
        "margin": explanation.margin,
        "moved_by_margin": moved,
        "prediction_flipped": "" if regression else (before > 0) != (after > 0),
        "folding_share": folding,
        "valid": not reason,
        "invalid_reason": reason,
        "mean_abs_log_volume_change": float(np.abs(change[brain]).mean()) if brain.any()
        else 0.0,
    }


@dataclass
class InputGridMaps:
    """One explanation's NIfTI images on the input file's grid, with the input's affine.

    Attributes:
        simulated: the input at its own intensities, warped by ``field`` with linear
            interpolation (exactly ``sitk.Resample(input, DisplacementFieldTransform)``),
            float32 of the file's shape.
        log_volume_change: log volume change of the anatomy (growth > 0), 0 outside the
            brain (the input's non-zero voxels), float32 of the file's shape.
        field: the pull-back displacement as an ANTs-style warp: LPS mm, intent 1007,
            ``(X, Y, Z, 1, 3)`` (2D images ``(X, Y, 1, 1, 2)``).
    """

    simulated: nib.Nifti1Image
    log_volume_change: nib.Nifti1Image
    field: nib.Nifti1Image


def input_grid_maps(
    volume: LoadedVolume, displacement: np.ndarray, change: np.ndarray,
    native: np.ndarray | None = None,
) -> InputGridMaps:
    """The simulator's model-grid outputs brought onto the input's grid.

    Args:
        volume: the :class:`LoadedVolume` the model input came from.
        displacement: ``(d, *S)`` pull-back displacement in model voxels on the model grid
            (channel ``i`` along model axis ``i``): ``y(p) = x(p + u(p))``.
        change: ``(*S)`` log volume change on the model grid.
        native: ``(*volume.native_shape)`` the input file's voxels as stored
            (:func:`~counterwarp.data.preprocess.read_input_voxels`); read when None.

    The field is resampled linearly to the input's grid (still in model voxels), turned
    into world millimetres with the model grid's affine and flipped from RAS to LPS (kept
    outside the brain too, where it pulls background in as the brain grows); the simulated
    image is the input pulled back by exactly the float32 vectors written
    (:func:`~counterwarp.geometry.itk_field.pull_back_linear`).
    """
    import nibabel as nib

    if native is None:
        native = read_input_voxels(volume)  # (*N) the file's own voxels
    outside = native == 0
    vectors = restore_to_input(np.moveaxis(np.asarray(displacement), 0, -1), volume)
    world = world_displacement(vectors.reshape(*native.shape, -1), volume.model_affine)
    file_dims = len(volume.native_shape)  # ITK reads a 2D field file as 2D, even (X, Y, 1)
    lps = ras_to_lps(world).astype(np.float32)  # the vectors as written
    applied = ras_to_lps(lps.astype(np.float64))
    applied[..., file_dims:] = 0.0  # what ITK reads of a 2D field
    simulated = pull_back_linear(native, voxel_offsets(applied, volume.affine))
    restored_change = restore_to_input(change, volume)
    restored_change[outside.reshape(restored_change.shape)] = 0.0
    affine = volume.affine
    return InputGridMaps(
        simulated=nib.Nifti1Image(simulated.reshape(volume.original_shape), affine),
        log_volume_change=nib.Nifti1Image(restored_change.astype(np.float32), affine),
        field=itk_field_image(lps, affine, file_dims),
    )


def write_summary_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write the per-image, per-direction summary table atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({
            key: (f"{value:.6g}" if isinstance(value, float) else value)
            for key, value in row.items()
        })
    return write_text_atomic(path, buffer.getvalue())
