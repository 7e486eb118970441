"""Adaptive depth against fixed step sizes, by one command: perplexity vs executed steps and FLOPs per token.

For each model folder: the fixed step sizes (the reference curve: a = D/k for every step count k),
entropy early exit at several thresholds (read-out every step, and every 2 steps), and energy routing calibrated to
several compute targets on the first half of the validation split and scored on the second half (held out).
Each method is also scored on a second corpus (raw text, default: odegpt's own Python sources).
A second non-adaptive baseline is the truncated solve: every token stops the a=1 solve at the same
time t and reads out there (a shallower model; early exit without the per-token choice).
At equal FLOPs a method is compared with the best fixed step size that costs no more FLOPs per token,
with the best fixed step size or truncated solve of the same model, and (when several models are
given) with the best fixed step size of any of them. Decode time per token of each KV
fill is measured in one process, interleaved rounds, batch 1. The headroom sections
(benchmarks/adaptive_headroom.py) say how far any per-token rule could go on the model, and why.

    python benchmarks/adaptive_report.py --models runs/g-model runs/c-model --data runs/data \\
        --output runs/adaptive-report

writes results.json, results.md and adaptive.png into --output. CPU-friendly defaults.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from odegpt.decoding.adaptive import AdaptiveCache, AdaptiveDepth, adaptive_forward, adaptive_generate
from odegpt.evaluation.calibration import calibrate_energy
from odegpt.evaluation.data import EvaluationData, prepared_batches, raw_text_batches, raw_text_sources
from odegpt.evaluation.model_report import load_for_evaluation
from odegpt.evaluation.perplexity import COUNTED, adaptive_nll_sums, nll_sums, perplexity
from odegpt.folders.model_folder import load_config
from odegpt.model.accounting import adaptive_flops_per_token, format_count, model_cost

sys.path.insert(0, str(Path(__file__).parent))
import adaptive_headroom  # noqa: E402  (a sibling script module)

EXIT_ENTROPIES = (1.0, 2.0, 3.0, 4.0, 5.0)
TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)
FILL_TARGET = 0.7  # the routing point at which the three KV fills are compared
FILL_ENTROPY = 3.0  # the early-exit point at which the three KV fills are compared


def fixed_step_sizes(config) -> list[float]:
    """a = D / k for every step count k of the deepest shared segment (depth D), and a = 0.5: the whole
    curve a fixed step size can trace on this model, every step count once."""
    depth = max((s["depth"] for s in config.segments if s["shared"]), default=1)
    return sorted({0.5, *(depth / k for k in range(1, depth + 1))})


def fixed_rows(model, config, batches, seq_len) -> list[dict]:
    fixed = fixed_step_sizes(config)
    sums = nll_sums(model, batches, fixed)
    return [dict(method="fixed", label=f"a={a:.3g}", kv_fill="-", executed_steps=float(config.solver_steps(a)),
                 flops_per_token=model_cost(config, a, seq_len=seq_len).flops_per_token,
                 schedule_flops_per_token=model_cost(config, a, seq_len=seq_len).flops_per_token,
                 perplexity=perplexity(*sums[a])) for a in fixed]


def truncated_rows(model, config, batches, seq_len) -> list[dict]:
    """The a=1 solve cut at every step boundary t before its end, every token read out at t: what early
    exit would score if all tokens exited together. No later token executes a step after t, so no key
    or value past t is ever needed: it costs t steps and one read-out, as a depth-t model would."""
    rows = []
    for t in range(1, config.solver_steps(1.0)):
        # no entropy check (check_every past the end): the one read-out is the forced one at max_time
        settings = AdaptiveDepth(exit_entropy=0.0, step_size=1.0, check_every=1_000_000, max_time=float(t))
        score = adaptive_nll_sums(model, batches, settings)
        steps = score.per_token("executed_steps")
        flops = adaptive_flops_per_token(config, steps, score.per_token("readouts"), seq_len=seq_len)
        rows.append(dict(method="truncated solve (a=1, read-out at t)", label=f"t={t}", kv_fill="-",
                         executed_steps=steps, flops_per_token=flops, schedule_flops_per_token=flops,
                         perplexity=perplexity(score.nll_sum, score.num_tokens)))
    return rows


def adaptive_row(model, config, batches, settings: AdaptiveDepth, seq_len: int, method: str, label: str) -> dict:
    score = adaptive_nll_sums(model, batches, settings)
    per = {name: score.per_token(name) for name in COUNTED}
    return dict(method=method, label=label, kv_fill=settings.kv_fill, **per,
                schedule_flops_per_token=adaptive_flops_per_token(config, per["executed_steps"], per["readouts"],
                                                                  seq_len=seq_len),
                flops_per_token=adaptive_flops_per_token(config, **per, seq_len=seq_len),
                perplexity=perplexity(score.nll_sum, score.num_tokens))


BASELINES = ("fixed", "truncated solve (a=1, read-out at t)")


def fixed_at(rows: list[dict], flops: float, methods: tuple[str, ...] = ("fixed",)) -> float | None:
    """The best perplexity a fixed step size (or another of the non-adaptive ``methods``) reaches within
    ``flops`` per token (None if none is that cheap). On a depth-D model every step size costs one of D
    step counts, so nothing fixed lies between them."""
    affordable = [r["perplexity"] for r in rows
                  if r["method"] in methods and r["flops_per_token"] <= flops * (1 + 1e-9)]
    return min(affordable, default=None)


def gain(perplexity_: float, baseline: float | None) -> float | None:
    return None if baseline is None else 1 - perplexity_ / baseline


def compare_across_models(reports: list[dict]) -> None:
    """Give every row the best fixed perplexity of *any* of the reported models within its FLOPs (the
    models must share the vocabulary and width, so that FLOPs compare), per corpus."""
    for corpus in reports[0]["corpora"]:
        pooled = [r for report in reports for r in report["corpora"].get(corpus, [])]
        for report in reports:
            for row in report["corpora"].get(corpus, []):
                best = fixed_at(pooled, row["flops_per_token"])
                row["any_model_fixed_perplexity_at_equal_flops"] = best
                row["gain_vs_any_model_fixed"] = gain(row["perplexity"], best)


def decode_times(model, config, settings_by_name: dict, rounds: int, new_tokens: int) -> dict:
    """Median seconds per generated token (batch 1, greedy, 32-token prompt), interleaved rounds, and the
    KV cache entries per token (solver steps cached, summed over the cache's solves)."""
    prompt = torch.randint(4, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in settings_by_name}
    kv_steps = {}
    for _ in range(rounds):
        for name, settings in settings_by_name.items():
            began = time.perf_counter()
            if settings is None:
                model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, step_size=1.0)
            else:
                adaptive_generate(model, prompt, settings=settings, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)
            times[name].append((time.perf_counter() - began) / new_tokens)
    for name, settings in settings_by_name.items():
        if settings is not None:
            cache = AdaptiveCache()
            adaptive_forward(model, prompt, settings, past_key_values=cache)
            kv_steps[name] = sum(len(c.layers) for c in cache.solves.values())
        else:
            kv_steps[name] = config.solver_steps(1.0)
    return {name: dict(seconds_per_token=statistics.median(t), kv_steps_per_token=kv_steps[name])
            for name, t in times.items()}


