"""Optimizer parameter groups and the learning-rate schedule (linear warmup, cosine decay)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                     relax_lr_scale: float = 1.0) -> list[dict]:
    """Decay matrices only: norms, biases and embeddings are excluded (GPT-NeoX convention). The time-continuous
    relaxation's corrections (``relax_*``) form their own group at ``relax_lr_scale`` times ``lr``, decayed towards
    zero, i.e. towards the shared weights (their bias corrections are not decayed)."""
    decay, no_decay, relax, relax_biases = [], [], [], []
    for name, parameter in model.named_parameters():  # tied weights appear once
        if not parameter.requires_grad:
            continue
        if ".relax_" in name:
            (relax_biases if name.endswith("relax_bias") else relax).append(parameter)
        elif parameter.ndim < 2 or "norm" in name or "embed" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if relax or relax_biases:
        scaled = {} if lr is None else {"lr": lr * relax_lr_scale}
        groups += [{"params": relax, "weight_decay": weight_decay, **scaled},
                   {"params": relax_biases, "weight_decay": 0.0, **scaled}]
    return [group for group in groups if group["params"]]


@dataclass
class WarmupCosine:
    """Multiplier of the peak lr at optimizer step ``step`` (for ``torch.optim.lr_scheduler.LambdaLR``):
    linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio`` over
    ``decay_steps``, then flat."""

    warmup_steps: int
    decay_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.decay_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_for(train) -> WarmupCosine:
    decay = train.decay_steps if train.decay_steps is not None else max(1, train.train_steps - train.warmup_steps)
    return WarmupCosine(train.warmup_steps, decay, train.min_lr / train.lr)
