"""The evaluation report: speed against quality per step size, as JSON, a Markdown table and a plot.

The document (``results.json``, also what ``odegpt evaluate --json`` prints) is built by the
evaluate command; this module only renders it. Its shape::

    {"model": str, "data": [str], "seq_len": int, "stride": int, "num_tokens": int, "dtype": str,
     "decode": {"batch_size": 1, "prompt_tokens": int, "new_tokens": int, "rounds": int} | null,
     "results": [{"step_size", "solver_steps", "flops_per_token", "nll", "num_tokens", "perplexity",
                  "decode_tokens_per_s", "decode_speedup"}, ...]}

one result per requested step size, in the order given; the two decode fields are null when speed
was not measured. With adaptive depth (``--exit-entropy``, ``--route-energy``, ``--target-compute``)
the document also holds ``"adaptive": [{"method", "label", "kv_fill", "executed_steps", "readouts",
"exit_scores", "kv_projections", "continued_steps", "schedule_flops_per_token", "flops_per_token", "nll",
"perplexity", ...}]`` (per-token means), tabled and plotted against the fixed step sizes' FLOPs.
"""
from __future__ import annotations

import json
from pathlib import Path

from odegpt.model.accounting import format_count

RESULTS_JSON, RESULTS_MD, PARETO_PNG = "results.json", "results.md", "pareto.png"


def markdown_table(document: dict) -> str:
    """One row per step size: solver steps, FLOPs/token, perplexity, decode tokens/s, speedup."""
    lines = ["| step size | solver steps | FLOPs/token | perplexity | decode tokens/s | speedup over a=1 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in document["results"]:
        speed, speedup = row["decode_tokens_per_s"], row["decode_speedup"]
        lines.append(
            f"| {row['step_size']:g} | {row['solver_steps']} | {format_count(row['flops_per_token'])} "
            f"| {row['perplexity']:.3f} | {'-' if speed is None else f'{speed:.1f}'} "
            f"| {'-' if speedup is None else f'{speedup:.2f}x'} |")
    return "\n".join(lines) + "\n"


def adaptive_table(document: dict) -> str:
    """One row per adaptive setting: mean executed steps, read-outs, exit-head checks and fills per token, FLOPs,
    perplexity (the checks cost few FLOPs but wall time: each is a few operators at every token that reaches it)."""
    reference = next((row for row in document["results"] if row["step_size"] == 1.0), None)
    lines = ["| method | kv fill | executed steps/token | read-outs/token | head checks/token "
             "| fill (kv proj. + lazy steps)/token | FLOPs/token (schedule) | FLOPs/token (with fill) | vs a=1 "
             "| perplexity |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in document.get("adaptive", []):
        ratio = "-" if reference is None else f"{row['flops_per_token'] / reference['flops_per_token']:.2f}"
        lines.append(
            f"| {row['label']} | {row['kv_fill']} | {row['executed_steps']:.2f} | {row['readouts']:.2f} "
            f"| {row.get('exit_scores', 0.0):.2f} | {row['kv_projections']:.2f} + {row['continued_steps']:.2f} "
            f"| {format_count(row['schedule_flops_per_token'])} | {format_count(row['flops_per_token'])} "
            f"| {ratio} | {row['perplexity']:.3f} |")
    return "\n".join(lines) + "\n"


def describe(document: dict) -> str:
    """The lines above the table: what was scored and how speed was measured."""
    solver = f", {document['solver']} solver" if document.get("solver", "euler") != "euler" else ""
    lines = [f"model `{document['model']}` ({document['dtype']}{solver}), data "
             f"{', '.join(f'`{d}`' for d in document['data'])}",
             f"{document['num_tokens']:,} scored tokens, windows of up to {document['seq_len']} tokens, "
             f"stride {document['stride']}; FLOPs/token are forward FLOPs at a {document['seq_len']}-token context"]
    decode = document.get("decode")
    if decode:
        lines.append(f"decode: batch {decode['batch_size']}, {decode['new_tokens']} greedy tokens after a "
                     f"{decode['prompt_tokens']}-token prompt, KV cache, "
                     f"median of {decode['rounds']} interleaved rounds")
    else:
        lines.append("decode speed not measured (--no-speed)")
    return "\n".join(lines) + "\n"


def plot_pareto(document: dict, path: str | Path) -> None:
    """Perplexity against decode speedup over a=1, one labelled point per step size (Agg backend)."""
    import matplotlib  # 0.6 s: only when a report is plotted; pyplot after the backend is chosen

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = document["results"]
    adaptive = document.get("adaptive", [])
    measured = not adaptive and all(row["decode_speedup"] is not None for row in rows)
    if measured:
        xs, xlabel = [row["decode_speedup"] for row in rows], "decode speedup over a=1 (measured, batch 1)"
    else:  # no timing (--no-speed): cost in FLOPs instead, and the label says so
        xs = [row["flops_per_token"] for row in rows]
        xlabel = "forward FLOPs/token" + ("" if adaptive else " (speed not measured)")
    ys = [row["perplexity"] for row in rows]
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    order = sorted(range(len(rows)), key=lambda i: xs[i])
    axes.plot([xs[i] for i in order], [ys[i] for i in order], "-", color="tab:blue", alpha=0.3)
    axes.plot(xs, ys, "o", color="tab:blue", markersize=7)
    for x, y, row in zip(xs, ys, rows):
        steps = row["solver_steps"]
        axes.annotate(f"a={row['step_size']:g} ({steps} step{'' if steps == 1 else 's'})", (x, y),
                      textcoords="offset points", xytext=(6, 6), fontsize=9)
    for method, marker, color in (("early exit", "s", "tab:orange"), ("energy routing", "^", "tab:green"),
                                  ("truncation", "x", "tab:gray"), ("learned exit", "D", "tab:red"),
                                  ("learned routing", "v", "tab:purple")):
        points = sorted((row["flops_per_token"], row["perplexity"]) for row in adaptive if row["method"] == method)
        if points:
            axes.plot(*zip(*points), marker=marker, color=color, linestyle="--", alpha=0.8, label=method)
    if adaptive:
        axes.legend(fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("perplexity (lower is better)")
    axes.set_title(f"{document['model']} ({document['dtype']}): one set of weights at each step size", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.margins(x=0.2, y=0.2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(document: dict, output_dir: str | Path) -> list[Path]:
    """Write results.json, results.md and pareto.png into ``output_dir`` (created); return the paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / RESULTS_JSON, output_dir / RESULTS_MD, output_dir / PARETO_PNG]
    paths[0].write_text(json.dumps(document, indent=2) + "\n")
    adaptive = f"\n## Adaptive depth per token\n\n{adaptive_table(document)}" if document.get("adaptive") else ""
    paths[1].write_text(f"# Speed and quality per step size\n\n{describe(document)}\n{markdown_table(document)}"
                        f"{adaptive}")
    plot_pareto(document, paths[2])
    return paths
