"""The command line's options, declared once: a concept has one name, one type and one help text in every command.

Each ``add_*`` function adds one group of options to a command's parser. They only parse: what a value must be is
checked by the library that uses it (a ``ValueError`` naming the option, which ``odegpt``'s ``main`` prints in one
line with exit code 2). Lists of values (``--step-sizes 1,2,4``, ``--exit-entropy 1,2``) are comma-separated
everywhere. An option that was renamed stays as a refused alias naming its new name (:func:`add_renamed`).

Nothing here imports torch: ``odegpt --help`` stays fast.
"""
from __future__ import annotations

import argparse

from odegpt.decoding.defaults import DEFAULT_SWIFT_STEP_SIZE

# Weight and compute dtypes, for every command that takes --dtype (a command's library refuses one it cannot use):
# the float types, and the quantizations of a GGUF export (llama.cpp's block types; only `export --format gguf`).
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
GGUF_QUANTIZATIONS = ("q8_0", "q4_0")
DTYPES = FLOAT_DTYPES + GGUF_QUANTIZATIONS
KV_FILLS = ("lazy", "copy", "interpolate")


def real_list(text: str) -> list[float]:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]`` (an argparse type; empty items are skipped)."""
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number") from None
    if not values:
        raise argparse.ArgumentTypeError(f"no number in {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]`` (an argparse type)."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return list(dict.fromkeys(values))


def word_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def draft_length(text: str) -> int | str:
    """``--draft-tokens``: an integer or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto', got {text!r}") from None


class _Renamed(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is now {self.metavar}")


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str, takes_value: bool = True) -> None:
    """``old`` as a refused alias: using it is an error that names ``new`` (hidden from ``--help``)."""
    parser.add_argument(old, action=_Renamed, nargs=None if takes_value else 0, metavar=new, help=argparse.SUPPRESS)


def add_model(parser: argparse.ArgumentParser, help: str = "model folder (odegpt convert / import / export)") -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help=help)


def add_output(parser: argparse.ArgumentParser, what: str = "model folder") -> None:
    """``--output`` and ``--overwrite`` for a command that writes a folder (odegpt.folders.output_folder)."""
    parser.add_argument("--output", required=True, metavar="DIR",
                        help=f"the {what} to write: created, or replaced with --overwrite; never the folder read")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an earlier {what} at --output (never a run, a corpus, a tokenizer or other "
                             f"files); the new one is complete before the old one is removed")


def add_dtype(parser: argparse.ArgumentParser, default: str | None, what: str = "weights and compute") -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=default,
                        help=f"{what} (default: {default or 'as stored'})")


