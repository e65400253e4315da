"""Manifests (CSV of images and labels), the torch dataset built on them, and subject splits.

A manifest is a CSV file with a header holding at least ``path`` and ``label``, optionally
``subject`` and any other columns (covariates, kept as strings in ``ManifestRow.extras``).
Relative paths resolve against the manifest's folder. Commas, semicolons and tabs are
accepted as separators; a UTF-8 byte-order mark and blank lines are ignored.

Labels are 0 (healthy) / 1 (diseased), or strings with ``positive_label`` naming the
diseased value and the healthy ones known (see :mod:`counterwarp.data.labels`).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from counterwarp.data.contract import CANONICAL_ORIENTATION, Preprocessing, normalise_intensity
from counterwarp.data.labels import check_label_mapping, parse_negative_labels
from counterwarp.data.preprocess import (
    LoadedVolume,
    image_spatial_shape,
    load_volume,
    resolve_image_path,
)
from counterwarp.errors import CounterwarpError
from counterwarp.limits import check_fits, check_grid

SPLIT_PARTS: tuple[str, str, str] = ("train", "val", "test")
_NIFTI_SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img", ".mgz", ".mgh")


@dataclass
class ManifestRow:
    """One image of a manifest.

    Attributes:
        line: 1-based line number in the CSV file (the header is line 1).
        path: absolute, resolved path of the image.
        label: 0 (healthy / negative) or 1 (diseased / positive).
        subject: subject identifier (the file name without extension if no ``subject`` column).
        extras: every other column of the row, as strings.
    """

    line: int
    path: Path
    label: int
    subject: str
    extras: dict[str, str] = field(default_factory=dict)


def nifti_stem(path: Path) -> str:
    """The file name without its NIfTI suffix (``.nii.gz`` / ``.nii``, any case)."""
    name = path.name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_id(path: Path) -> str:
    """A file-name-safe id for an image: :func:`nifti_stem`, sanitised.

    Ids never contain path separators, and start with a letter or digit (never a dot, which
    would hide the file, nor a dash, which shells read as an option), so outputs stay
    visible inside --out.
    """
    return _UNSAFE.sub("_", nifti_stem(path)).strip("._-") or "image"


def _detect_delimiter(header_line: str) -> str:
    """The separator among , ; tab that occurs most often in the header line."""
    counts = {delimiter: header_line.count(delimiter) for delimiter in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def read_table(
    path: Path, where: str, needs: str, delimiter: str | None = None,
) -> tuple[list[str], list[tuple[int, dict[str, str]]], str]:
    """A UTF-8 CSV / TSV table: its header, ``(line, {column: value})`` rows (blank lines
    skipped, values stripped, short rows padded with "") and its separator (``delimiter``,
    or the one of , ; tab the header uses most).

    ``where`` starts every error (``"manifest X"``); ``needs`` says what an empty file
    lacks.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise CounterwarpError(
            f"{where}: not UTF-8 text ({error}). Save it as UTF-8 CSV."
        ) from error
    except OSError as error:
        raise CounterwarpError(
            f"{where}: cannot read it ({error.strerror or error}); check that "
            "the file is readable by you."
        ) from error
    lines = text.splitlines()
    header_index = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_index is None:
        raise CounterwarpError(f"{where} is empty; it needs {needs}.")
    delimiter = delimiter or _detect_delimiter(lines[header_index])
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    for fields in reader:
        line = reader.line_num
        if not any(value.strip() for value in fields):
            continue
        if header is None:
            header = [name.strip() for name in fields]
            continue
        values = [value.strip() for value in fields]
        rows.append((line, {name: (values[i] if i < len(values) else "")
                            for i, name in enumerate(header)}))
    assert header is not None
    return header, rows, delimiter


def _parse_label(raw: str, positive_label: str | None, manifest: Path, line: int) -> int:
    if positive_label is not None:
        return 1 if raw == positive_label else 0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if value in (0.0, 1.0):
        return int(value)
    raise CounterwarpError(
        f"manifest {manifest}, line {line}: label {raw!r} is not 0 or 1. Use 0 (healthy) / "
        "1 (diseased), or say which value means diseased with --positive-label "
        "(positive_label=...)."
    )


#: The manifest a folder holds (``counterwarp synth`` writes one; ``--manifest FOLDER``).
MANIFEST_NAME = "manifest.csv"


