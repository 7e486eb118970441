"""The learned exit head's target and training term.

For a state ``h`` reached at solve time ``t``, the head (``OdeGPTExitHead``) predicts ``log KL(p_end || p(h))``: how far
the read-out of ``h`` still is from the read-out at the end of the step-size-1 solve of the same token. That is zero
where the solve has converged (later steps change nothing), small where exiting changes little, and it answers both
adaptive questions with one number: exit a solve at ``h`` when it is small; route a token whose swift solve ended at
``h`` to the super solve when it is large.

Trained beside the language model (``train.exit_head_weight``) on the states of each drawn solve, or fitted afterwards
on a frozen model (odegpt.evaluation.exit_calibration, ``odegpt calibrate``); either way its inputs and targets are
detached: the head learns to read the model, never changes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The floor of the KL under the log: a state whose read-out equals the end's (to float precision) scores log(1e-6).
KL_FLOOR = 1e-6


def exit_target(logits: torch.Tensor, end_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_end || p)`` per token (>= 0; 0 where the read-out already is the end's)."""
    end = end_logits.float().log_softmax(-1)
    return (end.exp() * (end - logits.float().log_softmax(-1))).sum(-1).clamp(min=0)


def log_target(kl: torch.Tensor) -> torch.Tensor:
    """What the head predicts of a KL: its log, floored (:data:`KL_FLOOR`)."""
    return (kl + KL_FLOOR).log()


def exit_head_term(module, states: tuple[torch.Tensor, ...], plan, end_logits: torch.Tensor, positions: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The head's squared error against ``log KL(p_end || p(h))`` at every state of a solve (after each step; the
    embedding too), on ``positions`` random token positions of the batch (each state's read-out costs an LM head):
    ``states[k]`` is the state after step ``k - 1`` of ``plan`` (``states[0]`` at time 0), ``end_logits`` the
    step-size-1 solve's final logits. Everything but the head is detached."""
    batch, length = states[0].shape[:2]
    chosen = torch.randperm(batch * length, generator=generator)[:positions].to(states[0].device)
    end = end_logits.detach().flatten(0, 1)[chosen]
    times = [0.0] + [step.end for step in plan]
    errors = []
    with torch.no_grad():
        targets = [log_target(exit_target(module.read_out(h.detach().flatten(0, 1)[chosen]), end)) for h in states]
    for h, time, target in zip(states, times, targets):
        prediction = module.exit_score(h.detach().flatten(0, 1)[chosen], time)
        errors.append(F.mse_loss(prediction, target))
    return torch.stack(errors).mean()