def add_step_size(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """The solve: ``--step-size A`` (or ``--step-sizes A,B,...`` for a command that scores several) and
    ``--solver``."""
    if several:
        parser.add_argument("--step-sizes", type=real_list, default=[0.5, 1.0, 2.0, 4.0], metavar="A[,A...]",
                            help="solver step sizes, in this order (default: 0.5,1,2,4)")
    parser.add_argument("--step-size", type=float, default=None, metavar="A",
                        help="solver step size a of a native odegpt model (default: config.step_size)"
                             + ("; adaptive depth's (early exit's, and routing's super step size)" if several else ""))
    parser.add_argument("--solver", default=None, metavar="METHOD",
                        help="solver method of a native odegpt model: euler or heun (default: config.solver)")


def add_adaptive(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """Adaptive depth per token (odegpt/decoding/adaptive.py); with ``several``, each takes a comma list and every
    value is a row of the report."""
    numbers, one = (real_list, "[,...]") if several else (float, "")
    group = parser.add_argument_group("adaptive depth", "per-token depth with the same weights (native models)"
                                      + ("; one report row per value" if several else ""))
    group.add_argument("--exit-entropy", type=numbers, default=None, metavar=f"H{one}",
                       help="early exit: a token stops integrating at --step-size once its read-out's entropy is "
                            "below H nats (0 never exits)")
    group.add_argument("--route-energy", type=numbers, default=None, metavar=f"E{one}",
                       help="energy routing: tokens solved at --swift-step-size whose energy -logsumexp(logits) "
                            "exceeds E are re-solved at --step-size")
    group.add_argument("--target-compute", type=numbers, default=None, metavar=f"F{one}",
                       help="energy routing at F x the --step-size solve's FLOPs per token, F in (0, 1]: the "
                            "threshold calibrated by `odegpt evaluate --target-compute F` and saved in the folder")
    group.add_argument("--exit", choices=["learned"], default=None,
                       help="early exit by the model's learned exit head: a token stops at the first check whose "
                            "score says its read-out is within reach of the end, at the threshold `odegpt calibrate` "
                            "chose for --exit-tolerance")
    group.add_argument("--route", choices=["learned"], default=None,
                       help="routing by the learned exit head: tokens solved at --swift-step-size whose final "
                            "state's score is above the calibrated threshold are re-solved at --step-size")
    group.add_argument("--exit-tolerance", type=numbers, default=[0.02] if several else 0.02, metavar=f"EPS{one}",
                       help="with --exit/--route learned: the calibrated fraction of greedy tokens the rule may "
                            "change (default: 0.02)")
    group.add_argument("--kv-fill", type=word_list if several else str, default=["copy"] if several else "copy",
                       metavar=f"FILL{one}",
                       help="keys/values at the steps a token skipped: lazy (continue its solve), copy (its nearest "
                            "computed state) or interpolate (in time between its states) (default: copy)")
    group.add_argument("--check-every", type=int, default=1, metavar="N",
                       help="early exit: read out every N steps (default: 1)")
    group.add_argument("--min-time", type=float, default=0.0, metavar="T",
                       help="early exit: no exit before this solver time (default: 0)")
    group.add_argument("--swift-step-size", type=float, default=DEFAULT_SWIFT_STEP_SIZE, metavar="B",
                       help=f"energy routing: the swift step size (default: {DEFAULT_SWIFT_STEP_SIZE:g})")


def add_speculative(parser: argparse.ArgumentParser) -> None:
    """Self-speculative decoding (odegpt/decoding/speculative.py)."""
    group = parser.add_argument_group("self-speculative decoding", "drafts from the same weights or from the text, "
                                      "verified at --step-size: greedy output is unchanged, sampling keeps its "
                                      "distribution")
    group.add_argument("--draft-step-size", type=float, default=None, metavar="B",
                       help="draft with the same weights at step size B (e.g. 4)")
    group.add_argument("--prompt-lookup", type=int, default=None, metavar="K",
                       help="draft up to K tokens copied from what followed the last n-gram's latest earlier "
                            "occurrence in the text (transformers' prompt_lookup_num_tokens); with --draft-step-size "
                            "too, each round drafts from the source whose recent acceptance per cost is best")
    group.add_argument("--draft-tokens", type=draft_length, default=None, metavar="K|auto",
                       help="tokens drafted per verification (default: auto: adapted every round to the running "
                            "acceptance and the measured costs of drafting and verifying, down to plain decoding "
                            "when no draft pays, so speculation is never much slower than plain decoding); K fixes "
                            "it")
    group.add_argument("--draft-confidence", type=float, default=None, metavar="P",
                       help="with --draft-step-size: stop a round's drafting after a draft whose own probability is "
                            "below P (output unchanged; default: off)")
    group.add_argument("--draft-stop", choices=["learned"], default=None,
                       help="with --draft-step-size: stop a round's drafting after a draft whose final state the "
                            "learned exit head scores above the routing threshold `odegpt calibrate` chose for the "
                            "draft step size at --exit-tolerance (output unchanged)")
    group.add_argument("--reuse-draft", action="store_true",
                       help="with --draft-step-size: verification continues from the draft's shared work (output "
                            "unchanged; it saves 6-14%% of verification's work but on a CPU at batch 1 was no faster, "
                            "docs/self-speculative.md)")


def add_compile(parser: argparse.ArgumentParser) -> None:
    """The compiled decode path (odegpt/decoding/compiled.py)."""
    parser.add_argument("--compile", action="store_true",
                        help="decode native models through static KV caches with a torch.compile'd step per token "
                             "(CUDA graphs on a GPU): the same tokens, after a one-time build (about a minute per "
                             "step size and batch on a CPU; needs a C++ compiler there)")


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: the cores the load average leaves idle, at least 1; "
                             "OMP_NUM_THREADS if set)")


def add_json(parser: argparse.ArgumentParser, what: str = "the results") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")
