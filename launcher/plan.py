"""``odegpt plan``: what a run costs before it starts — FLOPs, memory per GPU, tokens/s, days.

FLOPs come from ``odegpt.model.accounting.model_cost`` (the same numbers training's MFU uses), at every
step size the run trains or evaluates at; the training cost is the expectation over the step-size
distribution. Model-state memory under ZeRO-2 and ZeRO-3 is DeepSpeed's own estimator
(``estimate_zero{2,3}_model_states_mem_needs``); stages 0 and 1 follow the same byte counts
(16-bit params and grads, fp32 master weights and Adam moments: 2 + 2 + 4 + 8 = 16 bytes/param, plus
DeepSpeed's 4 bytes of fp32 gradients = 20). Activations use Korthikanti et al. (2022)'s ~34·s·b·h
bytes per executed step with flash attention, stored only at solver-step boundaries when activation
checkpointing is on. All numbers are estimates for bf16 mixed precision on GPUs.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from odegpt.model.accounting import PEAK_TFLOPS, block_parameter_count, format_count, model_cost, peak_tflops
from odegpt.training.objective import (
    REFERENCE_STEP_SIZE,
    StepSizeDistribution,
    StepSizeSampler,
    objective_flops_per_token,
)

from .config import CONFIG_DIR, ConfigError, load_config

GIB = 1024 ** 3


@dataclass
class Plan:
    name: str
    parameters: int
    largest_layer_parameters: int
    gpus: int
    gpus_per_node: int
    nodes: int
    step_sizes: list[float]
    executed_steps: dict[float, int]
    flops_per_token: dict[float, float]
    expected_training_flops_per_token: float
    model_states_bytes: dict[str, float]  # per GPU
    build_cpu_bytes: dict[str, float]  # CPU memory per node while ZeRO-3 builds the model, with/without zero.Init
    activation_bytes: float  # per GPU, one micro-batch
    kv_cache_bytes: dict[float, float]  # one sequence of seq_len tokens
    train_tokens: float
    tokens_per_s: float
    days: float


def model_states_per_gpu(parameters: int, largest_layer: int, gpus_per_node: int, nodes: int) -> dict[str, float]:
    """GPU bytes for parameters, gradients and optimizer states under each ZeRO stage."""
    # deepspeed: imported where used: it picks its accelerator (DS_ACCELERATOR) on import and logs it
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = gpus_per_node * nodes
    kwargs = dict(num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    # ZeRO-3 as odegpt train runs it: parameters created partitioned (zero_init=True).
    zero3 = dict(largest_layer_params=largest_layer, zero_init=True, **kwargs)
    return {
        "zero0": 20 * parameters,
        "zero1": 4 * parameters + int(16 * parameters / gpus),
        "zero2": estimate_zero2_model_states_mem_needs(parameters, cpu_offload=False, **kwargs)[1],
        "zero2+offload": estimate_zero2_model_states_mem_needs(parameters, cpu_offload=True, **kwargs)[1],
        "zero3": estimate_zero3_model_states_mem_needs(parameters, cpu_offload=False, **zero3)[1],
        "zero3+offload": estimate_zero3_model_states_mem_needs(parameters, cpu_offload=True, **zero3)[1],
    }


def build_cpu_memory_per_node(parameters: int, largest_layer: int, gpus_per_node: int, nodes: int) -> dict[str, float]:
    """CPU bytes per node while ZeRO-3 builds the model (DeepSpeed's estimator): with ``zero.Init`` each rank
    holds at most one layer whole; without it every rank holds the whole fp32 model first."""
    # deepspeed: imported where used: it picks its accelerator (DS_ACCELERATOR) on import and logs it
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    kwargs = dict(largest_layer_params=largest_layer, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
                  cpu_offload=False)
    return {"zero_init": estimate_zero3_model_states_mem_needs(parameters, zero_init=True, **kwargs)[0],
            "no_zero_init": estimate_zero3_model_states_mem_needs(parameters, zero_init=False, **kwargs)[0]}


def expected_step_sizes(distribution: dict, seed: int, draws: int = 2000) -> list[tuple[float, float]]:
    """(step size, probability) pairs of the training distribution (sampled if continuous)."""
    d = StepSizeDistribution.from_dict(distribution)
    if d.choices is not None:
        weights = d.weights or [1.0] * len(d.choices)
        return [(a, w / sum(weights)) for a, w in zip(d.choices, weights)]
    sampler = StepSizeSampler(d, seed)
    return [(sampler.sample(i), 1 / draws) for i in range(draws)]


def make_plan(config, nodes: int, gpus_per_node: int, gpu_tflops: float, mfu: float, name: str = "") -> Plan:
    model_config = config.model_config()
    t = config.train
    gpus = nodes * gpus_per_node
    step_sizes = sorted({*config.eval_step_sizes, *(a for a, _ in expected_step_sizes(t.step_size_distribution, t.seed)
                                                     if not t.step_size_distribution.get("low"))})
    costs = {a: model_cost(model_config, step_size=a, seq_len=t.seq_len) for a in step_sizes}
    reference_steps = model_cost(model_config, step_size=REFERENCE_STEP_SIZE, seq_len=t.seq_len).executed_steps
    expected_flops = expected_steps = 0.0
    for a, p in expected_step_sizes(t.step_size_distribution, t.seed):
        # The trainer's MFU counts the same FLOPs: the drawn solve plus the objective's a=1 and read-out passes.
        expected_flops += p * objective_flops_per_token(model_config, a, t.seq_len, t.consistency_weight,
                                                        t.reference_weight, t.readout_weights)
        # Activations held at once: the drawn solve's steps, plus the a=1 solve's when its loss is backpropagated.
        held = reference_steps if t.reference_weight > 0 and a != REFERENCE_STEP_SIZE else 0
        expected_steps += p * (model_cost(model_config, step_size=a, seq_len=t.seq_len).executed_steps + held)
    parameters = costs[step_sizes[0]].parameters
    largest_layer = max(block_parameter_count(model_config)[1],
                        model_config.vocab_size * model_config.hidden_size)
    s, b, h = t.seq_len, t.micro_batch_size, model_config.hidden_size
    if t.activation_checkpointing:  # one bf16 hidden state per executed step + one step recomputed
        activations = expected_steps * s * b * h * 2 + 34 * s * b * h
    else:
        activations = expected_steps * 34 * s * b * h
    activations += s * b * model_config.vocab_size * 4 * 2  # fp32 logits and their gradient
    train_tokens = t.train_steps * t.global_batch_size * t.seq_len
    tokens_per_s = mfu * gpu_tflops * 1e12 * gpus / expected_flops
    return Plan(
        name=name or config.run.name, parameters=parameters, largest_layer_parameters=largest_layer, gpus=gpus,
        gpus_per_node=gpus_per_node, nodes=nodes, step_sizes=step_sizes,
        executed_steps={a: c.executed_steps for a, c in costs.items()},
        flops_per_token={a: c.flops_per_token for a, c in costs.items()},
        expected_training_flops_per_token=expected_flops,
        model_states_bytes=model_states_per_gpu(parameters, largest_layer, gpus_per_node, nodes),
        build_cpu_bytes=build_cpu_memory_per_node(parameters, largest_layer, gpus_per_node, nodes),
        activation_bytes=activations,
        kv_cache_bytes={a: c.kv_cache_bytes_per_token * t.seq_len for a, c in costs.items()},
        train_tokens=train_tokens, tokens_per_s=tokens_per_s, days=train_tokens / tokens_per_s / 86400)


def format_plan(plan: Plan, config, gpu_tflops: float, mfu: float) -> str:
    t = config.train
    lines = [f"{plan.name}: {format_count(plan.parameters)} parameters "
             f"(segments {config.model.segments}), {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s)",
             f"  per token, context {t.seq_len}:"]
    lines += [f"    a={a:<5g} {plan.executed_steps[a]:>4} solver steps"
              f"  forward {format_count(plan.flops_per_token[a])}FLOP"
              f"  KV cache {plan.kv_cache_bytes[a] / 2 ** 20:.1f} MiB per {t.seq_len}-token sequence (bf16)"
              for a in plan.step_sizes]
    passes = [name for name, on in (("the a=1 loss", t.reference_weight > 0),
                                    ("the consistency term", t.consistency_weight > 0),
                                    ("read-out losses", bool(t.readout_weights))) if on]
    lines.append(f"  training, expected over a ~ {t.step_size_distribution}"
                 f"{' with ' + ', '.join(passes) if passes else ''}: "
                 f"{format_count(plan.expected_training_flops_per_token)}FLOP per token")
    lines.append("  model states per GPU: " + "  ".join(f"{stage} {value / GIB:.2f} GiB"
                                                         for stage, value in plan.model_states_bytes.items()))
    if config.deepspeed.zero_stage == 3:
        lines.append(f"  ZeRO-3 builds the model partitioned (zero.Init): "
                     f"{plan.model_states_bytes['zero3'] / GIB:.2f} GiB per GPU, "
                     f"{plan.build_cpu_bytes['zero_init'] / GIB:.1f} GiB CPU per node while building "
                     f"(without zero.Init: {plan.build_cpu_bytes['no_zero_init'] / GIB:.1f} GiB)")
    lines.append(f"  activations per GPU: {plan.activation_bytes / GIB:.2f} GiB (micro-batch {t.micro_batch_size}, "
                 f"checkpointing {'on' if t.activation_checkpointing else 'off'})")
    lines.append(f"  budget {format_count(plan.train_tokens)} tokens ({t.train_steps} steps x {t.global_batch_size} x "
                 f"{t.seq_len}) at {mfu:.0%} MFU of {gpu_tflops:g} TFLOP/s: "
                 f"{format_count(plan.tokens_per_s)} tokens/s, {plan.days:.2f} days")
    return "\n".join(lines)


def _model_presets() -> list[Path]:
    presets = [p for p in (CONFIG_DIR / "model").glob("*.yaml") if p.stem != "tiny"]
    size = {"125m": 0, "350m": 1, "760m": 2, "1.3b": 3, "13b": 4}
    layout = {"shared": 0, "partial": 1, "unshared": 2}
    return sorted(presets, key=lambda p: (size.get(p.stem.split("-")[0], 9), layout.get(p.stem.split("-")[-1], 9)))


def format_table(plans: list[Plan]) -> str:
    header = (f"{'model':<16}{'params':>8}{'GFLOP/tok a=1':>14}{'train GFLOP/tok':>16}"
              + "".join(f"{stage:>8}" for stage in ("zero0", "zero1", "zero2", "zero3")) + f"{'activ.':>8}"
              f"{'KV a=1':>9}{'tokens/s':>10}{'days':>8}")
    rows = [header, " " * 40 + "(model states and activations: GiB per GPU; KV: MiB per sequence)"]
    for plan in plans:
        rows.append(f"{plan.name:<16}{format_count(plan.parameters):>8}{plan.flops_per_token[1.0] / 1e9:>14.2f}"
                    f"{plan.expected_training_flops_per_token / 1e9:>16.2f}"
                    + "".join(f"{plan.model_states_bytes[stage] / GIB:>8.2f}"
                              for stage in ("zero0", "zero1", "zero2", "zero3"))
                    + f"{plan.activation_bytes / GIB:>8.2f}{plan.kv_cache_bytes[1.0] / 2 ** 20:>9.0f}"
                    f"{format_count(plan.tokens_per_s):>10}{plan.days:>8.2f}")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    world = args.num_nodes * args.num_gpus
    for flag, value, upper in (("--gpu-tflops", args.gpu_tflops, math.inf), ("--mfu", args.mfu, 1.0)):
        if value is not None and not (0 < value <= upper and math.isfinite(value)):
            limit = "a finite number > 0" if upper == math.inf else "a fraction in (0, 1]"
            print(f"odegpt plan: {flag} must be {limit}, got {value:g}", file=sys.stderr)
            return 2
    if args.gpu_tflops is None:
        args.gpu_tflops = peak_tflops(args.gpu)
        if args.gpu_tflops is None:
            print(f"odegpt plan: --gpu {args.gpu} is not a known GPU ({', '.join(PEAK_TFLOPS)}); "
                  f"give its peak with --gpu-tflops", file=sys.stderr)
            return 2
    try:
        if args.all_models:
            plans = []
            for preset in _model_presets():
                config = load_config([preset, *args.config], [*args.overrides, "eval.step_sizes=[1, 2, 4]"]
                                     if not any(o.startswith("eval.step_sizes") for o in args.overrides)
                                     else args.overrides, world_size=world)
                plans.append(make_plan(config, args.num_nodes, args.num_gpus, args.gpu_tflops, args.mfu,
                                       name=preset.stem))
            print(f"{args.num_nodes} node(s) x {args.num_gpus} GPU(s), {args.mfu:.0%} MFU of {args.gpu_tflops:g} "
                  f"TFLOP/s, training config {' + '.join(args.config)}")
            print(format_table(plans))
            return 0
        config = load_config(args.config, args.overrides, world_size=world)
    except ConfigError as error:
        print(f"odegpt plan: config error: {error}", file=sys.stderr)
        return 2
    name = " + ".join(Path(c).name.removesuffix(".yaml") for c in args.config)
    plan = make_plan(config, args.num_nodes, args.num_gpus, args.gpu_tflops, args.mfu, name=name)
    print(format_plan(plan, config, args.gpu_tflops, args.mfu))
    return 0