def resolve_manifest_path(manifest: str | os.PathLike[str]) -> Path:
    """The absolute manifest file: ``manifest`` itself, or ``manifest/manifest.csv`` for a
    folder; CounterwarpError when there is none."""
    path = Path(manifest).expanduser()
    if path.is_dir():
        candidate = path / MANIFEST_NAME
        if candidate.is_file():
            return candidate.resolve()
        raise CounterwarpError(
            f"{path} is a folder without a manifest.csv; give the manifest CSV file itself."
        )
    if not path.is_file():
        raise CounterwarpError(
            f"manifest not found: {path}. Give a CSV file with columns path,label "
            "(e.g. the manifest.csv written by `counterwarp synth`)."
        )
    return path.resolve()


def read_manifest(
    manifest: str | os.PathLike[str],
    positive_label: str | None = None,
    negative_labels: str | Sequence[str] | None = None,
) -> list[ManifestRow]:
    """Read and validate a manifest CSV.

    Args:
        manifest: CSV file (or a folder holding ``manifest.csv``).
        positive_label: label value meaning "diseased" (-> 1). None: labels must be 0/1.
        negative_labels: with ``positive_label``, the values meaning "healthy" (-> 0), as a
            sequence or one comma-separated string; None: see
            :mod:`counterwarp.data.labels`. Any other value is refused.

    Returns:
        the rows in file order.

    Raises:
        CounterwarpError: missing manifest; no ``path`` / ``label`` column; no rows; missing
            image file or a symbolic-link loop; label not 0/1 (without ``positive_label``);
            ``positive_label`` never occurs; a label neither positive nor known healthy;
            only one class; the same image listed twice.
    """
    manifest_path = resolve_manifest_path(manifest)
    if positive_label is not None:
        positive_label = str(positive_label).strip()
    negatives = parse_negative_labels(negative_labels)
    if negatives is not None and positive_label is None:
        raise CounterwarpError(
            "--negative-labels needs --positive-label (which value means diseased)"
        )
    header, raw_rows, delimiter = read_table(
        manifest_path, f"manifest {manifest_path}",
        "a header line 'path,label' and one line per image")
    lowered = {name.lower(): name for name in header if name}
    missing_columns = [name for name in ("path", "label") if name not in lowered]
    if missing_columns:
        raise CounterwarpError(
            f"manifest {manifest_path}: no {' or '.join(repr(c) for c in missing_columns)} "
            f"column (header: {header!r}, separator {delimiter!r}). The header needs columns "
            "'path' and 'label' (and optionally 'subject')."
        )
    if not raw_rows:
        raise CounterwarpError(
            f"manifest {manifest_path} lists no images (only a header); add one line per image."
        )
    path_key, label_key = lowered["path"], lowered["label"]
    subject_key = lowered.get("subject")
    base = manifest_path.parent
    rows: list[ManifestRow] = []
    for line, raw in raw_rows:
        raw_path = raw[path_key]
        if not raw_path:
            raise CounterwarpError(
                f"manifest {manifest_path}, line {line}: empty 'path'; give the image file."
            )
        raw_label = raw[label_key]
        if not raw_label:
            raise CounterwarpError(
                f"manifest {manifest_path}, line {line}: empty 'label'; give 0 or 1."
            )
        label = _parse_label(raw_label, positive_label, manifest_path, line)
        image_path = Path(raw_path).expanduser()
        if not image_path.is_absolute():
            image_path = base / image_path
        try:
            image_path = resolve_image_path(image_path)
        except CounterwarpError as error:
            raise CounterwarpError(f"manifest {manifest_path}, line {line}: {error}") from None
        subject = raw[subject_key] if subject_key else ""
        if not subject:
            subject = nifti_stem(image_path)
        extras = {
            name: value
            for name, value in raw.items()
            if name and name not in (path_key, label_key, subject_key)
        }
        rows.append(ManifestRow(line, image_path, label, subject, extras))

    if positive_label is not None:
        check_label_mapping(raw_rows, label_key, positive_label, negatives, manifest_path)

    missing = [row for row in rows if not row.path.is_file()]
    if missing:
        first = missing[0]
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise CounterwarpError(
            f"manifest {manifest_path}, line {first.line}: image file not found: {first.path}"
            f"{more}. Relative paths resolve against the manifest's folder {base}."
        )

    first_line_of: dict[Path, int] = {}
    for row in rows:
        if row.path in first_line_of:
            raise CounterwarpError(
                f"manifest {manifest_path}: lines {first_line_of[row.path]} and {row.line} both "
                f"name {row.path}; list each image once."
            )
        first_line_of[row.path] = row.line

    counts = Counter(row.label for row in rows)
    if len(counts) < 2:
        (only,) = counts
        raise CounterwarpError(
            f"manifest {manifest_path}: all {len(rows)} images have label {only}; a classifier "
            "needs both classes (0 = healthy, 1 = diseased)."
        )
    return rows


