"""Folders that one process at a time writes, all or nothing, without replacing foreign files.

The locks (:func:`folder_lock`), the transactions (:func:`output_transaction`) and their
union (:func:`writing_folder`); see :mod:`counterwarp._io` for the rules. Imports nothing
of counterwarp but :mod:`counterwarp.errors`, so :mod:`counterwarp._io` can build on it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from counterwarp.errors import CounterwarpError

_UMASK_GUARD = threading.Lock()


class ForeignFileError(CounterwarpError):
    """A command would replace a file that no counterwarp command created in its folder."""


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    Linux reports it in ``/proc/self/status``, a read with no side effect (so no other
    thread ever sees a wrong umask). Elsewhere it is read with the set-and-restore idiom of
    :func:`os.umask`, under a lock. Read at every file creation, so a program that changes
    its umask gets files with the new one.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_GUARD:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


#: The lock of a folder (unsharded writers).
LOCK_NAME = ".counterwarp.lock"


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


def lock_name(tag: str | None = None) -> str:
    """The lock file's name: ``.counterwarp.lock``, or ``.counterwarp.<tag>.lock`` for a
    shard (``tag = "shard-<i>-of-<n>"``)."""
    return LOCK_NAME if tag is None else f".counterwarp.{tag}.lock"


def shard_tag(shard: tuple[int, int] | None) -> str | None:
    """``"shard-<i>-of-<n>"`` for shard ``(i, n)`` of several; None unsharded (or ``n = 1``)."""
    if shard is None or shard[1] == 1:
        return None
    return f"shard-{shard[0]}-of-{shard[1]}"


#: Locks this process holds: absolute lock path -> nesting depth (a command calling another).
_HELD: dict[str, int] = {}


def _create_lock(lock: Path, content: str) -> bool:
    """Create ``lock`` already holding ``content``; False when it exists.

    Written to a temporary file and hard-linked into place, so no other process ever reads
    a lock file that is still empty (and takes it for a stale one); where the file system
    has no hard links, an exclusive create.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=".counterwarp.", suffix=".locking", dir=lock.parent)
    try:
        os.fchmod(fd, 0o644 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        try:
            os.link(tmp_name, lock)
        except FileExistsError:
            return False
        except OSError:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(content)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def _live_holder(lock: Path, host: str) -> str | None:
    """Who holds ``lock`` (``"another counterwarp process (pid N)"``), or None: no lock
    file, or one left by a process of this host that no longer runs (or by this process's
    pid in an earlier life). A lock of another host is always live: its pid cannot be
    checked from here."""
    if not lock.exists():
        return None
    holder, holder_host = _read_lock(lock)
    if holder_host is not None and holder_host != host and holder > 0:
        return f"a counterwarp process on host {holder_host} (pid {holder})"
    if holder > 0 and holder != os.getpid() and _pid_alive(holder):
        return f"another counterwarp process (pid {holder})"
    return None


def _in_use(folder: Path, holder: str, lock: Path, what: str) -> Exception:
    return CounterwarpError(
        f"{folder} is in use by {holder}; wait for it to finish before writing {what} there, "
        f"or delete {lock} if that process is gone"
    )


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike[str], what: str = "this folder", *, tag: str | None = None
) -> Iterator[Path]:
    """Hold ``folder/.counterwarp.lock`` while writing into ``folder``.

    A second process that tries to write the same folder is refused with a
    :class:`~counterwarp.errors.CounterwarpError` instead of interleaving its files. The lock
    file holds ``<pid> <host>``. A lock left behind by a killed process on this host (its pid
    no longer runs) is taken over; a lock written on another host (a shared file system) is
    never judged stale, since its pid cannot be checked from here.

    ``tag`` (see :func:`shard_tag`) takes ``.counterwarp.<tag>.lock`` instead: the shards of
    one array job share a folder and write disjoint files, so each shard excludes only a
    second copy of itself, and the unsharded lock. An unsharded writer, in turn, is refused
    while any shard's lock is live. The same process taking a lock it already holds (one
    command calling another) nests. A folder the lock created is removed again at the end
    when nothing was written into it.
    """
    import socket

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / lock_name(tag)
    key = os.path.abspath(lock)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield lock
        finally:
            _HELD[key] -= 1
        return
    host = socket.gethostname() or "localhost"
    for _ in range(2):
        if _create_lock(lock, f"{os.getpid()} {host}\n"):
            break
        holder = _live_holder(lock, host)
        if holder is not None:
            raise _in_use(folder, holder, lock, what) from None
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()  # stale lock of a killed process
    else:
        raise CounterwarpError(f"could not take the lock {lock}; delete it and retry")
    _HELD[key] = 1
    try:
        others = [folder / LOCK_NAME] if tag else sorted(folder.glob(".counterwarp.*.lock"))
        for other in others:
            holder = _live_holder(other, host) if other != lock else None
            if holder is not None:
                raise _in_use(folder, f"{holder}, lock {other.name}", other, what)
        yield lock
    finally:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: nothing was written


#: Hidden folder of counterwarp's bookkeeping inside an output folder.
STATE_DIR = ".counterwarp"
#: Open transactions of this process, innermost last.
_TRANSACTIONS: list[_Transaction] = []


