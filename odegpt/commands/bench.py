"""`odegpt bench`: prefill and decode throughput of a model folder per step size, beside transformers.

At each step size ``a`` the native model runs at ``a`` and transformers' ``LlamaForCausalLM`` runs the
unrolled export of the same weights at ``a`` (``odegpt.folders.export.save_unrolled``, then
``from_pretrained``: what a user would serve instead). All variants and batch sizes are timed
interleaved, round after round, in one process (``odegpt.evaluation.throughput``), and medians are reported.
"""
from __future__ import annotations

import argparse

from .cli import CommandError
from .evaluate import DTYPES
from .threads import add_threads_argument, choose_threads, describe


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="prefill/decode tokens/s per step size, against LlamaForCausalLM on the unrolled export",
        description="Throughput of an odegpt model folder at each step size a, at each batch size: prefill "
                    "(one forward over the prompt, filling the KV cache) and greedy decode with the KV cache, "
                    "beside transformers' LlamaForCausalLM loaded from the unrolled export of the same "
                    "weights at a. Interleaved rounds in one process, medians; prints odegpt/Llama at each a "
                    "and the speedup over a=1 (measured as the reference even if not requested).")
    parser.add_argument("--model", required=True, help="native odegpt model folder (odegpt convert / export)")
    parser.add_argument("--step-sizes", default="1,2,4", help="comma-separated real step sizes (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and compute (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, median (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps per run (default: %(default)s)")
    add_threads_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(func=run)


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise CommandError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise CommandError(f"{flag}: expected integers >= 1, got {text!r}")
    return list(dict.fromkeys(values))


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import tempfile

    import torch
    import transformers
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    from odegpt.commands.evaluate import load_native_config, load_native_model, parse_step_sizes
    from odegpt.evaluation.throughput import Variant, measure_interleaved, random_prompt
    from odegpt.folders.export import save_unrolled
    from odegpt.model.accounting import format_count, model_cost

    for name in ("rounds", "prompt_tokens", "new_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    batch_sizes = _positive_ints(args.batch_sizes, "--batch-sizes")
    threads = describe(*choose_threads(args.threads))
    config = load_native_config(args.model)
    step_sizes = parse_step_sizes(args.step_sizes, config)
    if args.prompt_tokens + args.new_tokens + 1 > config.max_position_embeddings:
        raise CommandError(f"--prompt-tokens + --new-tokens ({args.prompt_tokens} + {args.new_tokens}) must stay "
                           f"below the model's {config.max_position_embeddings} positions")
    model = load_native_model(args.model, config, "float32")  # unrolled in fp32, then cast: dt folded exactly
    dtype = getattr(torch, args.dtype)
    measured_sizes = list(dict.fromkeys([1.0, *step_sizes]))  # a=1 is the reference even if not requested

    variants = {}
    # The exports stay on disk while they run: from_pretrained may memory-map their safetensors.
    with tempfile.TemporaryDirectory(prefix="odegpt-bench-") as tmp:
        for a in tqdm(measured_sizes, desc="unrolled Llama exports", unit="export", file=sys.stderr, leave=False):
            folder = save_unrolled(model, f"{tmp}/a{a:g}", a)
            variants["llama", a] = Variant(LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval(), {})
        model = model.to(dtype)
        for a in measured_sizes:
            variants["odegpt", a] = Variant(model, {"step_size": a})
        # Interleaved per step size: odegpt then Llama at a, then the next a.
        variants = {key: variants[key] for a in measured_sizes for key in (("odegpt", a), ("llama", a))}
        prompts = {batch: random_prompt(config.vocab_size, batch, args.prompt_tokens) for batch in batch_sizes}
        with tqdm(total=args.rounds * len(variants) * len(prompts), desc="bench", unit="run", file=sys.stderr) as bar:
            measured = measure_interleaved(variants, prompts, args.new_tokens, args.rounds, bar.update)

    decode_context = args.prompt_tokens + args.new_tokens // 2  # mean context seen while decoding
    reference_flops = model_cost(config, 1.0, seq_len=decode_context).flops_per_token
    results = []
    for batch in batch_sizes:
        for a in step_sizes:
            flops = model_cost(config, a, seq_len=decode_context).flops_per_token
            row = {"step_size": a, "solver_steps": config.solver_steps(a), "batch_size": batch,
                   "flops_per_token": flops, "flop_ratio": reference_flops / flops}
            for impl in ("odegpt", "llama"):
                speed, base = measured[(impl, a), batch], measured[(impl, 1.0), batch]
                row[impl] = {"prefill_tokens_per_s": speed.prefill_tokens_per_s,
                             "decode_tokens_per_s": speed.decode_tokens_per_s,
                             "prefill_speedup": speed.prefill_tokens_per_s / base.prefill_tokens_per_s,
                             "decode_speedup": speed.decode_tokens_per_s / base.decode_tokens_per_s}
            row["odegpt_over_llama"] = {
                part: row["odegpt"][f"{part}_tokens_per_s"] / row["llama"][f"{part}_tokens_per_s"]
                for part in ("prefill", "decode")}
            results.append(row)
    document = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
                "rounds": args.rounds, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                "torch": torch.__version__, "transformers": transformers.__version__, "results": results}
    if args.json:
        print(json.dumps(document, indent=2))
        return 0

    segments = ", ".join(f"{s['depth']}{' shared' if s['shared'] else ''}" for s in config.segments)
    print(f"{args.model}: segments [{segments}], hidden {config.hidden_size}, "
          f"{format_count(model_cost(config).parameters)} parameters, {args.dtype}, {threads}")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} greedy decode steps with the KV cache; "
          f"median of {args.rounds} interleaved rounds; torch {torch.__version__}, transformers "
          f"{transformers.__version__}")
    print("odegpt = OdeGPTForCausalLM at a; Llama = LlamaForCausalLM.from_pretrained(unrolled export at a); "
          "speedup = over a=1 of the same implementation; FLOP ratio = FLOPs(a=1)/FLOPs(a)")
    header = (f"{'batch':>5} {'a':>5} {'steps':>5} {'FLOP':>6} | {'prefill tokens/s':>16} {'':>9} {'odegpt/':>7} "
              f"{'speedup':>7} | {'decode tokens/s':>15} {'':>9} {'odegpt/':>7} {'speedup':>7} {'speedup':>7}")
    subheader = (f"{'':>5} {'':>5} {'':>5} {'ratio':>6} | {'odegpt':>16} {'Llama':>9} {'Llama':>7} {'odegpt':>7} | "
                 f"{'odegpt':>15} {'Llama':>9} {'Llama':>7} {'odegpt':>7} {'Llama':>7}")
    print("\n" + header + "\n" + subheader)
    for row in results:
        o, l, r = row["odegpt"], row["llama"], row["odegpt_over_llama"]
        print(f"{row['batch_size']:>5} {row['step_size']:>5g} {row['solver_steps']:>5} {row['flop_ratio']:>6.2f} | "
              f"{o['prefill_tokens_per_s']:>16.0f} {l['prefill_tokens_per_s']:>9.0f} {r['prefill']:>7.2f} "
              f"{o['prefill_speedup']:>7.2f} | {o['decode_tokens_per_s']:>15.1f} {l['decode_tokens_per_s']:>9.1f} "
              f"{r['decode']:>7.2f} {o['decode_speedup']:>7.2f} {l['decode_speedup']:>7.2f}")
    return 0
