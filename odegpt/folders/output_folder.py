"""Writing a folder for odegpt's commands (export, convert): never over the input, never half-written.

The output is written beside its final name under a temporary one and renamed when complete, so a command
that fails (disk full, Ctrl-C) leaves what was there; an existing non-empty folder is replaced only when the
user says so (``--overwrite``), and never when it is, holds or lies inside the folder being read.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from odegpt.commands.cli import CommandError


def check_output(source: Path, output: Path, overwrite: bool, source_option: str = "--model") -> None:
    """Refuse an output that would destroy the input ``source`` (the same folder, inside it, or holding it) or,
    without ``overwrite``, a folder that already holds files."""
    source, target = source.resolve(), output.resolve()
    if target == source or source in target.parents:
        where = f"the {source_option} folder" if target == source else f"inside {source_option}"
        raise CommandError(f"--output {output} is {where} {source}: that would overwrite what is being read; "
                           f"choose another folder")
    if target in source.parents:
        raise CommandError(f"--output {output} holds the {source_option} folder {source}; choose another folder")
    check_writable(output)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CommandError(f"--output {output} exists and is not empty; choose another folder, or pass --overwrite "
                           f"to replace it")


def check_writable(output: Path, option: str = "--output") -> None:
    """Refuse, before any work, an output folder that is a file or that cannot be created or written."""
    if output.exists() and not output.is_dir():
        raise CommandError(f"{option} {output} is a file, not a folder")
    existing = next(folder for folder in (output.absolute(), *output.absolute().parents) if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {output}: {existing} is not writable")


@contextlib.contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A temporary folder beside ``output`` that becomes ``output`` only when the block completes: an export
    that fails (disk full, Ctrl-C) leaves ``output`` as it was, and a replaced folder is removed last."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # what mkdir would have given (mkdtemp makes it private)
    try:
        yield staging
        previous = output.with_name(staging.name.replace(".partial", ".old")) if output.exists() else None
        if previous is not None:
            output.rename(previous)
        staging.rename(output)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
