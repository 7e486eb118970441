"""Decode speed of a fully shared 12-step odegpt model at step sizes 1, 2, 4, beside its FLOP
ratios, and against transformers' LlamaForCausalLM serving the unrolled a = 1 export.

    python benchmarks/bench_decode.py [--new-tokens 128] [--rounds 5]

Variants run interleaved, round after round, and each reports its median: the machine is shared
and noisy, so only ratios measured side by side mean anything. Both fp32 and bf16 (the serving
dtype) are measured: batch-1 decode is memory-bound, and in fp32 one shared block (12.6 MB) plus
the LM head (16.8 MB) nearly fill this CPU's 32 MB L3, so the a = 1 solve enjoys a warm cache
that FLOP counts do not see.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from odegpt import OdeGPTConfig, OdeGPTForCausalLM
from odegpt.accounting import model_cost
from odegpt.export import unroll_to_llama


def decode_seconds(model, prompt, new_tokens: int, **kwargs) -> float:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=0, **kwargs)
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = OdeGPTConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_attention_heads=8,
                          num_key_value_heads=8, max_position_embeddings=1024,
                          segments=[{"depth": 12, "shared": True}])
    fp32_model = OdeGPTForCausalLM(config).eval()
    prompt = torch.randint(1, 8192, (1, args.prompt_tokens))
    context = args.prompt_tokens + args.new_tokens // 2  # mean context seen while decoding
    base_flops = model_cost(config, 1.0, seq_len=context).flops_per_token
    print(f"decode, batch 1, KV cache, {args.new_tokens} new tokens after {args.prompt_tokens}, "
          f"{args.rounds} interleaved rounds, {args.threads} threads; torch {torch.__version__}")

    for dtype in args.dtypes:
        model = fp32_model.to(getattr(torch, dtype))
        llama = unroll_to_llama(model, 1.0).eval()
        variants = {f"odegpt a={a:g}": (model, {"step_size": a}) for a in (1.0, 2.0, 4.0)}
        variants["Llama (unrolled a=1)"] = (llama, {})
        with torch.inference_mode():
            for m, kwargs in variants.values():  # warm-up
                decode_seconds(m, prompt, 8, **kwargs)
            times = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, (m, kwargs) in variants.items():
                    times[name].append(decode_seconds(m, prompt, args.new_tokens, **kwargs))
        tokens_per_s = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}

        print(f"\n[{dtype}]")
        print(f"{'variant':<22}{'tokens/s':>10}{'speedup':>9}{'FLOP ratio':>12}{'speedup/FLOP ratio':>20}")
        for a in (1.0, 2.0, 4.0):
            name = f"odegpt a={a:g}"
            speedup = tokens_per_s[name] / tokens_per_s["odegpt a=1"]
            flop_ratio = base_flops / model_cost(config, a, seq_len=context).flops_per_token
            print(f"{name:<22}{tokens_per_s[name]:>10.1f}{speedup:>9.2f}{flop_ratio:>12.2f}"
                  f"{speedup / flop_ratio:>19.0%}")
        llama_name = "Llama (unrolled a=1)"
        print(f"{llama_name:<22}{tokens_per_s[llama_name]:>10.1f}")
        print(f"odegpt a=1 / LlamaForCausalLM: {tokens_per_s['odegpt a=1'] / tokens_per_s[llama_name]:.2f}x")

if __name__ == "__main__":
    main()
