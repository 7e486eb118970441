"""DeepSpeed checkpoints that survive a crash mid-save, keep the last K, resume exactly, and load safely.

Layout under ``<output_dir>/checkpoints``: one DeepSpeed tag directory per save (``step_00000100``)
holding DeepSpeed's own files, our per-rank RNG states, ``odegpt_state.json`` (the optimizer step,
consumed samples, step-size sampler, run config and tokenizer: what the engine does not know) and — written
by rank 0 only after every rank has finished — a ``COMPLETE`` marker listing every file and its
size. ``latest`` (DeepSpeed's pointer file, so its own tools still work) is replaced atomically
after the marker. Resume only ever picks a tag with a marker, so a save killed half-way is ignored.

Nothing here unpickles arbitrary objects: our own files are tensors and plain types, and every
``torch.load`` of a checkpoint — ours and DeepSpeed's own inside ``load_checkpoint`` and
``zero_to_fp32`` — runs under :func:`safe_loading`, i.e. ``weights_only=True`` with an allowlist of
the few DeepSpeed types its files hold. A damaged checkpoint (a file missing, truncated or not a
checkpoint at all) is a :class:`CheckpointError` naming the checkpoint and the file.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.files import write_atomic, write_json_atomic

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE = "odegpt_state.json"
STATE_KEY = "odegpt"  # odegpt's state inside DeepSpeed's model-states file
MODEL_STATES = "mp_rank_00_model_states.pt"
UNIVERSAL_DIR = "zero"  # DeepSpeed's universal checkpoint: one folder per parameter under zero/
TAG_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the checkpoint and the bad file."""


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
            if p.is_dir() and p.name.startswith(TAG_PREFIX) and p.name[len(TAG_PREFIX):].isdigit()
            and (p / COMPLETE).is_file()]
    return sorted(tags, key=step_of)


def latest_complete_tag(checkpoint_dir: str | Path) -> str | None:
    tags = complete_tags(checkpoint_dir)
    return tags[-1] if tags else None


# ---- loading without unpickling arbitrary objects ----------------------------------------------

