"""`odegpt export`: a trained odegpt folder -> a native or an unrolled-Llama Hugging Face folder, or a GGUF file
(odegpt.folders.export)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model folder natively, unrolled to a plain LlamaForCausalLM, or as GGUF for llama.cpp",
        description=(
            "Write a Hugging Face folder from an odegpt model folder (e.g. the output of `odegpt convert`). "
            "native: safetensors plus the modeling code (loads with trust_remote_code=True, no odegpt needed). "
            "unrolled: a standard LlamaForCausalLM computing the model at one step size, one layer per executed "
            "solver step, for any Llama-compatible engine. gguf: that Llama as one .gguf file with the tokenizer, "
            "for llama.cpp."),
    )
    options.add_model(parser, "model folder to read: odegpt, or a Llama (e.g. an unrolled export) imported as an "
                              "unshared odegpt model")
    options.add_output(parser)
    parser.add_argument("--format", choices=["native", "unrolled", "gguf"], default="native",
                        help="what to write (default: native)")
    options.add_renamed(parser, "--unroll", "--format unrolled", takes_value=False)
    parser.add_argument("--step-size", type=float, default=None,
                        help="solver step size a (default: the model's config.step_size); unrolled and gguf bake "
                             "it into the Llama; natively it becomes the folder's default")
    options.add_dtype(parser, None, "weight dtype of the export (gguf: float16 unless given; norms stay float32); "
                                    "q8_0 and q4_0 quantize a gguf file's matrices, keeping what llama.cpp keeps in "
                                    "higher precision")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch & co.: not for odegpt --help
    import torch

    from data_pipeline.folder_kinds import MODEL
    from odegpt.folders.export import check_export, describe_export, write_export
    from odegpt.folders.importing import load_as_odegpt
    from odegpt.folders.model_folder import load_config
    from odegpt.folders.output_folder import check_not_source, claimed_output

    output = Path(args.output)
    check_not_source(Path(args.model), output)
    step_size = check_export(load_config(args.model), args.model, args.format, args.step_size, args.dtype)
    dtype = getattr(torch, args.dtype) if args.dtype and args.format != "gguf" else None
    with claimed_output(output, MODEL, args.overwrite, source=Path(args.model)) as staging:
        model = load_as_odegpt(args.model, dtype).eval()
        model.config.solver_steps(step_size, "--step-size")  # an imported Llama's solve, too
        written = write_export(model, staging, args.format, step_size, args.model, args.dtype)
    print(describe_export(model, args.format, step_size, output / written.relative_to(staging), args.dtype))
    return 0
