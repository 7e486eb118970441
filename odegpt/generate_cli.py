"""`odegpt generate`: sample text from a native odegpt folder or an unrolled Llama export."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with the KV cache at a chosen step size",
        description="Generate from a model folder (native odegpt or unrolled Llama) that holds its tokenizer.",
    )
    parser.add_argument("--model", required=True, help="model folder (with tokenizer files)")
    parser.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    parser.add_argument("--step-size", type=float, default=None,
                        help="solver step size a for a native odegpt model (default: config.step_size)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every token")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import odegpt  # noqa: F401  (registers the odegpt model type with the Auto classes)

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    extra = {}
    if args.step_size is not None:
        if model.config.model_type != "odegpt":
            print(f"odegpt generate: --step-size applies to native odegpt models; {args.model} is "
                  f"{model.config.model_type!r} (an unrolled export has its step size baked in)")
            return 2
        extra["step_size"] = args.step_size
    inputs = tokenizer(args.prompt, return_tensors="pt")
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k) if args.temperature > 0 \
        else dict(do_sample=False)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache,
                                pad_token_id=tokenizer.pad_token_id, **sampling, **extra)
    seconds = time.perf_counter() - start
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    step = extra.get("step_size", getattr(model.config, "step_size", None))
    where = f"step size {step:g}" if step is not None else f"{model.config.model_type}"
    print(f"-- {new_tokens} tokens in {seconds:.2f}s ({new_tokens / seconds:.1f} tokens/s, {where}, "
          f"{'no cache' if args.no_cache else 'KV cache'})")
    return 0
