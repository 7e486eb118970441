"""`odegpt evaluate`: validation perplexity of a model folder at several step sizes."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="validation perplexity of a model at several step sizes",
        description="Perplexity of an odegpt model folder on the validation split of a prepared corpus, "
                    "solved at each step size (token-weighted mean NLL, exponentiated).")
    parser.add_argument("--model", required=True, help="odegpt model folder (odegpt convert / export)")
    parser.add_argument("--data", required=True, nargs="+", help="prepared corpus directory (odegpt prepare)")
    parser.add_argument("--step-sizes", default="0.5,1,2,4", help="comma-separated (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="validation sequences, spread evenly over the split (default: all of them)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: min(512, model positions))")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print {step_size: perplexity} as JSON")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import torch

    from data_pipeline.datasets import build_datasets
    from odegpt import OdeGPTForCausalLM
    from odegpt.accounting import model_cost
    from odegpt.evaluation import evaluate_perplexity, evaluation_indices

    step_sizes = [float(a) for a in args.step_sizes.split(",") if a.strip()]
    model = OdeGPTForCausalLM.from_pretrained(args.model).float().eval()
    seq_len = args.seq_len or min(512, model.config.max_position_embeddings)
    # The whole validation split, unshuffled; then the same evenly spread subset training evaluates.
    _, valid = build_datasets(list(args.data), None, seq_len, seed=0, num_train_samples=0,
                              num_valid_samples=None, tokenizer_dir=None)
    if len(valid) == 0:
        raise SystemExit(f"odegpt evaluate: {args.data} has no validation samples of {seq_len + 1} tokens")
    indices = evaluation_indices(len(valid), args.num_samples)
    batches = [torch.from_numpy(np.stack([valid[i] for i in indices[start:start + args.batch_size]]))
               for start in range(0, len(indices), args.batch_size)]
    result = evaluate_perplexity(model, batches, step_sizes)
    if args.json:
        print(json.dumps({f"{a:g}": p for a, p in result.items()}))
        return 0
    print(f"{len(indices)} sequences x {seq_len} tokens from {', '.join(args.data)}")
    print(f"{'step size':>9}  {'solver steps':>12}  {'perplexity':>10}")
    for a, ppl in result.items():
        print(f"{a:>9g}  {model_cost(model.config, step_size=a, seq_len=seq_len).executed_steps:>12}  {ppl:>10.3f}")
    return 0
