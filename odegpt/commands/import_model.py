"""`odegpt import`: a pretrained Llama-family folder -> a native odegpt folder, exactly or retrofitted into shared
segments (odegpt.folders.importing)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="import a Llama, Mistral or Qwen2 folder as an odegpt model, exactly or retrofitted into shared segments",
        description=(
            "Read a Hugging Face save_pretrained folder (LlamaForCausalLM with any rotary scaling transformers "
            "computes once, biases included; MistralForCausalLM without a sliding window; Qwen2ForCausalLM) and "
            "write a native odegpt folder with its tokenizer. Without --segments every layer becomes an unshared "
            "block and the logits equal the source's. With --segments the layers are mapped onto the segments in "
            "order and each shared segment's block is initialised from its layers (--init); --relax-rank adds the "
            "time-continuous relaxation, which at full rank reproduces the source at step size 1. Anything the "
            "odegpt block cannot represent (sliding window, experts, q/k norm, another activation) is refused "
            "from config.json before any weight is read."),
    )
    parser.add_argument("--model", required=True, help="the source folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--output", required=True, help="the odegpt folder to write (never --model)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument("--segments", default=None, metavar="SPEC",
                        help="depth then u (unshared layers) or s (one shared block), comma-separated, adding up "
                             "to the source's layers, e.g. 1u,6s,1u (default: all unshared, an exact import)")
    parser.add_argument("--init", choices=["stepwise", "average", "lower"], default="stepwise",
                        help="a shared block from its segment's source layers: the middle one (stepwise), their "
                             "mean (average) or the first (lower); default stepwise")
    parser.add_argument("--relax-rank", default="0", metavar="R",
                        help="rank of each shared linear map's time-continuous correction, initialised from the "
                             "truncated SVD of each source layer's difference to the shared weights; 'full' (or a "
                             "rank >= a matrix's) makes it exact at step size 1; default 0 (none)")
    parser.add_argument("--data", nargs="+", default=None, metavar="PATH",
                        help="prepared corpora (their validation split) and/or raw text files or folders (tokenized "
                             "with the source's tokenizer): print the perplexity of the source and of the imported "
                             "model at step sizes 1 and 2 on them")
    parser.add_argument("--seq-len", type=int, default=256, help="window length of the --data perplexity")
    parser.add_argument("--max-batches", type=int, default=16,
                        help="score at most this many batches of 8 windows of --data (default 16)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import types

    import torch

    from odegpt.commands.cli import CommandError
    from odegpt.evaluation.perplexity import evaluate_perplexity
    from odegpt.folders.export import save_native
    from odegpt.folders.importing import UnsupportedModelError, load_source, parse_relax_rank, retrofit
    from odegpt.folders.output_folder import check_output, staged_folder
    from odegpt.model.accounting import format_count
    from odegpt.model.configuration_odegpt import parse_segments

    try:
        relax_rank = parse_relax_rank(args.relax_rank)
        segments = None if args.segments is None else parse_segments(args.segments)
    except ValueError as error:
        raise CommandError(str(error)) from None
    if args.seq_len < 2 or args.max_batches < 1:
        raise CommandError(f"--seq-len must be >= 2 and --max-batches >= 1, got {args.seq_len} and {args.max_batches}")
    output = Path(args.output)
    check_output(Path(args.model), output, args.overwrite)
    try:
        source = load_source(args.model)
        model, report = retrofit(source, segments, args.init, relax_rank)
    except UnsupportedModelError as error:
        raise CommandError(str(error)) from None
    except ValueError as error:
        raise CommandError(f"--model {args.model}: {error}") from None
    layout = ",".join(f"{s['depth']}{'s' if s['shared'] else 'u'}" for s in report.segments)
    without = report.parameters - report.relaxation_parameters
    print(f"imported {type(source).__name__} ({source.config.num_hidden_layers} layers, "
          f"{format_count(report.source_parameters)} parameters) as segments {layout}"
          + ("" if all(not s["shared"] for s in report.segments) else f", init {report.init}") + ": "
          f"{format_count(without)} parameters without the relaxation, {format_count(report.parameters)} with it "
          f"(relax rank {report.relax_rank}: {format_count(report.relaxation_parameters)}; "
          f"{report.parameters / report.source_parameters:.0%} of the source)")
    if args.data:
        from odegpt.commands.evaluate import prepared_batches, raw_text_batches, raw_text_sources

        prepared = [d for d in args.data if (Path(d) / "manifest.json").is_file()]
        raw = [d for d in args.data if d not in prepared]
        settings = types.SimpleNamespace(model=args.model, text_key="text", batch_size=8, data=raw,
                                         num_samples=8 * args.max_batches)
        batches = prepared_batches(prepared, settings, args.seq_len) if prepared else []
        if raw:
            batches += raw_text_batches(raw_text_sources(raw, args.model), settings, args.seq_len, args.seq_len)
        batches = batches[:args.max_batches]
        before = evaluate_perplexity(_FixedStep(source), batches, [1.0])[1.0]
        after = evaluate_perplexity(model, batches, [1.0, 2.0])
        tokens = sum(batch[:, 1:].numel() if isinstance(batch, torch.Tensor) else int((batch[1] != -100).sum())
                     for batch in batches)
        print(f"perplexity on {tokens:,} tokens of --data: source {before:.3f}; imported a=1 {after[1.0]:.3f} "
              f"({after[1.0] / before - 1:+.1%}), a=2 {after[2.0]:.3f}")
    with staged_folder(output) as staging:
        save_native(model, staging, tokenizer_dir=args.model)
    print(f"native odegpt folder -> {output}")
    return 0


class _FixedStep:
    """The source model called as nll_sums calls an odegpt model (its step size ignored: a plain stack)."""

    def __init__(self, model) -> None:
        self.model = model
        self.training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, input_ids, step_size=None, use_cache=False):
        return self.model(input_ids=input_ids, use_cache=False)
