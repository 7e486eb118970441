"""The learned exit head fitted on a frozen model, and its thresholds calibrated with a stated guarantee.

``odegpt calibrate`` does both, from the same teacher-forced solves of calibration text:

- **fit** (:func:`fit_exit_head`): the head's features and targets (odegpt.training.exit_head) at every state of the
  step-size-1 solve; a linear head is the ridge regression of the targets on the features (closed form), a head with a
  hidden layer is trained on them with Adam.
- **calibrate** (:func:`calibrate_thresholds`): for a tolerance ``epsilon`` on the fraction of positions whose greedy
  token the rule changes (against the full step-size-1 solve), the least conservative threshold whose changed-token
  rate is at most ``epsilon`` with confidence ``1 - delta``: candidate thresholds are tested in order from the most
  conservative, each by the Clopper-Pearson upper bound of its changed-token rate on held-out calibration tokens, and
  the last one that passes is kept (fixed-sequence testing, as Learn-then-Test and CALM calibrate early exits).
  With ``lazy`` fills the decoder's states are the teacher-forced ones, so the guarantee holds for the tokens the
  calibration text is drawn like; ``copy`` and ``interpolate`` fills change later tokens' inputs slightly.
  Two rules are calibrated: **exit** (a token stops at the first check whose score is below the threshold) and
  **route** (a token solved at the swift step size is re-solved at 1 when its final state's score is above it).
- **schedule** (:func:`choose_check_times`): where the exit is checked. A check costs wall time (the head's score
  and a test of it, about what a fraction of a solver step costs at batch 1), so a check after which few tokens
  exit costs every token that reaches it more than it saves; the check times that minimise executed steps plus
  ``check_cost`` x checks per token are chosen on the fit part of the text, and the threshold is then tested under
  that schedule on the held-out part, so the bound stays a held-out one.

On a model fitted for the exit to the tail (``config.exit_to_tail``, ``odegpt calibrate --exit-to tail``) the head's
states are those of the last shared segment, its target and the changed tokens are those of the read-out after the
unshared tail run from the state, and an exit there executes the tail's steps too.

The thresholds live in ``exit_calibration.json`` in the model folder, one record per (rule, tolerance, step sizes).
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from time import perf_counter

import torch

from odegpt.decoding.adaptive import AdaptiveDepth, last_shared_steps
from odegpt.model.configuration_odegpt import has_tail
from odegpt.model.modeling_odegpt import OdeGPTExitHead
from odegpt.model.solver import SolvePlan
from odegpt.training.exit_head import exit_target, log_target

from .perplexity import Batch

EXIT_CALIBRATION_FILE = "exit_calibration.json"
RIDGE = 1.0
CANDIDATE_THRESHOLDS = 200


@dataclass
class SolveRecord:
    """Per scored token of the calibration text: the head's score after every step of the step-size-1 solve (and at
    time 0), whether the greedy token read out there differs from the full solve's, and the score and changed flag of
    the swift solve's final state."""

    scores: torch.Tensor  # (tokens, steps + 1)
    changed: torch.Tensor  # (tokens, steps + 1) bool
    swift_scores: torch.Tensor | None = None  # (tokens,)
    swift_changed: torch.Tensor | None = None  # (tokens,) bool
    check_states: tuple[int, ...] | None = None  # the states a check may exit at (None: all but the first and last)
    tail_steps: int = 0  # steps a token runs after it exits (the exit to the tail's unshared layers)

    @property
    def checkable(self) -> tuple[int, ...]:
        return tuple(range(1, self.scores.shape[1] - 1)) if self.check_states is None else self.check_states


def tail_exit(model) -> tuple[range, SolvePlan] | None:
    """For a model fitted for the exit to the tail: the step-size-1 plan's steps of its last shared segment (the
    tail runs from ``.stop``) and the plan; None otherwise."""
    if not getattr(model.config, "exit_to_tail", False):
        return None
    plan = model.plan(1.0)
    return last_shared_steps(model.config.segments, plan), plan


