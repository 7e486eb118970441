"""Adaptive depth per token with one set of weights: early exit and routing, by entropy and energy or by the model's
learned exit head.

A shared ODE model reads out (final norm + LM head) the state after any solver step, so depth can
be chosen per token without a second model:

- **early exit** (COST-EFF): solving at step size ``a``, a token stops integrating once the entropy
  (nats) of its read-out falls below ``exit_entropy``; the check runs every ``check_every`` steps
  from ``min_time`` on (or at the solve times ``check_times`` only), and a token still going at ``max_time``
  stops there. Checks may fall after
  any step, inside a shared segment or at an unshared layer (unshared layers are steps of ``dt = 1``
  on the same time axis). A token that exits is never read out again.
- **learned exit and routing** (CALM's learned confidence): with an exit head (``config.exit_head``), the rule is the
  head's score of a state, its predicted ``log KL(p_end || p)`` to the end of the step-size-1 solve: a token exits
  at the first check whose score is below ``exit_learned`` (no read-out at the checks: only the exiting tokens are
  read out), and a swift token is re-solved when its final state's score is above ``route_learned``. Thresholds
  calibrated with a stated tolerance come from ``odegpt calibrate`` (odegpt.evaluation.exit_calibration).
- **exit to the tail**: on a model whose last shared segment is followed by unshared layers and whose head was
  fitted for it (``config.exit_to_tail``), a token the head stops inside that segment is not read out there: it
  stays frozen through the rest of the segment, then runs the unshared tail from where it stopped, as every token
  does. Reading out mid-solve would skip the layers that turn a retrofitted model's state into a distribution.
- **energy routing** (E-LANG): every token is solved at the swift step size ``B``; where the energy
  ``E = -T * logsumexp(logits / T)`` of its swift logits exceeds ``route_energy`` it is re-solved
  from the embedding at the super step size ``a`` and the super logits replace the swift ones.
  Energies are usually negative (about minus the largest logit), so the threshold may be too.

In decoding a later token attends, at every step it executes, to the keys and values of all earlier
tokens *at that step*, which an earlier token that exited (or stayed swift) never computed. The
``kv_fill`` decides what it gets, and so which semantics the model implements:

- ``lazy`` -- *continued integration*: the missing steps are the token's own solve continued (exit:
  the fixed-step solve at ``a``, of which the exit only chooses the read-out time; routing: its
  super solve). Exact with respect to the schedule, so equal to an uncached recomputation of the
  full sequence with the same per-token schedule. It defers compute rather than saving it: a step
  is needed as soon as any later token executes it. This implementation computes it eagerly, in the
  token's own forward; evaluation counts only what a deferred fill would compute.
- ``copy`` -- *nearest computed state*: a missing step takes the keys and values of the token's
  computed state nearest in time, projected with that step's block (Huginn's fallback within a
  shared segment, where the projection is the same weights). After an exit the nearest state is the
  exit state, so this is exactly *frozen-state* semantics (``h(t) = h(exit)``): a fully exited
  token costs one key/value projection per block it has yet to pass (a shared block projects a
  frozen state the same at every step, so it is projected once), no attention or MLP.
- ``interpolate`` -- ours, from the ODE view: keys and values interpolated linearly in time between
  the computed states on either side (routing: the swift states at times 0, B, 2B, ... and the end).
  After an exit there is no later state, so it falls back to the frozen state, as ``copy`` does.

Per token the solve counts what it executed (solver steps, LM-head read-outs, key/value projections
and lazily continued steps); ``odegpt.model.accounting`` turns counts into FLOPs.

This file is copied into exported model folders (``custom_generate/``), so it imports only torch,
transformers and its siblings; it reaches the model through its decoder surface (``surface.DecoderModel``), and
its solve hooks are plain objects with the methods of ``odegpt.model.solver.SolveHook`` they need.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import torch
from transformers.utils import ModelOutput

from .defaults import DEFAULT_SWIFT_STEP_SIZE
from .speculative import _UNSUPPORTED_UNLESS, _Sampler, decoding_limits
from .surface import DecoderModel

KV_FILLS = ("lazy", "copy", "interpolate")
RULES = ("exit_entropy", "exit_learned", "route_energy", "route_learned")
_TIME_TOLERANCE = 1e-9


@dataclass(frozen=True)
class AdaptiveDepth:
    """Settings of one adaptive solve: early exit (``exit_entropy``, or ``exit_learned`` by the exit head) or routing
    (``route_energy``, or ``route_learned`` by the exit head).

    ``step_size`` is the exit solve's step size, or the super step size when routing (default: the
    model's ``config.step_size``); times are in units of trained depth, as step sizes are. ``check_times``, when
    given, are the only solve times after which exits are checked (from ``min_time`` on; ``check_every`` is then
    unused): ``odegpt calibrate`` chooses them by what a check costs against the steps it saves."""

    exit_entropy: float | None = None
    route_energy: float | None = None
    exit_learned: float | None = None
    route_learned: float | None = None
    kv_fill: str = "copy"
    step_size: float | None = None
    swift_step_size: float = DEFAULT_SWIFT_STEP_SIZE
    check_every: int = 1
    min_time: float = 0.0
    max_time: float | None = None
    energy_temperature: float = 1.0
    check_times: tuple[float, ...] | None = None

    @property
    def routing(self) -> bool:
        return self.route_energy is not None or self.route_learned is not None

    @property
    def rule(self) -> str | None:
        """Which of the four thresholds is set (the first, when several are): exit_entropy, exit_learned, route_energy
        or route_learned."""
        return next((key for key in RULES if getattr(self, key) is not None), None)

    def checked(self, config, names: dict[str, str] | None = None) -> AdaptiveDepth:
        """These settings with ``step_size`` resolved, or a ValueError naming the bad one (as ``names``
        calls it, e.g. ``{"exit_entropy": "--exit-entropy"}``) and what it must be."""
        def name(key: str) -> str:
            return (names or {}).get(key, key)

        given = [key for key in RULES if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(name(key) for key in RULES)}"
                             + (f", not {' and '.join(name(key) for key in given)}" if given else ""))
        for key in ("exit_learned", "route_learned"):
            value = getattr(self, key)
            if value is not None and (not _is_real(value) or math.isnan(value)):
                raise ValueError(f"{name(key)} must be a real threshold of the exit head's score, got {value!r}")
            if value is not None and getattr(config, "exit_head", None) is None:
                raise ValueError(f"{name(key)}: this model has no learned exit head (config.exit_head is null); "
                                 f"fit one with `odegpt calibrate`")
        if self.exit_entropy is not None and not _is_real(self.exit_entropy, minimum=0.0):
            raise ValueError(f"{name('exit_entropy')} must be an entropy in nats >= 0 (0 never exits), "
                             f"got {self.exit_entropy!r}")
        if self.route_energy is not None and (not _is_real(self.route_energy) or math.isnan(self.route_energy)):
            raise ValueError(f"{name('route_energy')} must be a real energy threshold (tokens above it are "
                             f"re-solved; inf never routes, -inf always does), got {self.route_energy!r}")
        if self.kv_fill not in KV_FILLS:
            raise ValueError(f"{name('kv_fill')} must be one of {', '.join(KV_FILLS)}, got {self.kv_fill!r}")
        if getattr(config, "exit_to_tail", False) and self.rule in ("exit_learned", "route_learned"):
            if self.rule == "route_learned":
                raise ValueError(f"{name('route_learned')}: this model's exit head was fitted for the exit to the "
                                 f"tail (config.exit_to_tail), not for routing; use {name('exit_learned')}")
            if self.kv_fill == "lazy":
                raise ValueError(f"{name('kv_fill')} lazy cannot exit to the tail (config.exit_to_tail): it continues "
                                 f"an exited token's solve for later tokens, and the token's tail runs from where it "
                                 f"stopped; use copy or interpolate")
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"{name('check_every')} must be an integer >= 1, got {self.check_every!r}")
        if not _is_real(self.min_time, minimum=0.0) or math.isinf(self.min_time):
            raise ValueError(f"{name('min_time')} must be a finite time >= 0, got {self.min_time!r}")
        if self.max_time is not None and not (_is_real(self.max_time) and self.max_time > 0):
            raise ValueError(f"{name('max_time')} must be a time > 0, got {self.max_time!r}")
        if self.check_times is not None and not (isinstance(self.check_times, (tuple, list)) and all(
                _is_real(t) and 0 < t < math.inf for t in self.check_times)):
            raise ValueError(f"{name('check_times')} must be solve times > 0, got {self.check_times!r}")
        if not (_is_real(self.energy_temperature) and 0 < self.energy_temperature < math.inf):
            raise ValueError(f"{name('energy_temperature')} must be a finite number > 0, "
                             f"got {self.energy_temperature!r}")
        for key in ("step_size", "swift_step_size") if self.routing else ("step_size",):
            value = getattr(self, key)
            if value is not None and not (_is_real(value) and 0 < value < math.inf):
                raise ValueError(f"{name(key)} must be a real number > 0, got {value!r}")
        step_size = config.step_size if self.step_size is None else float(self.step_size)
        config.solver_steps(step_size)
        if self.routing:
            config.solver_steps(self.swift_step_size)
        check_times = None if self.check_times is None else tuple(sorted(float(t) for t in self.check_times))
        return replace(self, step_size=step_size, check_times=check_times)


def _is_real(value: object, minimum: float = -math.inf) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value >= minimum


@dataclass
class AdaptiveCounts:
    """What each token's solve executed, (batch, seq) tensors: solver steps of its own schedule, LM-head
    read-outs (the final one included), key/value projections that filled missing steps, steps its
    solve was continued for later tokens (``lazy``, computed eagerly here), and exit-head scores."""

    executed_steps: torch.Tensor
    readouts: torch.Tensor
    kv_projections: torch.Tensor
    continued_steps: torch.Tensor
    exit_scores: torch.Tensor | None = None


@dataclass
class AdaptiveOutput(ModelOutput):
    logits: torch.Tensor | None = None
    counts: AdaptiveCounts | None = None
    cache: AdaptiveCache | None = None  # not past_key_values: transformers 5.24 renames that keyword to cache


@dataclass
class AdaptiveCache:
    """The KV caches of an adaptive solve: one ``OdeCache`` (bound to its step size) per step size it runs
    at; every step's keys and values are complete for every position (missing ones filled)."""

    solves: dict[float, object] = field(default_factory=dict)

    def solve(self, model, plan):
        """The cache of the solve ``plan`` (``odegpt.model.solver.SolvePlan``), bound to it."""
        cache = self.solves.setdefault(plan.step_size, model.new_cache())
        cache.bind(plan.step_size, plan.num_slots, plan.method.name)
        return cache

    def get_seq_length(self) -> int:
        return next(iter(self.solves.values())).get_seq_length() if self.solves else 0

    def crop_to(self, length: int) -> None:
        for cache in self.solves.values():
            cache.crop_to(length)


