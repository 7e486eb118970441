"""One writer per output folder: a second `prepare` into the same corpus, a second training run into the same run
folder, or a second export into the same output is refused in one line naming the process that holds it, instead
of interleaving (or silently replacing) files.

An advisory ``fcntl`` lock on a lock file, held for as long as the writer needs it: the kernel releases it when
the process ends, however it ends, so a killed writer never leaves a stale lock. The file records who holds it
(host, pid, command) for the message. A folder written in place (a corpus, a run) keeps its lock inside,
``FOLDER/.odegpt.lock``; a folder that is staged and renamed into place (an export) keeps it beside,
``PARENT/.NAME.odegpt.lock``, where the rename cannot move it away, and removes it when done. A lock file can
be removed safely because a writer that locked it checks, once locked, that the file is still the one at that
path (else it locked a removed file, and tries again).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".odegpt.lock"
_held: dict[Path, int] = {}  # lock file -> open descriptor, for the life of this process


class FolderInUseError(OSError):
    """Another process writes this folder."""


def lock_file_inside(folder: Path) -> Path:
    return folder / LOCK_FILE


def lock_file_beside(folder: Path) -> Path:
    return folder.parent / f".{folder.name}{LOCK_FILE}"


def hold_writer_lock(folder: str | os.PathLike, what: str) -> None:
    """Take ``folder``'s writer lock for the rest of this process, or raise :class:`FolderInUseError` naming the
    holder. ``what`` names the folder in the message ("run folder", "corpus"). Taking it twice is a no-op."""
    folder = Path(folder).resolve()
    lock = lock_file_inside(folder)
    if lock not in _held:
        _held[lock] = _take(lock, folder, what)


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, what: str, beside: bool = False) -> Iterator[None]:
    """``folder``'s writer lock for the duration of the block (or :class:`FolderInUseError`); ``beside`` keeps the
    lock file next to the folder, for a folder that is renamed into place while the lock is held."""
    folder = Path(folder).resolve()
    lock = lock_file_beside(folder) if beside else lock_file_inside(folder)
    if lock in _held:  # this process holds it already
        yield
        return
    descriptor = _take(lock, folder, what)
    _held[lock] = descriptor
    try:
        yield
    finally:
        del _held[lock]
        if beside:  # removed while still locked: a writer that opened it meanwhile sees it gone, and retries
            lock.unlink(missing_ok=True)
        os.close(descriptor)  # closing releases the flock


def _take(lock: Path, folder: Path, what: str) -> int:
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = _try_lock(lock, folder, what)
        try:
            if os.stat(lock).st_ino == os.fstat(descriptor).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)  # the file was removed by the writer that held it: lock the one there now
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                     "command": " ".join(sys.argv)[:300]}).encode())
    return descriptor


def _try_lock(lock: Path, folder: Path, what: str) -> int:
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 4096).decode(errors="replace").strip()
        os.close(descriptor)
        try:
            holder = ", ".join(f"{k} {v}" for k, v in json.loads(holder).items())
        except ValueError:
            holder = holder or "unknown"
        raise FolderInUseError(f"{what} {folder} is being written by another process ({holder}); wait for it to "
                               f"finish or stop it, or choose another folder") from None
    return descriptor