class _Transaction:
    """What one command changed in ``folder``, to undo it on failure (see
    :func:`output_transaction`)."""

    def __init__(self, folder: Path, tag: str | None, overwrite: bool, hint: str) -> None:
        self.folder = Path(os.path.abspath(folder))
        self.pid = os.getpid()
        self.state = self.folder / STATE_DIR
        suffix = f".{tag}" if tag else ""
        self.ledger = self.state / f"files{suffix}.txt"
        # old versions of replaced files; one folder per open transaction
        self.backups = self.state / f"backup{suffix}-{self.pid}-{len(_TRANSACTIONS)}"
        self.overwrite, self.hint = overwrite, hint
        self.state_existed = self.state.is_dir()
        self.ledger_size = self.ledger.stat().st_size if self.ledger.is_file() else None
        self.owned = owned_files(self.folder)
        self.changed: dict[Path, Path | None] = {}  # final -> hard link to its old version
        self.new_folders: list[Path] = []
        self.kept = False
        mine = {t.backups for t in _TRANSACTIONS}
        for stale in self.state.glob(f"backup{suffix}-*"):  # of a killed command, same lock
            if stale not in mine:
                shutil.rmtree(stale, ignore_errors=True)

    def contains(self, path: Path) -> bool:
        return self.pid == os.getpid() and path.is_relative_to(self.folder)

    def note_folders(self, parent: Path) -> None:
        """Remember the folders up to ``parent`` that do not exist yet (removed on undo)."""
        missing = []
        parent = Path(os.path.abspath(parent))
        for folder in [parent, *parent.parents]:
            if folder == self.folder or folder.exists() or not folder.is_relative_to(
                    self.folder):
                break
            missing.append(folder)
        self.new_folders.extend(reversed(missing))

    def before_replace(self, final: Path) -> None:
        """Called just before ``final`` is renamed into place: refuse a foreign file, keep
        the old version, and record the name as counterwarp's (before the file exists)."""
        final = Path(os.path.abspath(final))
        if final in self.changed:
            return
        name = final.relative_to(self.folder).as_posix()
        backup = None
        if final.exists() or final.is_symlink():
            if name not in self.owned and not self.overwrite:
                raise ForeignFileError(
                    f"{final} exists and was not written there by counterwarp; {self.hint}"
                )
            self.backups.mkdir(parents=True, exist_ok=True)
            backup = self.backups / str(len(self.changed))
            try:
                os.link(final, backup, follow_symlinks=False)
            except OSError:  # no hard links on this file system: move the old one aside
                os.replace(final, backup)
        if name not in self.owned and "\n" not in name:
            self.state.mkdir(exist_ok=True)
            with open(self.ledger, "a", encoding="utf-8") as handle:
                handle.write(name + "\n")
            self.owned.add(name)
        self.changed[final] = backup

    def commit(self) -> None:
        shutil.rmtree(self.backups, ignore_errors=True)

    def rollback(self) -> None:
        """Remove what the command created, put back what it replaced."""
        for final, backup in reversed(list(self.changed.items())):
            with contextlib.suppress(OSError):
                if backup is None:
                    final.unlink()
                else:
                    os.replace(backup, final)
        shutil.rmtree(self.backups, ignore_errors=True)
        with contextlib.suppress(OSError):
            if self.ledger_size is None:
                self.ledger.unlink()
            else:
                os.truncate(self.ledger, self.ledger_size)
        for folder in reversed(self.new_folders):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if not self.state_existed:
            with contextlib.suppress(OSError):
                self.state.rmdir()

    def keep(self) -> None:
        """Keep what was written so far even if the command then fails."""
        self.kept = True


def owned_files(folder: str | os.PathLike[str]) -> set[str]:
    """Names (relative, ``/``-separated) of the files counterwarp commands created in
    ``folder``, from its ``.counterwarp/files*.txt`` lists."""
    names: set[str] = set()
    for ledger in (Path(folder) / STATE_DIR).glob("files*.txt"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            names.update(line for line in ledger.read_text(encoding="utf-8").splitlines()
                         if line)
    return names


def _transaction_for(path: Path) -> _Transaction | None:
    """The innermost open transaction of this process whose folder holds ``path``."""
    target = Path(os.path.abspath(path))
    found = [t for t in _TRANSACTIONS if t.contains(target)]
    return max(reversed(found), key=lambda t: len(t.folder.parts)) if found else None


@contextlib.contextmanager
def output_transaction(
    folder: str | os.PathLike[str], *, tag: str | None = None, overwrite: bool = False,
    hint: str = "move it away, or choose another output folder",
) -> Iterator[_Transaction]:
    """Make the writes of this process into ``folder`` (and below) all-or-nothing.

    Every :func:`atomic_path` write under ``folder`` inside the block is recorded. If the
    block raises, files it created are deleted and files it replaced are restored, byte for
    byte (their old versions are kept as hard links until the block ends), unless
    ``transaction.keep()`` was called (a command that keeps its finished part on purpose).
    Replacing a file that counterwarp did not create in ``folder`` raises
    :class:`~counterwarp.errors.CounterwarpError` (ending in ``hint``), unless
    ``overwrite``. Hold :func:`folder_lock` (same ``tag``) around it; see
    :func:`writing_folder`.
    """
    transaction = _Transaction(Path(folder), tag, overwrite, hint)
    _TRANSACTIONS.append(transaction)
    try:
        yield transaction
    except BaseException:
        _TRANSACTIONS.remove(transaction)
        if transaction.kept:
            transaction.commit()
        else:
            transaction.rollback()
        raise
    _TRANSACTIONS.remove(transaction)
    transaction.commit()


@contextlib.contextmanager
def writing_folder(
    folder: str | os.PathLike[str], what: str, *, tag: str | None = None,
    overwrite: bool = False, hint: str = "move it away, or choose another output folder",
) -> Iterator[_Transaction]:
    """:func:`folder_lock` and :func:`output_transaction` of ``folder``: how a command
    writes its output folder (one writer at a time, nothing foreign replaced, nothing left
    half-done by an error)."""
    with folder_lock(folder, what, tag=tag), output_transaction(
        folder, tag=tag, overwrite=overwrite, hint=hint
    ) as transaction:
        yield transaction
