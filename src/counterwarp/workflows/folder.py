"""Run folders: what one analysis wrote, and how the commands find it again.

A run folder holds ``classifier.pt``, ``split.json`` (subject-level train/val/test parts),
``simulator.pt``, logs, metrics and outputs. These helpers read it back with clear errors.

Bindings: every artefact records the sha256 (:func:`file_digest`) of the file it was made
from, inside itself (so it is written atomically with it): ``classifier.pt`` records
``split_sha256`` (of ``split.json``); ``simulator.pt``, ``simulator_checkpoint.pt`` and
``simulator_fit.json`` record ``classifier_sha256``; an ``explain`` output folder holds
``provenance.json`` naming the digests of the simulator, classifier and split it came from.
The loaders here refuse a stale file with a message naming it and the command to rerun.
Files written before bindings existed (no such key) are accepted as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from counterwarp._io import write_json_atomic
from counterwarp._io.provenance import PROVENANCE_NAME, input_digests, record, relative_to
from counterwarp.data.contract import Preprocessing, parse_contract
from counterwarp.data.manifest import (
    ManifestDataset,
    ManifestRow,
    read_manifest,
    resolve_manifest_path,
)
from counterwarp.data.split import split_by_subject, split_from_disk, split_on_disk, split_record
from counterwarp.data.stream import table_name
from counterwarp.errors import CounterwarpError
from counterwarp.explain.simulator import Simulator
from counterwarp.nn.classifier import CLASSIFIER_NAME, load_classifier
from counterwarp.train.checkpoint import CHECKPOINT_NAME, LOG_NAME
from counterwarp.train.classifier import (
    CLASSIFIER_LOG_NAME,
    CLASSIFIER_METRICS_NAME,
    SPLIT_NAME,
)
from counterwarp.train.staging import CLASSIFIER_STAGING, FIT_STAGING, file_digest
from counterwarp.workflows.classifier import (
    CONTRACT_NAME,
    ClassifierSource,
    classifier_digest,
    load_source,
    read_record,
    recorded_source,
    same_source,
)

__all__ = [
    "BENCHMARK_FOLDER",
    "CHECKPOINT_NAME",
    "CLASSIFIER_LOG_NAME",
    "CLASSIFIER_STAGING",
    "CLASSIFIER_METRICS_NAME",
    "CLASSIFIER_NAME",
    "DEMO_SUMMARY_NAME",
    "EXPLAIN_FOLDER",
    "EXPLAIN_SUMMARY_NAME",
    "FIT_METRICS_NAME",
    "FIT_STAGING",
    "GROUP_FOLDER",
    "LOG_NAME",
    "PROVENANCE_NAME",
    "REPORT_NAME",
    "SALIENCY_FOLDER",
    "SALIENCY_INDEX_NAME",
    "SIMULATOR_NAME",
    "SPLIT_NAME",
    "SPLIT_PARTS",
    "check_provenance",
    "file_digest",
    "load_images",
    "load_run_classifier",
    "load_run_simulator",
    "model_preprocessing",
    "model_shape",
    "parse_parts",
    "read_split",
    "split_on_disk",
    "rows_in_split",
    "select_rows",
    "draw_split",
    "run_digests",
    "write_provenance",
]

SPLIT_PARTS = ("train", "val", "test")
# The run folder's files. Those the training loops write (classifier.pt, split.json, the
# classifier's log and metrics, the simulator's checkpoint and log) are named where they are
# written, in train/ and nn/, and imported here.
SIMULATOR_NAME = "simulator.pt"
FIT_METRICS_NAME = "simulator_fit.json"
REPORT_NAME = "report.html"
#: Tables of an ``explain`` / ``saliency`` output folder (one per shard, see ``table_name``).
EXPLAIN_SUMMARY_NAME = "summary.csv"
SALIENCY_INDEX_NAME = "saliency_index.csv"
#: In an ``explain`` output folder: the digests of the simulator, classifier and split used.
#: Next to a demo's run folder: its summary.
DEMO_SUMMARY_NAME = "demo_summary.json"
# Output folders the commands use by default, inside or beside a run folder.
GROUP_FOLDER = "group"
EXPLAIN_FOLDER = "explain"
SALIENCY_FOLDER = "saliency"
BENCHMARK_FOLDER = "benchmark"


def recorded_manifest(run: Path, payload: dict[str, Any]) -> str:
    """The manifest a checkpoint of ``run`` records (stored relative to the run folder), as
    a path to type from here; ``M`` when it records none."""
    manifest = payload.get("manifest")
    if not isinstance(manifest, str):
        return "M"
    return str((Path(run) / manifest).resolve())


def _rerun_training(run: Path, payload: dict[str, Any]) -> str:
    manifest = recorded_manifest(run, payload)
    return f"`counterwarp train-classifier --manifest {manifest} --out {run} --overwrite`"


def load_run_classifier(
    run: str | Path, map_location: str | torch.device = "cpu",
    source: ClassifierSource | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier of a run folder (eval mode) and its checkpoint payload.

    ``source`` (from ``--classifier``) is used when given; else the classifier the run's
    ``classifier.json`` records (see :mod:`counterwarp.workflows.classifier`); else the
    run's own ``classifier.pt``. A brought classifier is checked on a dummy batch first.

    Refused when ``split.json`` is not the split the classifier was trained on (its
    ``split_sha256`` differs: a retraining left the run half swapped, or the file was
    replaced). A classifier without ``split_sha256`` (written before bindings existed, or
    not by ``train-classifier``) is accepted.
    """
    run = Path(run)
    if source is None and (record := read_record(run)) is not None:
        source = recorded_source(run, record)
    if source is not None:
        return load_source(source, map_location)
    model, payload = load_classifier(run / CLASSIFIER_NAME, map_location=map_location)
    recorded, split_path = payload.get("split_sha256"), run / SPLIT_NAME
    if isinstance(recorded, str) and split_path.is_file():
        read_split(run)  # an unreadable or malformed split gets its own message first
        if file_digest(split_path) != recorded:
            raise CounterwarpError(
                f"{split_path} is not the split {run / CLASSIFIER_NAME} was trained on "
                f"(rewritten since); rerun {_rerun_training(run, payload)}"
            )
    return model, payload


