"""`odegpt export`: a trained odegpt folder -> a native or an unrolled-Llama Hugging Face folder."""
from __future__ import annotations

import argparse
from pathlib import Path


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
    parser.add_argument("--output", required=True,
                        help="folder to write: created, or replaced with --overwrite; never the --model folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output folder (the new folder is complete before the old "
                             "one is removed)")
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
    from odegpt.cli import CommandError
    from odegpt.export import from_llama
    from odegpt.model_folder import load_model as load_folder_model

    model = load_folder_model(folder)
    if model.config.model_type == "llama":
        try:
            model = from_llama(model)
        except ValueError as error:  # rotary scaling, biases, another activation: not an odegpt block
            raise CommandError(f"{folder}: this Llama cannot be imported: {error}") from None
    return model if dtype is None else model.to(dtype)


def _checked(config, step_size: float | None) -> float:
    from odegpt.cli import CommandError

    step_size = config.step_size if step_size is None else step_size
    try:
        config.solver_steps(step_size)  # a finite real > 0 whose solve fits max_solver_steps
    except ValueError as error:
        raise CommandError(f"--step-size: {error}") from None
    return step_size


def run(args: argparse.Namespace) -> int:
    import torch

    from odegpt.accounting import format_count, model_cost
    from odegpt.export import save_native, save_unrolled
    from odegpt.cli import CommandError
    from odegpt.model_folder import load_config
    from odegpt.output_folder import check_output, staged_folder
    from odegpt.solver import solver_method

    output = Path(args.output)
    config = load_config(args.model)
    check_output(Path(args.model), output, args.overwrite)
    if config.model_type == "odegpt":  # a bad step size or solver is refused before any weight is read
        _checked(config, args.step_size)  # (a Llama's odegpt config exists once it is imported)
        reason = solver_method(config.solver).not_unrollable
        if args.unroll and reason is not None:
            raise CommandError(f"--unroll: the {config.solver} solver cannot be unrolled to Llama layers: {reason}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_model(args.model, dtype).eval()
    step_size = _checked(model.config, args.step_size)
    cost = model_cost(model.config, step_size)
    trained = model.config.num_hidden_layers
    with staged_folder(output) as staging:
        if args.unroll:
            save_unrolled(model, staging, step_size, tokenizer_dir=args.model)
        else:
            model.config.step_size = step_size
            save_native(model, staging, tokenizer_dir=args.model)
    if args.unroll:
        print(f"unrolled LlamaForCausalLM at step size {step_size:g}: {cost.executed_steps} layers "
              f"(trained depth {trained}), {format_count(cost.flops_per_token)} FLOPs/token -> {args.output}")
    else:
        print(f"native odegpt folder (default step size {step_size:g}, {cost.executed_steps} solver steps, "
              f"{format_count(cost.parameters)} parameters) -> {args.output}")
    return 0
