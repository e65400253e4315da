"""Which scans to prepare: a folder of NIfTI files, a manifest CSV, or a BIDS dataset.

:func:`discover_scans` accepts

- a **manifest** (a ``.csv`` file, or a folder holding ``manifest.csv``) in the project's
  format (:mod:`counterwarp.data.manifest`): columns ``path`` and ``label`` (or the column
  ``label_column`` names), optionally ``subject`` and any covariates. Every value is kept as
  written (labels too: ``AD`` / ``CN`` stay strings, for ``--positive-label`` later);
  relative paths resolve against the manifest's folder.
- a **BIDS dataset** (a folder with ``participants.tsv`` or ``sub-*`` folders): every
  ``sub-<id>[/ses-<id>]/anat/*_T1w.nii[.gz]``; the label is the ``participants.tsv``
  column ``label_column`` (default ``label``), and every other column of that file is kept
  as a covariate. Participants without a T1w scan are skipped (listed in the summary).
- a **folder of NIfTI files** (``*.nii`` / ``*.nii.gz``, not recursive): no labels (the
  ``label`` column of the output manifest is left empty, for the user to fill in).

Each scan gets a file-name-safe id, unique over the input: the BIDS entities
(``sub-01_ses-1``) for BIDS scans, :func:`counterwarp.data.manifest.image_id` of the file
otherwise.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from counterwarp.data.manifest import MANIFEST_NAME, image_id, nifti_stem, read_table
from counterwarp.data.preprocess import resolve_image_path
from counterwarp.errors import CounterwarpError

PARTICIPANTS_NAME = "participants.tsv"
_T1W = re.compile(
    r"^(?P<entities>sub-[A-Za-z0-9]+(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_T1w\.nii(\.gz)?$"
)


@dataclass
class Scan:
    """One native scan to prepare.

    Attributes:
        path: absolute, resolved path of the NIfTI file.
        id: file-name-safe id, unique over the input (``sub-01_ses-1`` for BIDS).
        label: the label as written in the input ("" when the input has none).
        subject: subject identifier ("" when the input gives none).
        columns: every other column of the input row (covariates), in input order.
        source: where the scan was listed (``manifest.csv, line 3`` / a BIDS path).
    """

    path: Path
    id: str
    label: str
    subject: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    source: str = ""


def input_kind(source: Path) -> str:
    """``"manifest"``, ``"bids"`` or ``"folder"`` for an existing input path."""
    if source.is_file():
        return "manifest"
    if (source / MANIFEST_NAME).is_file():
        return "manifest"
    if (source / PARTICIPANTS_NAME).is_file() or any(source.glob("sub-*/")):
        return "bids"
    return "folder"


def discover_scans(input: str | os.PathLike[str], label_column: str | None = None) -> list[Scan]:
    """The scans an input lists, in order, checked to exist (see the module doc).

    Args:
        input: a manifest CSV, a BIDS dataset folder or a folder of NIfTI files.
        label_column: the column holding the label (manifest: default ``label``; BIDS: a
            ``participants.tsv`` column, default ``label``); refused for a plain folder.

    Raises:
        CounterwarpError: missing input; no scans; a missing file (named with its row);
            a manifest without ``path`` / label column; a BIDS dataset without
            ``participants.tsv`` or without the label column, or a scan of a participant it
            does not list.
    """
    source = Path(input).expanduser()
    if not source.exists():
        raise CounterwarpError(
            f"--input {source} not found; give a folder of NIfTI files, a manifest CSV "
            "(path,label,...) or a BIDS dataset folder"
        )
    kind = input_kind(source)
    if kind == "manifest":
        manifest = source if source.is_file() else source / MANIFEST_NAME
        scans = _manifest_scans(manifest.resolve(), label_column or "label")
    elif kind == "bids":
        scans = _bids_scans(source.resolve(), label_column or "label")
    else:
        if label_column is not None:
            raise CounterwarpError(
                f"--label-column {label_column!r}: {source} is a folder of NIfTI files with no "
                "table of labels; give a manifest CSV or a BIDS dataset, or leave it out"
            )
        scans = _folder_scans(source.resolve())
    if not scans:
        raise CounterwarpError(
            f"--input {source}: no scans found ({kind}); a folder needs *.nii / *.nii.gz "
            "files, a BIDS dataset sub-*/anat/*_T1w.nii.gz files, a manifest one row per scan"
        )
    _make_ids_unique(scans)
    return scans


def _make_ids_unique(scans: list[Scan]) -> None:
    """Suffix ``_2``, ``_3`` ... to repeated ids (case-insensitively: outputs may go to a
    case-insensitive disk)."""
    used: set[str] = set()
    for scan in scans:
        base = candidate = scan.id
        count = 1
        while candidate.casefold() in used:
            count += 1
            candidate = f"{base}_{count}"
        used.add(candidate.casefold())
        scan.id = candidate


def _existing(path: Path, where: str) -> Path:
    try:
        resolved = resolve_image_path(path)
    except CounterwarpError as error:
        raise CounterwarpError(f"{where}: {error}") from None
    if not resolved.is_file():
        raise CounterwarpError(
            f"{where}: image file not found: {resolved}; fix the path or remove the row"
        )
    return resolved


def _read_table(path: Path, delimiter: str | None) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header (named columns only) and ``(line, row)`` pairs of a CSV / TSV file."""
    header, rows, _ = read_table(path, str(path), "a header line and one row per scan",
                                 delimiter)
    named = [name for name in header if name]
    return named, [(line, {k: v for k, v in row.items() if k}) for line, row in rows]


