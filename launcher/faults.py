"""Preemption signals, the non-finite-loss guard, and test-only fault injection.

SIGTERM/SIGINT only set a flag; the training loop checks it once per optimizer step (agreed across
ranks by the step's all-reduce), saves and exits 0, so a preempted job loses at most one step.
Before the loop (:func:`interruptible_startup`) they raise :class:`StartupInterrupted` instead, so
whatever start-up holds is released on the way out (a torch-extension build lock above all) and the
process exits 143 (SIGTERM) or 130 (SIGINT).

Fault injection (for the tests) is read from the environment once, at start-up, and installed as
wrappers around the trainer's methods only when asked for: the training loop itself knows nothing
of it. ``ODEGPT_FAULT_KILL=RANK:STEP`` kills that rank as it starts that optimizer step,
``ODEGPT_FAULT_KILL_IN_SAVE=RANK:STEP`` kills it in the middle of that step's checkpoint, and
``ODEGPT_FAULT_NONFINITE_STEPS=3,4,5`` makes the loss of those optimizer steps NaN.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

# Environment variables of the fault injection; `odegpt launch` passes them on to every rank.
FAULT_VARIABLES = ("ODEGPT_FAULT_KILL", "ODEGPT_FAULT_KILL_IN_SAVE", "ODEGPT_FAULT_NONFINITE_STEPS")


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` optimizer steps in a row with a non-finite loss."""


class StopRequest:
    """Remembers that SIGTERM or SIGINT arrived; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> "StopRequest":
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


class StartupInterrupted(BaseException):
    """SIGTERM/SIGINT before the training loop. A BaseException, so ``except Exception`` never swallows it
    and every ``finally`` on the way out runs (torch's extension builder releases its lock in one)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by that signal


@contextlib.contextmanager
def interruptible_startup() -> Iterator[None]:
    """SIGTERM/SIGINT raise :class:`StartupInterrupted` inside this block. Python runs signal handlers only
    between bytecodes, so use it around Python-level work (checks, the extension build, whose compiler
    runs as a subprocess), never around a blocking C call such as the rendezvous, where the handler would
    wait until that call times out: there the default action, dying at once, is the better one."""
    def interrupt(signum, frame):
        raise StartupInterrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is interrupt:  # unless the block installed its own (StopRequest)
                signal.signal(signum, handler)


class NonFiniteGuard:
    """Counts optimizer steps in a row whose (all-reduced) loss is not finite."""

    def __init__(self, limit: int, streak: int = 0) -> None:
        self.limit = limit
        self.streak = streak

    def update(self, step: int, loss: float, finite: bool) -> None:
        self.streak = 0 if finite else self.streak + 1
        if self.streak >= self.limit:
            raise NonFiniteLossError(
                f"loss was not finite for {self.streak} optimizer steps in a row (last: step {step}, loss {loss}); "
                f"stopping without saving. The last checkpoint was written before the first bad step; lower "
                f"train.lr or raise train.max_nonfinite_steps ({self.limit}) to tolerate longer streaks.")


# ---- fault injection for the tests ----------------------------------------------------------------

def _rank_step(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    rank, step = (int(x) for x in spec.split(":"))
    return rank, step


@dataclass(frozen=True)
class FaultPlan:
    kill: tuple[int, int] | None = None  # (rank, optimizer step)
    kill_in_save: tuple[int, int] | None = None
    nonfinite_steps: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "FaultPlan":
        return cls(kill=_rank_step(environ.get("ODEGPT_FAULT_KILL")),
                   kill_in_save=_rank_step(environ.get("ODEGPT_FAULT_KILL_IN_SAVE")),
                   nonfinite_steps=frozenset(int(s) for s in environ.get("ODEGPT_FAULT_NONFINITE_STEPS", "").split(",")
                                             if s.strip()))

    def install(self, trainer) -> None:
        """Wrap the trainer's ``train_step``, ``micro_batch_loss`` and checkpoint writer where this plan asks."""
        rank = trainer.rank

        def die_at(target: tuple[int, int] | None, step: int) -> None:
            if target == (rank, step):
                os.kill(os.getpid(), signal.SIGKILL)

        if self.kill is not None:
            train_step = trainer.train_step

            @functools.wraps(train_step)
            def killing_train_step(*args, **kwargs):
                die_at(self.kill, trainer.step)
                return train_step(*args, **kwargs)

            trainer.train_step = killing_train_step
        if self.nonfinite_steps:
            micro_batch_loss = trainer.micro_batch_loss

            @functools.wraps(micro_batch_loss)
            def nonfinite_loss(*args, **kwargs):
                loss = micro_batch_loss(*args, **kwargs)
                return loss * float("nan") if trainer.step in self.nonfinite_steps else loss

            trainer.micro_batch_loss = nonfinite_loss
        if self.kill_in_save is not None:
            trainer.checkpointer.after_files_written = functools.partial(die_at, self.kill_in_save)
