"""Staged updates of a run folder: written beside the old files, swapped in only when complete.

A command that replaces files of a run folder (``train-classifier`` into an existing run,
``fit``) writes every new file into a hidden staging folder inside the run
(``RUN/.classifier-staging``, ``RUN/.fit-staging``) and moves them over the old ones only
once all of them are written. Until then the run's visible files stay byte for byte what
they were: an exception, a NaN, a full disk, Ctrl-C, SIGTERM or SIGKILL before the swap
changes none of them.

The swap itself is made safe by a marker: :meth:`Staging.commit` first writes
``commit.json`` (the names to move) into the staging folder, then renames the files one by
one (each ``os.replace`` is atomic). A process killed during those renames leaves the
marker behind, and the next writer of the run (holding the folder lock) finishes the swap
(:func:`recover_run`) before it does anything else.

Every artefact also records the sha256 (:func:`file_digest`) of what it was made from, so
a reader can tell a stale file from a current one (see :mod:`counterwarp.workflows.folder`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from counterwarp._io import atomic_path, write_text_atomic
from counterwarp._io.provenance import file_digest
from counterwarp.errors import CounterwarpError

__all__ = [
    "CLASSIFIER_STAGING",
    "COMMIT_NAME",
    "FIT_STAGING",
    "Staging",
    "disk_errors",
    "file_digest",
    "recover_run",
    "save_torch_file",
]

#: Hidden folder of a run where ``train-classifier`` writes before the swap.
CLASSIFIER_STAGING = ".classifier-staging"
#: Hidden folder of a run where ``fit`` writes its checkpoints, log and results before the
#: swap; a killed or failed fit's progress stays here for ``fit --resume``.
FIT_STAGING = ".fit-staging"
#: The marker of a swap in progress, inside a staging folder.
COMMIT_NAME = "commit.json"

#: errno values that mean "the disk (or the quota) is full".
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def save_torch_file(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """``torch.save`` ``payload`` to ``path`` atomically, the bytes written by Python.

    Given a file name, torch's own C++ writer reports a full disk as a ``RuntimeError``
    ("file write failed"); given a Python file object it raises the ``OSError``
    (``ENOSPC``) that :func:`disk_errors` turns into a message naming the file.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)
    return Path(path)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Staging:
    """The staging folder ``run/name`` and the swap of its files into ``run``.

    Call every method that changes files only while holding the run's folder lock.
    """

    def __init__(self, run: str | os.PathLike[str], name: str) -> None:
        self.run = Path(run)
        self.folder = self.run / name

    def __truediv__(self, name: str) -> Path:
        """The staged path of the run file ``name``."""
        return self.folder / name

    def start(self, keep: bool = False) -> Path:
        """Create the staging folder (emptied first unless ``keep``) and return it, after
        finishing any swap into the run that a killed process left half done."""
        recover_run(self.run)
        if not keep:
            self.discard()
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder

    def commit(self, names: Sequence[str]) -> list[Path]:
        """Move the staged files ``names`` (those that exist) into the run, then remove the
        staging folder; returns the run's paths that were replaced."""
        present = [name for name in names if (self.folder / name).is_file()]
        with disk_errors(self.folder / COMMIT_NAME, "nothing was swapped in"):
            write_text_atomic(self.folder / COMMIT_NAME, json.dumps(present))
        return self._finish(present)

    def recover(self) -> list[Path]:
        """Finish a swap a killed process left half done (its marker is present); returns
        the run's paths it moved (none when there was no swap to finish)."""
        marker = self.folder / COMMIT_NAME
        if not marker.is_file():
            return []
        try:
            names = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CounterwarpError(
                f"{marker}: damaged record of an interrupted update of {self.run}; delete "
                f"{self.folder} and rerun the command that wrote it"
            )
        return self._finish([n for n in names if "/" not in n and n not in ("", ".", "..")])

    def _finish(self, names: Sequence[str]) -> list[Path]:
        moved = []
        for name in names:
            staged = self.folder / name
            if staged.is_file():
                os.replace(staged, self.run / name)
                moved.append(self.run / name)
        _fsync_folder(self.run)
        self.discard()
        return moved

    def discard(self) -> None:
        """Remove the staging folder and everything in it."""
        shutil.rmtree(self.folder, ignore_errors=True)

    @contextlib.contextmanager
    def discarded_on_failure(self, discard: bool = True) -> Iterator[None]:
        """Remove the staged files when the block raises (an exception or Ctrl-C) and
        ``discard`` (the writing rank of a distributed run); re-raise."""
        try:
            yield
        except BaseException:
            if discard:
                self.discard()
            raise


def recover_run(run: str | os.PathLike[str]) -> None:
    """Finish every swap into ``run`` that a killed process left half done."""
    for name in (CLASSIFIER_STAGING, FIT_STAGING):
        Staging(run, name).recover()


@contextlib.contextmanager
def disk_errors(shown: str | os.PathLike[str], note: str) -> Iterator[None]:
    """Turn a full disk (or quota) while writing ``shown`` into a one-line
    :class:`CounterwarpError` naming ``shown`` (the user's path, not a temporary or staged
    one) and ending with ``note``; torch's own "file write failed" too."""
    try:
        yield
    except OSError as error:
        if error.errno not in _NO_SPACE:
            raise
        raise CounterwarpError(
            f"no space left on the device (or quota) while writing {shown} "
            f"({error.strerror or error}); {note}"
        ) from None
    except RuntimeError as error:  # torch's C++ file writer: a full disk among the causes
        if "write failed" not in str(error) and "failed writing" not in str(error):
            raise
        raise CounterwarpError(
            f"could not write {shown} (torch: file write failed; is the disk or the quota "
            f"full?); {note}"
        ) from None
