"""`odegpt export`: a trained odegpt folder -> a native or an unrolled-Llama Hugging Face folder."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model folder natively or unrolled to a plain LlamaForCausalLM",
        description=(
            "Write a Hugging Face folder from an odegpt model folder (e.g. the output of `odegpt convert`). "
            "Native: safetensors plus the modeling code (loads with trust_remote_code=True, no odegpt needed). "
            "--unroll: a standard LlamaForCausalLM computing the model at one step size, one layer per "
            "executed solver step, for any Llama-compatible engine."
        ),
    )
    parser.add_argument("--model", required=True, help="odegpt model folder to read")
    parser.add_argument("--output", required=True, help="folder to write (created)")
    parser.add_argument("--unroll", action="store_true", help="write a LlamaForCausalLM for --step-size")
    parser.add_argument("--step-size", type=float, default=None,
                        help="solver step size a (default: the model's config.step_size); with --unroll "
                             "it is baked into the Llama; natively it becomes the folder's default")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weight dtype of the export (default: as stored)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from odegpt import OdeGPTForCausalLM
    from odegpt.accounting import format_count, model_cost
    from odegpt.configuration_odegpt import check_step_size
    from odegpt.export import save_native, save_unrolled

    if not (Path(args.model) / "config.json").is_file():
        print(f"odegpt export: {args.model} is not a model folder (no config.json)")
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = OdeGPTForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    step_size = model.config.step_size if args.step_size is None else check_step_size(args.step_size, "--step-size")
    cost = model_cost(model.config, step_size)
    trained = model.config.num_hidden_layers
    if args.unroll:
        save_unrolled(model, args.output, step_size, tokenizer_dir=args.model)
        print(f"unrolled LlamaForCausalLM at step size {step_size:g}: {cost.executed_steps} layers "
              f"(trained depth {trained}), {format_count(cost.flops_per_token)} FLOPs/token -> {args.output}")
    else:
        model.config.step_size = step_size
        save_native(model, args.output, tokenizer_dir=args.model)
        print(f"native odegpt folder (default step size {step_size:g}, {cost.executed_steps} solver steps, "
              f"{format_count(cost.parameters)} parameters) -> {args.output}")
    return 0
