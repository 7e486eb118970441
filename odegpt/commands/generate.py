"""`odegpt generate`: text from a native odegpt folder or an unrolled Llama export, for people and for scripts.

The text goes to stdout (or one JSON object per prompt with ``--json``); the timing summary goes to
stderr, so ``odegpt generate ... > out.txt`` keeps only the text. Bad input (a step size that is not a
positive finite number or needs too many solver steps, an empty or too long prompt, a folder that is
not a model) is refused with one line before any work.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from odegpt.decoding.defaults import DEFAULT_DRAFT_TOKENS, DEFAULT_SWIFT_STEP_SIZE

from .cli import CommandError
from .threads import add_threads_argument, choose_threads, describe

DEFAULT_PROMPT = "def "
WEIGHT_FILES = ("*.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with the KV cache at a chosen step size",
        description="Generate from a model folder (native odegpt or unrolled Llama) that holds its tokenizer. "
                    "Text goes to stdout, the timing summary to stderr.",
    )
    parser.add_argument("--model", required=True, help="model folder (odegpt convert / export, with tokenizer files)")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", default=None,
                         help=f"text to continue; '-' reads it from stdin (default: {DEFAULT_PROMPT!r})")
    prompts.add_argument("--prompt-file", default=None,
                         help="one prompt per line ('-': stdin), generated in left-padded batches")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --prompt-file (default: 8)")
    parser.add_argument("--step-size", type=float, default=None,
                        help="solver step size a for a native odegpt model (default: config.step_size)")
    parser.add_argument("--solver", default=None, metavar="METHOD",
                        help="solver method for a native odegpt model: euler or heun (default: config.solver)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens; 0 = all (default: 50)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample from the smallest set of tokens with probability >= p (default: 1.0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every token")
    parser.add_argument("--draft-step-size", type=float, default=None, metavar="B",
                        help="self-speculative decoding: draft with the same weights at step size B (e.g. 4) and "
                             "verify at --step-size; greedy output is unchanged, sampling keeps its distribution")
    parser.add_argument("--prompt-lookup", type=int, default=None, metavar="K",
                        help="self-speculative decoding with drafts copied from the text itself: up to K tokens "
                             "that followed the last n-gram's latest earlier occurrence (transformers' "
                             "prompt_lookup_num_tokens); with --draft-step-size too, each round drafts from the "
                             "source whose recent acceptance per cost is best")
    parser.add_argument("--draft-tokens", type=_draft_tokens, default=None, metavar="K|auto",
                        help=f"tokens drafted per verification (default: {DEFAULT_DRAFT_TOKENS} with "
                             f"--draft-step-size, K of --prompt-lookup alone); 'auto' adapts the length to the "
                             f"running acceptance, down to plain decoding when no draft pays")
    parser.add_argument("--draft-confidence", type=float, default=None, metavar="P",
                        help="with --draft-step-size: stop a round's drafting after a draft whose own probability "
                             "is below P (saves drafts the target would reject; output unchanged; default: off)")
    parser.add_argument("--reuse-draft", action="store_true",
                        help="with --draft-step-size: verification continues from the draft's shared work (the "
                             "unshared layers before the first shared segment, the next step's first attention) "
                             "instead of recomputing it; output unchanged; it saves 6-14%% of verification's work "
                             "but on a CPU at batch 1 was no faster (docs/self-speculative.md), so it is off")
    adaptive = parser.add_argument_group("adaptive depth", "per-token depth with the same weights (native models)")
    adaptive.add_argument("--exit-entropy", type=float, default=None, metavar="H",
                          help="early exit: a token stops integrating at --step-size once its read-out's entropy "
                               "is below H nats")
    adaptive.add_argument("--route-energy", type=float, default=None, metavar="E",
                          help="energy routing: tokens solved at --swift-step-size whose energy exceeds E are "
                               "re-solved at --step-size")
    adaptive.add_argument("--target-compute", type=float, default=None, metavar="F",
                          help="energy routing with the threshold calibrated for F x the --step-size solve's FLOPs "
                               "(odegpt evaluate --target-compute F saves it in the model folder)")
    adaptive.add_argument("--kv-fill", default="copy", metavar="FILL",
                          help="keys/values at steps a token skipped: lazy, copy or interpolate (default: %(default)s)")
    adaptive.add_argument("--check-every", type=int, default=1, metavar="N",
                          help="early exit: read out every N steps (default: %(default)s)")
    adaptive.add_argument("--min-time", type=float, default=0.0,
                          help="early exit: no exit before this solver time (default: %(default)s)")
    adaptive.add_argument("--swift-step-size", type=float, default=DEFAULT_SWIFT_STEP_SIZE, metavar="B",
                          help="energy routing: the swift step size (default: %(default)s)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    output.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (prompt, completion, token counts, timing, settings)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time

    import torch
    from transformers import TextStreamer

    from odegpt.folders.model_folder import load_config, load_model, load_tokenizer

    _check_options(args)
    try:
        threads = describe(*choose_threads(args.threads))
    except ValueError as error:
        raise CommandError(str(error)) from None
    _check_model_folder(Path(args.model))
    config = load_config(args.model, solver=args.solver)
    native = config.model_type == "odegpt"
    if not native and (args.step_size is not None or args.draft_step_size is not None):
        option = "--step-size" if args.step_size is not None else "--draft-step-size"
        raise CommandError(f"{option} applies to native odegpt models; {args.model} is {config.model_type!r} "
                           f"(an unrolled export has its step size baked in)")
    step_size = _checked_step_size(config, "--step-size", args.step_size) if native else None
    if args.draft_step_size is not None:
        _checked_step_size(config, "--draft-step-size", args.draft_step_size)
    adaptive = _adaptive_settings(args, config, step_size) if native else None

    tokenizer = load_tokenizer(args.model, config.vocab_size)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = _read_prompts(args)
    prompt_ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    _check_prompt_lengths(prompts, prompt_ids, args.max_new_tokens, getattr(config, "max_position_embeddings", None))

    model = load_model(args.model, config)
    settings = dict(max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if args.temperature > 0:
        settings.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    else:
        settings.update(do_sample=False)
    if native:
        settings["step_size"] = step_size
    speculative_decoding = native and (args.draft_step_size is not None or args.prompt_lookup is not None)
    if args.prompt_lookup is not None and not native:  # a plain Llama: transformers' own prompt lookup
        settings["prompt_lookup_num_tokens"] = args.prompt_lookup
    if speculative_decoding:
        settings.update(draft_step_size=args.draft_step_size, draft_tokens=args.draft_tokens,
                        draft_confidence=args.draft_confidence, prompt_lookup_num_tokens=args.prompt_lookup,
                        reuse_draft=args.reuse_draft, return_dict_in_generate=True)
    if adaptive is not None:
        settings.update(adaptive=adaptive, return_dict_in_generate=True)

    torch.manual_seed(args.seed)
    batch_size = 1 if args.stream else args.batch_size
    total_tokens, total_seconds, drafted, accepted, by_source = 0, 0.0, 0, 0, {}
    executed_steps, counted_tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        batch = list(range(start, min(start + batch_size, len(prompts))))
        inputs = tokenizer.pad({"input_ids": [prompt_ids[i] for i in batch]}, return_tensors="pt")
        streamer = TextStreamer(tokenizer, skip_special_tokens=True) if args.stream else None
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    streamer=streamer, **settings)
        seconds = time.perf_counter() - began
        sequences = output.sequences if speculative_decoding or adaptive is not None else output
        if adaptive is not None and output.counted_tokens:
            executed_steps += output.executed_steps_per_token * output.counted_tokens
            counted_tokens += output.counted_tokens
        if speculative_decoding:
            drafted, accepted = drafted + output.drafted_tokens, accepted + output.accepted_tokens
            for source, counts in output.sources.items():
                totals = by_source.setdefault(source, dict.fromkeys(counts, 0))
                for key, value in counts.items():
                    totals[key] += value
        width = inputs["input_ids"].shape[1]
        results = [_result(tokenizer, prompt_ids[i], sequences[row, width:].tolist()) for row, i in enumerate(batch)]
        batch_tokens = sum(r["completion_tokens"] for r in results)
        total_tokens, total_seconds = total_tokens + batch_tokens, total_seconds + seconds
        for i, result in zip(batch, results):
            text = result.pop("text")
            if args.json:
                record = dict(prompt=prompts[i], **result, seconds=round(seconds, 4),
                              tokens_per_second=round(batch_tokens / seconds, 2), batch_size=len(batch),
                              step_size=step_size, draft_step_size=args.draft_step_size,
                              draft_tokens=(args.draft_tokens or DEFAULT_DRAFT_TOKENS) if args.draft_step_size is not None
                              else args.draft_tokens, prompt_lookup=args.prompt_lookup,
                              draft_confidence=args.draft_confidence,
                              acceptance_rate=_rate(output) if speculative_decoding else None,
                              draft_sources=output.sources if speculative_decoding else None,
                              **(_adaptive_record(adaptive, output) if adaptive is not None else {}),
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              model=args.model)
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif not args.stream:  # the streamer has printed it already
                print(text, flush=True)

    where = f"step size {step_size:g}" if native else config.model_type
    cache = "no cache" if args.no_cache else "KV cache"
    speculative = ""
    if speculative_decoding:
        rate = f"{accepted / drafted:.0%}" if drafted else "n/a"
        length = args.draft_tokens or (DEFAULT_DRAFT_TOKENS if args.draft_step_size is not None else args.prompt_lookup)
        length = "an adaptive number" if length == "auto" else length
        upto = "" if args.draft_confidence is None else f"up to {length} (none after one below p={args.draft_confidence:g})"
        origins = " and ".join(([f"at step size {args.draft_step_size:g}"] if args.draft_step_size is not None else [])
                             + ([f"by prompt lookup (up to {args.prompt_lookup})"] if args.prompt_lookup is not None
                                else []))
        split = ""
        if len(by_source) > 2 or "none" in by_source and by_source["none"]["rounds"]:
            split = " (" + ", ".join(f"{name.replace('_', ' ')}: {c['rounds']} rounds" + (
                f", {c['accepted']}/{c['drafted']} kept" if c["drafted"] else "") for name, c in by_source.items()
                if c["rounds"]) + ")"
        speculative = (f", self-speculative: drafts {origins}, {upto or length} per verification, {rate} "
                       f"accepted{split}")
    if adaptive is not None:
        method = (f"exit at entropy < {adaptive.exit_entropy:g}" if not adaptive.routing else
                  f"route energy > {adaptive.route_energy:.4g} from step size {adaptive.swift_step_size:g}")
        mean = f"{executed_steps / counted_tokens:.2f}" if counted_tokens else "n/a"
        speculative = (f", adaptive depth: {method}, {adaptive.kv_fill} fill, {mean} solver steps/token "
                       f"(fixed: {config.solver_steps(step_size)})")
    for_prompts = f" for {len(prompts)} prompts" if len(prompts) > 1 else ""
    print(f"-- {total_tokens} tokens{for_prompts} in {total_seconds:.2f}s "
          f"({total_tokens / total_seconds:.1f} tokens/s, {where}, {cache}{speculative}; {threads})", file=sys.stderr)
    return 0


def _check_options(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not 0 <= args.seed < 2**63:  # torch's seeds are 64-bit
        raise CommandError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CommandError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature:g}")
    if args.top_k < 0:
        raise CommandError(f"--top-k must be >= 0 (0 = no top-k filter), got {args.top_k}")
    if not 0 < args.top_p <= 1:  # false for nan too
        raise CommandError(f"--top-p must be in (0, 1], got {args.top_p:g}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    if isinstance(args.draft_tokens, int) and args.draft_tokens < 1:
        raise CommandError(f"--draft-tokens must be at least 1 (or 'auto'), got {args.draft_tokens}")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise CommandError(f"--prompt-lookup must be at least 1, got {args.prompt_lookup}")
    if args.prompt_lookup is not None and args.no_cache:
        raise CommandError("--prompt-lookup needs the KV cache; drop --no-cache")
    if args.draft_confidence is not None and not 0 <= args.draft_confidence <= 1:  # false for nan too
        raise CommandError(f"--draft-confidence must be a probability in [0, 1], got {args.draft_confidence:g}")
    if args.draft_confidence is not None and args.draft_step_size is None:
        raise CommandError("--draft-confidence applies to self-speculative decoding: give --draft-step-size too")
    if args.draft_step_size is not None and args.no_cache:
        raise CommandError("--draft-step-size needs the KV cache; drop --no-cache")


def _adaptive_settings(args: argparse.Namespace, config, step_size: float):
    """The adaptive-depth settings the flags ask for (None without them), checked before any work."""
    from odegpt.decoding.adaptive import AdaptiveDepth
    from odegpt.evaluation.calibration import check_target_compute, load_calibration

    chosen = [flag for flag, value in (("--exit-entropy", args.exit_entropy), ("--route-energy", args.route_energy),
                                       ("--target-compute", args.target_compute)) if value is not None]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise CommandError(f"{' and '.join(chosen)} are alternatives: give one")
    if args.draft_step_size is not None or args.prompt_lookup is not None:
        option = "--draft-step-size" if args.draft_step_size is not None else "--prompt-lookup"
        raise CommandError(f"{chosen[0]} and {option} are separate decoders: give one")
    if args.no_cache:
        raise CommandError(f"{chosen[0]} decodes with its own KV cache; drop --no-cache")
    names = {"exit_entropy": "--exit-entropy", "route_energy": "--route-energy", "kv_fill": "--kv-fill",
             "swift_step_size": "--swift-step-size", "step_size": "--step-size", "check_every": "--check-every",
             "min_time": "--min-time"}
    settings = AdaptiveDepth(exit_entropy=args.exit_entropy, kv_fill=args.kv_fill, step_size=step_size,
                             swift_step_size=args.swift_step_size, check_every=args.check_every,
                             min_time=args.min_time,
                             route_energy=0.0 if args.target_compute is not None else args.route_energy)
    try:
        settings = settings.checked(config, names)
        if args.target_compute is not None:
            target = check_target_compute(args.target_compute, "--target-compute")
            record = load_calibration(args.model, target, settings)
            if record is None:
                raise CommandError(f"--target-compute {target:g}: {args.model} holds no calibration for it at step "
                                   f"size {step_size:g} with swift step size {settings.swift_step_size:g}; run "
                                   f"`odegpt evaluate --model {args.model} --data VALIDATION --target-compute "
                                   f"{target:g}` first, or give --route-energy")
            settings = AdaptiveDepth(**{**settings.__dict__, "route_energy": record["route_energy"]})
    except ValueError as error:
        raise CommandError(str(error)) from None
    return settings


def _adaptive_record(settings, output) -> dict:
    return dict(exit_entropy=settings.exit_entropy, route_energy=settings.route_energy, kv_fill=settings.kv_fill,
                executed_steps_per_token=output.executed_steps_per_token)


def _check_model_folder(folder: Path) -> None:
    """A model folder holds config.json with a model_type, weights and a tokenizer; say what is missing."""
    import json

    if not folder.is_dir():
        raise CommandError(f"{folder} is not a folder")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    has_weights = any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES)
    if not model_type or not has_weights:
        missing = "config.json with a model_type" if not model_type else "weights (*.safetensors)"
        hint = ""
        if (folder / "model" / "config.json").is_file():
            hint = f"; did you mean {folder / 'model'}?"
        elif (folder / "checkpoints").is_dir():
            hint = (f"; it looks like a training run: write its model with "
                    f"`odegpt convert --checkpoint {folder / 'checkpoints'} --output {folder / 'model'}`")
        raise CommandError(f"{folder} is not a model folder (no {missing}){hint}")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise CommandError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model): copy the tokenizer "
                           f"files of the corpus it was trained on into it")


def _checked_step_size(config, option: str, step_size: float | None) -> float:
    """The step size, refused before any work if it is not a finite real > 0 or needs too many solver steps."""
    from odegpt.model.configuration_odegpt import check_step_size

    try:
        step_size = config.step_size if step_size is None else check_step_size(step_size, option)
        config.solver_steps(step_size)
    except ValueError as error:  # includes SolveTooLongError
        raise CommandError(f"{option}: {error}" if not str(error).startswith(option) else str(error)) from None
    return step_size


def _utf8(raw: bytes, option: str) -> str:
    """``raw`` (stdin's bytes) as UTF-8 text, or a one-line error naming ``option`` and the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CommandError(f"{option}: stdin is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                           f"{error.start})") from None


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file is not None:
        source = "stdin" if args.prompt_file == "-" else args.prompt_file
        try:
            text = _utf8(sys.stdin.buffer.read(), "--prompt-file -") if args.prompt_file == "-" else \
                Path(args.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise CommandError(f"cannot read --prompt-file {source}: {error}") from None
        prompts = text.splitlines()
        if not prompts:
            raise CommandError(f"--prompt-file {source} holds no prompts")
        for number, prompt in enumerate(prompts, start=1):
            if not prompt:
                raise CommandError(f"--prompt-file {source}: line {number} is empty (one prompt per line)")
        return prompts
    if args.prompt == "-":
        prompt = _utf8(sys.stdin.buffer.read(), "--prompt -").removesuffix("\n")
        if not prompt:
            raise CommandError("--prompt -: stdin gave an empty prompt")
        return [prompt]
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    if not prompt:
        raise CommandError("--prompt is empty: give some text to continue")
    return [prompt]


def _check_prompt_lengths(prompts: list[str], prompt_ids: list[list[int]], max_new_tokens: int,
                          context: int | None) -> None:
    for prompt, ids in zip(prompts, prompt_ids):
        if not ids:
            raise CommandError(f"prompt {prompt!r} encodes to no tokens")
    if context is None:
        return
    longest = max(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    length, which = len(prompt_ids[longest]), "" if len(prompts) == 1 else f" (prompt {longest + 1})"
    if length >= context:
        raise CommandError(f"the prompt{which} is {length} tokens, the model's context is {context} "
                           f"(max_position_embeddings): shorten it")
    if length + max_new_tokens > context:
        raise CommandError(f"the prompt{which} is {length} tokens and --max-new-tokens {max_new_tokens} would end at "
                           f"position {length + max_new_tokens}, beyond the model's context of {context} "
                           f"(max_position_embeddings); use --max-new-tokens {context - length} or less")


def _result(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> dict:
    """Completion text and counts of one row; generation ends at the first end-of-sequence token."""
    finish_reason = "length"
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new_ids:
        new_ids, finish_reason = new_ids[: new_ids.index(tokenizer.eos_token_id) + 1], "eos"
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    text = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    completion = text[len(prompt_text):] if text.startswith(prompt_text) else \
        tokenizer.decode(new_ids, skip_special_tokens=True)
    return dict(completion=completion, text=text, prompt_tokens=len(prompt_ids), completion_tokens=len(new_ids),
                finish_reason=finish_reason)


def _draft_tokens(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto', got {text!r}") from None


def _rate(output) -> float | None:
    return round(output.accepted_tokens / output.drafted_tokens, 4) if output.drafted_tokens else None
