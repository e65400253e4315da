"""``counterwarp explain``: the run's simulator applied to images, maps written to a folder.

Each function reads what earlier commands wrote into the run folder, does one job, writes
its outputs atomically and returns a summary the CLI prints.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from counterwarp._io import ForeignFileError, shard_tag, write_text_atomic, writing_folder
from counterwarp.data.manifest import image_id
from counterwarp.data.preprocess import resolve_image_path, save_on_input_grid
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
from counterwarp.report.figures import explanation_panel
from counterwarp.workflows.classifier import ClassifierSource
from counterwarp.workflows.folder import (
    EXPLAIN_SUMMARY_NAME,
    load_run_simulator,
    model_preprocessing,
    model_shape,
    rows_in_split,
)

SUMMARY_COLUMNS = (
    "id", "path", "label", "direction", "logit_before", "logit_after", "probability_before",
    "probability_after", "logit_shift", "margin", "moved_by_margin", "prediction_flipped",
    "folding_share", "mean_abs_log_volume_change",
)


@dataclass
class ExplainInput:
    """One image to explain: where it came from and its label if known."""

    path: Path
    label: int | None


def explain_inputs(
    run: Path, manifest: str | Path | None, split: str, images: list[str | Path] | None,
    positive_label: str | None,
) -> list[ExplainInput]:
    if manifest is not None and images:
        raise CounterwarpError("give either --manifest or image files, not both")
    if manifest is not None:
        rows = rows_in_split(run, manifest, split, positive_label=positive_label)
        return [ExplainInput(row.path, row.label) for row in rows]
    if not images:
        raise CounterwarpError("nothing to explain: give --manifest M or one or more images")
    return [ExplainInput(resolve_image_path(p), None) for p in images]


def unique_ids(inputs: list[ExplainInput]) -> list[str]:
    """One :func:`image_id` per input, made unique by ``_2``, ``_3`` ... suffixes.

    Unique even when a suffixed id is itself a file name (``a``, ``a``, ``a_2``) and when
    ids differ only in case (outputs may go to a case-insensitive disk).
    """
    ids: list[str] = []
    used: set[str] = set()
    for item in inputs:
        base = candidate = image_id(item.path)
        count = 1
        while candidate.casefold() in used:
            count += 1
            candidate = f"{base}_{count}"
        used.add(candidate.casefold())
        ids.append(candidate)
    return ids


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
) -> list[dict[str, Any]]:
    """Explain images with the run's simulator; write NIfTI maps, PNG panels, summary.csv.

    ``classifier`` (``--classifier``) must be the classifier the run's simulator was
    fitted for; by default the run's own is used.

    Per image and direction: ``<id>_<direction>_simulated.nii.gz``,
    ``<id>_<direction>_displacement.nii.gz`` (vector image, model voxels, last axis = the
    spatial dim it moves along), ``<id>_<direction>_log_volume_change.nii.gz``, all on the
    input's grid with the input's affine, and ``<id>_<direction>.png``. With
    ``progression=N`` (velocity-field simulators) also ``<id>_<direction>_progression.gif``.

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
            shard=shard, workers=workers, classifier=classifier,
        )


#: How a refusal to replace a file counterwarp did not write ends.
FOREIGN_HINT = "move it away, or choose another --out"


def _explain_into(
    transaction: Any, run: Path, out: Path, *, manifest: str | Path | None, split: str,
    images: list[str | Path] | None, directions: tuple[str, ...], panels: bool,
    progression: int, progress: bool, shard: Shard | None, workers: int,
    classifier: ClassifierSource | None = None,
) -> list[dict[str, Any]]:
    """The body of :func:`explain_run`, run while holding ``out``'s lock and transaction."""
    from counterwarp.explain.progression import check_progression_supported
    from counterwarp.workflows.progression import write_progression

    simulator, payload = load_run_simulator(run, source=classifier)
    if progression:
        check_progression_supported(simulator, progression)
    shape = model_shape(payload)
    inputs = explain_inputs(run, manifest, split, images, payload.get("positive_label"))
    mine, ids = shard_inputs(inputs, shard, shape)
    table = table_name(EXPLAIN_SUMMARY_NAME, shard)
    summary: list[dict[str, Any]] = []
    done = 0
    bar = tqdm(total=len(mine) * len(directions), desc="explain", disable=not progress)
    try:
        for k, tensor, volume in stream_images([item.path for item in mine], shape, workers,
                                              model_preprocessing(payload)):
            out.mkdir(parents=True, exist_ok=True)  # once the first image has loaded
            for name in directions:
                explanation = simulator.explain(tensor.unsqueeze(0), name)
                summary.append(
                    _write_explanation(out, ids[k], mine[k], volume, explanation, panels,
                                       payload.get("contract"))
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

    write_provenance(out, simulator)
    return summary


def _write_explanation(
    out: Path, image_id_: str, item: ExplainInput, volume: Any, explanation: Explanation,
    panel: bool, contract: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one explanation's maps and panel; its row of ``summary.csv``. A regression
    contract's score is a prediction in its unit: no probability, no flipped prediction."""
    regression = (contract or {}).get("output") == "regression"
    score = "prediction" if regression else "logit"
    unit = f" {contract['unit']}" if regression and contract.get("unit") else ""
    stem = f"{image_id_}_{explanation.direction}"
    simulated = explanation.simulated[0, 0].numpy()
    change = explanation.log_volume_change[0].numpy()
    displacement = np.moveaxis(explanation.displacement[0].numpy(), 0, -1)
    save_on_input_grid(out / f"{stem}_simulated.nii.gz", simulated, volume)
    save_on_input_grid(out / f"{stem}_displacement.nii.gz", displacement, volume)
    save_on_input_grid(out / f"{stem}_log_volume_change.nii.gz", change, volume)
    if panel:
        explanation_panel(
            explanation.image[0, 0].numpy(), simulated, change, out / f"{stem}.png",
            title=f"{image_id_}: {explanation.direction} "
                  f"({score} {float(explanation.logit_before[0]):+.2f} -> "
                  f"{float(explanation.logit_after[0]):+.2f}{unit})",
            affine=volume.model_affine,
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
        "moved_by_margin": bool(explanation.moved[0]),
        "prediction_flipped": "" if regression else (before > 0) != (after > 0),
        "folding_share": float(explanation.folding[0]),
        "mean_abs_log_volume_change": float(np.abs(change[brain]).mean()) if brain.any()
        else 0.0,
    }


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
