"""`odegpt bench`: prefill and decode throughput of a model folder per step size, beside transformers' Llama on
the unrolled export of the same weights (odegpt.evaluation.llama_comparison)."""
from __future__ import annotations

import argparse
import json

from . import options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="prefill/decode tokens/s per step size, against LlamaForCausalLM on the unrolled export",
        description="Throughput of an odegpt model folder at each step size a, at each batch size: prefill "
                    "(one forward over the prompt, filling the KV cache) and greedy decode with the KV cache, "
                    "beside transformers' LlamaForCausalLM loaded from the unrolled export of the same "
                    "weights at a. Interleaved rounds in one process, medians; prints odegpt/Llama at each a "
                    "and the speedup over a=1 (measured as the reference even if not requested).")
    options.add_model(parser, "native odegpt model folder (odegpt convert / import / export)")
    parser.add_argument("--step-sizes", type=options.real_list, default=[1.0, 2.0, 4.0], metavar="A[,A...]",
                        help="solver step sizes (default: 1,2,4)")
    parser.add_argument("--batch-sizes", type=options.int_list, default=[1, 8], metavar="N[,N...]",
                        help="batch sizes (default: 1,8)")
    options.add_dtype(parser, "float32", "weights and compute: float32 or bfloat16")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, median (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps per run (default: %(default)s)")
    options.add_compile(parser)
    options.add_threads(parser)
    options.add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch & co.: not for odegpt --help
    from odegpt.evaluation.llama_comparison import BenchRequest, compare_with_llama
    from odegpt.folders.model_folder import load_config, load_model

    from .threads import choose_threads, describe

    threads = choose_threads(args.threads)
    config = load_config(args.model, expect="odegpt")
    request = BenchRequest(step_sizes=args.step_sizes, batch_sizes=args.batch_sizes, dtype=args.dtype,
                           rounds=args.rounds, prompt_tokens=args.prompt_tokens,
                           new_tokens=args.new_tokens, compile=args.compile).checked(config)
    model = load_model(args.model, config).float()  # unrolled in float32, then cast: dt folded exactly
    document = {"model": args.model, **compare_with_llama(model, config, request,
                                                            threads[0])}
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print_table(document, config, describe(*threads))
    return 0


def print_table(document: dict, config, threads: str) -> None:
    # torch & co.: not for odegpt --help
    from odegpt.model.accounting import format_count, model_cost

    segments = ", ".join(f"{s['depth']}{' shared' if s['shared'] else ''}" for s in config.segments)
    print(f"{document['model']}: segments [{segments}], hidden {config.hidden_size}, "
          f"{format_count(model_cost(config).parameters)} parameters, {document['dtype']}, {threads}")
    print(f"prompt {document['prompt_tokens']} tokens, {document['new_tokens']} greedy decode steps with the KV cache; "
          f"median of {document['rounds']} interleaved rounds; torch {document['torch']}, transformers "
          f"{document['transformers']}")
    print("odegpt = OdeGPTForCausalLM at a; Llama = LlamaForCausalLM.from_pretrained(unrolled export at a); "
          "speedup = over a=1 of the same implementation; FLOP ratio = FLOPs(a=1)/FLOPs(a)")
    header = (f"{'batch':>5} {'a':>5} {'steps':>5} {'FLOP':>6} | {'prefill tokens/s':>16} {'':>9} {'odegpt/':>7} "
              f"{'speedup':>7} | {'decode tokens/s':>15} {'':>9} {'odegpt/':>7} {'speedup':>7} {'speedup':>7}")
    subheader = (f"{'':>5} {'':>5} {'':>5} {'ratio':>6} | {'odegpt':>16} {'Llama':>9} {'Llama':>7} {'odegpt':>7} | "
                 f"{'odegpt':>15} {'Llama':>9} {'Llama':>7} {'odegpt':>7} {'Llama':>7}")
    print("\n" + header + "\n" + subheader)
    for row in document["results"]:
        o, llama, r = row["odegpt"], row["llama"], row["odegpt_over_llama"]
        print(f"{row['batch_size']:>5} {row['step_size']:>5g} {row['solver_steps']:>5} {row['flop_ratio']:>6.2f} | "
              f"{o['prefill_tokens_per_s']:>16.0f} {llama['prefill_tokens_per_s']:>9.0f} {r['prefill']:>7.2f} "
              f"{o['prefill_speedup']:>7.2f} | {o['decode_tokens_per_s']:>15.1f} {llama['decode_tokens_per_s']:>9.1f} "
              f"{r['decode']:>7.2f} {o['decode_speedup']:>7.2f} {llama['decode_speedup']:>7.2f}")
    compiled = [row for row in document["results"] if "compiled" in row]
    if compiled:
        print("\ncompiled = odegpt through a static KV cache with a torch.compile'd step per token (--compile; its "
              "prefill runs eagerly)")
        print(f"{'batch':>5} {'a':>5} | {'decode tokens/s':>15} {'compiled/':>9} {'compiled/':>9}")
        print(f"{'':>5} {'':>5} | {'compiled':>15} {'eager':>9} {'Llama':>9}")
        for row in compiled:
            c = row["compiled"]["decode_tokens_per_s"]
            print(f"{row['batch_size']:>5} {row['step_size']:>5g} | {c:>15.1f} "
                  f"{c / row['odegpt']['decode_tokens_per_s']:>9.2f} {row['compiled_over_llama']['decode']:>9.2f}")