class _FilledKeysValues:
    """Stands in for the cache during one step of a solve: the keys and values of the tokens not in ``keep``
    are replaced by ``fill(slot)`` before they are cached and attended to."""

    def __init__(self, cache, keep: torch.Tensor, fill) -> None:
        self.cache, self.keep, self.fill = cache, keep[:, None, :, None], fill

    def update(self, keys: torch.Tensor, values: torch.Tensor, slot: int):
        fill_keys, fill_values = self.fill(slot, keys, values)
        keys, values = torch.where(self.keep, keys, fill_keys), torch.where(self.keep, values, fill_values)
        return (keys, values) if self.cache is None else self.cache.update(keys, values, slot)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dimension (float32, >= 0)."""
    logits = logits.float()
    log_probs = logits.log_softmax(-1)
    return (-(log_probs.exp() * log_probs).sum(-1)).clamp(min=0)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """E-LANG's energy ``-T * logsumexp(logits / T)`` (float32): high = uncertain."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=-1)


def adaptive_forward(model: DecoderModel, input_ids: torch.LongTensor, settings: AdaptiveDepth,
                     attention_mask: torch.Tensor | None = None, past_key_values: AdaptiveCache | None = None,
                     logits_to_keep: int = 0) -> AdaptiveOutput:
    """Logits of ``input_ids`` (after the cached tokens, if any) with a per-token adaptive solve.

    Teacher-forced scoring is one call over the whole sequence; decoding feeds new tokens with an
    ``AdaptiveCache``. Causal attention makes both give every token the same schedule and logits.
    ``logits_to_keep=K`` (transformers' meaning; 0: all) returns the last ``K`` positions' logits, and the early-exit
    solve by the learned head reads out only those (a prompt's other tokens need keys and values, not logits)."""
    settings = settings.checked(model.config)
    h = model.embed(input_ids)
    past_len = 0 if past_key_values is None else past_key_values.get_seq_length()
    inputs = model.attention_inputs(h, attention_mask, past_len)
    first_kept = max(h.shape[1] - logits_to_keep, 0) if logits_to_keep else 0
    if settings.routing:
        logits, counts = _routed_solve(model, h, inputs, settings, past_key_values)
        logits = logits[:, first_kept:]
    else:
        logits, counts = _early_exit_solve(model, h, inputs, settings, past_key_values, first_kept)
    return AdaptiveOutput(logits=logits, counts=counts, cache=past_key_values)


