"""Atomic file output: write to a temporary file in the same folder, then rename.

A killed process therefore never leaves a half-written NIfTI, JSON, CSV or checkpoint.
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name keeps the final suffixes (``.nii.gz``) so libraries that pick a
    format by extension still work. On error the temporary file is removed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
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


LOCK_NAME = ".counterwarp.lock"


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(lock: Path) -> tuple[int, str | None]:
    """``(pid, host)`` written in a lock file; ``(-1, None)`` when it cannot be parsed.

    ``host`` is None for locks written by older versions (pid only).
    """
    try:
        fields = lock.read_text(encoding="utf-8").split()
        return int(fields[0]), (fields[1] if len(fields) > 1 else None)
    except (OSError, ValueError, IndexError):
        return -1, None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str = "this folder") -> Iterator[Path]:
    """Hold ``folder/.counterwarp.lock`` while writing into ``folder``.

    A second process that tries to write the same folder is refused with a
    :class:`~counterwarp.errors.CounterwarpError` instead of interleaving its files. The lock
    file holds ``<pid> <host>``. A lock left behind by a killed process on this host (its pid
    no longer runs) is taken over; a lock written on another host (a shared file system) is
    never judged stale, since its pid cannot be checked from here.
    """
    import socket

    from counterwarp.errors import CounterwarpError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    host = socket.gethostname() or "localhost"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, holder_host = _read_lock(lock)
            other_host = holder_host is not None and holder_host != host
            if other_host and holder > 0:
                raise CounterwarpError(
                    f"{folder} is in use by a counterwarp process on host {holder_host} "
                    f"(pid {holder}) writing {what}; wait for it to finish, or delete {lock} "
                    f"if that process is gone"
                ) from None
            if holder > 0 and holder != os.getpid() and _pid_alive(holder):
                raise CounterwarpError(
                    f"{folder} is in use by another counterwarp process (pid {holder}) "
                    f"writing {what}; wait for it to finish, or delete {lock} if that "
                    f"process is gone"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale lock of a killed process
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {host}\n")
        break
    else:
        raise CounterwarpError(f"could not take the lock {lock}; delete it and retry")
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
