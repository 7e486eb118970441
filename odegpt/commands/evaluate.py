"""`odegpt evaluate`: perplexity and decode speed of a model folder at several step sizes, as a report."""
from __future__ import annotations

import argparse
from pathlib import Path

from odegpt.decoding.defaults import DEFAULT_SWIFT_STEP_SIZE

from .cli import CommandError
from .threads import add_threads_argument, choose_threads
from .threads import describe as describe_threads

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
    parser.add_argument("--solver", default=None, metavar="METHOD",
                        help="solver method for every step size: euler or heun (default: the model's config.solver)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens of input per window (default: min(512, model positions))")
    parser.add_argument("--stride", type=int, default=None,
                        help="raw text: a window starts every STRIDE tokens and scores only tokens no earlier "
                             "window scored, so every token is scored once with up to seq_len tokens of "
                             "context (default: seq_len, disjoint windows)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where a prepared corpus's verification record is kept (default: its index_cache/); "
                             "for a read-only corpus")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="prepared corpora: validation sequences, spread evenly over the split (default: all)")
    parser.add_argument("--text-key", default="text", help="raw .jsonl/.parquet inputs: the text field")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default: %(default)s)")
    parser.add_argument("--no-speed", action="store_true", help="skip the decode speed measurement")
    add_threads_argument(parser)
    parser.add_argument("--decode-tokens", type=int, default=64,
                        help="decode speed: greedy tokens per timed run, batch 1 (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="decode speed: interleaved rounds over the step sizes, median (default: %(default)s)")
    adaptive = parser.add_argument_group(
        "adaptive depth", "per-token depth with the same weights (odegpt/decoding/adaptive.py), one report row per value; "
                          "the fixed step sizes stay the reference curve")
    adaptive.add_argument("--exit-entropy", default=None, metavar="H[,H...]",
                          help="early exit: a token stops integrating at step size --adaptive-step-size once its "
                               "read-out's entropy is below H nats (>= 0; 0 never exits)")
    adaptive.add_argument("--route-energy", default=None, metavar="E[,E...]",
                          help="energy routing: tokens solved at --swift-step-size whose energy "
                               "-T*logsumexp(logits/T) exceeds E are re-solved at --adaptive-step-size")
    adaptive.add_argument("--target-compute", default=None, metavar="F[,F...]",
                          help="energy routing at F x the super solve's FLOPs per token, F in (0, 1]: the threshold "
                               "saved in the model folder (adaptive_calibration.json), or calibrated on "
                               "--calibration-data and saved there")
    adaptive.add_argument("--calibration-data", nargs="+", default=None, metavar="PATH",
                          help="prepared corpora (their validation split) to calibrate --target-compute on "
                               "(default: --data; use other text to keep the evaluation held out)")
    adaptive.add_argument("--kv-fill", default="copy", metavar="FILL[,FILL...]",
                          help="keys/values at the steps a token skipped: lazy (continue its solve), copy (its "
                               "nearest computed state), interpolate (in time between its states) "
                               "(default: %(default)s)")
    adaptive.add_argument("--adaptive-step-size", type=float, default=None, metavar="A",
                          help="early exit's step size and routing's super step size (default: config.step_size)")
    adaptive.add_argument("--swift-step-size", type=float, default=DEFAULT_SWIFT_STEP_SIZE, metavar="B",
                          help="routing: the swift step size (default: %(default)s)")
    adaptive.add_argument("--check-every", type=int, default=1, metavar="N",
                          help="early exit: read out every N steps (default: %(default)s)")
    adaptive.add_argument("--min-time", type=float, default=0.0,
                          help="early exit: no exit before this solver time (default: %(default)s)")
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


ADAPTIVE_FLAGS = {"exit_entropy": "--exit-entropy", "route_energy": "--route-energy", "kv_fill": "--kv-fill",
                  "step_size": "--adaptive-step-size", "swift_step_size": "--swift-step-size",
                  "check_every": "--check-every", "min_time": "--min-time", "target_compute": "--target-compute"}


def _numbers(text: str | None, flag: str) -> list[float]:
    if text is None:
        return []
    values = []
    for item in (part.strip() for part in text.split(",")):
        try:
            values.append(float(item))
        except ValueError:
            raise CommandError(f"{flag}: {item!r} is not a number") from None
    return values


def parse_adaptive(args, config) -> list[dict]:
    """The adaptive rows asked for: ``{"settings": AdaptiveDepth, "target_compute": F | None}``, each checked
    (a one-line CommandError names the flag) before any work."""
    from odegpt.decoding.adaptive import AdaptiveDepth
    from odegpt.evaluation.calibration import check_target_compute

    fills = [fill.strip() for fill in args.kv_fill.split(",")]
    common = dict(step_size=args.adaptive_step_size, swift_step_size=args.swift_step_size,
                  check_every=args.check_every, min_time=args.min_time)
    rows = []
    for fill in fills:
        rows += [dict(settings=AdaptiveDepth(exit_entropy=h, kv_fill=fill, **common), target_compute=None)
                 for h in _numbers(args.exit_entropy, "--exit-entropy")]
        rows += [dict(settings=AdaptiveDepth(route_energy=e, kv_fill=fill, **common), target_compute=None)
                 for e in _numbers(args.route_energy, "--route-energy")]
        for target in _numbers(args.target_compute, "--target-compute"):
            try:
                check_target_compute(target, "--target-compute")
            except ValueError as error:
                raise CommandError(str(error)) from None
            rows.append(dict(settings=AdaptiveDepth(route_energy=0.0, kv_fill=fill, **common), target_compute=target))
    for row in rows:
        try:
            row["settings"] = row["settings"].checked(config, ADAPTIVE_FLAGS)
        except ValueError as error:
            raise CommandError(str(error)) from None
    return rows


def _adaptive_results(model, config, rows: list[dict], batches: list, args, seq_len: int) -> list[dict]:
    """One result per adaptive row: perplexity and what the solve executed per token, as FLOPs too."""
    import sys
    from dataclasses import replace

    from tqdm import tqdm

    from odegpt.evaluation.calibration import calibrate_energy, load_calibration, save_calibration
    from odegpt.evaluation.perplexity import adaptive_nll_sums, perplexity
    from odegpt.model.accounting import adaptive_flops_per_token

    results = []
    calibration_batches = None
    for row in rows:
        settings = row["settings"]
        if row["target_compute"] is not None:
            record = load_calibration(args.model, row["target_compute"], settings, seq_len)
            if record is None:
                if calibration_batches is None:
                    calibration_batches = (prepared_batches(args.calibration_data, args, seq_len, config.vocab_size)
                                           if args.calibration_data else batches)
                try:
                    record = calibrate_energy(model, calibration_batches, settings, row["target_compute"], seq_len)
                except ValueError as error:
                    raise CommandError(f"--target-compute: {error}") from None
                path = save_calibration(args.model, record, list(args.calibration_data or args.data))
                print(f"calibrated --target-compute {row['target_compute']:g}: route energy > "
                      f"{record['route_energy']:.4g} ({record['routed_fraction']:.1%} of {record['num_tokens']:,} "
                      f"tokens), saved in {path}", file=sys.stderr)
            settings = replace(settings, route_energy=record["route_energy"])
        label = (f"exit entropy < {settings.exit_entropy:g}" if not settings.routing else
                 f"route energy > {settings.route_energy:.4g}" + (
                     f" (target {row['target_compute']:g})" if row["target_compute"] is not None else ""))
        progress = tqdm(batches, desc=f"{label}, {settings.kv_fill}", unit="batch", file=sys.stderr, leave=False)
        score = adaptive_nll_sums(model, progress, settings)
        per = {name: score.per_token(name) for name in ("executed_steps", "readouts", "kv_projections",
                                                        "continued_steps")}
        results.append({
            "method": "energy routing" if settings.routing else "early exit",
            "label": label,
            "exit_entropy": settings.exit_entropy, "route_energy": settings.route_energy,
            "target_compute": row["target_compute"], "kv_fill": settings.kv_fill,
            "step_size": settings.step_size, "swift_step_size": settings.swift_step_size if settings.routing else None,
            **per,
            "schedule_flops_per_token": adaptive_flops_per_token(config, per["executed_steps"], per["readouts"],
                                                                 seq_len=seq_len),
            "flops_per_token": adaptive_flops_per_token(config, **per, seq_len=seq_len),
            "nll": score.nll_sum / score.num_tokens, "num_tokens": score.num_tokens,
            "perplexity": perplexity(score.nll_sum, score.num_tokens),
        })
    return results


def load_native_config(path: str, solver: str | None = None):
    """The OdeGPTConfig of a native model folder (cheap: no weights), with ``solver`` for this run if given; a
    one-line CommandError otherwise."""
    from odegpt.folders.model_folder import load_config

    return load_config(path, expect="odegpt", solver=solver)


def load_native_model(path: str, config, dtype: str):
    """The model of a native folder (its config already checked by :func:`load_native_config`), in eval mode."""
    import torch

    from odegpt.folders.model_folder import load_model

    return load_model(path, config).to(getattr(torch, dtype)).eval()


def prepared_batches(corpora: list[str], args, seq_len: int, vocab_size: int | None = None) -> list:
    """(B, seq_len + 1) token batches of the prepared corpora's validation samples; corpora tokenized with a
    vocabulary larger than the model's ``vocab_size`` are refused."""
    import numpy as np
    import torch

    from data_pipeline.datasets import build_datasets
    from data_pipeline.manifest import Manifest
    from odegpt.evaluation.perplexity import evaluation_indices
    from odegpt.folders.model_folder import check_vocabulary

    # The model folder's tokenizer, when it has one, must be the one the corpora were prepared with.
    tokenizer_dir = args.model if (Path(args.model) / "tokenizer.model").is_file() else None
    try:
        # The whole validation split, unshuffled; then the same evenly spread subset training evaluates.
        _, valid = build_datasets(corpora, None, seq_len, seed=0, num_train_samples=0, num_valid_samples=None,
                                  tokenizer_dir=tokenizer_dir, cache_dir=getattr(args, "cache_dir", None))
        for corpus in corpora:
            check_vocabulary(int(Manifest.load(corpus).tokenizer["vocab_size"]), vocab_size,
                             f"--data: the tokenizer of corpus {corpus}")
    except (OSError, ValueError) as error:
        raise CommandError(f"--data: {error}") from None
    if len(valid) == 0:
        raise CommandError(f"--data: {', '.join(corpora)} has no validation samples of {seq_len + 1} tokens")
    indices = evaluation_indices(len(valid), args.num_samples)
    return [torch.from_numpy(np.stack([valid[i] for i in indices[start:start + args.batch_size]]))
            for start in range(0, len(indices), args.batch_size)]


def raw_text_sources(inputs: list[str], model_dir: str) -> list:
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


def raw_text_batches(sources: list, args, seq_len: int, stride: int, vocab_size: int | None = None) -> list:
    """Sliding-window (input ids, targets) batches over raw documents, tokenized with the model's tokenizer.
    Each document is framed by EOS on both sides, as packed training data puts one before and after it:
    its first token is predicted after an EOS, and its closing EOS is scored too."""
    import torch
    from tqdm import tqdm

    from data_pipeline.readers import iter_documents
    from odegpt.evaluation.perplexity import window_batches
    from odegpt.folders.model_folder import load_tokenizer

    tokenizer = load_tokenizer(args.model, vocab_size)
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

    from odegpt.evaluation.perplexity import nll_sums, perplexity
    from odegpt.evaluation.report import adaptive_table, describe, markdown_table, write_report
    from odegpt.evaluation.throughput import Variant, measure_interleaved, random_prompt
    from odegpt.model.accounting import model_cost

    # Everything the user typed is checked before the weights are loaded.
    try:
        threads = choose_threads(args.threads)
    except ValueError as error:
        raise CommandError(str(error)) from None
    config = load_native_config(args.model, args.solver)
    step_sizes = parse_step_sizes(args.step_sizes, config)
    seq_len = args.seq_len if args.seq_len is not None else min(512, config.max_position_embeddings)
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
    if args.output:
        from odegpt.folders.output_folder import check_writable

        check_writable(Path(args.output))
    adaptive_rows = parse_adaptive(args, config)
    if args.calibration_data and args.target_compute is None:
        raise CommandError("--calibration-data applies to --target-compute")
    for corpus in args.calibration_data or []:
        if not (Path(corpus) / "manifest.json").is_file():
            raise CommandError(f"--calibration-data: {corpus} is not a prepared corpus (no manifest.json)")
    prepared = [d for d in args.data if (Path(d) / "manifest.json").is_file()]
    raw = [d for d in args.data if d not in prepared]
    if args.stride is not None and not raw:
        raise CommandError("--stride applies to raw text; prepared corpora are scored in their fixed validation "
                           "samples of seq_len + 1 tokens (use --seq-len)")
    sources = raw_text_sources(raw, args.model) if raw else []
    batches = prepared_batches(prepared, args, seq_len, config.vocab_size) if prepared else []
    if sources:
        batches += raw_text_batches(sources, args, seq_len, stride, config.vocab_size)

    print(f"odegpt evaluate: {describe_threads(*threads)}", file=sys.stderr)
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

    adaptive_results = _adaptive_results(model, config, adaptive_rows, batches, args, seq_len)
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
                "num_tokens": num_tokens, "dtype": args.dtype, "solver": config.solver, "threads": threads[0],
                "decode": decode,
                "results": results}
    if adaptive_results:
        document["adaptive"] = adaptive_results
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(describe(document) + "\n" + markdown_table(document), end="")
        if adaptive_results:
            print("\n" + adaptive_table(document), end="")
    if args.output:
        paths = write_report(document, args.output)
        print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr if args.json else sys.stdout)
    return 0
