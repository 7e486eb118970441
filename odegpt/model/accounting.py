"""What a model costs at a step size: parameters, FLOPs per token and KV-cache bytes per token.

One function so that training's MFU, the cluster planner and the benchmarks agree. FLOPs follow
the PaLM/Megatron convention: 2 FLOPs per multiply-accumulate of every executed matmul, plus the
attention scores and weighted sum over a context of ``seq_len`` keys (4 * heads * head_dim *
seq_len per step, not halved for causality); training counts 3x the forward pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .configuration_odegpt import OdeGPTConfig, check_step_size
from .solver import SolvePlan, num_blocks, plan_solve, relaxation_knots, segment_starts, solver_method


@dataclass(frozen=True)
class ModelCost:
    step_size: float
    executed_steps: int
    block_evaluations: int  # executed steps x the solver method's evaluations per step (Heun: 2); KV slots
    parameters: int  # distinct parameters, tied embeddings counted once
    block_parameters: int  # parameters of all distinct blocks
    flops_per_token: float  # forward
    training_flops_per_token: float  # forward + backward
    kv_cache_bytes_per_token: int


def linear_shapes(config: OdeGPTConfig) -> list[tuple[int, int, bool]]:
    """``(in, out, has bias)`` of each linear map of a block."""
    d, q, kv, ff = (config.hidden_size, config.num_attention_heads * config.head_dim,
                    config.num_key_value_heads * config.head_dim, config.intermediate_size)
    attention, output, mlp = config.attention_bias, config.attention_output_bias, config.mlp_bias
    return [(d, q, attention), (d, kv, attention), (d, kv, attention), (q, d, output),
            (d, ff, mlp), (d, ff, mlp), (ff, d, mlp)]


def block_parameter_count(config: OdeGPTConfig) -> tuple[int, int]:
    """(matmul parameters, all parameters) of one block, without the relaxation."""
    shapes = linear_shapes(config)
    matmul = sum(n_in * n_out for n_in, n_out, _ in shapes)
    return matmul, matmul + sum(n_out for _, n_out, bias in shapes if bias) + 2 * config.hidden_size


def _relaxed_macs(config: OdeGPTConfig) -> int:
    """Multiply-accumulates of one knot's corrections of a relaxed block, per token (odegpt.model.modeling_odegpt:
    dense below a matrix's own rank, else ``up @ down``)."""
    rank = config.relax_rank
    return sum(n_in * n_out if rank == "full" or rank >= min(n_in, n_out) else rank * (n_in + n_out)
               for n_in, n_out, _ in linear_shapes(config))


def relaxation_parameter_count(config: OdeGPTConfig) -> int:
    """Parameters of the time-continuous relaxation: one knot per unit of each shared segment's depth."""
    if not config.relax_rank:
        return 0
    biases = sum(n_out for _, n_out, bias in linear_shapes(config) if bias)
    knots = sum(s["depth"] for s in config.segments if s["shared"])
    return knots * (_relaxed_macs(config) + biases)


def relaxation_flops(config: OdeGPTConfig, plan: SolvePlan) -> int:
    """Forward FLOPs of the relaxation's corrections over a solve (one or two knots per evaluation of a shared
    block), per token."""
    if not config.relax_rank:
        return 0
    starts, shared = segment_starts(config.segments), []
    for segment in config.segments:
        shared.extend([segment["depth"]] if segment["shared"] else [0] * segment["depth"])
    knots_used = sum(len(relaxation_knots(step.start + stage * step.dt - starts[step.block], shared[step.block]))
                     for step in plan if shared[step.block] for stage in plan.method.stage_times)
    return 2 * knots_used * _relaxed_macs(config)


def step_flops(config: OdeGPTConfig, seq_len: int = 2048) -> int:
    """Forward FLOPs of one executed solver step for one token with ``seq_len`` keys of context."""
    matmul, _ = block_parameter_count(config)
    return 2 * matmul + 4 * config.num_attention_heads * config.head_dim * seq_len


def readout_flops(config: OdeGPTConfig) -> int:
    """Forward FLOPs of one read-out (the LM head) of one token; the final norm is not a matmul."""
    return 2 * config.vocab_size * config.hidden_size


def kv_projection_flops(config: OdeGPTConfig) -> int:
    """Forward FLOPs of a block's key and value projections for one token (an adaptive solve's KV fill)."""
    return 2 * 2 * config.hidden_size * config.num_key_value_heads * config.head_dim


