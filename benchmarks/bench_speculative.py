"""Self-speculative decoding against plain decoding and transformers' own speculative modes, on trained models.

    python benchmarks/bench_speculative.py --model runs/quickstart/export/native [MORE_MODELS ...]
                                           [--new-tokens 96] [--rounds 3]

Every model decodes prompts from two corpora: Python code (what the quickstart models train on) and English
prose from this repository's docs/ (text they did not train on). Beside the grid below, at a = 1 it times
odegpt's prompt lookup (``prompt_lookup_num_tokens``), step-size drafts with an adaptive length
(``draft_tokens="auto"``), both combined, and, on the same weights unrolled to a plain ``LlamaForCausalLM``,
transformers' plain ``generate``, its prompt-lookup decoding and its assisted generation with the a = 4
unrolled export as the assistant. Each model's summary gives the best odegpt mode over plain ``generate``
and over transformers' prompt lookup; the last line is the geometric mean over models.

For every target step size a, draft step size B, draft length k and draft confidence threshold p
(``--draft-confidence``: a round stops drafting after a draft less likely than p) it reports the share of drafted
tokens accepted and the decode tokens/s, beside plain decoding (transformers' ``generate``) at a = 1
and at a itself, and beside a bare decoding loop (the model's forward and KV cache, no ``generate``
machinery), which shows how much of a speedup is the leaner loop rather than the drafts. All
variants run interleaved, round after round, in this one process; each reports the median of its
rounds (the machine is shared and noisy, so only ratios measured side by side mean anything). Every
speculative output is checked token for token against plain greedy decoding at a.

It also prints what one round costs, in units of a one-token forward at a = 1 (at the context decoding sees
on average: a prompt and half the new tokens): a draft forward at each B, and the verification forward at a
over k + 1 tokens. Speculation pays when
k * draft + verify is well under the tokens a round keeps, 1 + (accepted drafts). From the same costs it
prints each (a, B, k)'s ceiling: the tokens/s if every draft were accepted, (k + 1) tokens per
k * draft + verify forwards, against plain generate at a = 1. Where that ceiling is under a target, no
draft model of this cost can reach it on this machine, however well it agrees with the target.

Each row also runs with ``reuse_draft=True`` (verification continues from the draft's work: the steps both
solves share and the next step's first attention branch are taken from the draft, not recomputed): "reuse:
speed" is its tokens/s over the row's, "reused/round" what it took from the draft per round (token-steps: block
evaluations plus first attention branches) and that share of verification's work; the JSON's
``ceiling_with_reuse_vs_generate_a1`` takes that share off verification's forward.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch

from odegpt.decoding.speculative import _Solve  # the decoder's own solve: what its rounds cost
from odegpt.evaluation.throughput import Variant as Timed
from odegpt.evaluation.throughput import time_generation
from odegpt.folders.export import unroll_to_llama
from odegpt.folders.model_folder import load_model, load_tokenizer
from odegpt.model.accounting import format_count

PROMPTS = [
    "def ",
    "import os\nimport sys\n\n\ndef main(argv):\n    ",
    "class Parser:\n    def __init__(self, ",
    "    for index, item in enumerate(",
    "if __name__ == '__main__':\n    ",
]


def attention_flops_share(config) -> float:
    """The attention branch's share of one block evaluation's matmul FLOPs per token (projections only): what a
    reused first attention branch saves of that evaluation."""
    attention = config.hidden_size * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    return attention / (attention + 3 * config.hidden_size * config.intermediate_size)


def plain_loop(model, prompt: torch.Tensor, new_tokens: int, step_size: float) -> torch.Tensor:
    """Greedy decoding with the model's forward and cache only (the loop `odegpt bench` times): the least a
    decoding loop can cost. Prompt and ``new_tokens`` tokens, as ``generate`` returns them."""
    timed = time_generation(Timed(model, {"step_size": step_size}), prompt, new_tokens - 1)
    return torch.cat([prompt, timed.tokens], dim=1)


def forward_costs(model, prompt: torch.Tensor, cases: list[tuple[float, int]], rounds: int = 9) -> dict:
    """Median seconds of one cached forward over ``q`` new tokens at step size ``a``, for each (a, q), through the
    calls self-speculative decoding makes (its solve at one step size; not the model's ``forward``, whose
    wrapper would count a cost the decoder does not pay)."""
    solves = {}
    for a, q in cases:
        solves[a, q] = _Solve(model, a)
        solves[a, q].logits(prompt, None, keep=1)
    seconds = {case: [] for case in cases}
    for _ in range(rounds):
        for a, q in cases:  # interleaved
            tokens = prompt[:, -q:]
            start = time.perf_counter()
            for _ in range(20):
                solves[a, q].logits(tokens, None)
                solves[a, q].crop(prompt.shape[1])
            seconds[a, q].append((time.perf_counter() - start) / 20)
    return {case: statistics.median(s) for case, s in seconds.items()}


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_confidences(text: str) -> list[float | None]:
    """'off,0.3' -> [None, 0.3]: draft confidence thresholds, 'off' for none."""
    return [None if x.strip() == "off" else float(x) for x in text.split(",") if x.strip()]


def speculative_name(a: float, b: float, k: int, confidence: float | None) -> str:
    return f"speculative a={a:g} B={b:g} k={k}" + ("" if confidence is None else f" p={confidence:g}")


def prose_prompts(count: int = 5, characters: int = 160) -> list[str]:
    """The openings of ``count`` paragraphs of this repository's docs/: English text a code model did not train on."""
    paragraphs = []
    for path in sorted((Path(__file__).resolve().parent.parent / "docs").glob("*.md")):
        paragraphs += [p.strip() for p in path.read_text().split("\n\n")
                       if len(p.strip()) > characters and p.strip()[0].isalpha()]
    step = max(1, len(paragraphs) // count)
    return [p[:characters] for p in paragraphs[::step][:count]]


def bench_model(path: str, args: argparse.Namespace) -> dict:
    tokenizer = load_tokenizer(path)
    model = load_model(path).float().eval()
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS + prose_prompts()]
    settings = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                    pad_token_id=tokenizer.pad_token_id)
    targets = sorted(set([1.0, *args.step_sizes]))

    def run_generate(a, **extra):
        return [model.generate(p, step_size=a, **settings, **extra) for p in prompts]

    variants = {f"generate a={a:g}": lambda a=a: run_generate(a) for a in targets}
    variants |= {f"bare loop a={a:g}": lambda a=a: [plain_loop(model, p, args.new_tokens, a) for p in prompts]
                 for a in targets}
    combos = list(itertools.product(args.step_sizes, args.draft_step_sizes, args.draft_tokens, args.draft_confidence))
    for a, b, k, p in combos:
        for reuse in (False, True):  # verification recomputing everything (the default), or continuing from the
            variants[speculative_name(a, b, k, p) + (" reuse" if reuse else "")] = (  # draft's shared work
                lambda a=a, b=b, k=k, p=p, reuse=reuse: run_generate(
                    a, draft_step_size=b, draft_tokens=k, draft_confidence=p, reuse_draft=reuse,
                    return_dict_in_generate=True))
    # At a = 1: odegpt's other draft sources, and transformers' own modes on the unrolled Llama.
    b, lookup = max(args.draft_step_sizes), args.lookup_tokens
    modes = {f"odegpt lookup K={lookup}": dict(prompt_lookup_num_tokens=lookup),
             f"odegpt steps B={b:g} auto": dict(draft_step_size=b, draft_tokens="auto"),
             f"odegpt lookup K={lookup} + steps B={b:g} auto": dict(prompt_lookup_num_tokens=lookup, draft_step_size=b,
                                                                     draft_tokens="auto")}
    for name, extra in modes.items():
        variants[name] = lambda extra=extra: run_generate(1.0, return_dict_in_generate=True, **extra)
    llama, assistant = unroll_to_llama(model, 1.0).eval(), unroll_to_llama(model, 4.0).eval()

    def run_llama(**extra):
        return [llama.generate(p, attention_mask=torch.ones_like(p), **settings, **extra) for p in prompts]

    variants["transformers generate (unrolled a=1)"] = run_llama
    variants[f"transformers prompt lookup K={lookup}"] = lambda: run_llama(prompt_lookup_num_tokens=lookup)
    variants["transformers assisted (a=4 assistant)"] = lambda: run_llama(assistant_model=assistant)

    print(f"\n{path}: {format_count(sum(p.numel() for p in model.parameters()))} parameters, segments "
          f"{model.config.segments}; {len(prompts)} prompts x {args.new_tokens} new tokens, greedy, batch 1, "
          f"{args.rounds} interleaved rounds, {args.threads} thread(s); torch {torch.__version__}", flush=True)
    seconds = {name: [] for name in variants}
    outputs: dict[str, list] = {}
    with torch.inference_mode():
        for name, run in variants.items():  # warm-up, and the outputs to check
            outputs[name] = run()
        for round_ in range(args.rounds):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
            print(f"  round {round_ + 1}/{args.rounds} done", flush=True)
        cases = [(1.0, 1)] + [(b, 1) for b in args.draft_step_sizes] + [(a, k + 1) for a in args.step_sizes
                                                                         for k in args.draft_tokens]
        # At the context decoding sees on average: a prompt and half the new tokens.
        context = round(statistics.mean(p.shape[1] for p in prompts)) + args.new_tokens // 2
        cost = forward_costs(model, torch.cat(prompts, dim=1)[:, :context], list(dict.fromkeys(cases)))
    tokens = len(prompts) * args.new_tokens
    rate = {name: tokens / statistics.median(s) for name, s in seconds.items()}

    unit = cost[1.0, 1]
    print(f"\none forward, relative to one token at a=1 ({unit * 1e3:.2f} ms): "
          + ", ".join(f"{'draft' if q == 1 and (a, q) != (1.0, 1) else 'verify' if q > 1 else 'target'} "
                      f"a={a:g} x {q} token{'s' if q > 1 else ''}: {c / unit:.2f}" for (a, q), c in cost.items()))

    print(f"\n{'baseline':<22}{'tokens/s':>10}")
    for a in targets:
        for kind in ("generate", "bare loop"):
            print(f"{f'{kind} a={a:g}':<22}{rate[f'{kind} a={a:g}']:>10.1f}")
        plain = outputs[f"generate a={a:g}"]
        assert all(torch.equal(x, y) for x, y in zip(plain, outputs[f"bare loop a={a:g}"])), f"bare loop a={a:g}"
    print(f"\n{'a':>4}{'B':>5}{'k':>4}{'p':>5}{'accepted':>10}{'tokens/s':>10}{'vs generate a':>15}"
          f"{'vs generate a=1':>17}{'vs bare loop a':>16}{'ceiling vs a=1':>16}{'reuse: speed':>13}"
          f"{'reused/round':>14}  greedy text")
    rows = []
    for a, b, k, p in combos:
        name = speculative_name(a, b, k, p)
        results, reusing = outputs[name], outputs[f"{name} reuse"]
        accepted = sum(r.accepted_tokens for r in results) / sum(r.drafted_tokens for r in results)
        identical = all(torch.equal(r.sequences, p) for r, p in zip(results, outputs[f"generate a={a:g}"]))
        identical &= all(torch.equal(r.sequences, p.sequences) for r, p in zip(reusing, results))
        # What reuse takes from the draft: the share of verification's block evaluations (first attention branches
        # counted as the attention part of an evaluation), which the ceiling with reuse takes off its forward.
        attention_share = attention_flops_share(model.config)
        verified = sum(r.target_forwards for r in reusing) * (k + 1) * model.plan(a).num_slots
        saved = sum(r.reused_evaluations + attention_share * r.reused_attention for r in reusing) / verified
        all_accepted_rate = (k + 1) / (k * cost[b, 1] + cost[a, k + 1])  # tokens/s, every draft kept
        per_round = sum(r.reused_evaluations + r.reused_attention for r in reusing) / sum(r.target_forwards
                                                                                        for r in reusing)
        row = dict(a=a, B=b, k=k, draft_confidence=p, acceptance_rate=accepted, tokens_per_s=rate[name],
                   speedup_vs_generate_a=rate[name] / rate[f"generate a={a:g}"],
                   speedup_vs_generate_a1=rate[name] / rate["generate a=1"],
                   speedup_vs_bare_loop_a=rate[name] / rate[f"bare loop a={a:g}"],
                   ceiling_vs_generate_a1=all_accepted_rate / rate["generate a=1"],
                   ceiling_with_reuse_vs_generate_a1=(k + 1) / (k * cost[b, 1] + cost[a, k + 1] * (1 - saved))
                   / rate["generate a=1"],
                   reuse_speedup=rate[f"{name} reuse"] / rate[name], verification_work_reused=saved,
                   reused_per_round=dict(evaluations=sum(r.reused_evaluations for r in reusing) / sum(
                       r.target_forwards for r in reusing), attention_branches=sum(
                       r.reused_attention for r in reusing) / sum(r.target_forwards for r in reusing)),
                   identical=identical)
        rows.append(row)
        print(f"{a:>4g}{b:>5g}{k:>4}{'off' if p is None else f'{p:g}':>5}{accepted:>10.0%}{rate[name]:>10.1f}"
              f"{row['speedup_vs_generate_a']:>14.2f}x{row['speedup_vs_generate_a1']:>16.2f}x{row['speedup_vs_bare_loop_a']:>15.2f}x"
              f"{row['ceiling_vs_generate_a1']:>15.2f}x{row['reuse_speedup']:>12.2f}x"
              f"{f'{per_round:.1f} ({saved:.0%})':>14}  {'identical' if identical else 'DIFFERENT'}")
    print(f"\n{'at a = 1, same prompts':<46}{'tokens/s':>10}{'vs generate a=1':>17}{'vs transformers lookup':>24}"
          f"  greedy text")
    plain1, tf_lookup = rate["generate a=1"], rate[f"transformers prompt lookup K={lookup}"]
    modes_rows = []
    for name in [*modes, "transformers generate (unrolled a=1)", f"transformers prompt lookup K={lookup}",
                 "transformers assisted (a=4 assistant)"]:
        sequences = [o.sequences if hasattr(o, "sequences") else o for o in outputs[name]]
        identical = all(torch.equal(x, y) for x, y in zip(sequences, outputs["generate a=1"]))
        modes_rows.append(dict(mode=name, tokens_per_s=rate[name], speedup_vs_generate_a1=rate[name] / plain1,
                               speedup_vs_transformers_lookup=rate[name] / tf_lookup, identical=identical))
        print(f"{name:<46}{rate[name]:>10.1f}{rate[name] / plain1:>16.2f}x{rate[name] / tf_lookup:>23.2f}x  "
              f"{'identical' if identical else 'DIFFERENT'}")
    ours = [r for r in modes_rows if r["mode"].startswith("odegpt")] + [
        dict(mode=f"self-speculative a=1 B={r['B']:g} k={r['k']}", speedup_vs_generate_a1=r["speedup_vs_generate_a1"],
             speedup_vs_transformers_lookup=r["tokens_per_s"] / tf_lookup) for r in rows if r["a"] == 1.0]
    best = max(ours, key=lambda r: r["speedup_vs_generate_a1"])
    print(f"best odegpt mode: {best['mode']}: {best['speedup_vs_generate_a1']:.2f}x over generate a=1, "
          f"{best['speedup_vs_transformers_lookup']:.2f}x over transformers' prompt lookup")
    return dict(model=path, baselines={n: rate[n] for n in rate if "speculative" not in n}, speculative=rows,
                modes=modes_rows, best=best,
                forward_cost_vs_one_token_a1={f"a={a:g} q={q}": c / unit for (a, q), c in cost.items()},
                new_tokens=args.new_tokens, rounds=args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, help="native odegpt model folder(s) with a tokenizer")
    parser.add_argument("--new-tokens", type=int, default=96, help="tokens generated per prompt (end-of-text ignored)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step-sizes", type=parse_floats, default=[1.0, 2.0], help="target a (default: 1,2)")
    parser.add_argument("--draft-step-sizes", type=parse_floats, default=[2.0, 4.0], help="draft B (default: 2,4)")
    parser.add_argument("--draft-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 6],
                        help="k (default: 2,4,6)")
    parser.add_argument("--draft-confidence", type=parse_confidences, default=[None],
                        help="draft confidence thresholds P, 'off' for none (default: off), e.g. off,0.3,0.5")
    parser.add_argument("--lookup-tokens", type=int, default=4, help="K of the prompt-lookup modes (default: 4)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [bench_model(path, args) for path in args.model]
    if results:
        def geometric_mean(values):
            return math.exp(sum(math.log(v) for v in values) / len(values))

        print(f"\ngeometric mean over {len(results)} model(s) of each model's best odegpt mode: "
              f"{geometric_mean([r['best']['speedup_vs_generate_a1'] for r in results]):.2f}x over generate a=1, "
              f"{geometric_mean([r['best']['speedup_vs_transformers_lookup'] for r in results]):.2f}x over "
              f"transformers' prompt lookup")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if not all(row["identical"] for result in results for row in result["speculative"] + result["modes"]):
        raise SystemExit("self-speculative greedy output differs from plain greedy decoding")


if __name__ == "__main__":
    main()
