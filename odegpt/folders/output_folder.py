"""The folder a command writes (``convert``, ``import``, ``export``): claimed, never assumed.

A command takes its output the way training takes a run folder, for the whole time it works:

1. checked before any work: never the folder being read, inside it or holding it; a file or an unwritable place
   is refused; an existing folder may be replaced (``--overwrite``) only when it is an earlier output of the same
   kind (:mod:`data_pipeline.folder_kinds`): a model folder, never a run with its checkpoints, a corpus, a
   tokenizer or a folder of the user's own files;
2. locked from that check to the end (a lock file beside the folder, removed when done): a second writer is
   refused at once, naming the process that holds it;
3. written under a temporary name beside it and renamed into place when complete, the check repeated under the
   lock right before the rename: a folder that appeared meanwhile is never replaced (the new output is kept
   under another name, and the message says where).

A command that fails or is stopped (SIGTERM, Ctrl-C) leaves what was there; a killed one leaves a hidden
``.NAME.*.partial`` folder, which the next claim of ``NAME`` removes (and a replaced folder that a kill left under
``.NAME.*.old``, it puts back).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.folder_kinds import DESCRIPTIONS, EMPTY, folder_kind
from data_pipeline.writer_lock import FolderInUseError, writer_lock
from odegpt.errors import InputError


def check_not_source(source: Path, output: Path, source_option: str = "--model") -> None:
    """Refuse an output that would destroy the input ``source``: the same folder, inside it, or holding it."""
    source, target = source.resolve(), output.resolve()
    if target == source or source in target.parents:
        where = f"the {source_option} folder" if target == source else f"inside {source_option}"
        raise InputError(f"--output {output} is {where} {source}: that would overwrite what is being read; "
                         f"choose another folder")
    if target in source.parents:
        raise InputError(f"--output {output} holds the {source_option} folder {source}; choose another folder")


def check_writable(output: Path, option: str = "--output") -> None:
    """Refuse, before any work, an output folder that is a file or that cannot be created or written."""
    if output.exists() and not output.is_dir():
        raise InputError(f"{option} {output} is a file, not a folder")
    existing = next(folder for folder in (output.absolute(), *output.absolute().parents) if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option} {output}: {existing} is not writable")


def check_replaceable(output: Path, kind: str, overwrite: bool) -> None:
    """An existing ``output`` may be replaced only with ``overwrite`` and only when it is a folder of ``kind``."""
    found = folder_kind(output)
    if found.kind == EMPTY:
        return
    if found.kind != kind:
        raise InputError(f"--output {output} exists and is not {DESCRIPTIONS[kind]}: it is {found.describe()}, which "
                         f"is never replaced (--overwrite replaces only {DESCRIPTIONS[kind]}); choose another folder")
    if not overwrite:
        raise InputError(f"--output {output} exists and is not empty ({found.describe()}); choose another folder, "
                         f"or pass --overwrite to replace it")


@contextlib.contextmanager
def claimed_output(output: Path, kind: str, overwrite: bool, source: Path | None = None,
                   source_option: str = "--model") -> Iterator[Path]:
    """Claim ``output`` for writing a folder of ``kind`` (see the module docstring) and yield an empty staging
    folder beside it, which becomes ``output`` when the block completes. Call it before the work that leads to the
    output, so that every check comes first and the lock covers the whole of it."""
    if source is not None:
        check_not_source(source, output, source_option)
    check_writable(output)
    target = output.resolve()
    try:
        with writer_lock(target, "--output", beside=True):
            _recover_leftovers(target)
            check_replaceable(output, kind, overwrite)
            staging = _staging_folder(target)
            try:
                try:
                    yield staging
                except OSError as error:  # a full disk while writing: name --output, not the staging folder
                    if error.filename and str(error.filename).startswith(str(staging)):
                        raise OSError(error.errno, error.strerror, str(output)) from None
                    raise
                before_publish(staging, target)
                _publish(staging, output, target, kind, overwrite)
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
    except FolderInUseError as error:
        raise InputError(str(error)) from None


def before_publish(staging: Path, target: Path) -> None:
    """Called with the lock held, between the work and the final check and rename (a seam for tests that race
    another writer against this one deterministically)."""


def _publish(staging: Path, output: Path, target: Path, kind: str, overwrite: bool) -> None:
    """Rename ``staging`` to ``target`` after checking again what is there now; a replaced folder goes last."""
    try:
        check_replaceable(output, kind, overwrite)
    except InputError as error:
        kept = _kept_name(target)
        staging.rename(kept)
        raise InputError(f"{error} (it changed while this command ran; nothing was replaced, and the new "
                         f"output ({DESCRIPTIONS[kind]}) is kept in {kept})") from None
    previous = None
    if target.exists():
        previous = target.with_name(staging.name.removesuffix(".partial") + ".old")
        target.rename(previous)
    staging.rename(target)
    if previous is not None:
        shutil.rmtree(previous)


def _staging_folder(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # what mkdir would have given (mkdtemp makes it private)
    return staging


def _recover_leftovers(target: Path) -> None:
    """Under the lock, no live writer owns a staged or set-aside folder of ``target``: remove the staged ones, and
    put back a replaced folder that a killed writer had set aside but not yet replaced."""
    name = glob.escape(target.name)
    for leftover in sorted(target.parent.glob(f".{name}.*.old")):
        if not target.exists():
            leftover.rename(target)
        else:
            shutil.rmtree(leftover)
    for leftover in target.parent.glob(f".{name}.*.partial"):
        shutil.rmtree(leftover)


def _kept_name(target: Path) -> Path:
    for number in range(1, 1000):
        kept = target.with_name(f"{target.name}.new-{number}")
        if not kept.exists():
            return kept
    raise InputError(f"--output {target}: too many kept outputs beside it ({target.name}.new-*); remove them")
