"""`odegpt evaluate`: perplexity and decode speed of a model folder at several step sizes, as a report."""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli import CommandError

DTYPES = ("float32", "bfloat16")
SPEED_PROMPT_TOKENS = 32  # decode speed is measured after a prompt of this many (random) tokens


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="perplexity and decode speed of a model at several step sizes (a report)",
        description="Score an odegpt model folder at each step size: perplexity (token-weighted mean NLL, "
                    "exponentiated), executed solver steps, FLOPs/token and measured decode tokens/s with "
                    "the speedup over a=1. --data takes prepared corpora (their validation split) and raw "
                    "text files, directories or globs, tokenized with the model folder's tokenizer; a raw "
                    "document starts after an EOS, as in training, and is scored with a sliding window. "
                    "--output DIR writes results.json, results.md and pareto.png.")
    parser.add_argument("--model", required=True, help="odegpt model folder (odegpt convert / export)")
    parser.add_argument("--data", required=True, nargs="+", metavar="PATH",
                        help="prepared corpus directories (odegpt prepare: their validation split) and/or raw "
                             "text: files, directories, globs (quote them) or 'stdlib'; .txt/.md/.py, "
                             ".jsonl/.json, .parquet as odegpt prepare reads them")
    parser.add_argument("--step-sizes", default="0.5,1,2,4",
                        help="comma-separated real step sizes, reported in this order (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens of input per window (default: min(512, model positions))")
    parser.add_argument("--stride", type=int, default=None,
                        help="raw text: a window starts every STRIDE tokens and scores only tokens no earlier "
                             "window scored, so every token is scored once with up to seq_len tokens of "
                             "context (default: seq_len, disjoint windows)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="prepared corpora: validation sequences, spread evenly over the split (default: all)")
    parser.add_argument("--text-key", default="text", help="raw .jsonl/.parquet inputs: the text field")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default: %(default)s)")
    parser.add_argument("--no-speed", action="store_true", help="skip the decode speed measurement")
    parser.add_argument("--decode-tokens", type=int, default=64,
                        help="decode speed: greedy tokens per timed run, batch 1 (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="decode speed: interleaved rounds over the step sizes, median (default: %(default)s)")
    parser.add_argument("--output", default=None, metavar="DIR", help="write results.json, results.md, pareto.png")
    parser.add_argument("--json", action="store_true", help="print the results.json document on stdout")
    parser.set_defaults(func=run)


def parse_step_sizes(text: str, config) -> list[float]:
    """Real step sizes from ``"0.5,1,2"``, each checked against the model (finite, > 0, solve not too long)."""
    step_sizes = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            a = float(item)
        except ValueError:
            raise CommandError(f"--step-sizes: {item!r} is not a number") from None
        try:
            config.solver_steps(a)
        except ValueError as error:
            raise CommandError(f"--step-sizes: {error}") from None
        step_sizes.append(a)
    if not step_sizes:
        raise CommandError(f"--step-sizes: no step size in {text!r}")
    return step_sizes


def load_native_config(path: str):
    """The OdeGPTConfig of a native model folder (cheap: no weights); a one-line CommandError otherwise."""
    from transformers import AutoConfig

    from odegpt import OdeGPTConfig

    if not (Path(path) / "config.json").is_file():
        raise CommandError(f"--model: {path} is not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, OdeGPTConfig):
        raise CommandError(f"--model: {path} holds a {config.model_type!r} model; this needs a native odegpt "
                           f"folder (odegpt convert, or odegpt export without --unroll)")
    return config


def load_native_model(path: str, config, dtype: str):
    """The model of a native folder (its config already checked by :func:`load_native_config`), in eval mode."""
    import torch

    from odegpt import OdeGPTForCausalLM

    from .integrity import check_finite_weights

    model = OdeGPTForCausalLM.from_pretrained(path, config=config)
    try:
        check_finite_weights(model.named_parameters(), path)  # before a cast could hide or add infinities
    except ValueError as error:
        raise CommandError(str(error)) from None
    return model.to(getattr(torch, dtype)).eval()


def _prepared_batches(corpora: list[str], args, seq_len: int) -> list:
    """(B, seq_len + 1) token batches of the prepared corpora's validation samples."""
    import numpy as np
    import torch

    from data_pipeline.datasets import build_datasets
    from odegpt.evaluation import evaluation_indices

    # The model folder's tokenizer, when it has one, must be the one the corpora were prepared with.
    tokenizer_dir = args.model if (Path(args.model) / "tokenizer.model").is_file() else None
    try:
        # The whole validation split, unshuffled; then the same evenly spread subset training evaluates.
        _, valid = build_datasets(corpora, None, seq_len, seed=0, num_train_samples=0, num_valid_samples=None,
                                  tokenizer_dir=tokenizer_dir)
    except (OSError, ValueError) as error:
        raise CommandError(f"--data: {error}") from None
    if len(valid) == 0:
        raise CommandError(f"--data: {', '.join(corpora)} has no validation samples of {seq_len + 1} tokens")
    indices = evaluation_indices(len(valid), args.num_samples)
    return [torch.from_numpy(np.stack([valid[i] for i in indices[start:start + args.batch_size]]))
            for start in range(0, len(indices), args.batch_size)]


def _raw_text_sources(inputs: list[str], model_dir: str) -> list:
    """The files (or saved datasets) behind raw-text inputs; checked before any model is loaded."""
    from data_pipeline.readers import resolve_inputs

    try:
        sources = resolve_inputs(inputs)
    except (OSError, ValueError) as error:
        raise CommandError(f"--data: {error}") from None
    if not (Path(model_dir) / "tokenizer.json").is_file() and not (Path(model_dir) / "tokenizer_config.json").is_file():
        raise CommandError(f"--model: {model_dir} has no tokenizer files, needed to tokenize raw text "
                           f"(odegpt convert copies the run's tokenizer into the folder)")
    return sources


def _raw_text_batches(sources: list, args, seq_len: int, stride: int) -> list:
    """Sliding-window (input ids, targets) batches over raw documents, tokenized with the model's tokenizer.
    Each document is framed by EOS on both sides, as packed training data puts one before and after it:
    its first token is predicted after an EOS, and its closing EOS is scored too."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from data_pipeline.readers import iter_documents
    from odegpt.evaluation import window_batches

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    frame = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    documents = []
    try:
        for document in tqdm(iter_documents(sources, text_key=args.text_key), desc="tokenize", unit="doc",
                             leave=False):
            if document.text:
                ids = tokenizer(document.text, add_special_tokens=False)["input_ids"]
                documents.append(torch.tensor(frame + ids + frame, dtype=torch.long))
    except (OSError, ValueError) as error:
        raise CommandError(f"--data: {error}") from None
    if not documents:
        raise CommandError(f"--data: no text in {', '.join(args.data)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return window_batches(documents, seq_len, stride, args.batch_size, pad_id=pad)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from tqdm import tqdm

    from odegpt.accounting import model_cost
    from odegpt.evaluation import nll_sums, perplexity
    from odegpt.report import describe, markdown_table, write_report
    from odegpt.throughput import Variant, measure_interleaved, random_prompt

    # Everything the user typed is checked before the weights are loaded.
    config = load_native_config(args.model)
    step_sizes = parse_step_sizes(args.step_sizes, config)
    seq_len = args.seq_len or min(512, config.max_position_embeddings)
    if not 0 < seq_len <= config.max_position_embeddings:
        raise CommandError(f"--seq-len must be in 1..{config.max_position_embeddings} (the model's positions), "
                           f"got {seq_len}")
    stride = seq_len if args.stride is None else args.stride
    if not 0 < stride <= seq_len:
        raise CommandError(f"--stride must be in 1..seq_len ({seq_len}), got {stride}")
    for name in ("batch_size", "num_samples", "decode_tokens", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    prepared = [d for d in args.data if (Path(d) / "manifest.json").is_file()]
    raw = [d for d in args.data if d not in prepared]
    if args.stride is not None and not raw:
        raise CommandError("--stride applies to raw text; prepared corpora are scored in their fixed validation "
                           "samples of seq_len + 1 tokens (use --seq-len)")
    sources = _raw_text_sources(raw, args.model) if raw else []
    batches = _prepared_batches(prepared, args, seq_len) if prepared else []
    if sources:
        batches += _raw_text_batches(sources, args, seq_len, stride)

    model = load_native_model(args.model, config, args.dtype)
    progress = tqdm(batches, desc=f"perplexity at {len(step_sizes)} step sizes", unit="batch", file=sys.stderr)
    sums = nll_sums(model, progress, step_sizes)

    speeds: dict[float, float] = {}
    decode = None
    if not args.no_speed:
        prompt_tokens = min(SPEED_PROMPT_TOKENS, config.max_position_embeddings // 2)
        new_tokens = max(1, min(args.decode_tokens, config.max_position_embeddings - prompt_tokens - 1))
        speed_sizes = list(dict.fromkeys([1.0, *step_sizes]))  # a=1 is the reference even if not requested
        variants = {a: Variant(model, {"step_size": a}) for a in speed_sizes}
        prompt = random_prompt(config.vocab_size, 1, prompt_tokens)
        with tqdm(total=args.rounds * len(variants), desc="decode speed", unit="run", file=sys.stderr) as bar:
            measured = measure_interleaved(variants, {"batch 1": prompt}, new_tokens, args.rounds, bar.update)
        speeds = {a: measured[a, "batch 1"].decode_tokens_per_s for a in speed_sizes}
        decode = {"batch_size": 1, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                  "rounds": args.rounds}

    num_tokens = next(iter(sums.values()))[1]
    results = []
    for a in step_sizes:
        nll_sum, count = sums[a]
        speed = speeds.get(a)
        results.append({
            "step_size": a,
            "solver_steps": config.solver_steps(a),
            "flops_per_token": model_cost(config, a, seq_len=seq_len).flops_per_token,
            "nll": nll_sum / count,  # count > 0: empty data was refused above
            "num_tokens": count,
            "perplexity": perplexity(nll_sum, count),
            "decode_tokens_per_s": speed,
            "decode_speedup": None if speed is None else speed / speeds[1.0],
        })
    document = {"model": args.model, "data": list(args.data), "seq_len": seq_len, "stride": stride,
                "num_tokens": num_tokens, "dtype": args.dtype, "decode": decode, "results": results}
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(describe(document) + "\n" + markdown_table(document), end="")
    if args.output:
        paths = write_report(document, args.output)
        print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr if args.json else sys.stdout)
    return 0