class ManifestDataset(Dataset):
    """Torch dataset of manifest images, preprocessed for the classifier.

    ``dataset[i]`` is ``(image, label)``: ``image`` a ``(1, *spatial_shape)`` float32 tensor
    (reoriented and normalised as ``preprocessing`` says: by default 3D images reoriented to
    RAS and z-scored over non-zero voxels; resampled linearly to ``shape`` if given),
    ``label`` a
    ``()`` float32 tensor (0. or 1.).

    Attributes:
        rows: the manifest rows.
        spatial_shape: model grid in voxels, ``(H, W)`` or ``(D, H, W)``.
        dim: 2 or 3.
    """

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        shape: tuple[int, ...] | None = None,
        cache: bool = True,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        self.rows: list[ManifestRow] = list(rows)
        if not self.rows:
            raise CounterwarpError("no images given (empty manifest / empty selection)")
        native = [image_spatial_shape(row.path) for row in self.rows]
        dims = {len(s) for s in native}
        if len(dims) > 1:
            i2 = next(i for i, s in enumerate(native) if len(s) == 2)
            i3 = next(i for i, s in enumerate(native) if len(s) == 3)
            raise CounterwarpError(
                f"the images mix 2D and 3D: {self.rows[i2].path} has shape {native[i2]}, "
                f"{self.rows[i3].path} has shape {native[i3]}. Use one kind per manifest."
            )
        self.dim: int = dims.pop()
        self.preprocessing = preprocessing or Preprocessing(
            orientation=CANONICAL_ORIENTATION if self.dim == 3 else None
        )
        if shape is None:
            different = next((i for i, s in enumerate(native) if s != native[0]), None)
            if different is not None:
                raise CounterwarpError(
                    f"the images have different shapes: {self.rows[0].path} is {native[0]}, "
                    f"{self.rows[different].path} is {native[different]}. Give a common "
                    f"model shape with --shape (e.g. --shape {' '.join(['64'] * self.dim)}); "
                    "images are then resampled linearly to it."
                )
            self.spatial_shape: tuple[int, ...] = native[0]
        else:
            shape = tuple(int(n) for n in shape)
            if len(shape) != self.dim or min(shape) < 1:
                raise CounterwarpError(
                    f"shape {shape} does not fit {self.dim}D images; give {self.dim} positive "
                    "sizes."
                )
            check_grid(shape, f"--shape {' '.join(str(n) for n in shape)}")
            self.spatial_shape = shape
        if cache:
            n_voxels = math.prod(self.spatial_shape)
            check_fits(
                f"caching {len(self.rows)} images of {' x '.join(map(str, self.spatial_shape))}",
                4 * n_voxels * len(self.rows),
                "Use a smaller --shape, or fewer images per run.",
                n_voxels=n_voxels,
            )
        self.cache = cache
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        """``(N,)`` int64 labels (0/1)."""
        return np.array([row.label for row in self.rows], dtype=np.int64)

    def volume(self, index: int) -> LoadedVolume:
        """The raw (not z-scored) :class:`LoadedVolume` of image ``index`` on the model grid."""
        return load_volume(self.rows[index].path, self.spatial_shape,
                           orientation=self.preprocessing.orientation)

    def image(self, index: int) -> torch.Tensor:
        """``(1, *spatial_shape)`` float32 image ``index``, normalised as ``preprocessing``
        says (z-scored by default; cached if enabled)."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        loaded = self.volume(index)
        values = normalise_intensity(loaded.data, self.preprocessing.intensity)
        image = torch.from_numpy(values).unsqueeze(0)
        if self.cache:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = torch.tensor(float(self.rows[index].label), dtype=torch.float32)
        return self.image(index), label

    def preload(self, progress: bool = False) -> None:
        """Read every image now (validating all files up front); fills the cache if enabled."""
        from tqdm.auto import tqdm

        for index in tqdm(
            range(len(self)), desc="loading images", disable=not progress, leave=False
        ):
            self.image(index)
