"""A retrofit calibrated on real text: shared blocks and relaxation knots from what the source's layers *do* on a few
batches, not from their weights alone.

Real models carry a few very large activation channels, so two layers whose weights look far apart may compute nearly
the same on real inputs, and the reverse: the error that matters is the difference in outputs. With ``X_k`` the inputs
of a linear map of source layer ``k`` on calibration text and ``C_k = X_k X_k^T`` their second moment (the inputs of
q/k/v and gate/up are the unit-gain normed states, the RMSNorm gains being folded into the maps as the retrofit does),
the output error of replacing ``W_k`` by ``W`` is ``||(W_k - W) X_k||^2 = tr((W_k - W) C_k (W_k - W)^T)``. So:

- a relaxation knot is the rank-``r`` ``U V`` closest to ``D_k = W_k - W`` *on those inputs*: the truncated SVD of
  ``D_k S`` with ``C_k = S S^T`` (Cholesky), ``V = V' S^-1`` (SVD-LLM's whitening; ASVD scales by the diagonal only);
- ``fit``: the shared weight closest to all of its segment's layers on their inputs,
  ``W = argmin sum_k ||(W - W_k) X_k||^2 = (sum_k W_k C_k)(sum_k C_k)^-1``;
- ``auto``: per shared block, the rule (stepwise, average, lower, fit) whose block, relaxation included, has the least
  relative output error ``sum_maps mean_k ||(W_k - W - U_k V_k) X_k||^2 / ||W_k X_k||^2``.

``C`` gets a small ridge (``damp`` times its mean diagonal) so that directions the text never visits stay defined.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Which input each linear map reads: the groups whose second moments are collected.
INPUT_OF = {"self_attn.q_proj": "attention", "self_attn.k_proj": "attention", "self_attn.v_proj": "attention",
            "self_attn.o_proj": "output", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "down"}
CALIBRATED_RULES = ("stepwise", "average", "lower", "fit")


@dataclass
class InputMoments:
    """``moments[group][layer]``: the summed second moment (float64) of the inputs of the maps of ``group`` in source
    layer ``layer``, over ``tokens`` tokens."""

    moments: dict[str, torch.Tensor]
    tokens: int

    def of(self, name: str, layer: int, damp: float = 1e-2) -> torch.Tensor:
        """The mean second moment of the inputs of map ``name`` of ``layer``, with a ridge of ``damp`` x its mean
        diagonal."""
        moment = self.moments[INPUT_OF[name]][layer] / self.tokens
        return moment + damp * moment.diagonal().mean() * torch.eye(moment.shape[0], dtype=moment.dtype)


@torch.no_grad()
def input_moments(source, batches) -> InputMoments:
    """The second moments of every source layer's map inputs on ``batches`` ((B, L + 1) token tensors, or
    (inputs, targets) pairs), in the folded convention (unit-gain normed states for q/k/v and gate/up)."""
    layers, hidden = source.model.layers, source.config.hidden_size
    eps, inner = source.config.rms_norm_eps, source.config.intermediate_size
    moments = {group: torch.zeros(len(layers), size, size, dtype=torch.float64)
               for group, size in (("attention", hidden), ("output", _attention_width(source)), ("mlp", hidden),
                                   ("down", inner))}

    def add(group: str, layer: int, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        moments[group][layer] += x.T @ x

    hooks = []
    for index, layer in enumerate(layers):
        hooks += [
            layer.input_layernorm.register_forward_hook(
                lambda m, i, o, k=index: add("attention", k, F.rms_norm(i[0].float(), (hidden,), eps=eps))),
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, i, o, k=index: add("mlp", k, F.rms_norm(i[0].float(), (hidden,), eps=eps))),
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, i, k=index: add("output", k, i[0])),
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, i, k=index: add("down", k, i[0]))]
    tokens = 0
    try:
        for batch in batches:
            inputs = batch[:, :-1] if isinstance(batch, torch.Tensor) else batch[0]
            source(input_ids=inputs, use_cache=False)
            tokens += inputs.numel()
    finally:
        for hook in hooks:
            hook.remove()
    if tokens == 0:
        raise ValueError("no calibration tokens: --calibration holds no text")
    return InputMoments(moments, tokens)


def _attention_width(source) -> int:
    return source.model.layers[0].self_attn.o_proj.in_features


def low_rank(delta: torch.Tensor, rank: int, moment: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` of rank ``rank`` with ``up @ down`` closest to ``delta``: in weights (plain truncated SVD), or,
    given the inputs' second moment, in outputs on those inputs (whitened)."""
    delta = delta.double()
    if moment is None:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    whitening = torch.linalg.cholesky(moment)
    u, s, vh = torch.linalg.svd(delta @ whitening, full_matrices=False)
    down = torch.linalg.solve_triangular(whitening, vh[:rank], upper=False, left=False)  # vh S^-1
    return u[:, :rank] * s[:rank], down