def model_cost(
    config: OdeGPTConfig, step_size: float | None = None, seq_len: int = 2048, dtype_bytes: int = 2,
    solver: str | None = None,
) -> ModelCost:
    """Cost of ``config`` solved at ``step_size`` with ``solver`` (default: the config's) with ``seq_len`` context.
    A block evaluation costs one step's FLOPs and one KV-cache slot."""
    step_size = config.step_size if step_size is None else check_step_size(step_size)
    plan = plan_solve(config.segments, step_size, config.max_solver_steps, config.solver if solver is None else solver)
    executed = len(plan)
    steps = plan.num_slots
    _, per_block = block_parameter_count(config)
    d, vocab = config.hidden_size, config.vocab_size
    blocks = num_blocks(config.segments) * per_block
    embeddings = vocab * d * (1 if config.tie_word_embeddings else 2)
    forward = steps * step_flops(config, seq_len) + readout_flops(config) + relaxation_flops(config, plan)
    kv = steps * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    return ModelCost(
        step_size=step_size,
        executed_steps=executed,
        block_evaluations=steps,
        parameters=blocks + embeddings + d + relaxation_parameter_count(config),
        block_parameters=blocks + relaxation_parameter_count(config),
        flops_per_token=float(forward),
        training_flops_per_token=float(3 * forward),
        kv_cache_bytes_per_token=kv,
    )


def adaptive_flops_per_token(config: OdeGPTConfig, executed_steps: float, readouts: float, kv_projections: float = 0.0,
                             continued_steps: float = 0.0, seq_len: int = 2048, exit_scores: float = 0.0) -> float:
    """Forward FLOPs of an adaptive solve (odegpt/decoding/adaptive.py) from its per-token counts: executed and
    lazily continued steps (each the config's solver's evaluations), LM-head read-outs (the final one included),
    key/value fill projections and exit-head scores. With one read-out and a fixed step count it is
    ``model_cost(...).flops_per_token``."""
    evaluations = solver_method(config.solver).evaluations
    return float((executed_steps + continued_steps) * evaluations * step_flops(config, seq_len)
                 + readouts * readout_flops(config) + kv_projections * kv_projection_flops(config)
                 + exit_scores * exit_head_flops(config))


def exit_head_flops(config: OdeGPTConfig) -> int:
    """Forward FLOPs of one score of the learned exit head (its features, then one or two matrix products)."""
    if config.exit_head is None:
        return 0
    features = config.hidden_size + 2
    return 4 * config.hidden_size + 2 * (features * config.exit_head + config.exit_head if config.exit_head
                                         else features)


def llama_parameter_count(config: dict) -> int:
    """Parameters of a Llama-family ``config.json`` (the head counted untied: an upper bound), from its own head_dim
    and KV heads: what importing or loading such a folder will allocate, to refuse before anything is built."""
    d, layers = int(config.get("hidden_size") or 0), int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or d // max(heads, 1))
    attention = d * head_dim * 2 * (heads + kv_heads)  # q and o for every head, k and v for every KV head
    mlp = 3 * d * int(config.get("intermediate_size") or 0)
    return 2 * int(config.get("vocab_size") or 0) * d + layers * (attention + mlp)


# Dense bf16 peak TFLOP/s per device (no sparsity), from the vendors' data sheets; the first name
# found in the device name wins, so more specific names come first. Training's MFU and `odegpt plan`
# read it; `logging.peak_tflops_per_device` (or `odegpt plan --gpu-tflops`) overrides it.
PEAK_TFLOPS = {
    "GB200": 2500.0, "B200": 2250.0, "B100": 1750.0,
    "GH200": 989.0, "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0,
    "A100": 312.0, "A800": 312.0, "A30": 165.0, "A10": 125.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "RTX 6000 Ada": 364.0, "RTX A6000": 155.0,
    "MI355X": 2500.0, "MI325X": 1307.0, "MI300X": 1307.0, "MI250X": 383.0,
}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a device from its name (``torch.cuda.get_device_name()``), None if unknown."""
    return next((tflops for name, tflops in PEAK_TFLOPS.items() if name.lower() in device_name.lower()), None)


def format_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if not math.isclose(n, round(n)) else str(int(n))