def model_shape(payload: dict[str, Any]) -> tuple[int, ...]:
    """The spatial shape (voxels) the run's classifier takes."""
    return tuple(int(n) for n in payload["config"]["input_shape"])


def model_preprocessing(payload: dict[str, Any]) -> Preprocessing:
    """Orientation and intensity normalisation the run's classifier expects (its contract;
    counterwarp's own classifier: the orientation it records (RAS for 3D), z-scored over the
    brain)."""
    contract = payload.get("contract")
    if contract is None:
        return Preprocessing(orientation=payload.get("orientation"))
    return parse_contract(contract).preprocessing


def read_split(run: str | Path) -> dict[str, Any]:
    """``RUN/split.json`` as a dict; a clear error when the run has none."""
    path = Path(run) / SPLIT_NAME
    if not path.is_file():
        raise CounterwarpError(
            f"{path} not found: run `counterwarp train-classifier --manifest M --out {run}` "
            f"first (it writes the subject-level split)"
        )
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CounterwarpError(f"{path}: unreadable split file ({error})") from None
    if not isinstance(split, dict):
        raise CounterwarpError(f"{path}: not a split file (expected a JSON object)")
    for part in SPLIT_PARTS:
        items = split.get(part)
        if not isinstance(items, list) or not all(
            isinstance(item, dict) and isinstance(item.get("path"), str) for item in items
        ):
            raise CounterwarpError(
                f"{path}: the {part!r} part is missing or malformed (a list of objects with a "
                f"'path' is expected); retrain the classifier to rewrite it"
            )
    return split_from_disk(split, Path(run))


def parse_parts(parts: str) -> tuple[str, ...]:
    """``"train+val"`` -> ``("train", "val")``; ``"all"`` -> every part."""
    names = SPLIT_PARTS if parts == "all" else tuple(p for p in parts.split("+") if p)
    unknown = [p for p in names if p not in SPLIT_PARTS]
    if unknown or not names:
        raise CounterwarpError(
            f"--split {parts!r}: use one of train, val, test, joined with '+', or 'all'"
        )
    return names


def rows_in_split(
    run: str | Path,
    manifest: str | Path,
    parts: str,
    positive_label: str | None = None,
) -> list[ManifestRow]:
    """The manifest rows that belong to ``parts`` of the run's split (matched by file path).

    A manifest whose files are not in the split at all (another cohort) is used whole,
    since none of its subjects can have trained the classifier.
    """
    return select_rows(read_split(run), manifest, parts, positive_label,
                       where=str(Path(run) / SPLIT_NAME))


def select_rows(
    split: dict[str, Any], manifest: str | Path, parts: str,
    positive_label: str | None = None, where: str = SPLIT_NAME,
) -> list[ManifestRow]:
    """The rows of ``manifest`` in ``parts`` of a ``split.json`` record (see
    :func:`rows_in_split`)."""
    rows = read_manifest(manifest, positive_label=positive_label,
                         negative_labels=split.get("negative_labels"))
    wanted = {str(Path(item["path"]).resolve()) for p in parse_parts(parts) for item in split[p]}
    known = {str(Path(item["path"]).resolve()) for p in SPLIT_PARTS for item in split[p]}
    if not any(str(row.path) in known for row in rows):
        return rows
    selected = [row for row in rows if str(row.path) in wanted]
    if not selected:
        raise CounterwarpError(f"no row of {manifest} belongs to the {parts!r} part of {where}")
    return selected


def draw_split(manifest: str | Path, positive_label: str | None) -> dict[str, Any]:
    """The ``split.json`` record ``train-classifier`` would draw for ``manifest`` (subject
    level, stratified by label, 70/15/15 %, seed 0), for a run whose classifier was
    trained elsewhere."""
    rows = read_manifest(manifest, positive_label=positive_label)
    fractions, seed = (0.7, 0.15, 0.15), 0
    split = split_by_subject(rows, fractions, seed)
    record = split_record(rows, split, resolve_manifest_path(manifest), seed, fractions,
                          positive_label, None)
    return {**record, "classifier": "brought (trained elsewhere)"}


