"""The ODE solver behind odegpt: plan the steps of a solve, and integrate. The one solve loop lives here.

A pre-norm residual block ``h <- h + F(h)`` is one explicit Euler step of ``dh/dt = F(h)`` with
step 1. A shared segment of depth ``D`` is ONE block ``F`` integrated over time ``D``; with step
size ``a`` that takes ``ceil(D / a)`` steps, the last one shortened so the steps add up to ``D``.
An unshared segment is ``D`` distinct blocks, each always taking step 1 (ordinary layers).

- :func:`plan_solve`: a :class:`SolvePlan`, the one description of a solve: its step size, its method, and
  every step it executes (which block, for how long, from which time to which, into which KV-cache slots).
  Whatever needs a step's time or a solve's length reads it there.
- :data:`METHODS`: how one step is taken (a :class:`SolverMethod`: its step function, how many block
  evaluations and so KV-cache slots a step costs, and whether a step unrolls into Llama layers).
- :func:`integrate`: the loop over a plan, for every path that solves (the forward pass, cached decoding,
  adaptive depth, self-speculative drafts); a :class:`SolveHook` lets a decoder treat tokens differently
  at each step without writing a loop of its own.

Adding a method means adding a step function and one :data:`METHODS` entry here.

This file is copied verbatim into exported model folders, so it imports only torch.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
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
def _steps(segments: tuple[tuple[int, bool], ...], step_size: float) -> tuple[SolverStep, ...]:
    steps: list[SolverStep] = []
    block = 0
    for depth, shared in segments:
        if shared:
            steps.extend(SolverStep(block, dt) for dt in segment_step_sizes(depth, step_size))
            block += 1
        else:
            steps.extend(SolverStep(block + layer, 1.0) for layer in range(depth))
            block += depth
    return tuple(steps)


def plan_solve(segments: list[dict], step_size: float, max_steps: int = DEFAULT_MAX_SOLVER_STEPS,
               method: str = "euler") -> SolvePlan:
    """The solve at step size ``a`` with ``method``: every step it executes, in order. A solve of more than
    ``max_steps`` steps is refused before it is planned."""
    step_size = check_step_size(step_size)
    check_solve_length(segments, step_size, max_steps)
    return _solve_plan(tuple((s["depth"], s["shared"]) for s in segments), float(step_size), method)


def relaxation_knots(time: float, knots: int) -> list[tuple[int, float]]:
    """``(knot, weight)`` pairs of linear interpolation at ``time`` between knots at times 0, 1, ..., knots - 1
    (constant beyond the last): continuous in time, and exactly knot ``k`` at time ``k``. A relaxed shared block
    (odegpt.model.modeling_odegpt.OdeGPTLinear) interpolates its corrections so."""
    time = min(max(time, 0.0), knots - 1.0)
    knot = min(int(math.floor(time + _STEP_COUNT_TOLERANCE)), knots - 1)
    weight = time - knot
    return [(knot, 1.0)] if weight <= _STEP_COUNT_TOLERANCE else [(knot, 1.0 - weight), (knot + 1, weight)]


def segment_starts(segments: list[dict]) -> list[float]:
    """The solve time at which each block's segment starts, one entry per block."""
    starts, time = [], 0.0
    for segment in segments:
        starts.extend([time] * (1 if segment["shared"] else segment["depth"]))
        time += segment["depth"]
    return starts


def num_blocks(segments: list[dict]) -> int:
    """How many distinct blocks (parameter sets) the segments hold."""
    return sum(1 if s["shared"] else s["depth"] for s in segments)


def euler_step(block: torch.nn.Module, h: torch.Tensor, dt: float, cache=None, slot: int = 0, time: float = 0.0,
               first_attention: torch.Tensor | None = None, **attention_inputs) -> torch.Tensor:
    """``h <- h + dt * Attn(norm(h))``, then ``h <- h + dt * MLP(norm(h))``: one evaluation of the block at solve
    time ``time`` (which only a relaxed block reads), whose keys and values go to ``cache`` slot ``slot``.
    ``first_attention``: ``Attn(norm(h))`` computed before (its keys and values already in that slot)."""
    attention = first_attention if first_attention is not None else \
        block.attention_branch(h, time=time, cache=cache, slot=slot, **attention_inputs)
    h = _add_scaled(h, attention, dt)
    return _add_scaled(h, block.mlp_branch(h, time=time), dt)