def _exit_read_outs(model, hidden_states, found) -> Callable[[int], torch.Tensor]:
    """What an exit at state ``i`` (after step ``i - 1``) reads out, flattened: the state's own read-out, or after
    the tail when exiting to it."""
    if found is None:
        return lambda i: model.read_out(hidden_states[i].flatten(0, 1))
    segment, plan = found
    attention = model.attention_inputs(hidden_states[0])
    return lambda i: model.read_out(model.solve(hidden_states[i], plan, attention, start=segment.stop).flatten(0, 1))


def _exit_states(model, found) -> list[int]:
    """The states the head is fitted and checked at: every state of the step-size-1 solve, or exiting to the tail
    the states inside its segment (after its first step, before its last)."""
    if found is None:
        return list(range(len(model.plan(1.0)) + 1))
    segment, _ = found
    return list(range(segment.start + 1, segment.stop))


def _inputs(batch: Batch) -> torch.Tensor:
    return batch[:, :-1] if isinstance(batch, torch.Tensor) else batch[0]


@torch.no_grad()
def head_samples(model, batches: Iterable[Batch], positions: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, targets) of the head at every state of the step-size-1 solve (exiting to the tail: at the states
    inside its segment), on ``positions`` positions of each batch (each costs a read-out per state)."""
    features, targets = [], []
    plan, found = model.plan(1.0), tail_exit(model)
    times = [0.0] + [step.end for step in plan]
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        out = model(input_ids=_inputs(batch), step_size=1.0, use_cache=False, output_hidden_states=True)
        flat = out.logits.flatten(0, 1)
        chosen = torch.randperm(flat.shape[0], generator=generator)[:positions]
        read_out = _exit_read_outs(model, out.hidden_states, found)
        for i in _exit_states(model, found):
            states = out.hidden_states[i].flatten(0, 1)[chosen]
            features.append(model.exit_head.features(states, times[i]))
            targets.append(log_target(exit_target(read_out(i)[chosen], flat[chosen])))
    return torch.cat(features), torch.cat(targets)


def fit_exit_head(model, features: torch.Tensor, targets: torch.Tensor, epochs: int = 200) -> float:
    """Fit the model's head to (features, targets) in place; returns the correlation of its predictions with the
    targets on them. Linear: ridge regression; with a hidden layer: Adam on the squared error."""
    head = model.exit_head
    if head.hidden is None:
        design = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
        gram = design.T @ design + RIDGE * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(gram, design.T @ targets.double())
        with torch.no_grad():
            head.score.weight.copy_(solution[:-1][None].to(head.score.weight.dtype))
            head.score.bias.copy_(solution[-1:].to(head.score.bias.dtype))
    else:
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
        for _ in range(epochs):
            with torch.enable_grad():
                x = features.to(head.score.weight.dtype)
                loss = (head.score(torch.nn.functional.silu(head.hidden(x))).squeeze(-1) - targets).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        x = features.to(head.score.weight.dtype)
        predicted = head.score(torch.nn.functional.silu(head.hidden(x)) if head.hidden is not None else x).squeeze(-1)
    return float(torch.corrcoef(torch.stack([predicted.float(), targets.float()]))[0, 1])


@torch.no_grad()
def solve_records(model, batches: Iterable[Batch], swift_step_size: float | None = None, changes: bool = True
                  ) -> SolveRecord:
    """The head's scores and the changed-token flags of every state of the step-size-1 solve (and of the swift
    solve's end, when ``swift_step_size`` is given) on every position of ``batches``; ``changes=False`` skips the
    read-outs the flags cost (all False then): the scores alone say where tokens exit."""
    plan, found = model.plan(1.0), tail_exit(model)
    times = [0.0] + [step.end for step in plan]
    checked = set(_exit_states(model, found)) if found is not None else None
    scores, changed, swift_scores, swift_changed = [], [], [], []
    for batch in batches:
        inputs = _inputs(batch)
        out = model(input_ids=inputs, step_size=1.0, use_cache=False, output_hidden_states=True)
        final = out.logits.flatten(0, 1).argmax(-1)
        unread = torch.zeros_like(final, dtype=torch.bool)
        read_out = _exit_read_outs(model, out.hidden_states, found)
        never = torch.full_like(final, math.inf, dtype=torch.float32)

        def state(i: int, h: torch.Tensor, time: float) -> tuple[torch.Tensor, torch.Tensor]:
            if checked is not None and i not in checked:  # exiting to the tail, never an exit here
                return never, unread if i == len(plan) else ~unread  # the last state is the full solve's
            return model.exit_score(h.flatten(0, 1), time), read_out(i).argmax(-1) != final if changes else unread

        per_state = [state(i, h, time) for i, (h, time) in enumerate(zip(out.hidden_states, times))]
        scores.append(torch.stack([s for s, _ in per_state], dim=1))
        changed.append(torch.stack([c for _, c in per_state], dim=1))
        if swift_step_size is not None:
            swift = model(input_ids=inputs, step_size=swift_step_size, use_cache=False, output_hidden_states=True)
            end = model.plan(swift_step_size).steps[-1].end
            swift_scores.append(model.exit_score(swift.hidden_states[-1].flatten(0, 1), end))
            swift_changed.append(swift.logits.flatten(0, 1).argmax(-1) != final)
    return SolveRecord(torch.cat(scores), torch.cat(changed),
                       torch.cat(swift_scores) if swift_scores else None,
                       torch.cat(swift_changed) if swift_changed else None,
                       None if found is None else tuple(sorted(checked)),
                       0 if found is None else len(plan) - found[0].stop)


def upper_bound(failures: int, trials: int, delta: float) -> float:
    """The one-sided Clopper-Pearson upper confidence bound (level 1 - delta) of a rate seen ``failures`` times in
    ``trials``: the rate ``p`` at which seeing ``failures`` or fewer has probability ``delta`` (bisection on the
    binomial tail)."""
    if failures >= trials:
        return 1.0
    low, high = failures / trials, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if _binomial_cdf(failures, trials, middle) > delta:
            low = middle
        else:
            high = middle
    return high


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    terms = (math.lgamma(n + 1) - torch.lgamma(i + 1) - torch.lgamma(n - i + 1) + i * math.log(p)
             + (n - i) * math.log1p(-p))
    return float(torch.logsumexp(terms, 0).exp())


def scheduled_exit(record: SolveRecord, threshold: float, check_times: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(changed flag, executed steps, checks made) per token when each exits at the first of ``check_times`` (states
    of the step-size-1 solve, state ``i`` at time ``i``) whose score is below ``threshold``, or runs the whole solve
    (which is not a check: every token stops there)."""
    steps = record.scores.shape[1] - 1
    times = torch.tensor([*check_times, steps], dtype=torch.long)
    below = record.scores[:, times] < threshold
    below[:, -1] = True
    first = below.float().argmax(-1)
    exited_at = times[first]
    checks = torch.where(first < len(check_times), first + 1, first)
    executed = torch.where(first < len(check_times), exited_at + record.tail_steps, exited_at)
    return record.changed.gather(1, exited_at[:, None]).squeeze(1), executed.float(), checks.float()


