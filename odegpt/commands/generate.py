"""`odegpt generate`: text from a native odegpt folder or an unrolled Llama export, for people and for scripts.

The text goes to stdout (or one JSON object per prompt with ``--json``); the timing summary goes to
stderr, so ``odegpt generate ... > out.txt`` keeps only the text. Bad input (a step size that is not a
positive finite number or needs too many solver steps, an empty or too long prompt, a folder that is
not a model) is refused with one line before any weight is read: the decoders check their settings
against the folder's config alone (``odegpt.decoding.generate.choose_decoder``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

from . import options
from .prompts import check_prompt_lengths, read_prompts

DEFAULT_PROMPT = "def "
# generate()'s keywords as this command's flags, for the library's messages.
FLAGS = {"step_size": "--step-size", "draft_step_size": "--draft-step-size", "draft_tokens": "--draft-tokens",
         "draft_confidence": "--draft-confidence", "prompt_lookup_num_tokens": "--prompt-lookup",
         "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
         "use_cache=False": "--no-cache", "exit_entropy": "--exit-entropy", "route_energy": "--route-energy",
         "kv_fill": "--kv-fill", "swift_step_size": "--swift-step-size", "check_every": "--check-every",
         "min_time": "--min-time", "exit_learned": "--exit learned", "route_learned": "--route learned",
         "draft_stop_score": "--draft-stop learned", "compile": "--compile", "reuse_draft": "--reuse-draft",
         "cache_implementation='static'": "--compile"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate text with the KV cache at a chosen step size",
        description="Generate from a model folder (native odegpt or unrolled Llama) that holds its tokenizer. "
                    "Text goes to stdout, the timing summary to stderr.")
    options.add_model(parser, "model folder (odegpt convert / import / export, with tokenizer files)")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", default=None,
                         help=f"text to continue; '-' reads it from stdin (default: {DEFAULT_PROMPT!r})")
    prompts.add_argument("--prompt-file", default=None,
                         help="one prompt per line ('-': stdin), generated in left-padded batches")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --prompt-file (default: 8)")
    options.add_step_size(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample from the k likeliest tokens; 0 = all (default: 50)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample from the smallest set of tokens with probability >= p (default: 1.0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    options.add_threads(parser)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix at every token")
    options.add_compile(parser)
    options.add_speculative(parser)
    options.add_adaptive(parser)
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    output.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (prompt, completion, token counts, timing, settings)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch & co.: not for odegpt --help
    import torch

    from odegpt.folders.model_folder import check_model_folder, load_config, load_model, load_tokenizer

    from .threads import choose_threads, describe

    threads = describe(*choose_threads(args.threads))
    check_model_folder(args.model)
    config = load_config(args.model, solver=args.solver)
    settings = generation_settings(args, config)  # every decoder setting checked against the config
    tokenizer = load_tokenizer(args.model, config.vocab_size, padding_side="left")
    prompts = read_prompts(args.prompt, args.prompt_file, DEFAULT_PROMPT)
    prompt_ids = [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]
    check_prompt_lengths(prompts, prompt_ids, args.max_new_tokens, getattr(config, "max_position_embeddings", None))
    model = load_model(args.model, config)
    torch.manual_seed(args.seed)
    tally = Tally()
    batch_size = 1 if args.stream else args.batch_size
    for start in range(0, len(prompts), batch_size):
        batch = list(range(start, min(start + batch_size, len(prompts))))
        results, seconds = generate_batch(model, tokenizer, [prompt_ids[i] for i in batch], settings, args.stream,
                                          tally)
        for i, result in zip(batch, results):
            if args.json:
                record = dict(prompt=prompts[i], **result, seconds=round(seconds, 4),
                              **tally.batch_record(results, seconds, len(batch)), **tally.settings_record(args))
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif not args.stream:  # the streamer has printed it already
                print(result["text"], flush=True)
    print(tally.summary(args, config, len(prompts), threads), file=sys.stderr)
    return 0


def generation_settings(args: argparse.Namespace, config) -> dict:
    """generate()'s keywords for these flags, checked against the model's config alone (a ValueError naming the
    flag); calibrated thresholds (``--target-compute``, ``--exit learned``, ``--route learned``) are read from the
    folder."""
    # torch & co.: not for odegpt --help
    from odegpt.decoding.generate import ADAPTIVE, SPECULATIVE, check_sampling, choose_decoder

    if not 0 <= args.seed < 2**63:  # torch's seeds are 64-bit
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    native = config.model_type == "odegpt"
    if not native and (args.step_size is not None or args.draft_step_size is not None):
        option = "--step-size" if args.step_size is not None else "--draft-step-size"
        raise ValueError(f"{option} applies to native odegpt models; {args.model} is {config.model_type!r} (an "
                         f"unrolled export has its step size baked in)")
    check_sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens, names=FLAGS)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
        if args.temperature != 0 else dict(do_sample=False)
    settings = dict(max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache, **sampling)
    if not native:  # a plain Llama: transformers' own decoding (and prompt lookup)
        if args.compile:
            raise ValueError(f"--compile applies to native odegpt models; {args.model} is {config.model_type!r}")
        return {**settings, **({} if args.prompt_lookup is None else {"prompt_lookup_num_tokens": args.prompt_lookup})}
    step_size = config.step_size if args.step_size is None else args.step_size
    stop = None
    if args.draft_stop == "learned":
        # torch & co.: not for odegpt --help
        from odegpt.evaluation.exit_calibration import calibrated_threshold

        if args.draft_step_size is None:
            raise ValueError("--draft-stop learned stops step-size drafts: give --draft-step-size too")
        stop = calibrated_threshold(args.model, "route", args.exit_tolerance, args.draft_step_size)
    decoder, chosen = choose_decoder(
        config, names=FLAGS, step_size=step_size, draft_step_size=args.draft_step_size, draft_tokens=args.draft_tokens,
        draft_confidence=args.draft_confidence, prompt_lookup_num_tokens=args.prompt_lookup,
        adaptive=adaptive_settings(args, config, step_size), draft_stop_score=stop, compile=args.compile,
        reuse_draft=args.reuse_draft, **settings)
    compiled = {"compile": True} if args.compile else {}
    if decoder == ADAPTIVE:
        return dict(settings, step_size=step_size, adaptive=chosen, return_dict_in_generate=True)
    if decoder == SPECULATIVE:
        return dict(settings, step_size=step_size, reuse_draft=args.reuse_draft, **chosen, return_dict_in_generate=True,
                    **({} if stop is None else {"draft_stop_score": stop}), **compiled)
    return dict(settings, step_size=step_size, **compiled)


def adaptive_settings(args: argparse.Namespace, config, step_size: float):
    """The adaptive-depth settings the flags ask for (None without any), with the thresholds the folder's
    calibrations hold for ``--target-compute``, ``--exit learned`` and ``--route learned``."""
    # torch & co.: not for odegpt --help
    from odegpt.decoding.adaptive import AdaptiveDepth
    from odegpt.evaluation.calibration import calibrated_route_energy
    from odegpt.evaluation.exit_calibration import calibrated_exit, calibrated_threshold

    rules = {"--exit-entropy": args.exit_entropy, "--route-energy": args.route_energy,
             "--target-compute": args.target_compute, "--exit learned": args.exit, "--route learned": args.route}
    chosen = [flag for flag, value in rules.items() if value is not None]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} are alternatives: give one")
    if not chosen:
        return None
    base = AdaptiveDepth(kv_fill=args.kv_fill, step_size=step_size, swift_step_size=args.swift_step_size,
                         check_every=args.check_every, min_time=args.min_time)
    if chosen == ["--exit-entropy"]:
        return replace(base, exit_entropy=args.exit_entropy)
    if chosen == ["--route-energy"]:
        return replace(base, route_energy=args.route_energy)
    if chosen == ["--target-compute"]:
        return calibrated_route_energy(args.model, args.target_compute,
                                       replace(base, route_energy=0.0).checked(config, FLAGS))
    if chosen == ["--exit learned"]:
        return calibrated_exit(args.model, args.exit_tolerance, base)
    return replace(base, route_learned=calibrated_threshold(args.model, "route", args.exit_tolerance,
                                                            args.swift_step_size))


def generate_batch(model, tokenizer, prompt_ids: list[list[int]], settings: dict, stream: bool, tally: Tally
                   ) -> tuple[list[dict], float]:
    """One left-padded batch through ``model.generate``: a result per prompt (text, completion, counts), the
    seconds it took; ``tally`` adds what the decoder reported."""
    # torch & co.: not for odegpt --help
    import torch
    from transformers import TextStreamer

    inputs = tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if stream else None
    settings = dict(settings, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    began = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                streamer=streamer, **settings)
    seconds = time.perf_counter() - began
    sequences = output.sequences if settings.get("return_dict_in_generate") else output
    width = inputs["input_ids"].shape[1]
    results = [completion(tokenizer, ids, sequences[row, width:].tolist()) for row, ids in enumerate(prompt_ids)]
    tally.add(output, settings, sum(r["completion_tokens"] for r in results), seconds)
    return results, seconds


def completion(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> dict:
    """Completion text and counts of one row; generation ends at the first end-of-sequence token."""
    finish_reason = "length"
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new_ids:
        new_ids, finish_reason = new_ids[: new_ids.index(tokenizer.eos_token_id) + 1], "eos"
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    text = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    completion_text = text[len(prompt_text):] if text.startswith(prompt_text) else \
        tokenizer.decode(new_ids, skip_special_tokens=True)
    return dict(completion=completion_text, text=text, prompt_tokens=len(prompt_ids), completion_tokens=len(new_ids),
                finish_reason=finish_reason)


class Tally:
    """What the batches generated, for the per-prompt JSON records and the summary line."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.drafted, self.accepted = 0, 0.0, 0, 0
        self.by_source: dict[str, dict[str, int]] = {}
        self.executed_steps, self.counted_tokens = 0.0, 0
        self.last = None  # the last batch's decoder output
        self.settings: dict = {}

    def add(self, output, settings: dict, tokens: int, seconds: float) -> None:
        self.last, self.settings = output, settings
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        if "adaptive" in settings and output.counted_tokens:
            self.executed_steps += output.executed_steps_per_token * output.counted_tokens
            self.counted_tokens += output.counted_tokens
        if "draft_tokens" in settings:
            self.drafted, self.accepted = self.drafted + output.drafted_tokens, self.accepted + output.accepted_tokens
            for source, counts in output.sources.items():
                totals = self.by_source.setdefault(source, dict.fromkeys(counts, 0))
                for key, value in counts.items():
                    totals[key] += value

    def batch_record(self, results: list[dict], seconds: float, batch_size: int) -> dict:
        tokens = sum(r["completion_tokens"] for r in results)
        return dict(tokens_per_second=round(tokens / seconds, 2), batch_size=batch_size)

    def settings_record(self, args: argparse.Namespace) -> dict:
        output, settings, adaptive = self.last, self.settings, self.settings.get("adaptive")
        speculative = "draft_tokens" in settings
        record = dict(step_size=settings.get("step_size"), draft_step_size=args.draft_step_size,
                      draft_tokens=settings.get("draft_tokens", args.draft_tokens), prompt_lookup=args.prompt_lookup,
                      draft_confidence=args.draft_confidence,
                      acceptance_rate=(round(output.accepted_tokens / output.drafted_tokens, 4)
                                       if output.drafted_tokens else None) if speculative else None,
                      draft_sources=output.sources if speculative else None)
        if adaptive is not None:
            record.update(exit_entropy=adaptive.exit_entropy, route_energy=adaptive.route_energy,
                          exit_learned=adaptive.exit_learned, route_learned=adaptive.route_learned,
                          kv_fill=adaptive.kv_fill, executed_steps_per_token=output.executed_steps_per_token)
        return dict(record, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    model=args.model)

    def summary(self, args: argparse.Namespace, config, prompts: int, threads: str) -> str:
        step_size = self.settings.get("step_size")
        where = f"step size {step_size:g}" if step_size is not None else config.model_type
        cache = "no cache" if args.no_cache else "KV cache"
        for_prompts = f" for {prompts} prompts" if prompts > 1 else ""
        return (f"-- {self.tokens} tokens{for_prompts} in {self.seconds:.2f}s ({self.tokens / self.seconds:.1f} "
                f"tokens/s, {where}, {cache}{self._decoder(args, config)}; {threads})")

    def _decoder(self, args: argparse.Namespace, config) -> str:
        adaptive = self.settings.get("adaptive")
        if adaptive is not None:
            method = _rule(adaptive, args.exit_tolerance)
            mean = f"{self.executed_steps / self.counted_tokens:.2f}" if self.counted_tokens else "n/a"
            return (f", adaptive depth: {method}, {adaptive.kv_fill} fill, {mean} solver steps/token "
                    f"(fixed: {config.solver_steps(adaptive.step_size)})")
        if "draft_tokens" not in self.settings:
            return ""
        rate = f"{self.accepted / self.drafted:.0%}" if self.drafted else "n/a"
        length = self.settings["draft_tokens"]
        length = "an adaptive number" if length == "auto" else length
        upto = "" if args.draft_confidence is None else \
            f"up to {length} (none after one below p={args.draft_confidence:g})"
        origins = " and ".join(([f"at step size {args.draft_step_size:g}"] if args.draft_step_size is not None else [])
                               + ([f"by prompt lookup (up to {args.prompt_lookup})"] if args.prompt_lookup is not None
                                  else []))
        split = ""
        if len(self.by_source) > 2 or "none" in self.by_source and self.by_source["none"]["rounds"]:
            split = " (" + ", ".join(f"{name.replace('_', ' ')}: {c['rounds']} rounds" + (
                f", {c['accepted']}/{c['drafted']} kept" if c["drafted"] else "") for name, c in self.by_source.items()
                if c["rounds"]) + ")"
        return f", self-speculative: drafts {origins}, {upto or length} per verification, {rate} accepted{split}"



def _rule(adaptive, tolerance: float) -> str:
    """The adaptive rule of a summary line, in words."""
    swift = f" from step size {adaptive.swift_step_size:g}"
    if adaptive.rule == "exit_entropy":
        return f"exit at entropy < {adaptive.exit_entropy:g}"
    if adaptive.rule == "exit_learned":
        from odegpt.evaluation.exit_calibration import describe_check_times

        checks = "" if adaptive.check_times is None else f", checks at {describe_check_times(adaptive.check_times)}"
        return f"learned exit (tolerance {tolerance:g}, score < {adaptive.exit_learned:.3g}{checks})"
    if adaptive.rule == "route_energy":
        return f"route energy > {adaptive.route_energy:.4g}{swift}"
    return f"learned routing (tolerance {tolerance:g}, score > {adaptive.route_learned:.3g}){swift}"