def _add_scaled(h: torch.Tensor, update: torch.Tensor, dt: float) -> torch.Tensor:
    return h + update if dt == 1.0 else torch.add(h, update, alpha=dt)


def heun_step(block: torch.nn.Module, h: torch.Tensor, dt: float, cache=None, slot: int = 0, time: float = 0.0,
              first_attention: torch.Tensor | None = None, **attention_inputs) -> torch.Tensor:
    """Heun's method (explicit trapezoid): two evaluations of the block, at ``h`` and at the Euler prediction,
    averaged. With ``g(x) = (euler_step(x, dt) - x) / dt`` the block's increment per unit time,
    ``h + dt/2 (g(h) + g(h + dt g(h)))``, which is ``(h + euler_step(euler_step(h)))/2``."""
    predicted = euler_step(block, h, dt, cache, slot, time, first_attention, **attention_inputs)
    return (h + euler_step(block, predicted, dt, cache, slot + 1, time + dt, **attention_inputs)) / 2


# Why a Heun step is not a sequence of Llama layers: its update adds the four branch outputs at half weight
# to the state it started from, h + (u1 + u2 + u3 + u4)/2, but computes u2, u3, u4 from the full-weight
# intermediate states h + u1, h + u1 + u2, ... A residual layer can only add to the stream what it computes
# from the stream, which would then hold h + u1/2 where the method needs h + u1 (and RMSNorm's scale
# invariance cannot turn one into the other).
_HEUN_NOT_UNROLLABLE = ("a Heun step is h + (u1 + u2 + u3 + u4)/2 with u2, u3, u4 computed from the states "
                        "h + u1, ... that the residual stream of Llama layers never holds; export it unrolled "
                        "with the euler solver, or natively")


class SolverMethod(NamedTuple):
    """How one step of a solve is taken.

    ``step(block, h, dt, cache, slot, time, first_attention, **attention_inputs)`` returns the next state from time
    ``time``, writing the keys and values of its block evaluations to cache slots ``slot, slot + 1, ...``; its first
    evaluation starts with the attention branch at ``h``, which does not depend on ``dt`` and may be given
    (``first_attention``, see :func:`first_attention`); ``stage_times`` says when in the step, as a
    fraction of ``dt``, each evaluation stands (its length is the number of evaluations, and of KV-cache slots,
    per step). ``not_unrollable`` says why a step cannot become Llama layers, or is None when it can (one layer
    per step, ``dt`` folded into the branch outputs: odegpt/folders/export.py)."""

    name: str
    stage_times: tuple[float, ...]
    step: Callable[..., torch.Tensor]
    not_unrollable: str | None = None

    @property
    def evaluations(self) -> int:
        return len(self.stage_times)


METHODS: dict[str, SolverMethod] = {
    "euler": SolverMethod("euler", (0.0,), euler_step),
    "heun": SolverMethod("heun", (0.0, 1.0), heun_step, not_unrollable=_HEUN_NOT_UNROLLABLE),
}


