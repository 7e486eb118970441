"""DeepSpeed checkpoints that survive a crash mid-save, keep the last K, and resume exactly.

Layout under ``<output_dir>/checkpoints``: one DeepSpeed tag directory per save (``step_00000100``)
holding DeepSpeed's own files, our per-rank RNG states, and — written by rank 0 only after every
rank has finished — a ``COMPLETE`` marker. ``latest`` (DeepSpeed's pointer file, so its own tools
still work) is replaced atomically after the marker. Resume only ever picks a tag with a marker,
so a save killed half-way is ignored and the previous checkpoint stays usable.

The client state (in DeepSpeed's model-states file) carries what the engine does not know: the
optimizer step, consumed samples, the step-size sampler and the run config.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import faults

COMPLETE = "COMPLETE"
LATEST = "latest"
TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> int:
    return int(tag[len(TAG_PREFIX):])


def complete_tags(checkpoint_dir: str | Path) -> list[str]:
    """Tags with a ``COMPLETE`` marker, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir()
            if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / COMPLETE).is_file()]
    return sorted(tags, key=step_of)


def latest_complete_tag(checkpoint_dir: str | Path) -> str | None:
    tags = complete_tags(checkpoint_dir)
    return tags[-1] if tags else None


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> tuple[Path, str] | None:
    """``--resume`` to (checkpoint dir, tag): ``auto`` = newest complete here (or none),
    a tag directory, or a checkpoints directory (its newest complete tag)."""
    if resume in (None, "", "none", "no"):
        return None
    if resume == "auto":
        tag = latest_complete_tag(checkpoint_dir)
        return (checkpoint_dir, tag) if tag else None
    path = Path(resume)
    if (path / COMPLETE).is_file():
        return path.parent, path.name
    tag = latest_complete_tag(path)
    if tag is None:
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (a tag directory with a "
                                f"{COMPLETE} marker, or a directory of them)")
    return path, tag


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, checkpoint_dir: Path, step: int, client_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the tag directory."""
    rank = dist.get_rank()
    tag = tag_for(step)
    tag_dir = checkpoint_dir / tag
    if rank == 0:
        # A leftover from a crashed save at this step must not look complete while being rewritten.
        (tag_dir / COMPLETE).unlink(missing_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), tag_dir / f"rng_state_rank{rank:05d}.pt")
    faults.maybe_kill(rank, step, "ODEGPT_FAULT_KILL_IN_SAVE")
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        _write_atomically(tag_dir / COMPLETE, f"{step}\n")
        _write_atomically(checkpoint_dir / LATEST, tag)
        prune(checkpoint_dir, keep_last)
    dist.barrier()
    return tag_dir


def prune(checkpoint_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete tags, and incomplete tags older than them."""
    tags = complete_tags(checkpoint_dir)
    keep = set(tags[-keep_last:])
    newest = step_of(tags[-1]) if tags else -1
    for path in checkpoint_dir.iterdir():
        if not (path.is_dir() and path.name.startswith(TAG_PREFIX)) or path.name in keep:
            continue
        if (path / COMPLETE).is_file() or step_of(path.name) < newest:
            shutil.rmtree(path, ignore_errors=True)


def load(engine, checkpoint_dir: Path, tag: str) -> dict:
    """Collective: restore engine, optimizer, scheduler and this rank's RNG; returns the client state."""
    path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir / tag}")
    rng_file = checkpoint_dir / tag / f"rng_state_rank{dist.get_rank():05d}.pt"
    if rng_file.is_file():  # absent when resuming on a different number of ranks
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
