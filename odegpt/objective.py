"""The step-size-randomized pretraining objective.

Each optimizer step draws one step size ``a`` and trains the model solved at ``a``, so one set of
weights learns a vector field that stays accurate at many step sizes. The draw depends only on
(seed, optimizer step): every data-parallel rank and every micro-batch of a step sees the same
``a`` without communicating, and a resumed run draws the same sequence.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from .configuration_odegpt import check_step_size
from .loss import shifted_cross_entropy


@dataclass(frozen=True)
class StepSizeDistribution:
    """Either a finite set ``choices`` (optional ``weights``) or a range ``[low, high]``
    (uniform, or log-uniform so that small and large steps are drawn equally often by ratio)."""

    choices: tuple[float, ...] | None = None
    weights: tuple[float, ...] | None = None
    low: float | None = None
    high: float | None = None
    log_uniform: bool = False

    def __post_init__(self) -> None:
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
    def constant(cls, step_size: float) -> "StepSizeDistribution":
        return cls(choices=(step_size,))

    @classmethod
    def from_dict(cls, spec: dict) -> "StepSizeDistribution":
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
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


class StepSizeSampler:
    """Draws the step size of optimizer step ``t`` as a pure function of (seed, t)."""

    def __init__(self, distribution: StepSizeDistribution, seed: int) -> None:
        self.distribution = distribution
        self.seed = int(seed)
        if distribution.choices is not None:
            weights = np.ones(len(distribution.choices)) if distribution.weights is None else np.array(distribution.weights)
            self._probabilities = weights / weights.sum()

    def sample(self, optimizer_step: int) -> float:
        rng = np.random.default_rng([self.seed, int(optimizer_step)])
        d = self.distribution
        if d.choices is not None:
            return d.choices[int(rng.choice(len(d.choices), p=self._probabilities))]
        if d.log_uniform:
            return float(math.exp(rng.uniform(math.log(d.low), math.log(d.high))))
        return float(rng.uniform(d.low, d.high))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "distribution": self.distribution.to_dict()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "StepSizeSampler":
        return cls(StepSizeDistribution.from_dict(state["distribution"]), state["seed"])


def language_model_loss(
    model: torch.nn.Module, tokens: torch.Tensor, step_size: float, consistency_weight: float = 0.0
) -> torch.Tensor:
    """Next-token loss of ``tokens`` (batch, seq_len + 1) solved at ``step_size``.

    With ``consistency_weight > 0`` and ``a != 1``, adds ``KL(p_1 || p_a)`` per token, where
    ``p_1`` is a detached solve at step size 1 (the trained depth's own resolution), pulling the
    coarse solve towards the fine one.
    """
    inputs = tokens[:, :-1]
    logits = model(input_ids=inputs, step_size=step_size, use_cache=False).logits.float()
    loss = shifted_cross_entropy(logits, tokens)
    if consistency_weight > 0 and step_size != 1.0:
        with torch.no_grad():
            reference = model(input_ids=inputs, step_size=1.0, use_cache=False).logits.float()
        kl = F.kl_div(
            logits.flatten(0, 1).log_softmax(-1), reference.flatten(0, 1).log_softmax(-1),
            log_target=True, reduction="batchmean",
        )
        loss = loss + consistency_weight * kl
    return loss