def solver_method(name: object) -> SolverMethod:
    """The method called ``name``, or a ValueError listing the known ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"solver must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


class PlannedStep(NamedTuple):
    """One executed step of a solve: its index in the plan, which block's vector field, its length ``dt``, the solve
    times it starts and ends at, the KV-cache slots its block evaluations write, and whether it is the last."""

    index: int
    block: int
    dt: float
    start: float
    end: float
    slots: range
    last: bool


@dataclass(frozen=True)
class SolvePlan:
    """A solve: its step size, its method and every step it executes. Iterating it gives its steps."""

    step_size: float
    method: SolverMethod
    steps: tuple[PlannedStep, ...]

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index):
        return self.steps[index]

    @property
    def num_slots(self) -> int:
        """KV-cache slots of the solve: one per block evaluation."""
        return len(self.steps) * self.method.evaluations

    @property
    def blocks(self) -> tuple[int, ...]:
        """The block of every step, in order (two plans with the same blocks and lengths solve alike)."""
        return tuple(step.block for step in self.steps)


@lru_cache(maxsize=256)
def _solve_plan(segments: tuple[tuple[int, bool], ...], step_size: float, method: str) -> SolvePlan:
    solver, steps, time = solver_method(method), [], 0.0
    moves = _steps(segments, step_size)
    for index, (block, dt) in enumerate(moves):  # times summed in order: every reader sees the same floats
        first = index * solver.evaluations
        steps.append(PlannedStep(index, block, dt, time, time + dt, range(first, first + solver.evaluations),
                                 index == len(moves) - 1))
        time += dt
    return SolvePlan(step_size, solver, tuple(steps))


class SolveHook:
    """Per-step control of :func:`integrate` for decoders that treat tokens differently (adaptive depth).

    A hook is any object with some of these four methods: :func:`integrate` uses the default below for a
    method it lacks, so decoders that live outside the model's files (odegpt/decoding, which exported folders
    carry separately) need not import this class. The defaults integrate every token at every step."""

    def cache(self, step: PlannedStep, cache):
        """The cache this step's evaluations write to and attend over (e.g. one that fills some tokens' keys)."""
        return cache

    def evaluate(self, step: PlannedStep, h: torch.Tensor) -> bool:
        """Whether to evaluate the block at this step; when not, the state stays and :meth:`skipped` runs."""
        return True

    def skipped(self, step: PlannedStep, h: torch.Tensor) -> None:
        """Called for a step that was not evaluated (e.g. to fill the cache's slots for later tokens)."""

    def advance(self, step: PlannedStep, h: torch.Tensor, stepped: torch.Tensor) -> torch.Tensor:
        """The state to carry on from, given the state before the step and after it (e.g. frozen tokens keep
        theirs); also where a decoder observes the states of a solve."""
        return stepped


def integrate(blocks, h: torch.Tensor, plan: SolvePlan, cache=None, hook: SolveHook | None = None,
              checkpoint: Callable | None = None, start: int = 0, stop: int | None = None,
              first_attention: torch.Tensor | None = None, **attention_inputs) -> torch.Tensor:
    """The solve: take every step of ``plan`` from state ``h`` with its method; return the final state.

    ``blocks[i]`` is block ``i``'s vector field, ``cache`` holds ``plan.num_slots`` slots of keys and values (or is
    None), ``checkpoint(function, *args, **kwargs)`` recomputes a step in the backward pass (activation
    checkpointing), and ``hook`` shapes each step (:class:`SolveHook`'s methods, any of them).

    A solve may be taken in parts: only steps ``start`` to ``stop`` (exclusive) run, ``h`` being the state before
    step ``start``, and ``first_attention`` that step's first attention branch if it was computed before
    (:func:`first_attention`). Two solves at different step sizes run the same steps up to the first where their
    plans differ, and that step's first attention branch too: self-speculative decoding reuses its draft's."""
    evaluate, cache_for, skipped, advance = (getattr(hook, name, getattr(_PLAIN, name))
                                             for name in ("evaluate", "cache", "skipped", "advance"))
    take = plan.method.step if checkpoint is None else functools.partial(checkpoint, plan.method.step)
    for step in plan.steps[start:stop]:
        if evaluate(step, h):
            given = first_attention if step.index == start else None
            stepped = take(blocks[step.block], h, step.dt, cache_for(step, cache), step.slots.start, step.start,
                           given, **attention_inputs)
            h = advance(step, h, stepped)
        else:
            skipped(step, h)
    return h


def first_attention(blocks, h: torch.Tensor, plan: SolvePlan, index: int, cache=None, **attention_inputs
                    ) -> torch.Tensor:
    """Step ``index``'s first attention branch at states ``h`` (its keys and values to the step's first cache slot):
    the part of the step that its length does not change, to be given to :func:`integrate` as ``first_attention``."""
    step = plan.steps[index]
    return blocks[step.block].attention_branch(h, time=step.start, cache=cache, slot=step.slots.start,
                                               **attention_inputs)


_PLAIN = SolveHook()


class StateRecorder(SolveHook):
    """Keeps the state before the first step and after every step, with their times."""

    def __init__(self, h: torch.Tensor) -> None:
        self.states, self.times = [h], [0.0]

    def advance(self, step: PlannedStep, h: torch.Tensor, stepped: torch.Tensor) -> torch.Tensor:
        self.states.append(stepped)
        self.times.append(step.end)
        return stepped
