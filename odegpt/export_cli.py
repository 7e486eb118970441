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
    parser.add_argument("--model", required=True,
                        help="model folder to read: odegpt, or a Llama (e.g. an unrolled export) imported as an "
                             "unshared odegpt model")
    parser.add_argument("--output", required=True, help="folder to write (created)")
    parser.add_argument("--unroll", action="store_true", help="write a LlamaForCausalLM for --step-size")
    parser.add_argument("--step-size", type=float, default=None,
                        help="solver step size a (default: the model's config.step_size); with --unroll "
                             "it is baked into the Llama; natively it becomes the folder's default")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weight dtype of the export (default: as stored)")
    parser.set_defaults(func=run)


def load_model(folder: str, dtype=None):
    """An odegpt model from ``folder``: an odegpt folder as it is, a Llama folder (an unrolled export, or any
    bias-free SiLU Llama) imported as an unshared odegpt model with its weights (``export.from_llama``)."""
    import json
    from pathlib import Path

    from transformers import LlamaForCausalLM

    from odegpt import OdeGPTForCausalLM
    from odegpt.cli import CommandError
    from odegpt.export import from_llama

    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise CommandError(f"{folder} is not a model folder (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except ValueError as error:
        raise CommandError(f"{config_file} is not valid JSON: {error}") from None
    if model_type == "odegpt":
        return OdeGPTForCausalLM.from_pretrained(folder, dtype=dtype)
    if model_type == "llama":
        try:
            return from_llama(LlamaForCausalLM.from_pretrained(folder, dtype=dtype))
        except ValueError as error:  # rotary scaling, biases, another activation: not an odegpt block
            raise CommandError(f"{folder}: this Llama cannot be imported: {error}") from None
    raise CommandError(f"{folder} holds a {model_type!r} model; odegpt export reads odegpt folders and Llama "
                       f"folders (such as an unrolled export)")


def run(args: argparse.Namespace) -> int:
    import torch

    from odegpt.accounting import format_count, model_cost
    from odegpt.cli import CommandError
    from odegpt.export import save_native, save_unrolled

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_model(args.model, dtype).eval()
    step_size = model.config.step_size if args.step_size is None else args.step_size
    try:
        model.config.solver_steps(step_size)  # a finite real > 0 whose solve fits max_solver_steps
    except ValueError as error:
        raise CommandError(f"--step-size: {error}") from None
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
