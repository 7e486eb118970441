"""Prefill and decode throughput, measured the one way both `odegpt bench` and `odegpt evaluate` use.

A generation is timed in two parts: the prefill (one forward over the prompt that fills the KV
cache) and the decode (``new_tokens`` forwards of one token each, greedy, reusing the cache). The
loop is the one every engine runs, written out so that odegpt and transformers' ``LlamaForCausalLM``
are timed on exactly the same work, without ``generate``'s logits processors in the way.

The machine is shared and noisy, so variants are measured interleaved, round after round, in one
process, and each reports its median: only ratios measured side by side mean anything.

What to expect on a CPU: batch-1 decode is memory-bound (every step streams the weights), so the
dtype matters as much as the FLOPs. In fp32, a fully shared model with hidden size 512 has one
block of 12.6 MB and an LM head of 16.8 MB (vocabulary 8192), which nearly fill a 32 MB L3 cache:
the a = 1 solve re-reads the same block from a warm cache, which FLOP counts do not see. The
unrolled Llama holds one copy of the block per executed step, so it streams distinct weights at
every layer where odegpt reuses one block.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from odegpt.model.cache import CACHE_FIELD, output_cache


@dataclass(frozen=True)
class Variant:
    """A model and the extra forward arguments it runs with (e.g. ``{"step_size": 2.0}``); ``compile``: a native
    model decoding through a static KV cache with a compiled step (odegpt.decoding.compiled) instead of forward()."""

    model: torch.nn.Module
    forward_kwargs: Mapping[str, object]
    compile: bool = False


@dataclass(frozen=True)
class Throughput:
    """Median tokens per second over the measured rounds (batch size x tokens / seconds)."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def random_prompt(vocab_size: int, batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
    """A fixed (batch_size, length) prompt of random token ids: timing does not depend on the text."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, length), generator=generator)


class TimedGeneration(NamedTuple):
    prefill_seconds: float
    decode_seconds: float
    tokens: torch.Tensor  # (batch, new_tokens + 1) greedy tokens: the prefill's, then one per decode step


@torch.inference_mode()
def time_generation(variant: Variant, prompt: torch.Tensor, new_tokens: int, room: int | None = None
                    ) -> TimedGeneration:
    """Time the prefill of ``prompt``, then ``new_tokens`` greedy decode steps with the KV cache. A compiled variant's
    static cache holds ``room`` new tokens (default ``new_tokens``): one size for every run, so one graph."""
    if variant.compile:
        return _time_compiled(variant, prompt, new_tokens, new_tokens if room is None else room)
    model, kwargs = variant.model, dict(variant.forward_kwargs)
    start = time.perf_counter()
    output = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **kwargs)
    token = output.logits[:, -1].argmax(-1, keepdim=True)
    prefilled = time.perf_counter()
    tokens = [token]
    cache = output_cache(output)
    for _ in range(new_tokens):
        output = model(input_ids=token, use_cache=True, **{CACHE_FIELD: cache}, **kwargs)
        cache = output_cache(output)
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    end = time.perf_counter()
    return TimedGeneration(prefilled - start, end - prefilled, torch.cat(tokens, dim=1))


def _time_compiled(variant: Variant, prompt: torch.Tensor, new_tokens: int, room: int) -> TimedGeneration:
    """:func:`time_generation`'s loop through a static cache and ``compiled.DecodeStep`` (the prefill runs eagerly:
    a prompt is fed once)."""
    from odegpt.decoding.compiled import DecodeStep

    model = variant.model
    step = DecodeStep(model, model.plan(variant.forward_kwargs.get("step_size")),
                      model.new_cache(prompt.shape[0], prompt.shape[1] + room), compile=True)
    start = time.perf_counter()
    token = step(prompt, keep=1)[0][:, -1].argmax(-1, keepdim=True)
    prefilled = time.perf_counter()
    tokens = [token]
    for _ in range(new_tokens):
        token = step(token)[0][:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    end = time.perf_counter()
    return TimedGeneration(prefilled - start, end - prefilled, torch.cat(tokens, dim=1))


def measure_interleaved(
    variants: Mapping[Hashable, Variant],
    prompts: Mapping[Hashable, torch.Tensor],
    new_tokens: int,
    rounds: int,
    on_measurement: Callable[[], None] | None = None,
) -> dict[tuple[Hashable, Hashable], Throughput]:
    """``{(variant, prompt name): median Throughput}``: every variant on every prompt (e.g. one per
    batch size), one warm-up pass, then ``rounds`` rounds each running everything once, in order.
    ``on_measurement`` is called after each timed run (a progress bar's update)."""
    if rounds < 1 or new_tokens < 1:
        raise ValueError(f"need rounds >= 1 and new_tokens >= 1, got {rounds} and {new_tokens}")
    pairs = [(name, prompt_name) for prompt_name in prompts for name in variants]
    for name, prompt_name in pairs:  # warm-up: allocator, kernels, caches
        time_generation(variants[name], prompts[prompt_name], min(new_tokens, 4), room=new_tokens)
    prefill: dict[tuple[Hashable, Hashable], list[float]] = {pair: [] for pair in pairs}
    decode: dict[tuple[Hashable, Hashable], list[float]] = {pair: [] for pair in pairs}
    for _ in range(rounds):
        for name, prompt_name in pairs:
            timed = time_generation(variants[name], prompts[prompt_name], new_tokens)
            prefill[name, prompt_name].append(timed.prefill_seconds)
            decode[name, prompt_name].append(timed.decode_seconds)
            if on_measurement is not None:
                on_measurement()
    results = {}
    for name, prompt_name in pairs:
        batch, length = prompts[prompt_name].shape
        results[name, prompt_name] = Throughput(
            prefill_tokens_per_s=batch * length / statistics.median(prefill[name, prompt_name]),
            decode_tokens_per_s=batch * new_tokens / statistics.median(decode[name, prompt_name]),
        )
    return results
