"""``provenance.json``: what made a folder's files, so a result can be traced and redone.

Every folder a counterwarp command writes (a cohort, a run, an explain / saliency /
benchmark / group / report / prepare folder) holds one. Its common part is
:func:`environment`: counterwarp's version and, when it runs from a git checkout, the
commit; Python and the platform; the versions of the libraries the numbers depend on
(torch, numpy, scipy, nibabel, nilearn, MONAI, Captum, SimpleITK, deepbet; ``null`` when
not installed); the command line; the time (UTC). Each command adds what it used: its
seed, the sha256 of its classifier, simulator, split, manifest and input files.

A run folder is written by several commands (``train-classifier``, then ``fit``): its
``provenance.json`` keeps one entry per command, ``{"train-classifier": {...}, "fit":
{...}}``, each replaced when that command runs again.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

PROVENANCE_NAME = "provenance.json"
#: The distributions whose versions every record lists.
PACKAGES = ("torch", "numpy", "scipy", "nibabel", "nilearn", "monai", "captum", "SimpleITK",
            "deepbet", "matplotlib")

_command_line: list[str] | None = None


def set_command_line(argv: list[str]) -> None:
    """Record the command line the CLI was given (``counterwarp`` + ``argv``)."""
    global _command_line
    _command_line = ["counterwarp", *argv]


def command_line() -> str:
    """The command line that runs now: the CLI's, else the Python process's."""
    words = _command_line if _command_line is not None else [sys.executable, *sys.argv]
    return shlex.join(str(word) for word in words)


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def code_version() -> str | None:
    """The git commit of the checkout counterwarp runs from (``+dirty`` with uncommitted
    changes), or None when it is installed from a package."""
    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit or None


def environment() -> dict[str, Any]:
    """The common part of every record (see the module doc)."""
    return {
        "counterwarp_version": package_version("counterwarp"),
        "code_version": code_version(),
        "command_line": command_line(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
    }


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of the bytes of the file at ``path``, as 64 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_digests(paths: Iterable[str | os.PathLike[str]], folder: Path) -> dict[str, str]:
    """``{path relative to folder: sha256}`` of the input files a command read."""
    base = Path(folder).resolve()
    return {relative_to(p, base): file_digest(p) for p in paths}


def relative_to(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> str:
    """``path`` relative to ``folder`` (POSIX separators), as run folders store paths so
    that moving a project (its cohort and runs together) keeps them valid."""
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()


def staged_digests(staging: Path, manifest: Path | None, names: Iterable[str]) -> dict[str, Any]:
    """``{"manifest_sha256": ..., "<name>_sha256": ...}`` of a manifest and of files written
    into ``staging`` (``classifier.pt`` -> ``classifier_sha256``)."""
    digests: dict[str, Any] = {}
    if manifest is not None:
        digests["manifest_sha256"] = file_digest(manifest)
    for name in names:
        digests[f"{name.split('.')[0]}_sha256"] = file_digest(Path(staging) / name)
    return digests


def record(**fields: Any) -> dict[str, Any]:
    """One command's record: :func:`environment` and ``fields`` (seed, digests, ...)."""
    return {**environment(), **fields}


def merged_record(folder: Path, command: str, fields: Mapping[str, Any],
                  drop: Iterable[str] = ()) -> dict[str, Any]:
    """A run folder's ``provenance.json`` content with ``command``'s entry (re)placed and
    the entries named in ``drop`` removed (a retrained classifier makes the old fit's
    record meaningless); an unreadable old file is replaced."""
    path = Path(folder) / PROVENANCE_NAME
    try:
        existing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        existing = {}
    if not isinstance(existing, dict):
        existing = {}
    for name in drop:
        existing.pop(name, None)
    existing[command] = record(**fields)
    return existing
