"""File output that cannot lie: atomic writes, one writer per folder, no lost files.

- :func:`atomic_path` writes to a temporary file in the same folder, then renames it: a
  killed process never leaves a half-written NIfTI, JSON, CSV or checkpoint. The file ends
  with mode ``0o666 & ~umask`` like any file the user creates, and an :class:`OSError` while
  writing (a full disk) names the final path, not the hidden temporary.
- :func:`folder_lock` lets one process at a time write a folder. The shards of one array
  job (``--shard i/n``) each take their own lock, ``.counterwarp.shard-<i>-of-<n>.lock``, so
  they can share a folder; an unsharded writer and a shard exclude each other.
- :func:`output_transaction` makes a command's writes into a folder all-or-nothing: on an
  exception every file it created is removed and every file it replaced is restored (a
  hard link to the old version is kept until the command ends). It also refuses to replace
  a file that no counterwarp command wrote there: each folder keeps the list of the files
  counterwarp commands created in it, ``.counterwarp/files*.txt`` (one per lock, so shards
  never write the same list), and a name is added there *before* its file is renamed into
  place, so even the files of a killed command count as counterwarp's own.
- :func:`writing_folder` is the three together, as every command that writes a folder uses
  them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from counterwarp._io.folders import (
    LOCK_NAME,
    STATE_DIR,
    ForeignFileError,
    current_umask,
    folder_lock,
    lock_name,
    output_transaction,
    owned_files,
    shard_tag,
    writing_folder,
)
from counterwarp._io.folders import _transaction_for as _transaction_for

__all__ = [
    "LOCK_NAME", "STATE_DIR", "ForeignFileError", "atomic_path", "current_umask",
    "folder_lock", "json_safe", "lock_name", "output_transaction", "owned_files",
    "remove_stale_temps", "save_nifti_atomic", "save_torch_atomic", "shard_tag",
    "write_json_atomic", "write_text_atomic", "writing_folder",
]


def _path_error(error: OSError, final: Path, hidden: Path) -> OSError:
    """``error`` naming ``final`` when it named the temporary ``hidden`` file or nothing."""
    named = error.filename
    if named is not None and os.fspath(named) != os.fspath(hidden):
        return error
    reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
    return OSError(error.errno, reason, str(final))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name keeps the final suffixes (``.nii.gz``) so libraries that pick a
    format by extension still work; it is created with mode ``0o666 & ~umask``, which the
    rename keeps. On error the temporary file is removed, and an :class:`OSError` that names
    the temporary (or no file, as a failed write does) is raised again naming ``path``.
    Inside an :func:`output_transaction` of a folder above ``path``, the transaction is told
    before ``path`` is replaced (it may refuse a file counterwarp did not write).
    """
    final = Path(path)
    transaction = _transaction_for(final)
    if transaction is not None:
        transaction.note_folders(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=suffix, dir=final.parent
        )
    except OSError as error:  # e.g. no inode left: say which file could not be written
        raise OSError(error.errno, error.strerror or str(error), str(final)) from error
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if transaction is not None:
            transaction.before_replace(final)
        os.replace(tmp, final)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        converted = _path_error(error, final, tmp)
        if converted is error:
            raise
        raise converted from error
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that strict JSON accepts, recursively: non-finite floats become
    None, numpy scalars Python numbers, mappings dicts with string keys, tuples lists."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically and return the path."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def save_torch_atomic(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """``torch.save`` a dict of tensors and JSON-able values to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def save_nifti_atomic(path: str | os.PathLike[str], image: Any) -> Path:
    """Save a nibabel image to ``path`` atomically and return the path."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def remove_stale_temps(folder: str | os.PathLike[str], names: tuple[str, ...]) -> list[Path]:
    """Delete temporary files that :func:`atomic_path` left beside ``folder/<name>``.

    A process killed while writing leaves its hidden ``.<name>.XXXXXXXX<suffix>`` file
    behind (the real file is intact). Call this only while holding :func:`folder_lock`, and
    only for names that no process writes without that lock. Returns the removed paths.
    """
    import glob

    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{glob.escape(name)}.*"):
            if tmp.is_file():
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    removed.append(tmp)
    return removed
