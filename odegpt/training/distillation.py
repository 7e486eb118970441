"""Distillation from a source model, consistent with the step size: what a retrofitted model learns from the model
it was made from.

The source (the teacher, frozen) is a plain stack of ``L`` layers: its residual stream after layer ``t`` is a sample,
at ODE time ``t``, of the trajectory the student's shared vector field should follow. So besides matching the source's
next-token distribution (``kl``), the student solved at step size ``a`` matches its state after each solver step, at
the step's end time ``t``, to the source's stream after layer ``t`` (``trajectory``): at ``a = 2`` the states after
layers 2, 4, ...; a Heun step at its end; a step that ends between layers is not compared. The distance is relative
(``||h_student - h_source||^2 / ||h_source||^2`` per token): real models carry a few very large activation
channels, which an absolute error would let dominate.

``stepwise`` trains the trajectory term alone, each solver step from the source's own state at the step's start (so
the steps train independently, without error carried from the steps before, and need no backward through depth): a
warm start for a retrofitted model before the whole solve is distilled. Steps that start or end between layer times
(``a = 0.5``) are taken together from one layer time to the next. ``steps_per_sample`` trains a random subset of the
pieces each micro-batch ("one layer-time at a time" with 1).

The teacher is called as an odegpt model (an imported Llama is one, ``odegpt.folders.importing.load_as_odegpt``), at
step size 1, for its logits and its states after every layer; it never receives gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_TIME_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Distillation:
    """The distillation terms' weights (``train.distill_*``); see the module docstring."""

    kl_weight: float = 1.0
    temperature: float = 1.0
    trajectory_weight: float = 0.0
    stepwise: bool = False
    steps_per_sample: int = 0  # stepwise: solver steps trained per micro-batch (0: all)

    def __post_init__(self) -> None:
        for name in ("kl_weight", "trajectory_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.stepwise and self.trajectory_weight <= 0:
            raise ValueError("stepwise distillation trains the trajectory term alone: give it a trajectory weight > 0")
        if isinstance(self.steps_per_sample, bool) or self.steps_per_sample < 0:
            raise ValueError(f"steps_per_sample must be an integer >= 0 (0: every step), got {self.steps_per_sample!r}")

    @property
    def needs_states(self) -> bool:
        return self.trajectory_weight > 0


@dataclass
class TeacherView:
    """What the student is compared with: the source's logits and its states at times 0, 1, ..., L (before the
    final norm)."""

    logits: torch.Tensor
    states: tuple[torch.Tensor, ...]


@torch.no_grad()
def teacher_view(teacher: torch.nn.Module, inputs: torch.Tensor, states: bool) -> TeacherView:
    """The teacher on ``inputs`` at step size 1: its float logits and, when asked, its states after every layer."""
    out = teacher(input_ids=inputs, step_size=1.0, use_cache=False, output_hidden_states=states)
    return TeacherView(out.logits.float(), tuple(out.hidden_states) if states else ())


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(p_teacher || p_student)`` at temperature ``T``, averaged over tokens (the T^2 keeps the gradient's
    scale independent of T, as in Hinton et al.)."""
    t = temperature
    student = (student_logits.float() / t).flatten(0, 1).log_softmax(-1)
    teacher = (teacher_logits.float() / t).flatten(0, 1).log_softmax(-1)
    return t * t * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def relative_error(state: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||state - target||^2 / ||target||^2`` per token, averaged."""
    target = target.float()
    return ((state.float() - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp(min=1e-12)).mean()


def matched_steps(plan, num_layers: int) -> list[int]:
    """Indices of the plan's steps that end on a layer time of the source (1..L): where the trajectory is compared."""
    return [step.index for step in plan
            if abs(step.end - round(step.end)) < _TIME_TOLERANCE and 1 <= round(step.end) <= num_layers]


def trajectory_loss(student_states: tuple[torch.Tensor, ...], plan, teacher_states: tuple[torch.Tensor, ...]
                    ) -> torch.Tensor:
    """The student's states after each solver step (``student_states[k + 1]`` after step ``k``) against the source's
    at the same times; mean over the compared steps."""
    matched = matched_steps(plan, len(teacher_states) - 1)
    if not matched:
        return student_states[-1].new_zeros(())
    errors = [relative_error(student_states[k + 1], teacher_states[round(plan[k].end)]) for k in matched]
    return torch.stack(errors).mean()


def stepwise_trajectory_loss(module, inputs: torch.Tensor, plan, teacher_states: tuple[torch.Tensor, ...],
                             steps_per_sample: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The solve cut at the source's layer times it reaches (:func:`matched_steps`), each piece taken alone from the
    source's state at its start (detached) and compared with the source's state at its end: the pieces train
    independently. A piece is one step where steps end on layer times (``a`` = 1, 2, ...), several where they do
    not (at ``a = 0.5``, two steps from layer ``t`` to layer ``t + 1``). ``steps_per_sample`` pieces at random (0:
    all)."""
    ends = matched_steps(plan, len(teacher_states) - 1)
    pieces = [range(first, last + 1) for first, last in zip([0] + [end + 1 for end in ends[:-1]], ends)]
    if steps_per_sample and len(pieces) > steps_per_sample:
        chosen = torch.randperm(len(pieces), generator=generator)[:steps_per_sample].tolist()
        pieces = [pieces[i] for i in sorted(chosen)]
    attention = module.attention_inputs(teacher_states[0])
    errors = []
    for piece in pieces:
        h = teacher_states[round(plan[piece.start].start)].to(module.dtype)
        for k in piece:
            step = plan[k]
            h = plan.method.step(module.model.blocks[step.block], h, step.dt, None, step.slots.start, step.start,
                                 None, **attention)
        errors.append(relative_error(h, teacher_states[round(plan[piece.stop - 1].end)]))
    return torch.stack(errors).mean()


def distillation_terms(model, inputs: torch.Tensor, step_size: float, solver: str | None, settings: Distillation,
                       teacher: TeacherView, student_logits: torch.Tensor | None,
                       student_states: tuple[torch.Tensor, ...] | None) -> dict[str, torch.Tensor]:
    """The weighted distillation terms of one micro-batch, by name (``kl``, ``trajectory``): from the student's logits
    and states at ``step_size`` (a whole solve), or, ``stepwise``, from its steps taken alone."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    plan = module.plan(step_size, solver)
    if settings.stepwise:
        return {"trajectory": settings.trajectory_weight * stepwise_trajectory_loss(
            module, inputs, plan, teacher.states, settings.steps_per_sample)}
    terms = {}
    if settings.kl_weight > 0:
        terms["kl"] = settings.kl_weight * kl_to_teacher(student_logits, teacher.logits, settings.temperature)
    if settings.trajectory_weight > 0:
        terms["trajectory"] = settings.trajectory_weight * trajectory_loss(student_states, plan, teacher.states)
    return terms