def last_shared_steps(segments: list[dict], plan) -> range | None:
    """The plan's steps of its last shared segment when unshared layers follow it (they are the tail an exit to the
    tail still runs, from ``.stop`` on); None when the model ends in a shared segment or has none."""
    block, last_shared = 0, None
    for segment in segments:
        if segment["shared"]:
            last_shared = block
        block += 1 if segment["shared"] else segment["depth"]
    if last_shared is None or last_shared == block - 1:
        return None
    indices = [step.index for step in plan if step.block == last_shared]
    return range(indices[0], indices[-1] + 1)


def _evaluation_time(step, slot: int, stage_times: tuple[float, ...]) -> float:
    """The solve time of the step's evaluation that writes ``slot`` (the method's ``stage_times``)."""
    return step.start + stage_times[slot - step.slots.start] * step.dt


def _zeros(h: torch.Tensor) -> torch.Tensor:
    return torch.zeros(h.shape[:2], device=h.device)


class _EarlyExit:
    """The early-exit solve's control of each step: tokens still integrating step; exited ones stay frozen
    (copy, interpolate) or keep integrating for later tokens (lazy); after a step where a check is due, the
    active tokens are read out (or scored by the exit head) and those below the threshold exit.

    Per step it does nothing but the check: what each token executed follows from the step after which it exited
    (``exit_after``) and the plan, and is counted once at the end (:meth:`counts`)."""

    def __init__(self, model, h: torch.Tensor, settings: AdaptiveDepth, kv, inputs: dict, plan,
                 first_kept: int = 0) -> None:
        self.model, self.settings, self.kv, self.inputs, self.plan = model, settings, kv, inputs, plan
        self.first_kept, self.lazy = first_kept, settings.kv_fill == "lazy"
        self.active = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        self.remaining, self.exited = self.active.numel(), False  # tokens still integrating; whether any exited
        self.exit_after = torch.full(h.shape[:2], len(plan), dtype=torch.long, device=h.device)
        self.readouts = _zeros(h)
        # A relaxed model's maps vary with time (model.time_dependent): a frozen state is projected anew at each step.
        self.time_dependent = bool(getattr(model, "time_dependent", False))
        self.stage_times = plan.method.stage_times
        self.logits: torch.Tensor | None = None
        self.reused: tuple | None = None
        # Exit to the tail: checks only inside the last shared segment; every token runs the tail after it.
        self.segment = (last_shared_steps(model.config.segments, plan)
                        if settings.exit_learned is not None and getattr(model.config, "exit_to_tail", False) else None)

    def evaluate(self, step, h: torch.Tensor) -> bool:
        self.state_before = h
        if self.segment is not None and step.index == self.segment.stop and self.exited:
            self.active.fill_(True)  # the tail: exited tokens run it from their frozen states
            self.remaining = self.active.numel()
        return self.lazy or self.remaining > 0

    def cache(self, step, cache):
        """With a method of several evaluations per step (Heun), a frozen token's keys and values at the later
        ones are those of its frozen state, which the step's first evaluation projected with the same block."""
        if self.lazy or len(step.slots) == 1 or not self.exited:
            return cache
        first: dict[str, tuple] = {}

        def frozen(slot: int, keys: torch.Tensor, values: torch.Tensor):
            if self.time_dependent and slot != step.slots.start:  # the frozen state, projected at this evaluation
                time = _evaluation_time(step, slot, self.stage_times)
                return self.model.keys_values(step.block, self.state_before, self.inputs, time)
            return first.setdefault("kv", (keys, values))

        return _FilledKeysValues(cache, self.active, frozen)

    def skipped(self, step, h: torch.Tensor) -> None:
        """Every token has exited: cache the frozen states' keys and values, nothing else."""
        if self.kv is not None:
            for slot in step.slots:
                time = _evaluation_time(step, slot, self.stage_times) if self.time_dependent else None
                if self.reused is None or self.reused[0] != (step.block, time):
                    self.reused = ((step.block, time), *self.model.keys_values(step.block, h, self.inputs, time or 0.0))
                self.kv.update(*self.reused[1:], slot)

    def advance(self, step, h: torch.Tensor, stepped: torch.Tensor) -> torch.Tensor:
        # An exited token keeps integrating (lazy) or stays frozen, its frozen state's keys and values being
        # what this step just cached for it (copy, interpolate).
        h = stepped if self.lazy or not self.exited else torch.where(self.active[..., None], stepped, h)
        if self._check_due(step):
            self._check(step, h)
        return h

    def _check_due(self, step) -> bool:
        return self.remaining > 0 and _check_due(step, self.settings, self.segment)

    def _check(self, step, h: torch.Tensor) -> None:
        active, settings, forced = self.active, self.settings, _forced(step, self.settings)
        if settings.exit_learned is not None:
            # The head scores every state (a dot product each: fewer operators than gathering the active ones);
            # only exiting tokens whose logits are kept are read out, and a check where none exits costs no more.
            exiting = active & ((self.model.exit_score(h, step.end) < settings.exit_learned) | forced)
            if not bool(exiting.any()):
                return
            self._exit(step, exiting)
            if self.segment is not None:  # read out after the tail, with every token
                return
            exiting[:, :self.first_kept] = False
            rows, cols = exiting.nonzero(as_tuple=True)
            checked = self.model.read_out(h[rows, cols])
            exits = torch.ones_like(rows, dtype=torch.bool)
        else:
            rows, cols = active.nonzero(as_tuple=True)
            checked = self.model.read_out(h[rows, cols])
            exits = (entropy(checked) < settings.exit_entropy) | forced
            exiting = torch.zeros_like(active)
            exiting[rows[exits], cols[exits]] = True
            self._exit(step, exiting)
        self.readouts[rows, cols] += 1
        if self.logits is None:
            self.logits = checked.new_zeros(active.shape[0], active.shape[1] - self.first_kept, checked.shape[-1])
        kept = exits & (cols >= self.first_kept)
        self.logits[rows[kept], cols[kept] - self.first_kept] = checked[kept]

    def _exit(self, step, exiting: torch.Tensor) -> None:
        self.active &= ~exiting
        self.exit_after.masked_fill_(exiting, step.index + 1)
        self.remaining -= int(exiting.sum())
        self.exited = True

    def counts(self) -> AdaptiveCounts:
        """What each token executed, from the step it exited after: its own steps; the steps its solve was continued
        (lazy) or the key/value projections of its frozen state (one per block it passes after its exit, a shared
        block projecting the same state alike at every step, unless the maps vary with time); the head's checks."""
        projections, checks = _count_tables(self.plan.blocks, tuple(self.plan), self.settings, self.time_dependent,
                                            self.segment)
        index, device = self.exit_after, self.exit_after.device
        executed = index.float()
        if self.segment is not None:  # an exited token ran the tail too
            executed = torch.where(index < len(self.plan), executed + len(self.plan) - self.segment.stop, executed)
        zeros = torch.zeros_like(executed)
        continued = (len(self.plan) - executed) if self.lazy else zeros
        projected = zeros if self.lazy else torch.tensor(projections, device=device)[index]
        scored = torch.tensor(checks, device=device)[index] if self.settings.exit_learned is not None else zeros
        return AdaptiveCounts(executed, self.readouts, projected, continued, scored)


