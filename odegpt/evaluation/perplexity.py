"""Perplexity of one model at several step sizes, on fixed samples or long documents.

Pure and local: it sums token-level negative log-likelihood over the batches it is given. A
distributed caller shards the batches and all-reduces :func:`nll_sums` itself, so the model code
stays free of collectives.

Long documents are scored with a sliding window, as in Hugging Face's perplexity guide: windows
of at most ``seq_len`` input tokens start every ``stride`` tokens, and each window scores only the
tokens no earlier window scored. Every token but the first is scored exactly once, with up to
``seq_len`` tokens of left context (at least ``seq_len - stride + 1`` after the first window).
``stride == seq_len`` gives disjoint windows; a smaller stride buys context with compute.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from odegpt.decoding.adaptive import adaptive_forward
from odegpt.model.solver import plan_solve

# Targets with this value are context only: not scored (the cross-entropy convention of PyTorch and HF).
IGNORE_INDEX = -100

# A batch is either (B, L + 1) tokens, every next token scored, or a pair (input ids (B, L),
# targets (B, L)) in which IGNORE_INDEX marks positions that are not scored.
Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def nll_sums(model: torch.nn.Module, batches: Iterable[Batch], step_sizes: Sequence[float]
             ) -> dict[float, tuple[float, int]]:
    """``{a: (sum of next-token NLL, number of scored tokens)}`` over ``batches``.

    ``batches`` is iterated once (it may be a generator): each batch is solved at every step size
    before the next one is read. A model that is not an odegpt model (a source Llama) has one step size: it is
    called without one, and ``step_sizes`` should be ``[1.0]``."""
    was_training = model.training
    model.eval()
    sums = {float(a): [0.0, 0] for a in step_sizes}
    try:
        for batch in batches:
            inputs, targets = (batch[:, :-1], batch[:, 1:]) if isinstance(batch, torch.Tensor) else batch
            scored = int((targets != IGNORE_INDEX).sum())
            for a in sums:
                solve = {"step_size": a} if hasattr(model, "plan") else {}
                logits = model(input_ids=inputs, use_cache=False, **solve).logits.float()
                nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                      reduction="sum")
                sums[a][0] += float(nll)
                sums[a][1] += scored
    finally:
        model.train(was_training)
    return {a: (total, count) for a, (total, count) in sums.items()}


def evaluation_indices(total: int, num_samples: int | None) -> list[int]:
    """``num_samples`` indices spread evenly over a validation set of ``total`` samples (all if None):
    a fixed, seed-independent subset, shared by training-time and offline evaluation."""
    if num_samples is None or num_samples >= total:
        return list(range(total))
    return [index * total // num_samples for index in range(num_samples)]


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp of the token-weighted mean NLL (inf if it overflows, nan without tokens)."""
    if num_tokens == 0:
        return math.nan
    mean = nll_sum / num_tokens
    return math.exp(mean) if mean < 700 else math.inf


