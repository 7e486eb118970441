"""Torch-extension build locks left by killed builds, found and cleared before a launch.

DeepSpeed JIT-builds its ops (fused Adam, the CPU shared-memory all-reduce, ...) with
``torch.utils.cpp_extension``, which serializes builds with a ``lock`` file in the extension's build
directory and waits *forever*, silently, while that file exists. A process killed during a build
leaves it behind, and every later launch needing that op hangs. The builder creates the file with
``O_EXCL`` and keeps it open until it removes it, so a lock that no process has open is stale: its
owner died. That test cannot be fooled by a slow build or a reused pid, which an age or a pid file
could; it sees only this machine's processes, hence a lock file owned by another user (a shared
``TORCH_EXTENSIONS_DIR``, perhaps over NFS) is reported but never removed.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil


def extension_roots() -> list[Path]:
    """Where torch builds JIT extensions: ``$TORCH_EXTENSIONS_DIR``, else one folder per Python/accelerator
    (``py311_cpu``, ``py311_cu124``, ...) under torch's default build root."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return [Path(os.environ["TORCH_EXTENSIONS_DIR"])]
    # torch & co.: launcher.train imports this module before a rank's interruptible start-up
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(get_default_build_root())
    return sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []


@dataclass
class BuildLock:
    path: Path
    age_s: float
    holders: list[tuple[int, str]]  # (pid, process name) of the processes that have it open
    foreign: bool  # owned by another user: never removed

    @property
    def stale(self) -> bool:
        return not self.holders and not self.foreign


def _holders(paths: set[str]) -> dict[str, list[tuple[int, str]]]:
    """For each path, the processes of this machine that have it open (/proc/PID/fd)."""
    found: dict[str, list[tuple[int, str]]] = {p: [] for p in paths}
    for process in psutil.process_iter(["pid", "name"]):
        try:
            for opened in process.open_files():
                if opened.path in found:
                    found[opened.path].append((process.pid, process.info["name"]))
        except psutil.Error:  # gone, or another user's process (whose lock we would not remove anyway)
            continue
    return found


def find_build_locks(roots: list[Path] | None = None, older_than: float | None = None) -> list[BuildLock]:
    """Every ``<root>/<extension>/lock`` file (created before the time ``older_than``, if given), with its
    age and the live processes holding it."""
    locks = [p for root in (extension_roots() if roots is None else roots) for p in root.glob("*/lock")]
    if older_than is not None:
        locks = [p for p in locks if _mtime(p) < older_than]
    if not locks:
        return []
    holders = _holders({os.path.realpath(p) for p in locks})
    now, found = time.time(), []
    for path in locks:
        try:
            stat = path.stat()
        except FileNotFoundError:  # released meanwhile
            continue
        found.append(BuildLock(path, max(0.0, now - stat.st_mtime), holders[os.path.realpath(path)],
                               foreign=stat.st_uid != os.getuid()))
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def clear_stale_build_locks(say: Callable[[str], None], roots: list[Path] | None = None,
                            older_than: float | None = None) -> list[BuildLock]:
    """Remove the stale build locks (no process holds them) and say so in one line each; report the others
    (held by a live process, or another user's) with how to remove them. Returns the locks found."""
    locks = find_build_locks(roots, older_than)
    for lock in locks:
        if lock.stale:
            try:
                lock.path.unlink()
            except FileNotFoundError:
                continue
            say(f"removed a stale torch-extension build lock {lock.path} (age {_age(lock.age_s)}; no process "
                f"holds it: its builder was killed); building that extension would have waited on it forever")
        else:
            who = ", ".join(f"pid {pid} ({name})" for pid, name in lock.holders) or "another user"
            say(f"torch-extension build lock {lock.path} (age {_age(lock.age_s)}) is held by {who}; the launch "
                f"waits until it is released. If that build is stuck, stop it, or remove the lock: rm {lock.path}")
    return locks
