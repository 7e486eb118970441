"""`odegpt calibrate`: fit a model folder's learned exit head on text and calibrate its exit and routing thresholds
for stated tolerances (odegpt.evaluation.exit_calibration); the folder is rewritten with both."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit the learned exit head and calibrate its thresholds for a tolerance",
        description="Fit the model's learned exit head (added if the folder has none) on part of --data, then, on the "
                    "rest, choose for each --tolerance the exit and routing thresholds whose rate of changed greedy "
                    "tokens stays below it with confidence 1 - --delta (Clopper-Pearson, fixed-sequence testing). "
                    "The folder gets the head's weights and exit_calibration.json; `generate` and `evaluate` then "
                    "take --exit learned / --route learned with --exit-tolerance.")
    options.add_model(parser, "native odegpt model folder, rewritten in place")
    parser.add_argument("--data", required=True, nargs="+", metavar="PATH",
                        help="calibration text: prepared corpora (their validation split) and/or raw text, as "
                             "evaluate reads it; keep text you evaluate on apart")
    parser.add_argument("--tolerance", type=options.real_list, default=[0.02], metavar="EPS[,EPS...]",
                        help="largest fraction of greedy tokens the rule may change (default: 0.02)")
    parser.add_argument("--delta", type=float, default=0.05, help="1 - confidence of the bound (default: 0.05)")
    parser.add_argument("--swift-step-size", type=float, default=4.0, metavar="B",
                        help="the routing rule's swift step size (default: 4)")
    parser.add_argument("--exit-head", type=int, default=0, metavar="N",
                        help="the head to add when the folder has none: 0 linear, N a hidden layer of N (default: 0)")
    parser.add_argument("--refit", action="store_true", help="fit the head again even if the folder has one")
    parser.add_argument("--check-cost", type=float, default=None, metavar="STEPS",
                        help="what one exit check costs, in solver steps, when choosing where decoding checks: "
                             "checks that save less than they cost are dropped (default: measured here at batch 1; "
                             "0 keeps a check after every step)")
    parser.add_argument("--exit-to", choices=("read-out", "tail"), default=None,
                        help="where a token the head stops goes: read-out (the final norm and LM head take its "
                             "state) or tail (on a model whose last shared segment is followed by unshared layers, "
                             "the token skips the rest of that segment and still runs them); changing it fits the "
                             "head again (default: what the folder's head was fitted for, read-out for a new one)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="prepared corpora: validation sequences to use (default: all)")
    options.add_threads(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch & co.: not for odegpt --help
    from data_pipeline.folder_kinds import MODEL
    from odegpt.evaluation.data import EvaluationData, evaluation_batches
    from odegpt.evaluation.exit_calibration import (
        CalibrationRequest,
        calibrate_model,
        describe_check_times,
        save_exit_calibration,
    )
    from odegpt.folders.export import copy_calibrations, save_native
    from odegpt.folders.model_folder import load_config, load_model
    from odegpt.folders.output_folder import claimed_output

    from .threads import choose_threads

    choose_threads(args.threads)
    folder = Path(args.model)
    config = load_config(folder, expect="odegpt")
    request = CalibrationRequest(tuple(args.tolerance), args.delta, args.swift_step_size, args.exit_head,
                                 args.refit, check_cost=args.check_cost, exit_to=args.exit_to).checked(config)
    batches = evaluation_batches(args.data, folder, EvaluationData(seq_len=args.seq_len, num_samples=args.num_samples),
                                 config.vocab_size)
    with claimed_output(folder, MODEL, overwrite=True) as staging:
        model = load_model(folder, config).float().eval()
        head_before = (model.exit_head is not None, model.exit_head is not None and model.config.exit_to_tail)
        records = calibrate_model(model, batches, request, print)
        save_native(model, staging, tokenizer_dir=folder)
        if not args.refit and head_before == (True, model.config.exit_to_tail):
            copy_calibrations(folder, staging)  # the thresholds calibrated before for the same head
        save_exit_calibration(staging, records)
    for record in records:
        cost = (f"{record['mean_steps']:.2f} of {config.solver_steps(1.0)} steps and {record['mean_checks']:.2f} "
                f"checks per token, checks at {describe_check_times(record['check_times'])}"
                if record["rule"] == "exit"
                else f"{record['routed_fraction']:.1%} routed from a={record['swift_step_size']:g}")
        print(f"{record['rule']:>5} at tolerance {record['tolerance']:g}: score threshold {record['threshold']:.3g}, "
              f"{record['changed_rate']:.2%} changed tokens (bound {record['upper_bound']:.2%} at "
              f"{1 - record['delta']:.0%} confidence, {record['tokens']:,} held-out tokens), {cost}")
    print(f"calibrated -> {folder}")
    return 0
