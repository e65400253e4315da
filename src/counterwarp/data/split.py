"""Subject-level train / validation / test split of manifest rows, stratified by label."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from counterwarp._io.provenance import relative_to
from counterwarp.data.manifest import SPLIT_PARTS, ManifestRow
from counterwarp.errors import CounterwarpError


def _allocate(n_items: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n_items`` into parts by ``fractions`` (largest remainder), at least one per part
    with a positive fraction whenever there are enough items."""
    ideal = [fraction * n_items for fraction in fractions]
    counts = [int(np.floor(value)) for value in ideal]
    order = sorted(range(len(fractions)), key=lambda k: (-(ideal[k] - counts[k]), k))
    for k in order[: n_items - sum(counts)]:
        counts[k] += 1
    wanted = [k for k, fraction in enumerate(fractions) if fraction > 0]
    if n_items >= len(wanted):
        for k in wanted:
            if counts[k] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[k] += 1
    return counts


def split_by_subject(
    rows: Sequence[ManifestRow],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, list[int]]:
    """Subject-level split into train / val / test, stratified by label, deterministic by seed.

    A subject's label is the majority label of its rows (ties count as 1). Subjects of each
    class are shuffled (from the sorted subject names, so the split depends only on the set of
    subjects and the seed) and allocated to the parts by largest remainder; every part with a
    positive fraction gets at least one subject of each class when the class has enough
    subjects.

    Args:
        rows: manifest rows.
        fractions: (train, val, test), non-negative, summing to 1.
        seed: random seed.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``: sorted indices into ``rows``.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(not np.isfinite(f) or f < 0 for f in fractions):
        raise CounterwarpError(
            f"fractions {fractions} must be three non-negative numbers (train, val, test)"
        )
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise CounterwarpError(
            f"fractions {fractions} must sum to 1 (they sum to {sum(fractions)})"
        )
    rows_of_subject: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        rows_of_subject.setdefault(row.subject, []).append(index)
    subjects_of_class: dict[int, list[str]] = {0: [], 1: []}
    for subject in sorted(rows_of_subject):
        labels = [rows[i].label for i in rows_of_subject[subject]]
        subject_label = 1 if 2 * sum(labels) >= len(labels) else 0
        subjects_of_class[subject_label].append(subject)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in SPLIT_PARTS}
    for label in (0, 1):
        subjects = subjects_of_class[label]
        permuted = [subjects[i] for i in rng.permutation(len(subjects))]
        counts = _allocate(len(permuted), fractions)
        start = 0
        for name, count in zip(SPLIT_PARTS, counts, strict=True):
            for subject in permuted[start : start + count]:
                parts[name].extend(rows_of_subject[subject])
            start += count
    return {name: sorted(indices) for name, indices in parts.items()}


def split_record(
    rows: Sequence[ManifestRow], split: dict[str, list[int]], manifest: Path, seed: int,
    fractions: Sequence[float], positive_label: str | None, negative_labels: str | None,
) -> dict[str, Any]:
    """The content of a run's ``split.json``: how it was drawn and each part's rows."""
    return {
        "manifest": str(manifest),
        "seed": seed,
        "fractions": list(fractions),
        "positive_label": positive_label,
        "negative_labels": negative_labels,
        **{
            name: [
                {"path": str(rows[i].path), "label": rows[i].label, "subject": rows[i].subject,
                 "line": rows[i].line}
                for i in split[name]
            ]
            for name in SPLIT_PARTS
        },
    }


def split_on_disk(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``record`` (from :func:`split_record`) as ``folder/split.json`` stores it: the
    manifest's and every row's ``path`` relative to ``folder`` (so a project moved whole,
    cohort and runs together, still finds its images) and ``absolute_path`` beside it (so a
    run folder moved alone still does)."""
    def relative(path: str) -> str:
        return relative_to(path, folder)

    stored = dict(record)
    if isinstance(stored.get("manifest"), str):
        stored["manifest_absolute"] = str(Path(stored["manifest"]).resolve())
        stored["manifest"] = relative(stored["manifest"])
    for name in SPLIT_PARTS:
        stored[name] = [{**item, "path": relative(item["path"]),
                         "absolute_path": str(Path(item["path"]).resolve())}
                        for item in record[name]]
    return stored


def _resolved(base: Path, path: str, absolute: Any) -> str:
    """``path`` against ``base`` when that file exists, else the recorded absolute path."""
    candidate = (base / path).resolve()
    if candidate.exists() or not isinstance(absolute, str):
        return str(candidate)
    return absolute


def split_from_disk(stored: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A ``split.json`` record with its paths resolved: relative to ``folder`` where that
    file exists, else the absolute path recorded beside it (older runs stored only
    absolute paths, which are kept)."""
    base = Path(folder).resolve()
    record = dict(stored)
    if isinstance(record.get("manifest"), str):
        record["manifest"] = _resolved(base, record["manifest"], record.pop(
            "manifest_absolute", None))
    for name in SPLIT_PARTS:
        if isinstance(record.get(name), list):
            record[name] = [
                {**{k: v for k, v in item.items() if k != "absolute_path"},
                 "path": _resolved(base, item["path"], item.get("absolute_path"))}
                if isinstance(item, dict) and isinstance(item.get("path"), str) else item
                for item in record[name]
            ]
    return record
