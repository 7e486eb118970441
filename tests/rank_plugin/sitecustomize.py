"""Test-only behaviour for the training processes the tests start (``odegpt launch``, ``launcher.train``), put
there from outside: the tests add this folder to ``PYTHONPATH``, so every Python process they start, DeepSpeed's
ranks included, imports it at start-up. It changes nothing until the module it patches is imported, and then
only what the environment asks for:

- ``data.corpora: [synthetic]``: deterministic synthetic token sequences (synthetic_data.py) instead of
  prepared corpora, for runs that test training rather than data;
- ``ODEGPT_FAULT_KILL=RANK:STEP``: that rank is killed (SIGKILL) as it starts that optimizer step;
- ``ODEGPT_FAULT_KILL_IN_SAVE=RANK:STEP``: killed in the middle of that step's checkpoint (its model and
  optimizer states written, its RNG state not);
- ``ODEGPT_FAULT_DISK_FULL_IN_SAVE=RANK:STEP``: that rank's write of that step's RNG state fails as a full
  disk makes ``torch.save`` fail;
- ``ODEGPT_FAULT_NONFINITE_STEPS=3,4,5``: the loss of those optimizer steps is NaN.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import signal
import sys


def _is_synthetic(config) -> bool:
    from synthetic_data import SYNTHETIC_CORPUS  # beside this file, on PYTHONPATH

    return list(config.data.corpora) == [SYNTHETIC_CORPUS]


def _patch_data(data) -> None:
    check_corpora, build_datasets = data.check_corpora, data.build_datasets

    def synthetic_check(config):
        if not _is_synthetic(config):
            check_corpora(config)

    def synthetic_datasets(config):
        if not _is_synthetic(config):
            return build_datasets(config)
        from synthetic_data import SYNTHETIC_VOCAB, SyntheticTokens  # beside this file, on PYTHONPATH

        t = config.train
        valid = 64 if config.eval.num_samples else 0
        return (SyntheticTokens(t.train_steps * t.global_batch_size, t.seq_len, SYNTHETIC_VOCAB, t.seed),
                SyntheticTokens(valid, t.seq_len, SYNTHETIC_VOCAB, t.seed + 1))

    data.check_corpora, data.build_datasets = synthetic_check, synthetic_datasets


def _rank_step(name: str) -> tuple[int, int] | None:
    spec = os.environ.get(name)
    return tuple(int(x) for x in spec.split(":")) if spec else None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_train(train) -> None:
    kill = _rank_step("ODEGPT_FAULT_KILL")
    nonfinite = {int(s) for s in os.environ.get("ODEGPT_FAULT_NONFINITE_STEPS", "").split(",") if s.strip()}
    trainer = train.Trainer
    if kill is not None:
        train_step = trainer.train_step

        @functools.wraps(train_step)
        def killing_train_step(self, *args, **kwargs):
            if kill == (self.rank, self.step):
                _die()
            return train_step(self, *args, **kwargs)

        trainer.train_step = killing_train_step
    if nonfinite:
        micro_batch_loss = trainer.micro_batch_loss

        @functools.wraps(micro_batch_loss)
        def nonfinite_loss(self, *args, **kwargs):
            terms = micro_batch_loss(self, *args, **kwargs)  # every loss term by name
            return {name: term * float("nan") for name, term in terms.items()} if self.step in nonfinite else terms

        trainer.micro_batch_loss = nonfinite_loss


def _patch_checkpointing(checkpointing) -> None:
    target, disk_full = _rank_step("ODEGPT_FAULT_KILL_IN_SAVE"), _rank_step("ODEGPT_FAULT_DISK_FULL_IN_SAVE")
    if target is None and disk_full is None:
        return
    save, rng_state, saving = checkpointing.Checkpointer.save, checkpointing.rng_state, []

    @functools.wraps(save)
    def recording_save(self, step, state):
        saving.append(step)
        try:
            return save(self, step, state)
        finally:
            saving.pop()

    def dying_rng_state():  # called once the engine's files are written, before this rank's RNG file
        import torch.distributed as dist

        if saving and (dist.get_rank(), saving[-1]) == target:
            _die()
        if saving and (dist.get_rank(), saving[-1]) == disk_full:  # what torch.save raises on a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return rng_state()

    checkpointing.Checkpointer.save, checkpointing.rng_state = recording_save, dying_rng_state


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patches[name](module)`` right after module ``name`` is first imported."""

    def __init__(self, patches: dict) -> None:
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):  # `python -m` finds the spec too but runs the code as __main__ without this
            exec_module(module)
            patch = self.patches.pop(name, None)
            if patch is not None:
                patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _AfterImport({"launcher.data": _patch_data, "launcher.train": _patch_train,
                                      "launcher.checkpointing": _patch_checkpointing}))
