"""Validation perplexity of one model at several step sizes.

Pure and local: it sums token-level negative log-likelihood over the batches it is given. A
distributed caller shards the batches and all-reduces :func:`nll_sums` itself, so the model code
stays free of collectives.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def nll_sums(model: torch.nn.Module, batches: Iterable[torch.Tensor], step_sizes: list[float]
             ) -> dict[float, tuple[float, int]]:
    """``{a: (sum of next-token NLL, number of tokens)}`` over ``batches`` of (B, seq_len + 1) tokens."""
    was_training = model.training
    model.eval()
    sums = {float(a): [0.0, 0] for a in step_sizes}
    try:
        for tokens in batches:
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            for a in sums:
                logits = model(input_ids=inputs, step_size=a, use_cache=False).logits.float()
                nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
                sums[a][0] += float(nll)
                sums[a][1] += targets.numel()
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


def evaluate_perplexity(model: torch.nn.Module, batches: Iterable[torch.Tensor], step_sizes: list[float]
                        ) -> dict[float, float]:
    """``{a: perplexity}``: token-weighted mean NLL at each step size, exponentiated."""
    batches = list(batches)  # iterated once per step size inside nll_sums
    return {a: perplexity(*sums) for a, sums in nll_sums(model, batches, step_sizes).items()}