def load_images(
    rows: list[ManifestRow], shape: tuple[int, ...], progress: bool = True,
    preprocessing: Preprocessing | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images (N, 1, *shape) and labels (N,) of ``rows``, as the classifier saw."""
    dataset = ManifestDataset(rows, shape=shape, cache=True, preprocessing=preprocessing)
    dataset.preload(progress=progress)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([float(row.label) for row in rows])
    return images, labels


def load_run_simulator(
    run: str | Path, source: ClassifierSource | None = None
) -> tuple[Simulator, dict[str, Any]]:
    """The fitted simulator of a run folder, bound to the run's classifier, and the
    classifier checkpoint's metadata (input shape, positive label, ...).

    Refused when ``simulator.pt`` was fitted for another classifier (its
    ``classifier_sha256`` differs: the classifier was retrained since), or when ``source``
    (``--classifier``) is not the classifier the run records. A simulator without
    that record (written before bindings existed) is accepted. The simulator's
    :attr:`~counterwarp.explain.simulator.Simulator.provenance_` holds the digests of the
    simulator, classifier and split files it was loaded from (see :func:`write_provenance`).
    """
    run = Path(run)
    if source is not None and not same_source(read_record(run), source):
        raise CounterwarpError(
            f"--classifier {source.where} is not the classifier {run / SIMULATOR_NAME} was "
            f"fitted for; fit one for it (`counterwarp fit --classifier {source.where} ... "
            f"--run NEW_RUN`) or leave --classifier out to use the run's own"
        )
    classifier, payload = load_run_classifier(run)
    simulator_path = run / SIMULATOR_NAME
    simulator = Simulator.load(simulator_path, classifier)
    classifier_sha256 = classifier_digest(run)
    recorded = simulator.provenance_.get("classifier_sha256")
    if recorded is not None and recorded != classifier_sha256:
        manifest = recorded_manifest(run, payload)
        brought = (run / CONTRACT_NAME).is_file()
        raise CounterwarpError(
            f"{simulator_path} was fitted for another "
            f"{run / (CONTRACT_NAME if brought else CLASSIFIER_NAME)} "
            f"({'changed' if brought else 'retrained'} since); rerun "
            f"`counterwarp fit --manifest {manifest} --run {run}`"
        )
    split_path = run / SPLIT_NAME
    simulator.provenance_ = {
        "run": str(run.resolve()),
        "simulator_sha256": file_digest(simulator_path),
        "classifier_sha256": classifier_sha256,
        **({"split_sha256": file_digest(split_path)} if split_path.is_file() else {}),
    }
    return simulator, payload


def run_digests(run: str | Path) -> dict[str, str]:
    """``{"simulator_sha256", "split_sha256", "classifier_sha256"}`` of a run folder (those
    present), for the ``provenance.json`` of a folder made from it."""
    run = Path(run)
    digests = {f"{name.split('.')[0]}_sha256": file_digest(run / name)
               for name in (SIMULATOR_NAME, SPLIT_NAME) if (run / name).is_file()}
    if (run / CONTRACT_NAME).is_file() or (run / CLASSIFIER_NAME).is_file():
        digests["classifier_sha256"] = classifier_digest(run)
    return digests


def write_provenance(
    out: str | Path, simulator: Simulator, inputs: list[Path] | None = None,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Write ``out/provenance.json`` (a shard ``provenance.shard-i-of-n.json``): the run
    (relative to ``out``), the digests of the simulator, classifier and split files a
    simulator from :func:`load_run_simulator` was loaded from and of the ``inputs``
    explained, and the environment (see :mod:`counterwarp._io.provenance`)."""
    out = Path(out)
    fields = dict(simulator.provenance_)
    if "run" in fields:
        fields["run"] = relative_to(fields["run"], out)
    if inputs is not None:
        fields["inputs_sha256"] = input_digests(inputs, out)
    return write_json_atomic(out / table_name(PROVENANCE_NAME, shard), record(**fields))


def check_provenance(out: str | Path, run: str | Path) -> None:
    """Refuse outputs in ``out`` that another simulator made than ``run``'s current one.

    Output folders without ``provenance.json`` (written before bindings existed) pass; the
    shards' records (``provenance.shard-i-of-n.json``) are checked too.
    """
    out, run = Path(out), Path(run)
    for path in sorted(out.glob("provenance*.json")):
        _check_one_provenance(path, out, run)


def _check_one_provenance(path: Path, out: Path, run: Path) -> None:
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("simulator_sha256")
    except (OSError, json.JSONDecodeError, AttributeError) as error:
        raise CounterwarpError(f"{path}: unreadable provenance record ({error})") from None
    simulator_path = run / SIMULATOR_NAME
    if recorded is not None and simulator_path.is_file() and recorded != file_digest(
            simulator_path):
        raise CounterwarpError(
            f"{out} was made by another {simulator_path} (refitted since); rerun `counterwarp "
            f"explain --run {run} --out {out}`"
        )
