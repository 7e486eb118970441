"""One writer per output folder: a second `prepare` into the same corpus, or a second training run into the
same run folder, is refused in one line naming the process that holds it, instead of interleaving files.

An advisory ``fcntl`` lock on ``FOLDER/.odegpt.lock``, held for as long as the writer lives: the kernel
releases it when the process ends, however it ends, so a killed writer never leaves a stale lock. The file
records who holds it (host, pid, command) for the message.
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
_held: dict[Path, int] = {}  # folder -> open descriptor, for the life of this process


class FolderInUseError(OSError):
    """Another process writes this folder."""


def hold_writer_lock(folder: str | os.PathLike, what: str) -> None:
    """Take ``folder``'s writer lock for the rest of this process, or raise :class:`FolderInUseError` naming the
    holder. ``what`` names the folder in the message ("run folder", "corpus"). Taking it twice is a no-op."""
    folder = Path(folder).resolve()
    if folder not in _held:
        _held[folder] = _take(folder, what)


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """``folder``'s writer lock for the duration of the block (or :class:`FolderInUseError`)."""
    folder = Path(folder).resolve()
    if folder in _held:  # this process holds it already
        yield
        return
    descriptor = _take(folder, what)
    try:
        yield
    finally:
        os.close(descriptor)  # closing releases the flock


def _take(folder: Path, what: str) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
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
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                     "command": " ".join(sys.argv)[:300]}).encode())
    return descriptor
