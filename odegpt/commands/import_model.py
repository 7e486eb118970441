"""`odegpt import`: a pretrained Llama-family folder -> a native odegpt folder, exactly or retrofitted into shared
segments (odegpt.folders.importing)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="import a Llama, Mistral or Qwen2 folder or GGUF file as an odegpt model, exactly or retrofitted into "
             "shared segments",
        description=(
            "Read a Hugging Face save_pretrained folder (LlamaForCausalLM with any rotary scaling transformers "
            "computes once, biases included; MistralForCausalLM without a sliding window; Qwen2ForCausalLM), or "
            "a GGUF file of one (dequantized by transformers' GGUF loader), and write a native odegpt folder "
            "with its tokenizer (every tokenizer file of the folder; a GGUF's vocabulary as a Hugging Face "
            "tokenizer), so that `odegpt prepare --tokenizer OUTPUT` prepares data for it. Without --segments "
            "every layer becomes an unshared block and the logits equal the source's. With --segments the layers "
            "are mapped onto the segments in order and each shared segment's block is initialised from its "
            "layers (--init); --relax-rank adds the time-continuous relaxation, which at full rank reproduces "
            "the source at step size 1. Anything the odegpt block cannot represent (sliding window, experts, q/k "
            "norm, another activation) is refused from config.json before any weight is read."),
    )
    options.add_model(parser, "the source: a folder (config.json, safetensors, tokenizer) or a .gguf file")
    options.add_output(parser, "odegpt model folder")
    parser.add_argument("--segments", default=None, metavar="SPEC",
                        help="depth then u (unshared layers) or s (one shared block), comma-separated, adding up "
                             "to the source's layers, e.g. 1u,6s,1u (default: all unshared, an exact import)")
    parser.add_argument("--init", choices=["stepwise", "average", "lower", "fit", "auto"], default=None,
                        help="a shared block from its segment's source layers: the middle one (stepwise), their "
                             "mean (average), the first (lower), the least-squares fit to all of them on the "
                             "--calibration text (fit), or per block the one of these with the least output error "
                             "on it (auto); default auto with --calibration, else stepwise")
    parser.add_argument("--relax-rank", default="0", metavar="R",
                        help="rank of each shared linear map's time-continuous correction, initialised from the "
                             "truncated SVD of each source layer's difference to the shared weights; 'full' (or a "
                             "rank >= a matrix's) makes it exact at step size 1; default 0 (none)")
    parser.add_argument("--calibration", nargs="+", default=None, metavar="PATH",
                        help="text to calibrate the retrofit on (prepared corpora: their training split; raw text "
                             "files or folders, tokenized with the source's tokenizer): each relaxation knot is the "
                             "low-rank map closest to its layer on these inputs (whitened SVD), not in weights alone")
    parser.add_argument("--calibration-tokens", type=int, default=32768, metavar="N",
                        help="tokens of --calibration to use (default: %(default)s)")
    parser.add_argument("--data", nargs="+", default=None, metavar="PATH",
                        help="prepared corpora (their validation split) and/or raw text files or folders (tokenized "
                             "with the source's tokenizer): print the perplexity of the source and of the imported "
                             "model at step sizes 1 and 2 on them")
    parser.add_argument("--seq-len", type=int, default=256, help="window length of the --data perplexity")
    parser.add_argument("--max-batches", type=int, default=16,
                        help="score at most this many batches of 8 windows of --data (default 16)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch & co.: not for odegpt --help
    from data_pipeline.folder_kinds import MODEL
    from odegpt.errors import InputError
    from odegpt.evaluation.data import EvaluationData, calibration_batches
    from odegpt.folders.export import save_native
    from odegpt.folders.gguf_source import check_gguf, is_gguf, save_gguf_tokenizer
    from odegpt.folders.importing import ImportRequest, describe_import, import_model
    from odegpt.folders.model_folder import check_tokenizer_folder
    from odegpt.folders.output_folder import claimed_output

    request = ImportRequest(source=args.model, segments=args.segments, init=args.init, relax_rank=args.relax_rank,
                            data=args.data, seq_len=args.seq_len, max_batches=args.max_batches,
                            calibration=args.calibration, calibration_tokens=args.calibration_tokens).checked()
    gguf = is_gguf(args.model)
    if gguf:  # its metadata, before any work; the tokenizer, once the output is claimed
        try:
            check_gguf(args.model)
        except ValueError as error:
            raise InputError(f"--model: {error}") from None
    else:
        check_tokenizer_folder(args.model)  # the tokenizer files the import copies, before any work
    cut = EvaluationData(seq_len=request.seq_len, batch_size=8)
    calibration = None
    if request.calibration and not gguf:  # checked, and tokenized, before any weight is read
        calibration = calibration_batches(request.calibration, request.source, cut, request.calibration_tokens)
    with claimed_output(Path(args.output), MODEL, args.overwrite, source=Path(args.model)) as staging:
        if gguf:  # into the model folder first: --data's and --calibration's raw text is tokenized with it
            try:
                save_gguf_tokenizer(args.model, staging)
            except ValueError as error:
                raise InputError(f"--model: {error}") from None
            if request.calibration:
                calibration = calibration_batches(request.calibration, staging, cut, request.calibration_tokens)
        source, model, report = import_model(request, calibration)
        print(describe_import(source, report))
        if request.data:
            print(compare_on_data(request, source, model, staging if gguf else args.model))
        save_native(model, staging, tokenizer_dir=None if gguf else args.model)
    print(f"native odegpt folder -> {args.output}")
    return 0


def compare_on_data(request, source, model, tokenizer_dir) -> str:
    """The line comparing the source's and the imported model's perplexity on ``--data`` (raw text tokenized with
    the tokenizer in ``tokenizer_dir``)."""
    # torch & co.: not for odegpt --help
    from odegpt.evaluation.data import EvaluationData, evaluation_batches, scored_tokens
    from odegpt.evaluation.perplexity import evaluate_perplexity

    cut = EvaluationData(seq_len=request.seq_len, batch_size=8, num_samples=8 * request.max_batches)
    batches = evaluation_batches(request.data, tokenizer_dir, cut)[:request.max_batches]
    before = evaluate_perplexity(source, batches, [1.0])[1.0]
    after = evaluate_perplexity(model, batches, [1.0, 2.0])
    return (f"perplexity on {scored_tokens(batches):,} tokens of --data: source {before:.3f}; imported a=1 "
            f"{after[1.0]:.3f} ({after[1.0] / before - 1:+.1%}), a=2 {after[2.0]:.3f}")
