"""`odegpt export`: a trained odegpt folder -> a native or an unrolled-Llama Hugging Face folder."""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
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
    from pathlib import Path

    from transformers import LlamaForCausalLM

    from odegpt import OdeGPTForCausalLM
    from odegpt.cli import CommandError
    from odegpt.export import from_llama

    from odegpt.integrity import check_finite_weights

    model_type = model_type_of(folder)
    try:
        if model_type == "odegpt":
            model = OdeGPTForCausalLM.from_pretrained(folder)
        else:
            try:
                model = from_llama(LlamaForCausalLM.from_pretrained(folder))
            except ValueError as error:  # rotary scaling, biases, another activation: not an odegpt block
                raise CommandError(f"{folder}: this Llama cannot be imported: {error}") from None
        check_finite_weights(model.named_parameters(), folder)  # as stored, before a cast
    except ValueError as error:
        raise CommandError(str(error)) from None
    return model if dtype is None else model.to(dtype)


def model_type_of(folder: str) -> str:
    """``odegpt`` or ``llama``, read from ``folder``'s config.json; anything else is a one-line error."""
    import json

    from odegpt.cli import CommandError

    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise CommandError(f"{folder} is not a model folder (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except ValueError as error:
        raise CommandError(f"{config_file} is not valid JSON: {error}") from None
    if model_type not in ("odegpt", "llama"):
        raise CommandError(f"{folder} holds a {model_type!r} model; odegpt export reads odegpt folders and Llama "
                           f"folders (such as an unrolled export)")
    return model_type


def check_output(model_dir: Path, output: Path, overwrite: bool) -> None:
    """Refuse an output that would destroy the input (the same folder, inside it, or holding it) or, without
    ``overwrite``, a folder that already holds files."""
    from odegpt.cli import CommandError

    model_dir, target = model_dir.resolve(), output.resolve()
    if target == model_dir or model_dir in target.parents:
        raise CommandError(f"--output {output} is {'the --model folder' if target == model_dir else 'inside --model'}"
                           f" {model_dir}: that would overwrite the model being exported; choose another folder")
    if target in model_dir.parents:
        raise CommandError(f"--output {output} holds the --model folder {model_dir}; choose another folder")
    if target.exists() and not target.is_dir():
        raise CommandError(f"--output {output} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CommandError(f"--output {output} exists and is not empty; choose another folder, or pass --overwrite "
                           f"to replace it")


@contextlib.contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A temporary folder beside ``output`` that becomes ``output`` only when the block completes: an export
    that fails (disk full, Ctrl-C) leaves ``output`` as it was, and a replaced folder is removed last."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # what mkdir would have given (mkdtemp makes it private)
    try:
        yield staging
        previous = output.with_name(staging.name.replace(".partial", ".old")) if output.exists() else None
        if previous is not None:
            output.rename(previous)
        staging.rename(output)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _step_size_of(args: argparse.Namespace):
    """The step size of an odegpt folder, refused before any weight is read (its config is cheap)."""
    from transformers import AutoConfig

    import odegpt  # noqa: F401  (registers the odegpt model type with the Auto classes)
    from odegpt.cli import CommandError

    try:
        config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load the configuration of {args.model}: {str(error).strip().splitlines()[0]}") \
            from None
    return _checked(config, args.step_size)


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

    output = Path(args.output)
    model_type = model_type_of(args.model)
    check_output(Path(args.model), output, args.overwrite)
    if model_type == "odegpt":  # a Llama's odegpt config exists once it is imported
        _step_size_of(args)
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