def evaluate_perplexity(model: torch.nn.Module, batches: Iterable[Batch], step_sizes: Sequence[float]
                        ) -> dict[float, float]:
    """``{a: perplexity}``: token-weighted mean NLL at each step size, exponentiated."""
    return {a: perplexity(*sums) for a, sums in nll_sums(model, batches, step_sizes).items()}


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` of a document go in; the targets ``[score_from, end)`` are scored
    (each predicted from the tokens before it in the window)."""

    begin: int
    end: int
    score_from: int


def sliding_windows(num_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """The windows that score tokens ``1 .. num_tokens - 1`` of a document exactly once, each with
    at most ``seq_len`` tokens of input (HF's perplexity guide, stride ``stride``)."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    windows: list[Window] = []
    scored_until = 1  # token 0 has no context: it is never a target
    begin = 0
    while scored_until < num_tokens:
        end = min(begin + seq_len + 1, num_tokens)  # > scored_until, as begin grows and stride > 0
        windows.append(Window(begin, end, scored_until))
        scored_until = end
        begin += stride
    return windows


def window_batches(documents: Iterable[torch.Tensor], seq_len: int, stride: int, batch_size: int,
                   pad_id: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input ids, targets)`` batches covering every window of every document (1-D token tensors).

    Windows are grouped by length (longest first) and right-padded within a batch; under causal
    attention a padded tail changes nothing before it, and its targets are ignored."""
    pieces = []
    for tokens in documents:
        for window in sliding_windows(len(tokens), seq_len, stride):
            piece = tokens[window.begin:window.end]
            targets = piece[1:].clone()
            targets[: window.score_from - window.begin - 1] = IGNORE_INDEX
            pieces.append((piece[:-1], targets))
    pieces.sort(key=lambda piece: -len(piece[0]))
    batches = []
    for start in range(0, len(pieces), batch_size):
        group = pieces[start:start + batch_size]
        length = len(group[0][0])
        inputs = torch.full((len(group), length), pad_id, dtype=torch.long)
        targets = torch.full((len(group), length), IGNORE_INDEX, dtype=torch.long)
        for row, (piece_inputs, piece_targets) in enumerate(group):
            inputs[row, :len(piece_inputs)] = piece_inputs
            targets[row, :len(piece_targets)] = piece_targets
        batches.append((inputs, targets))
    return batches


# What an adaptive solve counts per token (odegpt.decoding.adaptive.AdaptiveCounts), summed by adaptive_nll_sums.
COUNTED = ("executed_steps", "readouts", "kv_projections", "continued_steps", "exit_scores")


@dataclass(frozen=True)
class AdaptiveScore:
    """Teacher-forced NLL of an adaptive solve and what it executed, summed over the scored tokens."""

    nll_sum: float
    num_tokens: int
    executed_steps: float  # solver steps of the tokens' own schedules
    readouts: float  # LM-head read-outs, the final one included
    kv_projections: float  # key/value projections that filled skipped steps (copy, interpolate)
    continued_steps: float  # steps a lazy fill continued a solve for, counted as a deferred fill would run them
    exit_scores: float = 0.0  # scores of the learned exit head

    def per_token(self, name: str) -> float:
        return getattr(self, name) / self.num_tokens if self.num_tokens else math.nan


def _deferred_lazy_steps(counts, settings, real: torch.Tensor, full_steps: int) -> torch.Tensor:
    """Steps a deferred lazy fill would continue each token for: up to the deepest step any later token of
    its row executes (early exit), or the whole super solve if any later token is routed."""
    if settings.routing:
        routed = (counts.readouts > 1) & real  # a routed token is read out twice: swift and super
        later_routed = (routed.flip(-1).cumsum(-1).flip(-1) - routed.long()) > 0
        return (later_routed & ~routed).float() * full_steps * real
    own = counts.executed_steps * real
    deepest_later = own.flip(-1).cummax(-1).values.flip(-1)
    return (deepest_later - own) * real


@torch.no_grad()
def adaptive_nll_sums(model: torch.nn.Module, batches: Iterable[Batch], settings) -> AdaptiveScore:
    """Score ``batches`` with a per-token adaptive solve (``odegpt.decoding.adaptive.AdaptiveDepth``), one
    teacher-forced pass per batch: causal attention gives every token the schedule and logits it would
    have in decoding."""
    was_training = model.training
    model.eval()
    settings = settings.checked(model.config)
    full_steps = len(plan_solve(model.config.segments, settings.step_size, model.config.max_solver_steps))
    totals = dict(nll_sum=0.0, num_tokens=0, executed_steps=0.0, readouts=0.0, kv_projections=0.0,
                  continued_steps=0.0, exit_scores=0.0)
    try:
        for batch in batches:
            inputs, targets = (batch[:, :-1], batch[:, 1:]) if isinstance(batch, torch.Tensor) else batch
            out = adaptive_forward(model, inputs, settings)
            scored = targets != IGNORE_INDEX
            # Real tokens: everything up to a row's last scored target (a right-padded tail scores nothing).
            last = torch.where(scored, torch.arange(scored.shape[1]), -1).max(-1, keepdim=True).values
            real = torch.arange(scored.shape[1])[None] <= last
            nll = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                  reduction="sum")
            counts = out.counts
            if settings.kv_fill == "lazy":
                counts.continued_steps = _deferred_lazy_steps(counts, settings, real, full_steps)
            totals["nll_sum"] += float(nll)
            totals["num_tokens"] += int(scored.sum())
            for name in COUNTED:
                values = getattr(counts, name)
                totals[name] += 0.0 if values is None else float(values[scored].sum())
    finally:
        model.train(was_training)
    return AdaptiveScore(**totals)