def _deepspeed_safe_globals() -> list:
    """The classes DeepSpeed 0.16-0.19 pickles into its checkpoint files (besides tensors and plain
    containers): loss scalers and fragment addresses (ZeRO 1/2 optimizer states) and the ZeRO stage enum."""
    # deepspeed reads DS_ACCELERATOR on import (set at a rank's start-up)
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Every ``torch.load`` inside runs with ``weights_only=True`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``,
    which overrides DeepSpeed's own ``weights_only=False``) and admits only DeepSpeed's types above."""
    # torch & co.: launcher.train imports this module before a rank's interruptible start-up
    import torch

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_file(path: Path, mmap: bool = False):
    """One checkpoint file, loaded safely; a file that is not a readable checkpoint is a CheckpointError."""
    # torch & co.: launcher.train imports this module before a rank's interruptible start-up
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is missing")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; a cut one loses its directory
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} cannot be read (not a PyTorch zip archive: "
                              f"truncated, or not a checkpoint at all)")
    try:
        with safe_loading():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # truncated zip, garbage, a global outside the allowlist, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} cannot be read ({reason})") from None


# ---- what a checkpoint holds --------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A complete, verified checkpoint and odegpt's state in it."""

    directory: Path  # the checkpoints/ directory
    tag: str
    state: dict  # step, consumed_samples, config, step_size_sampler, world_size, tokenizer
    universal: bool = False  # DeepSpeed's universal (world-size independent) layout, from ds_to_universal

    @property
    def path(self) -> Path:
        return self.directory / self.tag


def verify(checkpoint_dir: Path, tag: str) -> Checkpoint:
    """Check that every file the ``COMPLETE`` marker lists is there with its saved size, that every
    ``.pt`` file is a checkpoint that loads safely (structure only: tensors are memory-mapped; the RNG states
    too, although ``odegpt convert`` never reads them: a file that would run code is refused wherever it is),
    and read odegpt's state. Raises :class:`CheckpointError` naming the checkpoint and the file."""
    path = checkpoint_dir / tag
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        marker = None  # a marker from before file lists were recorded ("<step>\n")
    if isinstance(marker, dict):
        for name, size in sorted(marker.get("files", {}).items()):
            if not (path / name).is_file():
                raise CheckpointError(f"checkpoint {path}: {name} is missing")
            if (actual := (path / name).stat().st_size) != size:
                raise CheckpointError(f"checkpoint {path}: {name} is {actual} bytes, {size} when saved "
                                      f"(truncated or overwritten)")
    files = sorted(path.glob("*.pt"))
    if not files:
        raise CheckpointError(f"checkpoint {path}: no checkpoint files (*.pt) in it")
    for file in files:
        load_file(file, mmap=True)
    return Checkpoint(checkpoint_dir, tag, _checked_state(path, _read_state(path, files)))


def _checked_state(path: Path, state: dict) -> dict:
    """odegpt's state with its counters checked: an edited ``odegpt_state.json`` is named, not a traceback later."""
    for key in ("step", "consumed_samples"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
            raise CheckpointError(f"checkpoint {path}: {STATE} {key} must be a whole number >= 0, got {value!r} "
                                  f"(the file was edited or damaged)")
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint {path}: {STATE} has no run config (the file was edited or damaged)")
    return state


def _read_state(path: Path, files: list[Path]) -> dict:
    if (path / STATE).is_file():
        try:
            state = json.loads((path / STATE).read_text())
        except ValueError as error:
            raise CheckpointError(f"checkpoint {path}: {STATE} is not valid JSON ({error})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {path}: {STATE} is not a JSON object")
        return state
    # Checkpoints written before odegpt_state.json kept the state in DeepSpeed's model-states file.
    model_states = [f for f in files if f.name.endswith("model_states.pt")]
    state = load_file(model_states[0], mmap=True).get(STATE_KEY) if model_states else None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: no {STATE}; not written by odegpt's launcher")
    return state


def is_universal(path: Path) -> bool:
    return (path / UNIVERSAL_DIR).is_dir() and (path / MODEL_STATES).is_file()


def verify_universal(path: Path) -> Checkpoint:
    """A DeepSpeed universal checkpoint (``ds_to_universal``'s output for one of our checkpoints), checked as far
    as it can be: its model-states file loads safely and holds odegpt's state, and every parameter it lists
    has its fp32 weights and optimizer states under ``zero/``, each a file that loads safely. (DeepSpeed's tool
    writes no marker of completion; a conversion cut short misses files, and this finds them.)"""
    model_states = load_file(path / MODEL_STATES, mmap=True)
    state = model_states.get(STATE_KEY)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {MODEL_STATES} holds no odegpt state; a universal checkpoint "
                              f"must be converted from a checkpoint written by odegpt's launcher")
    names = [name for group in model_states.get("param_shapes") or [] for name in group]
    if not names:
        raise CheckpointError(f"checkpoint {path}: {MODEL_STATES} lists no parameters (param_shapes)")
    for name in names:
        for file in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"):
            if not (path / UNIVERSAL_DIR / name / file).is_file():
                raise CheckpointError(f"checkpoint {path}: {UNIVERSAL_DIR}/{name}/{file} is missing "
                                      f"(an incomplete ds_to_universal conversion?)")
    for file in sorted((path / UNIVERSAL_DIR).rglob("*.pt")):
        load_file(file, mmap=True)
    return Checkpoint(path.parent, path.name, state, universal=True)


def choose(resume: str | None, checkpoint_dir: Path, note: Callable[[str], None] = print) -> Checkpoint | None:
    """``--resume`` to a verified checkpoint: ``none`` = start fresh; ``auto`` = the newest complete one
    in ``checkpoint_dir`` (none there: start fresh); a tag directory = that one; a checkpoints directory =
    its newest complete one. With ``auto`` or a directory, a newest checkpoint that cannot be read is
    passed over for the previous complete one, and ``note`` says so; a named tag must itself be good."""
    if resume in (None, "", "none", "no"):
        return None
    if resume != "auto":
        path = Path(resume)
        if (path / COMPLETE).is_file():
            return verify(path.parent, path.name)
        if is_universal(path):
            return verify_universal(path)
        if not complete_tags(path):
            raise CheckpointError(f"--resume {resume}: no complete checkpoint there (a tag directory with a "
                                  f"{COMPLETE} marker, a directory of them, or a DeepSpeed universal checkpoint "
                                  f"made from one by ds_to_universal)")
        checkpoint_dir = path
    tags = complete_tags(checkpoint_dir)
    if not tags:
        return None
    failures = []
    for tag in reversed(tags):
        try:
            checkpoint = verify(checkpoint_dir, tag)
        except CheckpointError as error:
            failures.append(str(error))
            continue
        for failure in failures:
            note(f"{failure}; resuming from the previous complete checkpoint, {checkpoint.path}")
        return checkpoint
    raise CheckpointError(f"no complete checkpoint in {checkpoint_dir} can be read: {'; '.join(failures)}. "
                          f"Start over in another run.output_dir, or with --resume none")


# ---- saving and restoring (collective: every rank calls these) ------------------------------------

def rng_state() -> dict:
    """This process's RNG states as tensors and plain types (loads with ``weights_only=True``)."""
    # torch & co.: launcher.train imports this module before a rank's interruptible start-up
    import numpy as np
    import torch

    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    # torch & co.: launcher.train imports this module before a rank's interruptible start-up
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves every ``interval`` optimizer steps (0 = only when asked) and keeps the newest ``keep_last``."""

    def __init__(self, engine, checkpoint_dir: Path, interval: int, keep_last: int,
                 saved_step: int | None = None) -> None:
        self.engine, self.directory, self.interval, self.keep_last = engine, checkpoint_dir, interval, keep_last
        self.saved_step = saved_step  # the step of the checkpoint on disk that matches the engine

    def maybe_save(self, step: int, state: dict) -> Path | None:
        if self.interval and step % self.interval == 0:
            return self.save(step, state)
        return None

    def save(self, step: int, state: dict) -> Path | None:
        """Collective. Returns the tag directory, or None when this step is already saved."""
        # torch & co.: launcher.train imports this module before a rank's interruptible start-up
        import torch
        import torch.distributed as dist

        if self.saved_step == step:
            return None
        rank = dist.get_rank()
        tag_dir = self.directory / tag_for(step)
        if rank == 0:
            # A leftover from a crashed save at this step must not look complete while being rewritten.
            (tag_dir / COMPLETE).unlink(missing_ok=True)
        dist.barrier()
        # odegpt's state rides along in the model-states file too: DeepSpeed's ds_to_universal copies that file
        # into a universal checkpoint, which can then be resumed on another number of ranks.
        failure = None
        try:
            self.engine.save_checkpoint(str(self.directory), tag=tag_for(step), save_latest=False,
                                        client_state={**universal_checkpoint_info(), STATE_KEY: state})
            torch.save(rng_state(), tag_dir / f"rng_state_rank{rank:05d}.pt")
        except (OSError, RuntimeError) as error:  # a full disk: torch.save's "file write failed" is a RuntimeError
            failure = error
        failed = torch.tensor(float(failure is not None))
        dist.all_reduce(failed)  # every rank's files are on disk, or every rank stops here together
        if failed.item():
            self._abandon(tag_dir, step, failure)
        if rank == 0:
            write_json_atomic(tag_dir / STATE, state)
            files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != COMPLETE}
            write_json_atomic(tag_dir / COMPLETE, {"step": step, "files": files})
            write_atomic(self.directory / LATEST, tag_for(step))
            prune(self.directory, self.keep_last)
        dist.barrier()
        self.saved_step = step
        return tag_dir

    def _abandon(self, tag_dir: Path, step: int, failure: BaseException | None) -> None:
        """A save that failed on some rank: its partial files are removed (they would only fill the disk further;
        without a COMPLETE marker they are never resumed from) and every rank raises one line saying what is
        left to resume from."""
        # torch & co.: launcher.train imports this module before a rank's interruptible start-up
        import torch.distributed as dist

        if dist.get_rank() == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist.barrier()
        reason = "on another rank" if failure is None else \
            f"({(str(failure).strip().splitlines() or [type(failure).__name__])[-1]})"
        newest = latest_complete_tag(self.directory)
        raise CheckpointError(f"saving checkpoint step {step} to {tag_dir} failed {reason}, e.g. a full disk; its "
                              f"partial files were removed and the earlier checkpoints are intact (newest complete: "
                              f"{self.directory / newest if newest else 'none'}); free space, then resume with "
                              f"--resume auto")

    def load(self, checkpoint: Checkpoint) -> None:
        """Collective: restore the engine, optimizer, scheduler and this rank's RNG from a verified checkpoint."""
        # torch & co.: launcher.train imports this module before a rank's interruptible start-up
        import torch.distributed as dist

        try:
            with safe_loading():
                path, _ = self.engine.load_checkpoint(str(checkpoint.directory), tag=checkpoint.tag,
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
        except CheckpointError:
            raise
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"checkpoint {checkpoint.path} cannot be loaded: {reason}") from None
        if path is None:
            raise CheckpointError(f"checkpoint {checkpoint.path}: DeepSpeed found nothing to load in it")
        rng_file = checkpoint.path / f"rng_state_rank{dist.get_rank():05d}.pt"
        if rng_file.is_file():  # absent when resuming on more ranks than saved, and in universal checkpoints
            set_rng_state(load_file(rng_file))
        # A universal checkpoint lives outside checkpoints/: the first save writes one there, even at this step.
        self.saved_step = None if checkpoint.universal else checkpoint.state["step"]


def check_world_size(checkpoint: Checkpoint, world_size: int) -> None:
    """Refuse, naming the fix, a ZeRO checkpoint saved on another number of ranks: its optimizer partitions are
    per rank, and DeepSpeed's own error at load does not say what to do. A universal checkpoint (and stage 0,
    which partitions nothing) resumes on any number."""
    saved = checkpoint.state.get("world_size")
    stage = checkpoint.state.get("config", {}).get("deepspeed", {}).get("zero_stage", 0)
    if checkpoint.universal or stage == 0 or saved is None or saved == world_size:
        return
    universal = checkpoint.directory.parent / "universal" / checkpoint.tag
    raise CheckpointError(
        f"checkpoint {checkpoint.path} was saved on {saved} rank(s) with ZeRO-{stage}, whose optimizer state is "
        f"partitioned per rank, and this run has {world_size}: resume on {saved} rank(s), or convert it once with "
        f"`python -m deepspeed.checkpoint.ds_to_universal --input_folder {checkpoint.path} --output_folder "
        f"{universal}` and resume from that with `--resume {universal}` (any number of ranks)")


def universal_checkpoint_info() -> dict:
    """What DeepSpeed's ``ds_to_universal`` needs in the model-states file to convert a checkpoint to its
    universal (world-size independent) form without ``--inject_missing_state``: the format version. The model
    has no tensor or pipeline parallelism, so no parameter patterns to merge."""
    # deepspeed reads DS_ACCELERATOR on import (set at a rank's start-up)
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def prune(checkpoint_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete tags, and incomplete tags older than them."""
    tags = complete_tags(checkpoint_dir)
    keep = set(tags[-keep_last:])
    newest = step_of(tags[-1]) if tags else -1
    for path in checkpoint_dir.iterdir():
        if not (path.is_dir() and path.name.startswith(TAG_PREFIX) and path.name[len(TAG_PREFIX):].isdigit()) \
                or path.name in keep:
            continue
        if (path / COMPLETE).is_file() or step_of(path.name) < newest:
            shutil.rmtree(path, ignore_errors=True)
