"""Preemption signals and the non-finite-loss guard.

SIGTERM/SIGINT only set a flag; the training loop checks it once per optimizer step (agreed across
ranks by the step's all-reduce), saves and exits 0, so a preempted job loses at most one step.
Before the loop (:func:`interruptible_startup`) they raise :class:`StartupInterrupted` instead, so
whatever start-up holds is released on the way out (a torch-extension build lock above all) and the
process exits 143 (SIGTERM) or 130 (SIGINT).
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

from .checkpointing import complete_tags, step_of


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.max_nonfinite_steps`` optimizer steps in a row with a non-finite loss."""


class StopRequest:
    """Remembers that SIGTERM or SIGINT arrived; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> StopRequest:
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
    """Counts optimizer steps in a row whose (all-reduced) loss is not finite; past ``limit`` it stops the run,
    naming the newest checkpoint in ``checkpoint_dir`` from before the streak, if there is one."""

    def __init__(self, limit: int, streak: int = 0, checkpoint_dir: Path | None = None) -> None:
        self.limit = limit
        self.streak = streak
        self.checkpoint_dir = checkpoint_dir

    def update(self, step: int, loss: float, finite: bool) -> None:
        self.streak = 0 if finite else self.streak + 1
        if self.streak >= self.limit:
            first = step - self.streak + 1
            raise NonFiniteLossError(
                f"loss was not finite for {self.streak} optimizer steps in a row (last: step {step}, loss {loss}); "
                f"stopping without saving. {self._what_remains(first)}; lower train.lr or raise "
                f"train.max_nonfinite_steps ({self.limit}) to tolerate longer streaks.")

    def _what_remains(self, first_bad_step: int) -> str:
        """The newest complete checkpoint from before ``first_bad_step`` — only one that exists is named."""
        tags = [tag for tag in complete_tags(self.checkpoint_dir) if step_of(tag) < first_bad_step] \
            if self.checkpoint_dir is not None else []
        if not tags:
            return f"No checkpoint was written before step {first_bad_step}, the first with a non-finite loss"
        return (f"The newest checkpoint from before step {first_bad_step}, the first with a non-finite loss, is "
                f"{self.checkpoint_dir / tags[-1]}")