def output_error(delta: torch.Tensor, moment: torch.Tensor) -> float:
    """``tr(delta C delta^T)``: the squared output error of a weight error ``delta`` on inputs of second moment C."""
    delta = delta.double()
    return float(torch.einsum("oi,ij,oj->", delta, moment, delta))


def shared_weight(rule: str, weights: list[torch.Tensor], moments: list[torch.Tensor] | None) -> torch.Tensor:
    """The shared weight (or bias) of one map from its segment's layers' folded weights, by ``rule`` (``fit`` needs
    the inputs' moments; a bias fits as their mean)."""
    if rule == "lower":
        return weights[0]
    if rule == "stepwise":
        return weights[len(weights) // 2]
    if rule == "average" or (rule == "fit" and weights[0].ndim == 1):
        return sum(weights) / len(weights)
    if rule == "fit":  # (sum_k W_k C_k)(sum_k C_k)^-1, C symmetric
        if moments is None:
            raise ValueError("init 'fit' fits the shared block on calibration text: give --calibration")
        return torch.linalg.solve(sum(moments), sum(w @ c for w, c in zip(weights, moments)).T).T
    raise ValueError(f"init must be one of {', '.join(CALIBRATED_RULES)} or auto, got {rule!r}")


@dataclass
class BlockFit:
    """A shared block's maps from one rule: per map the shared weight and bias, and each knot's (up, down) (None
    without a low-rank relaxation); with calibration, the block's relative output error on its inputs."""

    rule: str
    weights: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor | None]
    knots: dict[str, list[tuple[torch.Tensor, torch.Tensor]] | None]
    error: float | None


def fit_block(rule: str, maps: list[dict], layers: list[int], moments: InputMoments | None, rank: int | None,
              damp: float = 1e-2) -> BlockFit:
    """The shared maps of a segment whose source layers are ``layers`` (their folded ``maps``: name -> (weight,
    bias)) by ``rule``, and, when ``rank`` is given (None: no low-rank relaxation), each layer's knot: the rank-``rank``
    approximation of its difference to the shared weight, on the calibration inputs when ``moments`` are given."""
    weights, biases, knots, errors = {}, {}, {}, []
    for name in INPUT_OF:
        layer_weights = [m[name][0].double() for m in maps]
        layer_moments = None if moments is None else [moments.of(name, layer, damp) for layer in layers]
        weight = shared_weight(rule, layer_weights, layer_moments)
        pairs = None if rank is None else [low_rank(w - weight, rank, None if layer_moments is None else
                                                    layer_moments[k]) for k, w in enumerate(layer_weights)]
        if layer_moments is not None:
            remaining = [w - weight - (0 if pairs is None else pairs[k][0] @ pairs[k][1])
                         for k, w in enumerate(layer_weights)]
            errors += [output_error(r, c) / output_error(w, c)
                       for r, w, c in zip(remaining, layer_weights, layer_moments)]
        layer_biases = [m[name][1] for m in maps]
        biases[name] = None if layer_biases[0] is None else shared_weight(rule, [b.double() for b in layer_biases],
                                                                          None)
        weights[name], knots[name] = weight, pairs
    return BlockFit(rule, weights, biases, knots, sum(errors) / len(errors) if errors else None)
