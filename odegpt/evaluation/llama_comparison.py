"""What ``odegpt bench`` measures: prefill and decode throughput of a native model at each step size, beside
transformers' ``LlamaForCausalLM`` running the unrolled export of the same weights at that step size (what a user
would serve instead), timed interleaved in one process (odegpt.evaluation.throughput)."""
from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass

import psutil
import torch
import transformers
from tqdm import tqdm
from transformers import LlamaForCausalLM

from odegpt.errors import InputError
from odegpt.folders.export import save_unrolled
from odegpt.model.accounting import model_cost

from .throughput import Variant, measure_interleaved, random_prompt


@dataclass(frozen=True)
class BenchRequest:
    step_sizes: list[float]
    batch_sizes: list[int]
    dtype: str = "float32"
    rounds: int = 5
    prompt_tokens: int = 128
    new_tokens: int = 64
    compile: bool = False  # odegpt compiled too (odegpt.decoding.compiled), beside eager odegpt and Llama

    def checked(self, config) -> BenchRequest:
        """This request, or a ValueError naming the flag: step sizes the model can solve, a context that fits its
        positions, and batches whose KV cache and logits fit in this machine's memory."""
        for a in self.step_sizes:
            config.solver_steps(a, "--step-sizes")
        for name in ("rounds", "prompt_tokens", "new_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if min(self.batch_sizes) < 1:
            raise InputError(f"--batch-sizes: expected integers >= 1, got {self.batch_sizes}")
        if self.dtype not in ("float32", "bfloat16"):
            raise InputError(f"--dtype {self.dtype}: bench computes in float32 or bfloat16")
        if self.prompt_tokens + self.new_tokens + 1 > config.max_position_embeddings:
            raise InputError(f"--prompt-tokens + --new-tokens ({self.prompt_tokens} + {self.new_tokens}) must stay "
                             f"below the model's {config.max_position_embeddings} positions")
        positions, largest = self.prompt_tokens + self.new_tokens, max(self.batch_sizes)
        steps = max(config.solver_steps(a) for a in [1.0, *self.step_sizes])
        # Both implementations hold a KV cache, and the prefill's hidden states, for every batch row.
        needed = 2 * 4 * largest * positions * (steps * 2 * config.num_key_value_heads * config.head_dim
                                                + 4 * config.hidden_size + config.vocab_size)
        available = psutil.virtual_memory().available
        if needed > available:
            raise InputError(f"--batch-sizes {largest}: about {needed / 2**30:.1f} GiB of caches and activations at "
                             f"{positions} positions, more than the {available / 2**30:.1f} GiB available")
        return self


def compare_with_llama(model, config, request: BenchRequest, threads: int) -> dict:
    """The bench document: per batch size and step size, odegpt's and the unrolled Llama's prefill and decode
    tokens/s, their ratio and the speedup over a=1 (measured as the reference even if not requested)."""
    dtype = getattr(torch, request.dtype)
    measured_sizes = list(dict.fromkeys([1.0, *request.step_sizes]))
    variants = {}
    # The exports stay on disk while they run: from_pretrained may memory-map their safetensors.
    with tempfile.TemporaryDirectory(prefix="odegpt-bench-") as tmp:
        for a in tqdm(measured_sizes, desc="unrolled Llama exports", unit="export", file=sys.stderr, leave=False):
            folder = save_unrolled(model, f"{tmp}/a{a:g}", a)  # unrolled in fp32, then cast: dt folded exactly
            variants["llama", a] = Variant(LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval(), {})
        model = model.to(dtype)
        implementations = ["odegpt", "compiled", "llama"] if request.compile else ["odegpt", "llama"]
        for a in measured_sizes:
            variants["odegpt", a] = Variant(model, {"step_size": a})
            if request.compile:
                variants["compiled", a] = Variant(model, {"step_size": a}, compile=True)
        # Interleaved per step size: odegpt (eager, compiled) then Llama at a, then the next a.
        variants = {(impl, a): variants[impl, a] for a in measured_sizes for impl in implementations}
        prompts = {batch: random_prompt(config.vocab_size, batch, request.prompt_tokens)
                   for batch in request.batch_sizes}
        with tqdm(total=request.rounds * len(variants) * len(prompts), desc="bench", unit="run",
                  file=sys.stderr) as bar:
            measured = measure_interleaved(variants, prompts, request.new_tokens, request.rounds, bar.update)
    decode_context = request.prompt_tokens + request.new_tokens // 2  # mean context seen while decoding
    reference_flops = model_cost(config, 1.0, seq_len=decode_context).flops_per_token
    results = [_row(config, measured, batch, a, decode_context, reference_flops, implementations)
               for batch in request.batch_sizes for a in request.step_sizes]
    return {"dtype": request.dtype, "threads": threads, "rounds": request.rounds,
            "prompt_tokens": request.prompt_tokens, "new_tokens": request.new_tokens, "torch": torch.__version__,
            "transformers": transformers.__version__, "results": results}


def _row(config, measured: dict, batch: int, a: float, decode_context: int, reference_flops: float,
         implementations: list[str]) -> dict:
    flops = model_cost(config, a, seq_len=decode_context).flops_per_token
    row = {"step_size": a, "solver_steps": config.solver_steps(a), "batch_size": batch, "flops_per_token": flops,
           "flop_ratio": reference_flops / flops}
    for impl in implementations:
        speed, base = measured[(impl, a), batch], measured[(impl, 1.0), batch]
        row[impl] = {"prefill_tokens_per_s": speed.prefill_tokens_per_s,
                     "decode_tokens_per_s": speed.decode_tokens_per_s,
                     "prefill_speedup": speed.prefill_tokens_per_s / base.prefill_tokens_per_s,
                     "decode_speedup": speed.decode_tokens_per_s / base.decode_tokens_per_s}
    row["odegpt_over_llama"] = {part: row["odegpt"][f"{part}_tokens_per_s"] / row["llama"][f"{part}_tokens_per_s"]
                                for part in ("prefill", "decode")}
    if "compiled" in row:
        row["compiled_over_llama"] = {part: row["compiled"][f"{part}_tokens_per_s"]
                                      / row["llama"][f"{part}_tokens_per_s"] for part in ("prefill", "decode")}
    return row