def describe_check_times(times: Sequence[float]) -> str:
    """Check times as the commands print them: ``"t=6,7"``, or ``"t=none"`` when no check pays."""
    return f"t={','.join(f'{t:g}' for t in times) or 'none'}"


def choose_check_times(record: SolveRecord, threshold: float, check_cost: float) -> tuple[int, ...]:
    """The check times at which exits by ``threshold`` cost least per token on ``record``: executed steps plus
    ``check_cost`` (a check's cost in solver steps) x checks made. From a check after every step, the check whose
    removal saves most is dropped until none does; at ``check_cost`` 0 every check stays."""
    def cost(times: list[int]) -> float:
        _, executed, checks = scheduled_exit(record, threshold, times)
        return float((executed + check_cost * checks).mean())

    times = list(record.checkable)
    best = cost(times)
    while times:
        value, drop = min((cost(times[:i] + times[i + 1:]), i) for i in range(len(times)))
        if value >= best:
            break
        best = value
        del times[drop]
    return tuple(times)


@torch.no_grad()
def measured_check_cost(model, repeats: int = 30) -> float:
    """What a check costs in solver steps where this runs, at batch 1 on one token as decoding pays it: the median
    wall time of the head's score and its test over that of the step-size-1 solve's middle step (an estimate: a
    decoding step also attends to its cached keys, so it costs a little more)."""
    h = model.embed(torch.zeros(1, 1, dtype=torch.long, device=model.device))
    plan, inputs = model.plan(1.0), model.attention_inputs(h)
    middle = len(plan) // 2

    def step() -> None:
        float(model.solve(h, plan, inputs, start=middle, stop=middle + 1)[0, 0, 0])

    def check() -> None:
        bool((model.exit_score(h, plan[middle].end) < 0).any())

    return _median_seconds(check, repeats) / _median_seconds(step, repeats)