def _forced(step, settings: AdaptiveDepth) -> bool:
    return settings.max_time is not None and step.end >= settings.max_time - _TIME_TOLERANCE


def _check_due(step, settings: AdaptiveDepth, segment: range | None = None) -> bool:
    """Whether tokens still integrating are checked after ``step``: every ``check_every`` steps (or at the
    ``check_times``) from ``min_time`` on, and at ``max_time``; never after the last step (every token stops there),
    and, exiting to the tail, only inside its ``segment`` before the segment's last step."""
    if step.last or (segment is not None and not segment.start <= step.index < segment.stop - 1):
        return False
    if _forced(step, settings):
        return True
    due = ((step.index + 1) % settings.check_every == 0 if settings.check_times is None
           else any(abs(step.end - time) <= _TIME_TOLERANCE for time in settings.check_times))
    return due and step.end >= settings.min_time - _TIME_TOLERANCE


@functools.lru_cache(maxsize=64)
def _count_tables(blocks: tuple[int, ...], steps: tuple, settings: AdaptiveDepth, time_dependent: bool,
                  segment: range | None = None) -> tuple[list[float], list[float]]:
    """For a token that exits after ``k`` steps of the solve (``k`` = every step: it never does), at index ``k``: the
    key/value projections its frozen state costs (one per run of a block after its exit, up to the tail when it exits
    to the tail; one per step when the maps vary with time), and the checks it took."""
    n = len(blocks)
    frozen_until = n if segment is None else segment.stop
    starts_run = [j == 0 or blocks[j] != blocks[j - 1] for j in range(n)]
    projections = [float(frozen_until - k if time_dependent else (1 + sum(starts_run[k + 1:frozen_until]))
                         if k < n else 0) for k in range(n + 1)]
    due = [_check_due(step, settings, segment) for step in steps]
    checks = [float(sum(due[:k])) for k in range(n + 1)]
    return projections, checks