def _column(header: list[str], name: str, table: Path, flag: str) -> str:
    """The header's spelling of column ``name`` (case-insensitive), or a CounterwarpError."""
    lowered = {column.lower(): column for column in header}
    if name.lower() not in lowered:
        raise CounterwarpError(
            f"{table}: no column {name!r} (columns: {', '.join(header)}); {flag}"
        )
    return lowered[name.lower()]


def _manifest_scans(manifest: Path, label_column: str) -> list[Scan]:
    header, rows = _read_table(manifest, None)
    path_key = _column(header, "path", manifest, "the manifest needs a 'path' column")
    label_key = _column(header, label_column, manifest,
                        "name the label column with --label-column (label_column=...)")
    subject_key = next((c for c in header if c.lower() == "subject"), None)
    scans = []
    for line, row in rows:
        where = f"manifest {manifest}, line {line}"
        if not row[path_key]:
            raise CounterwarpError(f"{where}: empty 'path'; give the scan's NIfTI file")
        raw = Path(row[path_key]).expanduser()
        path = _existing(raw if raw.is_absolute() else manifest.parent / raw, where)
        columns = {k: v for k, v in row.items() if k not in (path_key, label_key, subject_key)}
        scans.append(Scan(path, image_id(path), row[label_key],
                          row[subject_key] if subject_key else "", columns, where))
    return scans


def _folder_scans(folder: Path) -> list[Scan]:
    files = sorted(p for p in folder.iterdir()
                   if p.name.lower().endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
    return [Scan(_existing(p, str(folder)), image_id(p), "", nifti_stem(p), {}, str(p))
            for p in files]


def _bids_scans(root: Path, label_column: str) -> list[Scan]:
    table = root / PARTICIPANTS_NAME
    if not table.is_file():
        raise CounterwarpError(
            f"BIDS dataset {root}: no {PARTICIPANTS_NAME}; add one (participant_id and a "
            "label column), or give a manifest CSV instead"
        )
    header, rows = _read_table(table, "\t")
    id_key = _column(header, "participant_id", table, "BIDS requires a participant_id column")
    label_key = _column(header, label_column, table,
                        "name the column holding the label with --label-column")
    participants = {}
    for _line, row in rows:
        pid = row[id_key] if row[id_key].startswith("sub-") else f"sub-{row[id_key]}"
        participants[pid] = row
    scans = []
    patterns = ("sub-*/anat/*_T1w.nii*", "sub-*/ses-*/anat/*_T1w.nii*")
    for path in sorted(p for pattern in patterns for p in root.glob(pattern)):
        match = _T1W.match(path.name)
        if match is None:
            continue
        subject = path.relative_to(root).parts[0]
        if subject not in participants:
            raise CounterwarpError(
                f"{path}: participant {subject} is not listed in {table}; add a row for it "
                "(with its label) or remove the scan"
            )
        row = participants[subject]
        entities = match.group("entities")
        session = next((e for e in entities.split("_") if e.startswith("ses-")), "")
        columns = {"session": session} if session else {}
        columns.update({k: v for k, v in row.items() if k not in (id_key, label_key)})
        scans.append(Scan(_existing(path, str(table)), entities, row[label_key], subject,
                          columns, str(path.relative_to(root))))
    return scans


def participants_without_scans(root: Path, scans: list[Scan]) -> list[str]:
    """The ``participants.tsv`` ids of a BIDS dataset with no T1w scan among ``scans``."""
    table = root / PARTICIPANTS_NAME
    if not table.is_file():
        return []
    header, rows = _read_table(table, "\t")
    key = next((c for c in header if c.lower() == "participant_id"), None)
    if key is None:
        return []
    have = {scan.subject for scan in scans}
    listed = [r[key] if r[key].startswith("sub-") else f"sub-{r[key]}" for _, r in rows]
    return [pid for pid in listed if pid not in have]
