"""`odegpt export`: a trained odegpt folder -> a native or an unrolled-Llama Hugging Face folder, or a GGUF file."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model folder natively, unrolled to a plain LlamaForCausalLM, or as GGUF for llama.cpp",
        description=(
            "Write a Hugging Face folder from an odegpt model folder (e.g. the output of `odegpt convert`). "
            "native: safetensors plus the modeling code (loads with trust_remote_code=True, no odegpt needed). "
            "unrolled (--unroll): a standard LlamaForCausalLM computing the model at one step size, one layer per "
            "executed solver step, for any Llama-compatible engine. gguf: that Llama as one .gguf file with the "
            "tokenizer, for llama.cpp."
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
    parser.add_argument("--format", choices=["native", "unrolled", "gguf"], default=None,
                        help="what to write (default: native)")
    parser.add_argument("--unroll", action="store_true", help="the same as --format unrolled")
    parser.add_argument("--step-size", type=float, default=None,
                        help="solver step size a (default: the model's config.step_size); with --unroll "
                             "it is baked into the Llama; natively it becomes the folder's default")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weight dtype of the export (default: as stored; gguf: float16, norms always float32)")
    parser.set_defaults(func=run)


def load_model(folder: str, dtype=None):
    """An odegpt model from ``folder``: an odegpt folder as it is, a Llama folder (an unrolled export, or any
    Llama) imported exactly as an unshared odegpt model with its weights (``odegpt.folders.importing``)."""
    from odegpt.commands.cli import CommandError
    from odegpt.folders.importing import UnsupportedModelError, check_importable, retrofit
    from odegpt.folders.model_folder import load_config
    from odegpt.folders.model_folder import load_model as load_folder_model

    config = load_config(folder)
    if config.model_type == "llama":  # refused from its config, before any weight is read
        try:
            check_importable(config.to_dict(), f"{folder}/config.json")
        except UnsupportedModelError as error:  # length-dependent rotary scaling, another activation, ...
            raise CommandError(f"{folder}: this Llama cannot be imported: {error}") from None
    model = load_folder_model(folder, config)
    if config.model_type == "llama":
        stored = model.dtype
        model = retrofit(model.float())[0].to(stored)
    return model if dtype is None else model.to(dtype)


def _checked(config, step_size: float | None) -> float:
    from odegpt.commands.cli import CommandError

    step_size = config.step_size if step_size is None else step_size
    try:
        config.solver_steps(step_size)  # a finite real > 0 whose solve fits max_solver_steps
    except ValueError as error:
        raise CommandError(f"--step-size: {error}") from None
    return step_size


def run(args: argparse.Namespace) -> int:
    import torch

    from odegpt.commands.cli import CommandError
    from odegpt.folders.export import save_gguf, save_native, save_unrolled
    from odegpt.folders.model_folder import load_config
    from odegpt.folders.output_folder import check_output, staged_folder
    from odegpt.model.accounting import format_count, model_cost
    from odegpt.model.solver import solver_method

    if args.unroll and args.format not in (None, "unrolled"):
        raise CommandError(f"--unroll is --format unrolled; it contradicts --format {args.format}")
    kind = "unrolled" if args.unroll else args.format or "native"
    output = Path(args.output)
    config = load_config(args.model)
    check_output(Path(args.model), output, args.overwrite)
    if config.model_type == "odegpt":  # a bad step size or solver is refused before any weight is read
        _checked(config, args.step_size)  # (a Llama's odegpt config exists once it is imported)
        reason = solver_method(config.solver).not_unrollable
        if kind != "native" and reason is not None:
            raise CommandError(f"--format {kind}: the {config.solver} solver cannot be unrolled to Llama layers: "
                               f"{reason}")
    if kind == "gguf" and not (Path(args.model) / "tokenizer.model").is_file():
        raise CommandError(f"--format gguf needs the SentencePiece tokenizer.model in {args.model}, for the GGUF "
                           f"vocabulary (odegpt convert copies the run's tokenizer into the model folder)")
    dtype = getattr(torch, args.dtype) if args.dtype and kind != "gguf" else None
    model = load_model(args.model, dtype).eval()
    step_size = _checked(model.config, args.step_size)
    cost = model_cost(model.config, step_size)
    trained = model.config.num_hidden_layers
    with staged_folder(output) as staging:
        if kind == "unrolled":
            save_unrolled(model, staging, step_size, tokenizer_dir=args.model)
        elif kind == "gguf":
            gguf_dtype = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", None: "f16"}[args.dtype]
            written = save_gguf(model, staging, step_size, args.model, gguf_dtype).name
        else:
            model.config.step_size = step_size
            save_native(model, staging, tokenizer_dir=args.model)
    if kind == "unrolled":
        print(f"unrolled LlamaForCausalLM at step size {step_size:g}: {cost.executed_steps} layers "
              f"(trained depth {trained}), {format_count(cost.flops_per_token)} FLOPs/token -> {args.output}")
    elif kind == "gguf":
        print(f"GGUF (llama, {gguf_dtype}) at step size {step_size:g}: {cost.executed_steps} layers (trained depth "
              f"{trained}), {format_count(cost.flops_per_token)} FLOPs/token -> {output / written}")
    else:
        print(f"native odegpt folder (default step size {step_size:g}, {cost.executed_steps} solver steps, "
              f"{format_count(cost.parameters)} parameters) -> {args.output}")
    return 0
