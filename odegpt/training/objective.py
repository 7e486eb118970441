"""The step-size-randomized pretraining objective.

Each optimizer step draws one step size ``a`` and trains the model solved at ``a``, so one set of
weights learns a vector field that stays accurate at many step sizes. The draw depends only on
(seed, optimizer step): every data-parallel rank and every micro-batch of a step sees the same
``a`` without communicating, and a resumed run draws the same sequence.

Two knobs keep the fine solve (``a = 1``, the trained depth's own resolution) as good as a model
trained at ``a = 1`` only, while the coarse solves learn to follow it:

- ``curriculum_steps`` in the distribution: the first N optimizer steps train at ``a = 1``, then
  the draws begin.
- ``reference_weight`` in the loss: a step that draws ``a != 1`` also adds the ``a = 1`` loss, so
  every step trains the fine solve (one more forward and backward at ``a = 1``); distilling, the ``a = 1``
  loss is the same objective as the drawn solve's (CE times ``lm_weight``, the distillation terms).

``consistency_weight`` adds ``KL(p_1 || p_a)`` towards the (detached) fine solve.

``readout_weights`` ``{t: w}`` adds ``w * CE`` of the read-out (final norm + LM head) of the state at
solver time ``t`` of the drawn solve, where that solve has a step boundary at ``t`` (0 < t < depth), so
early read-outs are good for entropy early exit (odegpt/decoding/adaptive.py).

A :class:`SolverSampler` may also draw the solver method per optimizer step (``train.solvers``, e.g.
``{euler: 1, heun: 1}``), so one set of weights learns to be integrated by several methods; the fine
reference solve keeps the model's own method.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from odegpt.model.accounting import model_cost, readout_flops
from odegpt.model.configuration_odegpt import OdeGPTConfig, check_step_size
from odegpt.model.loss import shifted_cross_entropy
from odegpt.model.solver import plan_solve, solver_method

from .distillation import Distillation, distillation_terms, teacher_view
from .exit_head import exit_head_term

# The solve every other step size is measured against: the trained depth's own resolution.
REFERENCE_STEP_SIZE = 1.0


@dataclass(frozen=True)
class StepSizeDistribution:
    """Either a finite set ``choices`` (optional ``weights``) or a range ``[low, high]``
    (uniform, or log-uniform so that small and large steps are drawn equally often by ratio);
    optionally preceded by ``curriculum_steps`` optimizer steps at ``a = 1``."""

    choices: tuple[float, ...] | None = None
    weights: tuple[float, ...] | None = None
    low: float | None = None
    high: float | None = None
    log_uniform: bool = False
    curriculum_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.curriculum_steps, bool) or not isinstance(self.curriculum_steps, int) \
                or self.curriculum_steps < 0:
            raise ValueError(f"step-size distribution: 'curriculum_steps' must be an integer >= 0, "
                             f"got {self.curriculum_steps!r}")
        if (self.choices is None) == (self.low is None and self.high is None):
            raise ValueError("step-size distribution: give either 'choices' or 'low' and 'high', not both or neither")
        if self.choices is not None:
            if len(self.choices) == 0:
                raise ValueError("step-size distribution: 'choices' is empty")
            object.__setattr__(self, "choices", tuple(check_step_size(a, "choices[]") for a in self.choices))
            if self.weights is not None:
                weights = tuple(float(w) for w in self.weights)
                if len(weights) != len(self.choices) or any(w < 0 or not math.isfinite(w) for w in weights) \
                        or sum(weights) <= 0:
                    raise ValueError(f"step-size distribution: 'weights' must be {len(self.choices)} non-negative "
                                     f"numbers with a positive sum, got {self.weights!r}")
                object.__setattr__(self, "weights", weights)
        else:
            if self.weights is not None:
                raise ValueError("step-size distribution: 'weights' only goes with 'choices'")
            if self.low is None or self.high is None:
                raise ValueError("step-size distribution: a range needs both 'low' and 'high'")
            low, high = check_step_size(self.low, "low"), check_step_size(self.high, "high")
            if low > high:
                raise ValueError(f"step-size distribution: low ({low}) must not exceed high ({high})")
            object.__setattr__(self, "low", low)
            object.__setattr__(self, "high", high)

    @classmethod
    def from_dict(cls, spec: dict) -> StepSizeDistribution:
        known = {f.name for f in fields(cls)}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"step-size distribution: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        spec = dict(spec)
        for key in ("choices", "weights"):
            if spec.get(key) is not None:
                spec[key] = tuple(spec[key])
        return cls(**spec)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if v is not None and not (k == "curriculum_steps" and v == 0)}


class StepSizeSampler:
    """Draws the step size of optimizer step ``t`` as a pure function of (seed, t)."""

    def __init__(self, distribution: StepSizeDistribution, seed: int) -> None:
        self.distribution = distribution
        self.seed = int(seed)
        if distribution.choices is not None:
            weights = (np.ones(len(distribution.choices)) if distribution.weights is None
                       else np.array(distribution.weights))
            self._probabilities = weights / weights.sum()

    def sample(self, optimizer_step: int) -> float:
        d = self.distribution
        if optimizer_step < d.curriculum_steps:
            return REFERENCE_STEP_SIZE
        rng = np.random.default_rng([self.seed, int(optimizer_step)])
        if d.choices is not None:
            return d.choices[int(rng.choice(len(d.choices), p=self._probabilities))]
        if d.log_uniform:
            return float(math.exp(rng.uniform(math.log(d.low), math.log(d.high))))
        return float(rng.uniform(d.low, d.high))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "distribution": self.distribution.to_dict()}

    @classmethod
    def from_state_dict(cls, state: dict) -> StepSizeSampler:
        return cls(StepSizeDistribution.from_dict(state["distribution"]), state["seed"])


class SolverSampler:
    """Draws the solver method of optimizer step ``t`` from ``{method: weight}`` as a pure function of (seed, t),
    from a stream of its own (the step-size draws are the same with or without it)."""

    def __init__(self, weights: dict[str, float], seed: int) -> None:
        self.names = list(weights)
        for name in self.names:
            solver_method(name)
        probabilities = np.array([float(weights[name]) for name in self.names])
        if (probabilities < 0).any() or not np.isfinite(probabilities).all() or probabilities.sum() <= 0:
            raise ValueError(f"solver weights must be non-negative numbers with a positive sum, got {weights!r}")
        self.probabilities, self.seed = probabilities / probabilities.sum(), int(seed)

    def sample(self, optimizer_step: int) -> str:
        if len(self.names) == 1:
            return self.names[0]
        rng = np.random.default_rng([self.seed, int(optimizer_step), _SOLVER_STREAM])
        return self.names[int(rng.choice(len(self.names), p=self.probabilities))]


_SOLVER_STREAM = 1  # distinguishes the solver draws' generator from the step-size draws'


def readout_slots(config: OdeGPTConfig, step_size: float, readout_weights: dict[float, float] | None
                  ) -> list[tuple[int, float]]:
    """``(k, w)``: the state after executed step ``k`` of the solve at ``step_size`` lies at a time
    ``t`` of ``readout_weights`` (strictly inside the solve) and is read out with weight ``w``."""
    if not readout_weights:
        return []
    times = np.array([step.end for step in plan_solve(config.segments, step_size, config.max_solver_steps)])
    slots = []
    for t, weight in readout_weights.items():
        matches = np.flatnonzero(np.abs(times[:-1] - float(t)) < 1e-9)
        if len(matches) and weight > 0:
            slots.append((int(matches[0]) + 1, float(weight)))
    return slots


def describe_objective(consistency_weight: float = 0.0, reference_weight: float = 0.0,
                       readout_weights: dict | None = None, lm_weight: float = 1.0,
                       distill: Distillation | None = None) -> str:
    """What :func:`objective_terms` sums, in words (the training progress bar's ``loss``; its terms are shown by
    name beside it)."""
    if distill is not None and distill.stepwise:
        return (f"trajectory: {distill.trajectory_weight:g} x each solver step taken alone from the source's state, "
                f"its relative squared error to the source's state after the layer at its end time")
    terms = [f"ce: {lm_weight:g} x CE at the drawn a"] if lm_weight > 0 else []
    if readout_weights:
        terms.append("readout: CEs at times " + ", ".join(f"{t:g} (x{w:g})" for t, w in readout_weights.items()))
    if reference_weight > 0 and lm_weight > 0:
        terms.append(f"reference: {reference_weight * lm_weight:g} x CE at a=1 when a != 1")
    if reference_weight > 0 and distill is not None:
        terms.append(f"reference_kl, reference_trajectory: {reference_weight:g} x the distillation terms below at "
                     f"a=1 when a != 1")
    if consistency_weight > 0:
        terms.append(f"consistency: {consistency_weight:g} x KL(p_1 || p_a) when a != 1")
    if distill is not None and distill.kl_weight > 0:
        terms.append(f"kl: {distill.kl_weight:g} x T^2 KL(p_source || p_a) at T={distill.temperature:g}")
    if distill is not None and distill.trajectory_weight > 0:
        terms.append(f"trajectory: {distill.trajectory_weight:g} x the relative squared error of the state after "
                     f"each solver step to the source's after the layer at that time")
    return " + ".join(terms) + " (CE: mean next-token cross-entropy in nats)"


def language_model_loss(
    model: torch.nn.Module, tokens: torch.Tensor, step_size: float, consistency_weight: float = 0.0,
    reference_weight: float = 0.0, readout_weights: dict[float, float] | None = None, solver: str | None = None,
) -> torch.Tensor:
    """Next-token loss of ``tokens`` (batch, seq_len + 1) solved at ``step_size`` with ``solver`` (default: the
    model's): the sum of :func:`objective_terms`.

    Away from ``a = 1`` two optional terms use the fine solve ``p_1`` (the trained depth's own
    resolution): ``reference_weight * CE(p_1)`` trains it on the same tokens (the loss is then
    ``CE(p_a) + w * CE(p_1)``), and ``consistency_weight * KL(p_1 || p_a)`` per token pulls the
    coarse solve towards it, with ``p_1`` detached. At ``a = 1`` the loss is ``CE(p_1)`` alone.
    """
    terms = objective_terms(model, tokens, step_size, consistency_weight, reference_weight, readout_weights, solver)
    return sum(terms.values())


def objective_terms(
    model: torch.nn.Module, tokens: torch.Tensor, step_size: float, consistency_weight: float = 0.0,
    reference_weight: float = 0.0, readout_weights: dict[float, float] | None = None, solver: str | None = None,
    lm_weight: float = 1.0, distill: Distillation | None = None, teacher: torch.nn.Module | None = None,
    exit_head_weight: float = 0.0, exit_head_positions: int = 256,
) -> dict[str, torch.Tensor]:
    """Every weighted term of the training loss of one micro-batch, by name, for the trainer to sum and to log:
    ``ce`` (``lm_weight`` x CE at the drawn ``a``), ``readout`` (the early read-outs' CEs), ``reference`` and
    ``consistency`` (see :func:`language_model_loss`), with a ``teacher`` the distillation terms ``kl`` and
    ``trajectory`` (odegpt.training.distillation), and ``exit``: the learned exit head's error at every state of the
    solve on ``exit_head_positions`` positions (odegpt.training.exit_head; the model is not changed by it). One solve
    at ``a`` serves them all."""
    inputs = tokens[:, :-1]
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    view = None if distill is None else teacher_view(teacher, inputs, distill.needs_states)
    if distill is not None and distill.stepwise:
        return distillation_terms(model, inputs, step_size, solver, distill, view, None, None)
    slots = readout_slots(module.config, step_size, readout_weights)
    states = bool(slots) or (distill is not None and distill.needs_states) or exit_head_weight > 0
    out = model(input_ids=inputs, step_size=step_size, use_cache=False, output_hidden_states=states, solver=solver)
    logits = out.logits.float()
    terms = {"ce": lm_weight * shifted_cross_entropy(logits, tokens)} if lm_weight > 0 else {}
    if slots:
        terms["readout"] = sum(weight * shifted_cross_entropy(module.read_out(out.hidden_states[k]).float(), tokens)
                               for k, weight in slots)
    reference = logits
    if step_size != REFERENCE_STEP_SIZE and (reference_weight > 0 or consistency_weight > 0 or exit_head_weight > 0):
        reference_terms, reference = _reference_terms(model, inputs, tokens, logits, reference_weight,
                                                      consistency_weight, lm_weight, distill, view)
        terms.update(reference_terms)
    if exit_head_weight > 0:
        terms["exit"] = exit_head_weight * exit_head_term(module, out.hidden_states, module.plan(step_size, solver),
                                                          reference, exit_head_positions)
    if distill is not None:
        terms.update(distillation_terms(model, inputs, step_size, solver, distill, view, logits, out.hidden_states))
    return terms or {"ce": logits.new_zeros(())}


def _reference_terms(model, inputs, tokens, logits, reference_weight: float, consistency_weight: float,
                     lm_weight: float = 1.0, distill: Distillation | None = None, view=None
                     ) -> tuple[dict, torch.Tensor]:
    """The fine solve's terms: the ``a = 1`` pass's own objective times ``reference_weight`` (``reference``: the
    CE times ``lm_weight``; distilling, ``reference_kl`` and ``reference_trajectory``: the distillation terms at
    ``a = 1``, so that ``lm_weight: 0`` distills at both step sizes), the coarse solve's KL towards it
    (``consistency``), and the fine solve's logits (detached)."""
    states = reference_weight > 0 and distill is not None and distill.needs_states

    def solve():
        return model(input_ids=inputs, step_size=REFERENCE_STEP_SIZE, use_cache=False, output_hidden_states=states)

    terms = {}
    if reference_weight > 0:
        out = solve()
        reference = out.logits.float()
        if lm_weight > 0:
            terms["reference"] = reference_weight * lm_weight * shifted_cross_entropy(reference, tokens)
        if distill is not None:
            fine = distillation_terms(model, inputs, REFERENCE_STEP_SIZE, None, distill, view, reference,
                                      out.hidden_states)
            terms.update({f"reference_{name}": reference_weight * term for name, term in fine.items()})
        reference = reference.detach()
    else:
        with torch.no_grad():
            reference = solve().logits.float()
    if consistency_weight > 0:
        kl = F.kl_div(logits.flatten(0, 1).log_softmax(-1), reference.flatten(0, 1).log_softmax(-1),
                      log_target=True, reduction="batchmean")
        terms["consistency"] = consistency_weight * kl
    return terms, reference


def objective_flops_per_token(config: OdeGPTConfig, step_size: float, seq_len: int, consistency_weight: float = 0.0,
                              reference_weight: float = 0.0, readout_weights: dict[float, float] | None = None,
                              solver: str | None = None, distill: Distillation | None = None,
                              source: OdeGPTConfig | None = None) -> float:
    """Training FLOPs per token of one :func:`objective_terms` at ``step_size``: the solve at ``a`` forward and
    backward, plus the ``a = 1`` solve forward and backward (``reference_weight``) or forward only
    (``consistency_weight`` alone) when ``a != 1``, plus the ``source``'s forward when distilling (and, stepwise, the
    trained steps alone instead of the solve)."""
    cost = model_cost(config, step_size=step_size, seq_len=seq_len, solver=solver).training_flops_per_token
    if distill is not None and source is not None:
        cost_source = model_cost(source, step_size=1.0, seq_len=seq_len).flops_per_token
        if distill.stepwise:
            plan = plan_solve(config.segments, step_size, config.max_solver_steps, solver or config.solver)
            steps = len(plan) if not distill.steps_per_sample else min(distill.steps_per_sample, len(plan))
            return cost_source + cost * steps / len(plan)
        cost += cost_source
    cost += 3 * readout_flops(config) * len(readout_slots(config, step_size, readout_weights))
    if step_size != REFERENCE_STEP_SIZE and (reference_weight > 0 or consistency_weight > 0):
        reference = model_cost(config, step_size=REFERENCE_STEP_SIZE, seq_len=seq_len)
        cost += reference.training_flops_per_token if reference_weight > 0 else reference.flops_per_token
    return cost