def evaluate_model(path: str, args) -> dict:
    config = load_config(path, expect="odegpt")
    model = load_for_evaluation(path, config, "float32")
    seq_len = args.seq_len
    cut = EvaluationData(seq_len=seq_len, batch_size=args.batch_size)
    valid = prepared_batches([args.data], path, cut)
    samples = torch.cat(valid)[: 2 * args.num_samples]
    calibration = list(samples[: len(samples) // 2].split(args.batch_size))
    held_out = list(samples[len(samples) // 2:].split(args.batch_size))
    corpora = {"stdlib validation (held out)": held_out}
    if args.second_data:
        second = raw_text_batches(raw_text_sources(args.second_data, path), path, cut)
        corpora[f"second corpus: {' '.join(args.second_data)}"] = second[: len(held_out)]

    exit_every = AdaptiveDepth(exit_entropy=0.0, kv_fill="copy")
    exit_mid = replace(exit_every, check_every=2)  # read-outs at t=2, 4, ... and the end
    routing = AdaptiveDepth(route_energy=0.0, kv_fill="copy")
    # A target below the swift solve's own cost (a partially shared model's unshared layers run at every a)
    # cannot be met: those rows are left out, and said so.
    swift_cost = (model_cost(config, routing.swift_step_size, seq_len=seq_len).flops_per_token
                  / model_cost(config, 1.0, seq_len=seq_len).flops_per_token)
    targets = [target for target in TARGETS if target > swift_cost]
    if len(targets) < len(TARGETS):
        print(f"{path}: routing targets below the swift solve's cost ({swift_cost:.3f} of a=1) left out: "
              f"{', '.join(f'{t:g}' for t in TARGETS if t not in targets)}")
    thresholds = {target: calibrate_energy(model, calibration, routing, target, seq_len)["route_energy"]
                  for target in targets}

    report = {"model": path, "seq_len": seq_len, "corpora": {},
              "homogeneity": adaptive_headroom.step_size_homogeneity(model, config, held_out, fixed_step_sizes(config)),
              "exit_headroom": adaptive_headroom.exit_headroom(model, config, calibration, held_out),
              "routing_headroom": adaptive_headroom.routing_headroom(model, config, calibration, held_out, seq_len)}
    for corpus, batches in corpora.items():
        rows = fixed_rows(model, config, batches, seq_len) + truncated_rows(model, config, batches, seq_len)
        jobs = []
        for h in EXIT_ENTROPIES:
            jobs.append((replace(exit_every, exit_entropy=h), "early exit (read-out every step)", f"H<{h:g}"))
            jobs.append((replace(exit_mid, exit_entropy=h), "early exit (read-out every 2 steps)", f"H<{h:g}"))
        for target, threshold in thresholds.items():
            jobs.append((replace(routing, route_energy=threshold), "energy routing a=4 -> a=1", f"F={target:g}"))
        for fill in ("lazy", "interpolate"):
            jobs.append((replace(routing, route_energy=thresholds.get(FILL_TARGET, float("inf")), kv_fill=fill),
                         "energy routing a=4 -> a=1", f"F={FILL_TARGET:g}"))
            jobs.append((replace(exit_mid, exit_entropy=FILL_ENTROPY, kv_fill=fill),
                         "early exit (read-out every 2 steps)", f"H<{FILL_ENTROPY:g}"))
        for settings, method, label in tqdm(jobs, desc=f"{Path(path).name}: {corpus}", unit="setting"):
            rows.append(adaptive_row(model, config, batches, settings, seq_len, method, label))
        reference = next(r for r in rows if r["label"] == "a=1")
        for row in rows:
            row["flops_vs_a1"] = row["flops_per_token"] / reference["flops_per_token"]
            fixed = fixed_at(rows, row["flops_per_token"])
            row["fixed_perplexity_at_equal_flops"] = fixed
            row["gain_vs_fixed_at_equal_flops"] = gain(row["perplexity"], fixed)
            fixed_or_cut = fixed_at(rows, row["flops_per_token"], BASELINES)
            row["fixed_or_truncated_perplexity_at_equal_flops"] = fixed_or_cut
            row["gain_vs_fixed_or_truncated"] = gain(row["perplexity"], fixed_or_cut)
        report["corpora"][corpus] = rows

    never = AdaptiveDepth(exit_entropy=0.0, check_every=1000)  # no read-out before the end: the fixed solve
    report["decode"] = decode_times(model, config, {
        "fixed a=1 (generate)": None,
        "fixed a=1 (the adaptive loop, no read-outs)": never,
        "fixed a=4 (the adaptive loop, no read-outs)": replace(never, step_size=4.0),
        f"routing F={FILL_TARGET:g}, copy": replace(routing, route_energy=thresholds.get(FILL_TARGET, float("inf"))),
        f"routing F={FILL_TARGET:g}, interpolate": replace(routing,
                                                           route_energy=thresholds.get(FILL_TARGET, float("inf")),
                                                           kv_fill="interpolate"),
        f"routing F={FILL_TARGET:g}, lazy": replace(routing, route_energy=thresholds.get(FILL_TARGET, float("inf")),
                                                    kv_fill="lazy"),
        f"exit H<{FILL_ENTROPY:g} every 2 steps, copy": replace(exit_mid, exit_entropy=FILL_ENTROPY),
        f"exit H<{FILL_ENTROPY:g} every 2 steps, interpolate": replace(exit_mid, exit_entropy=FILL_ENTROPY,
                                                                kv_fill="interpolate"),
        f"exit H<{FILL_ENTROPY:g} every 2 steps, lazy": replace(exit_mid, exit_entropy=FILL_ENTROPY, kv_fill="lazy"),
    }, args.rounds, args.decode_tokens)
    return report


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(reports: list[dict]) -> str:
    lines = ["# Adaptive depth per token vs fixed step sizes", "",
             "Gains are 1 - perplexity / baseline, the baseline being the best perplexity that costs no more FLOPs "
             "per token: a fixed step size of the same model; a fixed step size or truncated solve of the same "
             "model; a fixed step size of any model in this report.", ""]
    many = len(reports) > 1
    for report in reports:
        for corpus, rows in report["corpora"].items():
            lines += [f"## `{report['model']}` on {corpus} (windows of {report['seq_len']} tokens)", "",
                      "| method | setting | kv fill | executed steps/token | FLOPs/token | vs a=1 | perplexity "
                      "| best fixed a within its FLOPs | gain | best fixed or truncated | gain"
                      + (" | best fixed, any model | gain |" if many else " |"),
                      "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
                      + (" ---: | ---: |" if many else "")]
            for row in rows:
                line = (f"| {row['method']} | {row['label']} | {row['kv_fill']} | {row['executed_steps']:.2f} "
                        f"| {format_count(row['flops_per_token'])} | {row['flops_vs_a1']:.2f} "
                        f"| {row['perplexity']:.3f} | {_number(row['fixed_perplexity_at_equal_flops'], '.3f')} "
                        f"| {_number(row['gain_vs_fixed_at_equal_flops'], '+.1%')} "
                        f"| {_number(row['fixed_or_truncated_perplexity_at_equal_flops'], '.3f')} "
                        f"| {_number(row['gain_vs_fixed_or_truncated'], '+.1%')} |")
                if many:
                    line += (f" {_number(row.get('any_model_fixed_perplexity_at_equal_flops'), '.3f')} "
                             f"| {_number(row.get('gain_vs_any_model_fixed'), '+.1%')} |")
                lines.append(line)
            lines.append("")
        lines += adaptive_headroom.markdown(report)
        lines += [f"### Decode time per token, `{report['model']}` (batch 1, median of interleaved rounds)", "",
                  "| decoder | ms/token | KV cache (solver steps cached per token) |", "| --- | ---: | ---: |"]
        for name, measured in report["decode"].items():
            lines.append(f"| {name} | {1000 * measured['seconds_per_token']:.2f} | {measured['kv_steps_per_token']} |")
        lines.append("")
    lines += summary(reports)
    return "\n".join(lines)


def summary(reports: list[dict]) -> list[str]:
    """The best gain of each adaptive method over its settings and KV fills, against each baseline."""
    columns = ("gain_vs_fixed_at_equal_flops", "gain_vs_fixed_or_truncated", "gain_vs_any_model_fixed")
    lines = ["## Summary: best gain of each method over its settings (per column)", "",
             "| model | corpus | method | vs fixed a, same model | vs fixed a or truncated, same model "
             "| vs fixed a, any model |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for report in reports:
        for corpus, rows in report["corpora"].items():
            for method in dict.fromkeys(r["method"] for r in rows if r["method"] not in BASELINES):
                best = [max((r[c] for r in rows if r["method"] == method and r.get(c) is not None), default=None)
                        for c in columns]
                lines.append(f"| `{report['model']}` | {corpus} | {method} | "
                             + " | ".join(_number(b, "+.1%") for b in best) + " |")
    return lines + [""]


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(report, corpus, rows) for report in reports for corpus, rows in report["corpora"].items()]
    figure, axes = plt.subplots(len(panels), 2, figsize=(12, 4.2 * len(panels)), dpi=110, squeeze=False)
    styles = {"fixed": ("o-", "tab:blue"), "early exit (read-out every step)": ("s--", "tab:orange"),
              "early exit (read-out every 2 steps)": ("D--", "tab:red"),
              "energy routing a=4 -> a=1": ("^--", "tab:green"),
              "truncated solve (a=1, read-out at t)": ("v:", "tab:purple")}
    for (report, corpus, rows), row_axes in zip(panels, axes):
        for ax, key, xlabel in zip(row_axes, ("executed_steps", "flops_vs_a1"),
                                   ("executed solver steps per token", "forward FLOPs per token / a=1's (read-outs "
                                                                       "and KV fills included)")):
            for method, (style, color) in styles.items():
                points = sorted((r[key], r["perplexity"]) for r in rows if r["method"] == method
                                and r["kv_fill"] in ("-", "copy"))
                if points:
                    ax.plot(*zip(*points), style, color=color, label=method, markersize=5)
            for row in rows:
                if row["kv_fill"] in ("lazy", "interpolate"):
                    ax.plot(row[key], row["perplexity"], "x", color="black", markersize=6)
                    ax.annotate(row["kv_fill"], (row[key], row["perplexity"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("perplexity")
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{Path(report['model']).name}: {corpus}", fontsize=9)
        row_axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="native odegpt model folders")
    parser.add_argument("--data", required=True, help="prepared corpus: its validation split, halved")
    parser.add_argument("--second-data", nargs="*", default=["odegpt/*.py"], help="raw text: the second corpus")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=64, help="validation samples per half (default: 64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    reports = [evaluate_model(path, args) for path in args.models]
    compare_across_models(reports)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(reports, indent=2) + "\n")
    (output / "results.md").write_text(markdown(reports))
    plot(reports, output / "adaptive.png")
    print(markdown(reports))
    print(f"wrote {output / 'results.json'}, {output / 'results.md'}, {output / 'adaptive.png'}")


if __name__ == "__main__":
    main()
