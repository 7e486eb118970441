"""Preemption signals, the non-finite-loss guard, and test-only fault injection.

SIGTERM/SIGINT only set a flag; the training loop checks it once per optimizer step (agreed across
ranks by the step's all-reduce), saves and exits 0, so a preempted job loses at most one step.
"""
from __future__ import annotations

import os
import signal


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


# ---- fault injection for the tests (environment variables, never set in real runs) ----------

def _steps(variable: str) -> set[int]:
    value = os.environ.get(variable, "")
    return {int(s) for s in value.split(",") if s.strip()}


def inject_nonfinite(step: int) -> bool:
    """ODEGPT_FAULT_NONFINITE_STEPS=3,4,5: pretend the loss of those optimizer steps is NaN."""
    return step in _steps("ODEGPT_FAULT_NONFINITE_STEPS")


def maybe_kill(rank: int, step: int, variable: str = "ODEGPT_FAULT_KILL") -> None:
    """ODEGPT_FAULT_KILL=RANK:STEP: that rank dies (SIGKILL) when it reaches that optimizer step;
    ODEGPT_FAULT_KILL_IN_SAVE=RANK:STEP: it dies in the middle of that step's checkpoint."""
    spec = os.environ.get(variable)
    if spec:
        kill_rank, kill_step = (int(x) for x in spec.split(":"))
        if (rank, step) == (kill_rank, kill_step):
            os.kill(os.getpid(), signal.SIGKILL)