def _early_exit_solve(model, h, inputs, settings: AdaptiveDepth, cache: AdaptiveCache | None, first_kept: int = 0):
    plan = model.plan(settings.step_size)
    kv = None if cache is None else cache.solve(model, plan)
    control = _EarlyExit(model, h, settings, kv, inputs, plan, first_kept)
    h = model.solve(h, plan, inputs, kv, hook=control)
    logits, active = control.logits, control.active[:, first_kept:]
    if control.remaining > 0 and bool(active.any()):  # kept tokens that ran the whole solve: the final read-out
        final = model.read_out(h[:, first_kept:])
        logits = final if logits is None else torch.where(active[..., None], final, logits)
        control.readouts[:, first_kept:] += active
    return logits, control.counts()


class _RoutedSuperSolve:
    """The super solve of routed tokens: at each step the tokens that stayed swift get filled keys and values
    (from their swift states, by ``kv_fill``), which the routed tokens attend to and later tokens find cached."""

    def __init__(self, model, settings: AdaptiveDepth, routed: torch.Tensor, swift, kv, inputs: dict) -> None:
        self.model, self.settings, self.routed, self.swift, self.kv, self.inputs = \
            model, settings, routed, swift, kv, inputs
        self.any_routed = bool(routed.any())
        self.fill = not (settings.kv_fill == "lazy" or bool(routed.all()))
        self.kv_projections = torch.zeros(routed.shape, device=routed.device)
        self.projected: dict = {}
        self.stage_times = model.plan(settings.step_size).method.stage_times

    def _filled(self, step, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fill at the time of the step's evaluation writing ``slot`` (Heun's second one: the step's end)."""
        time = _evaluation_time(step, slot, self.stage_times)
        keys, values, projections = _fill(self.model, step.block, self.swift.states, self.swift.times, time,
                                          self.settings.kv_fill, self.inputs, self.projected)
        self.kv_projections += projections * ~self.routed
        return keys, values

    def cache(self, step, cache):
        if not self.fill:
            return cache
        return _FilledKeysValues(cache, self.routed, lambda slot, keys, values: self._filled(step, slot))

    def evaluate(self, step, h: torch.Tensor) -> bool:
        return not self.fill or self.any_routed

    def skipped(self, step, h: torch.Tensor) -> None:
        """No token re-solved: only the super cache needs the fill, for later tokens."""
        for slot in step.slots:
            self.kv.update(*self._filled(step, slot), slot)


def _routed_solve(model, h0, inputs, settings: AdaptiveDepth, cache: AdaptiveCache | None):
    swift_plan, super_plan = model.plan(settings.swift_step_size), model.plan(settings.step_size)
    swift_kv = None if cache is None else cache.solve(model, swift_plan)
    super_kv = None if cache is None else cache.solve(model, super_plan)

    # 1. The swift solve of every token, keeping its state at every step's start and at the end.
    swift = model.state_recorder(h0)
    swift_state = model.solve(h0, swift_plan, inputs, swift_kv, hook=swift)
    swift_logits = model.read_out(swift_state)
    zeros = torch.zeros(swift_logits.shape[:2], device=h0.device)
    if settings.route_learned is not None:  # the head's score of the swift solve's final state
        routed = model.exit_score(swift_state, swift_plan[-1].end) > settings.route_learned
        scores = zeros + 1.0
    else:
        routed, scores = energy(swift_logits, settings.energy_temperature) > settings.route_energy, zeros
    executed = len(swift_plan) + routed * float(len(super_plan))
    readouts = 1.0 + routed.float()
    continued = zeros.clone()

    # 2. The super solve of the routed tokens, attending to the others' filled keys and values.
    lazy, any_routed = settings.kv_fill == "lazy", bool(routed.any())
    if not (lazy or any_routed or super_kv is not None):
        return swift_logits, AdaptiveCounts(executed, readouts, zeros, continued, scores)
    control = _RoutedSuperSolve(model, settings, routed, swift, super_kv, inputs)
    h = model.solve(h0, super_plan, inputs, super_kv, hook=control)
    if lazy:
        continued += ~routed * float(len(super_plan))
    counts = AdaptiveCounts(executed, readouts, control.kv_projections, continued, scores)
    if not any_routed:
        return swift_logits, counts
    return torch.where(routed[..., None], model.read_out(h), swift_logits), counts


def _fill(model, block: int, states: list[torch.Tensor], times: list[float], time: float, kv_fill: str,
          inputs: dict, projected: dict):
    """Keys and values at ``time`` from the swift states at ``times`` (copy: the nearest, earlier on a tie;
    interpolate: linear between the two around it), and how many projections that cost per token. A
    state's projection by a block is kept in ``projected`` and reused: a shared block projects it the
    same at every step that needs it."""
    at = time if getattr(model, "time_dependent", False) else None  # a relaxed block projects by time

    def keys_values(index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        fresh = (block, index, at) not in projected
        if fresh:
            projected[block, index, at] = model.keys_values(block, states[index], inputs, at or 0.0)
        return *projected[block, index, at], int(fresh)

    after = next((i for i, t in enumerate(times) if t >= time - _TIME_TOLERANCE), len(times) - 1)
    if abs(times[after] - time) <= _TIME_TOLERANCE or after == 0:
        return keys_values(after)
    before = after - 1
    if kv_fill == "copy":
        return keys_values(before if time - times[before] <= times[after] - time else after)
    weight = (time - times[before]) / (times[after] - times[before])
    keys_before, values_before, fresh_before = keys_values(before)
    keys_after, values_after, fresh_after = keys_values(after)
    return (keys_before.lerp(keys_after, weight), values_before.lerp(values_after, weight),
            fresh_before + fresh_after)


@dataclass
class AdaptiveGenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)`` with adaptive depth: the sequences and, per generated
    token (finished rows excluded), the mean executed solver steps and LM-head read-outs."""

    sequences: torch.LongTensor | None = None
    executed_steps_per_token: float | None = None
    readouts_per_token: float | None = None
    counted_tokens: int | None = None  # the tokens those means are over


@torch.no_grad()
def adaptive_generate(model: DecoderModel, inputs: torch.LongTensor | None = None, generation_config=None, *,
                      settings: AdaptiveDepth, input_ids: torch.LongTensor | None = None,
                      attention_mask: torch.Tensor | None = None, streamer=None, **kwargs
                      ) -> torch.LongTensor | AdaptiveGenerateOutput:
    """``model.generate`` decoding one token per forward with a per-token adaptive solve and its own
    ``AdaptiveCache``. Takes the generation settings self-speculative decoding takes (greedy or sampled
    with temperature, top-k, top-p; EOS and padding; a left-padded batch with its attention mask)."""
    input_ids = inputs if inputs is not None else input_ids
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    for name, off in _UNSUPPORTED_UNLESS.items():
        value = getattr(config, name, off)
        if value is not None and value != off:
            raise ValueError(f"adaptive depth decoding does not support {name}={value!r}; leave it at {off!r}")
    if config.use_cache is False or set(model_kwargs) - {"use_cache"}:
        raise ValueError(f"adaptive depth decoding keeps its own KV cache and takes no "
                         f"{', '.join(sorted(set(model_kwargs) - {'use_cache'})) or 'use_cache=False'}")
    settings = settings.checked(model.config)
    if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("adaptive depth decoding needs input_ids of shape (batch, prompt length >= 1)")

    batch = input_ids.shape[0]
    max_new, eos, pad, attention_mask = decoding_limits(config, input_ids, attention_mask)
    sampler, cache = _Sampler(config), AdaptiveCache()
    tokens, mask, feed = input_ids, attention_mask, input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=tokens.device)
    steps, readouts, counted = 0.0, 0.0, 0
    if streamer is not None:
        streamer.put(tokens.cpu())
    for _ in range(max_new):
        out = adaptive_forward(model, feed, settings, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
        # A generated token costs the solve of the position that predicted it: the last one fed.
        steps += float(out.counts.executed_steps[unfinished, -1].sum())
        readouts += float(out.counts.readouts[unfinished, -1].sum())
        counted += int(unfinished.sum())
        next_token, _ = sampler.draw(out.logits[:, -1].float())
        if eos is not None:
            next_token = torch.where(unfinished, next_token, torch.full_like(next_token, pad))
            unfinished &= ~torch.isin(next_token, eos)
        tokens, feed = torch.cat([tokens, next_token[:, None]], dim=1), next_token[:, None]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        if streamer is not None:
            streamer.put(next_token.cpu())
        if not bool(unfinished.any()):
            break
    if streamer is not None:
        streamer.end()
    if config.return_dict_in_generate:
        return AdaptiveGenerateOutput(sequences=tokens, executed_steps_per_token=steps / counted if counted else None,
                                      readouts_per_token=readouts / counted if counted else None,
                                      counted_tokens=int(counted))
    return tokens
