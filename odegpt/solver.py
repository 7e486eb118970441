"""The ODE solver behind odegpt: plan the steps of a solve, and take one step.

A pre-norm residual block ``h <- h + F(h)`` is one explicit Euler step of ``dh/dt = F(h)`` with
step 1. A shared segment of depth ``D`` is ONE block ``F`` integrated over time ``D``; with step
size ``a`` that takes ``ceil(D / a)`` steps, the last one shortened so the steps add up to ``D``.
An unshared segment is ``D`` distinct blocks, each always taking step 1 (ordinary layers).

This file is copied verbatim into exported model folders, so it imports only torch.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch

# Slack for float step sizes: D / a may land a hair above an integer (12 / 0.3 = 40.000000000000004),
# which must not add a step of length 1e-15.
_STEP_COUNT_TOLERANCE = 1e-9
# A solve longer than this is refused before anything is planned or computed (a typo such as
# --step-size 1e-6 would otherwise run for hours or exhaust memory). Models carry their own limit
# in ``config.max_solver_steps``; this is its default.
DEFAULT_MAX_SOLVER_STEPS = 1024


class SolveTooLongError(ValueError):
    """A step size so small that the solve would exceed the allowed number of steps."""


class SolverStep(NamedTuple):
    """One executed step: which block's vector field, and for how long (``dt``)."""

    block: int
    dt: float


def check_step_size(step_size: object, name: str = "step_size") -> float:
    """Return ``step_size`` as a float, or raise if it is not a real number > 0."""
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
        raise ValueError(f"{name} must be a real number > 0, got {step_size!r}")
    if step_size == float("inf"):
        raise ValueError(f"{name} must be finite, got {step_size!r}")
    return float(step_size)


def _segment_num_steps(depth: int, step_size: float) -> int:
    return max(1, math.ceil(depth / step_size - _STEP_COUNT_TOLERANCE))


def segment_step_sizes(depth: int, step_size: float) -> tuple[float, ...]:
    """Step lengths of a shared segment's solve: ``ceil(depth / a)`` steps summing to ``depth``."""
    num_steps = _segment_num_steps(depth, step_size)
    return (step_size,) * (num_steps - 1) + (depth - (num_steps - 1) * step_size,)


def count_steps(segments: list[dict], step_size: float) -> int:
    """How many steps a solve at ``step_size`` executes, computed without planning them."""
    return sum(_segment_num_steps(s["depth"], step_size) if s["shared"] else s["depth"] for s in segments)


def check_solve_length(segments: list[dict], step_size: float, max_steps: int = DEFAULT_MAX_SOLVER_STEPS) -> int:
    """The step count at ``step_size``; raise :class:`SolveTooLongError` if it exceeds ``max_steps``
    (and ``ValueError`` if ``step_size`` is not a finite real > 0)."""
    steps = count_steps(segments, check_step_size(step_size))
    if steps > max_steps:
        depth = sum(s["depth"] for s in segments)
        raise SolveTooLongError(
            f"step size {step_size:g} needs {steps:,} solver steps (trained depth {depth}), more than the "
            f"maximum of {max_steps:,}; use a step size >= {depth / max_steps:.3g} or raise max_solver_steps"
        )
    return steps


@lru_cache(maxsize=256)
def _plan(segments: tuple[tuple[int, bool], ...], step_size: float) -> tuple[SolverStep, ...]:
    plan: list[SolverStep] = []
    block = 0
    for depth, shared in segments:
        if shared:
            plan.extend(SolverStep(block, dt) for dt in segment_step_sizes(depth, step_size))
            block += 1
        else:
            plan.extend(SolverStep(block + layer, 1.0) for layer in range(depth))
            block += depth
    return tuple(plan)


def plan_solve(segments: list[dict], step_size: float, max_steps: int = DEFAULT_MAX_SOLVER_STEPS
               ) -> tuple[SolverStep, ...]:
    """Every step the model executes at step size ``a``, in order; one KV-cache slot per step.
    A solve of more than ``max_steps`` steps is refused before it is planned."""
    step_size = check_step_size(step_size)
    check_solve_length(segments, step_size, max_steps)
    return _plan(tuple((s["depth"], s["shared"]) for s in segments), float(step_size))


def num_blocks(segments: list[dict]) -> int:
    """How many distinct blocks (parameter sets) the segments hold."""
    return sum(1 if s["shared"] else s["depth"] for s in segments)


def euler_step(block: torch.nn.Module, h: torch.Tensor, dt: float, **attention_inputs) -> torch.Tensor:
    """``h <- h + dt * Attn(norm(h))``, then ``h <- h + dt * MLP(norm(h))``."""
    h = _add_scaled(h, block.attention_branch(h, **attention_inputs), dt)
    return _add_scaled(h, block.mlp_branch(h), dt)


def _add_scaled(h: torch.Tensor, update: torch.Tensor, dt: float) -> torch.Tensor:
    return h + update if dt == 1.0 else torch.add(h, update, alpha=dt)


# The seam for higher-order solvers: a step function maps (block, h, dt, attention inputs) to the next h.
# A multi-stage method (Heun, RK4) would also need one KV-cache slot per stage.
STEP_FUNCTIONS = {"euler": euler_step}
