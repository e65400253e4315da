"""Run folders: what one analysis wrote, and how the commands find it again.

A run folder holds ``classifier.pt``, ``split.json`` (subject-level train/val/test parts),
``simulator.pt``, logs, metrics and outputs. These helpers read it back with clear errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from counterwarp.data.manifest import ManifestDataset, ManifestRow, read_manifest
from counterwarp.errors import CounterwarpError
from counterwarp.explain.simulator import Simulator
from counterwarp.nn.classifier import CLASSIFIER_NAME, Classifier, load_classifier
from counterwarp.train.checkpoint import CHECKPOINT_NAME, LOG_NAME
from counterwarp.train.classifier import (
    CLASSIFIER_LOG_NAME,
    CLASSIFIER_METRICS_NAME,
    SPLIT_NAME,
)

__all__ = [
    "BENCHMARK_FOLDER",
    "CHECKPOINT_NAME",
    "CLASSIFIER_LOG_NAME",
    "CLASSIFIER_METRICS_NAME",
    "CLASSIFIER_NAME",
    "DEMO_SUMMARY_NAME",
    "EXPLAIN_FOLDER",
    "EXPLAIN_SUMMARY_NAME",
    "FIT_METRICS_NAME",
    "GROUP_FOLDER",
    "LOG_NAME",
    "REPORT_NAME",
    "SALIENCY_FOLDER",
    "SALIENCY_INDEX_NAME",
    "SIMULATOR_NAME",
    "SPLIT_NAME",
    "SPLIT_PARTS",
    "load_images",
    "load_run_classifier",
    "load_run_simulator",
    "model_shape",
    "parse_parts",
    "read_split",
    "rows_in_split",
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
#: Next to a demo's run folder: its summary.
DEMO_SUMMARY_NAME = "demo_summary.json"
# Output folders the commands use by default, inside or beside a run folder.
GROUP_FOLDER = "group"
EXPLAIN_FOLDER = "explain"
SALIENCY_FOLDER = "saliency"
BENCHMARK_FOLDER = "benchmark"


def load_run_classifier(
    run: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Classifier, dict[str, Any]]:
    """The classifier of a run folder (eval mode) and its checkpoint payload."""
    return load_classifier(Path(run) / CLASSIFIER_NAME, map_location=map_location)


def model_shape(payload: dict[str, Any]) -> tuple[int, ...]:
    """The spatial shape (voxels) the run's classifier takes."""
    return tuple(int(n) for n in payload["config"]["input_shape"])


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
    return split


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
    rows = read_manifest(manifest, positive_label=positive_label)
    split = read_split(run)
    wanted = {str(Path(item["path"]).resolve()) for p in parse_parts(parts) for item in split[p]}
    known = {str(Path(item["path"]).resolve()) for p in SPLIT_PARTS for item in split[p]}
    if not any(str(row.path) in known for row in rows):
        return rows
    selected = [row for row in rows if str(row.path) in wanted]
    if not selected:
        raise CounterwarpError(
            f"no row of {manifest} belongs to the {parts!r} part of {Path(run) / SPLIT_NAME}"
        )
    return selected


def load_images(
    rows: list[ManifestRow], shape: tuple[int, ...], progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images (N, 1, *shape) and labels (N,) of ``rows``, as the classifier saw."""
    dataset = ManifestDataset(rows, shape=shape, cache=True)
    dataset.preload(progress=progress)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([float(row.label) for row in rows])
    return images, labels


def load_run_simulator(run: str | Path) -> tuple[Simulator, dict[str, Any]]:
    """The fitted simulator of a run folder, bound to the run's classifier, and the
    classifier checkpoint's metadata (input shape, positive label, ...)."""
    run = Path(run)
    classifier, payload = load_run_classifier(run)
    return Simulator.load(run / SIMULATOR_NAME, classifier), payload