def _median_seconds(call: Callable[[], None], repeats: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start = perf_counter()
        call()
        times.append(perf_counter() - start)
    return statistics.median(times)


def route_outcome(record: SolveRecord, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(changed flag, routed flag) per token when tokens whose swift score is above ``threshold`` are re-solved."""
    routed = record.swift_scores > threshold
    return record.swift_changed & ~routed, routed


def calibrate_thresholds(record: SolveRecord, rule: str, tolerance: float, delta: float = 0.05,
                         check_times: Sequence[int] | None = None) -> dict:
    """The least conservative threshold of ``rule`` (exit or route) whose changed-token rate is at most ``tolerance``
    with confidence ``1 - delta`` on ``record`` (fixed-sequence testing from the most conservative candidate); the
    exit checked at ``check_times`` (default: after every step)."""
    if not 0 < tolerance < 1 or not 0 < delta < 1:
        raise ValueError(f"the tolerance and delta must be in (0, 1), got {tolerance!r} and {delta!r}")
    times = record.checkable if check_times is None else tuple(check_times)
    scores = record.scores[:, list(record.checkable)].flatten() if rule == "exit" else record.swift_scores
    quantiles = torch.linspace(0, 1, CANDIDATE_THRESHOLDS, dtype=torch.float64)
    candidates = torch.quantile(scores.double(), quantiles).tolist()
    # exit: a larger threshold exits earlier (riskier); route: a larger one routes fewer (riskier)
    chosen, tokens, steps = None, len(record.scores), record.scores.shape[1] - 1
    for threshold in [-math.inf, *candidates] if rule == "exit" else [-math.inf, *candidates, math.inf]:
        if rule == "exit":
            changed, cost, checks = scheduled_exit(record, threshold, times)
        else:
            changed, cost = route_outcome(record, threshold)
        bound = upper_bound(int(changed.sum()), tokens, delta)
        if bound > tolerance:
            break
        chosen = dict(threshold=threshold, changed_rate=float(changed.float().mean()), upper_bound=bound,
                      **({"mean_steps": float(cost.mean()),
                          "first_exit_time": _first_exit_time(cost, steps, record.tail_steps),
                          "mean_checks": float(checks.mean())}
                         if rule == "exit" else {"routed_fraction": float(cost.float().mean())}))
    if chosen is None:
        raise ValueError(f"no threshold meets a tolerance of {tolerance:g} with confidence {1 - delta:g} on "
                         f"{tokens:,} tokens: give a larger tolerance or more calibration text")
    schedule = {"check_times": list(times)} if rule == "exit" and check_times is not None else {}
    return dict(rule=rule, tolerance=tolerance, delta=delta, tokens=tokens, **chosen, **schedule)


def _first_exit_time(executed: torch.Tensor, steps: int, tail_steps: int = 0) -> float:
    """The earliest solve time at which a calibration token exits (state ``i`` of the step-size-1 solve is time
    ``i``), or the whole solve when none does: decoding checks from there on, and on the calibration text the rule
    then exits exactly where it did, so its changed rate and bound are the same while no check is wasted before."""
    early = executed[executed < steps] - tail_steps  # an exit to the tail ran the tail after its exit
    return float(early.min()) if len(early) else float(steps)


def save_exit_calibration(model_dir: str | Path, records: list[dict]) -> Path:
    """Add ``records`` to the folder's calibration file, replacing those of the same rule, tolerance and step sizes."""
    path = Path(model_dir) / EXIT_CALIBRATION_FILE
    kept = [r for r in load_exit_calibrations(model_dir)
            if not any(_same(r, new) for new in records)]
    path.write_text(json.dumps({"records": kept + records}, indent=2, allow_nan=True) + "\n")
    return path


def load_exit_calibrations(model_dir: str | Path) -> list[dict]:
    path = Path(model_dir) / EXIT_CALIBRATION_FILE
    return json.loads(path.read_text())["records"] if path.is_file() else []


def _same(a: dict, b: dict) -> bool:
    return a["rule"] == b["rule"] and math.isclose(a["tolerance"], b["tolerance"]) and \
        a.get("swift_step_size") == b.get("swift_step_size")


def calibrated_threshold(model_dir: str | Path, rule: str, tolerance: float, swift_step_size: float | None = None
                         ) -> float:
    """The threshold the folder's calibration holds for ``rule`` at ``tolerance``, or a ValueError saying how to make
    it."""
    return float(_calibration_record(model_dir, rule, tolerance, swift_step_size)["threshold"])


def calibrated_exit(model_dir: str | Path, tolerance: float, settings: AdaptiveDepth) -> AdaptiveDepth:
    """``settings`` with the learned exit the folder's calibration holds for ``tolerance``: its threshold, and checks
    at its calibrated check times (unless ``settings.check_every`` asks for every n-th step), or, for a calibration
    made before check times were chosen, from the earliest time a calibration token exited; never before
    ``settings.min_time``."""
    record = _calibration_record(model_dir, "exit", tolerance)
    if record.get("check_times") is not None and settings.check_every == 1:
        return replace(settings, exit_learned=float(record["threshold"]),
                       check_times=tuple(float(t) for t in record["check_times"]))
    return replace(settings, exit_learned=float(record["threshold"]),
                   min_time=max(settings.min_time, float(record.get("first_exit_time", 0.0))))


def _calibration_record(model_dir: str | Path, rule: str, tolerance: float, swift_step_size: float | None = None
                        ) -> dict:
    for record in load_exit_calibrations(model_dir):
        if record["rule"] == rule and math.isclose(record["tolerance"], tolerance) and \
                (rule == "exit" or record.get("swift_step_size") == swift_step_size):
            return record
    step = "" if rule == "exit" else f" --swift-step-size {swift_step_size:g}"
    raise ValueError(f"--exit-tolerance {tolerance:g}: {model_dir} holds no calibrated {rule} threshold for it; run "
                     f"`odegpt calibrate --model {model_dir} --data TEXT --tolerance {tolerance:g}{step}` first")


@dataclass(frozen=True)
class CalibrationRequest:
    """What ``odegpt calibrate`` was asked: the tolerances to calibrate thresholds for, their confidence, the swift
    step size of the routing rule, the exit head to add when the model has none, whether to fit it again, and the
    share of the text that fits the head (the rest calibrates the thresholds, held out from the fit), and what a check
    costs in solver steps (None: measured here) when the exit's check times are chosen, and where the exit goes
    ("tail": the unshared layers after the last shared segment still run; None: where the folder's head was fitted
    for, the read-out for a new one)."""

    tolerances: tuple[float, ...] = (0.02,)
    delta: float = 0.05
    swift_step_size: float = 4.0
    exit_head: int = 0
    refit: bool = False
    fit_fraction: float = 0.5
    check_cost: float | None = None
    exit_to: str | None = None

    def checked(self, config) -> CalibrationRequest:
        for tolerance in self.tolerances:
            if not 0 < tolerance < 1:
                raise ValueError(f"--tolerance must be in (0, 1) (a fraction of changed tokens), got {tolerance:g}")
        if not 0 < self.delta < 1:
            raise ValueError(f"--delta must be in (0, 1), got {self.delta:g}")
        if not 0 < self.fit_fraction < 1:
            raise ValueError(f"--fit-fraction must be in (0, 1), got {self.fit_fraction:g}")
        if isinstance(self.exit_head, bool) or self.exit_head < 0:
            raise ValueError(f"--exit-head must be 0 (linear) or a hidden width >= 1, got {self.exit_head!r}")
        if self.check_cost is not None and not 0 <= self.check_cost < math.inf:
            raise ValueError(f"--check-cost must be a finite number of solver steps >= 0, got {self.check_cost:g}")
        if self.exit_to not in (None, "read-out", "tail"):
            raise ValueError(f"--exit-to must be read-out or tail, got {self.exit_to!r}")
        if self.exit_to == "tail" and not has_tail(config.segments):
            raise ValueError("--exit-to tail: this model's last segment is shared, so no unshared layers follow it to "
                             "exit to; use --exit-to read-out")
        config.solver_steps(self.swift_step_size, "--swift-step-size")
        return self


def calibrate_model(model, batches: list, request: CalibrationRequest, say) -> list[dict]:
    """Fit the model's exit head (adding one if it has none) on the first ``fit_fraction`` of ``batches`` and
    calibrate the exit and route thresholds of every tolerance on the rest; the records, each with the held-out
    figures it was chosen on. The exit's check times are chosen on the fit part (by the threshold calibrated with a
    check after every step) and its threshold is then calibrated again under them on the rest."""
    split = max(1, min(len(batches) - 1, round(len(batches) * request.fit_fraction)))
    if len(batches) < 2:
        raise ValueError("--data gives fewer than 2 batches: the head is fitted on one part and the thresholds "
                         "calibrated on another; give more text")
    to_tail = model.config.exit_to_tail if request.exit_to is None else request.exit_to == "tail"
    if model.exit_head is None or request.refit or to_tail != model.config.exit_to_tail:
        model.config.exit_to_tail = to_tail  # the head's target changes with it: fitted again
        if model.exit_head is None:
            model.config.exit_head = request.exit_head
            model.exit_head = OdeGPTExitHead(model.config).to(model.dtype)
        features, targets = head_samples(model, batches[:split])
        correlation = fit_exit_head(model, features, targets)
        say(f"fitted the exit head ({'linear' if not model.config.exit_head else f'hidden {model.config.exit_head}'}) "
            f"on {len(targets):,} states: correlation {correlation:.2f} with log KL to the end of the solve")
    # Routing reads the head at the swift solve's end; a head fitted for the tail scores states inside a segment.
    record = solve_records(model, batches[split:], None if to_tail else request.swift_step_size)
    check_cost = measured_check_cost(model) if request.check_cost is None else request.check_cost
    say(f"a check costs {check_cost:.3g} solver steps "
        f"({'measured here, at batch 1' if request.check_cost is None else '--check-cost'})")
    # Where tokens exit on the fit part, apart from the bound's tokens; free checks all stay, so no pass is needed.
    fitted = solve_records(model, batches[:split], changes=False) if check_cost > 0 else None
    results = []
    for tolerance in request.tolerances:
        if fitted is None:
            times = record.checkable
        else:
            every_step = calibrate_thresholds(record, "exit", tolerance, request.delta)
            times = choose_check_times(fitted, every_step["threshold"], check_cost)
        results.append(dict(calibrate_thresholds(record, "exit", tolerance, request.delta, times),
                            check_cost=check_cost, exit_to="tail" if to_tail else "read-out"))
        if not to_tail:
            route = calibrate_thresholds(record, "route", tolerance, request.delta)
            results.append(dict(route, swift_step_size=request.swift_step_size))
    return results
