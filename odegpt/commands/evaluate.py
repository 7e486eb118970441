"""`odegpt evaluate`: perplexity and decode speed of a model folder at several step sizes, as a report
(odegpt.evaluation.model_report)."""
from __future__ import annotations

import argparse
import json
import sys

from . import options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="perplexity and decode speed of a model at several step sizes (a report)",
        description="Score an odegpt model folder at each step size: perplexity (token-weighted mean NLL, "
                    "exponentiated), executed solver steps, FLOPs/token and measured decode tokens/s with "
                    "the speedup over a=1. --data takes prepared corpora (their validation split) and raw "
                    "text files, directories or globs, tokenized with the model folder's tokenizer; a raw "
                    "document starts after an EOS, as in training, and is scored with a sliding window. "
                    "--output DIR writes results.json, results.md and pareto.png.")
    options.add_model(parser, "odegpt model folder (odegpt convert / import / export)")
    parser.add_argument("--data", required=True, nargs="+", metavar="PATH",
                        help="prepared corpus directories (odegpt prepare: their validation split) and/or raw "
                             "text: files, directories, globs (quote them) or 'stdlib'; .txt/.md/.py, "
                             ".jsonl/.json, .parquet as odegpt prepare reads them")
    options.add_step_size(parser, several=True)
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
    options.add_dtype(parser, "float32", "compute dtype: float32 or bfloat16")
    parser.add_argument("--no-speed", action="store_true", help="skip the decode speed measurement")
    options.add_threads(parser)
    parser.add_argument("--decode-tokens", type=int, default=64,
                        help="decode speed: greedy tokens per timed run, batch 1 (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="decode speed: interleaved rounds over the step sizes, median (default: %(default)s)")
    options.add_adaptive(parser, several=True)
    parser.add_argument("--truncate", type=options.real_list, default=None, metavar="T[,T...]",
                        help="baseline rows: every token read out after solver time T of the --step-size solve (the "
                             "truncated solve the per-token rules are measured against)")
    parser.add_argument("--calibration-data", nargs="+", default=None, metavar="PATH",
                        help="prepared corpora (their validation split) to calibrate --target-compute on "
                             "(default: --data; use other text to keep the evaluation held out)")
    options.add_renamed(parser, "--adaptive-step-size", "--step-size")
    parser.add_argument("--output", default=None, metavar="DIR", help="write results.json, results.md, pareto.png")
    options.add_json(parser, "the results.json document")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch & co.: not for odegpt --help
    from odegpt.evaluation.model_report import AdaptiveRows, EvaluationRequest, evaluate_model, load_for_evaluation
    from odegpt.evaluation.report import adaptive_table, describe, markdown_table, write_report
    from odegpt.folders.model_folder import load_config

    from .threads import choose_threads
    from .threads import describe as describe_threads

    threads = choose_threads(args.threads)
    config = load_config(args.model, expect="odegpt", solver=args.solver)
    request, rows = EvaluationRequest(
        model=args.model, data=args.data, step_sizes=args.step_sizes, seq_len=args.seq_len, stride=args.stride,
        batch_size=args.batch_size, num_samples=args.num_samples, text_key=args.text_key, cache_dir=args.cache_dir,
        dtype=args.dtype, speed=not args.no_speed, decode_tokens=args.decode_tokens, rounds=args.rounds,
        adaptive=AdaptiveRows(exit_entropy=args.exit_entropy or [], route_energy=args.route_energy or [],
                              target_compute=args.target_compute or [], kv_fill=args.kv_fill,
                              step_size=args.step_size, swift_step_size=args.swift_step_size,
                              check_every=args.check_every, min_time=args.min_time, exit=args.exit,
                              route=args.route, exit_tolerance=args.exit_tolerance, truncate=args.truncate or []),
        calibration_data=args.calibration_data, output=args.output).checked(config)
    batches = request.batches(config.vocab_size)
    print(f"odegpt evaluate: {describe_threads(*threads)}", file=sys.stderr)
    model = load_for_evaluation(args.model, config, args.dtype)
    document = evaluate_model(request, config, model, rows, batches, threads[0])
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(describe(document) + "\n" + markdown_table(document), end="")
        if "adaptive" in document:
            print("\n" + adaptive_table(document), end="")
    if args.output:
        paths = write_report(document, args.output)
        print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr if args.json else sys.stdout)
    return 0
