"""The learned exit on a model: its Pareto curve against truncation, entropy exit and energy routing, and its
decode speed at a stated tolerance of changed greedy tokens (issue 28).

    python benchmarks/learned_exit.py --model DIR --calibration TEXT... --data HELD_OUT... --output-dir OUT

1. ``odegpt calibrate`` fits the model's exit head (a copy of the folder, in OUT/model) on the calibration text and
   calibrates exit and routing thresholds for each ``--tolerances`` value on a held-out part of it;
2. ``odegpt evaluate`` scores the held-out ``--data`` with every rule: the fixed step sizes, the truncated solve at
   every step time, entropy exit at a range of thresholds, energy routing at a range of compute targets, and the
   learned exit and routing at each tolerance (perplexity against mean executed steps and FLOPs);
3. the learned rule's perplexity against the truncated solve's at the same mean executed steps (interpolated);
4. decoding: tokens/s with the learned exit (and its decoding loop with no check), the learned routing, and every
   token at ``--decode-step-sizes``, against plain decoding on the same prompts (interleaved rounds, median), and
   the fraction of greedy tokens each changed.

Writes OUT/learned_exit.json, OUT/learned_exit.md and the evaluation report (OUT/report: results.md, pareto.png).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def odegpt(*argv: str) -> str:
    command = [sys.executable, "-m", "odegpt", *argv]
    print("$ odegpt " + " ".join(argv), flush=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    sys.stderr.write(result.stderr[-2000:] if result.returncode else "")
    if result.returncode:
        raise SystemExit(f"learned_exit: failed ({result.returncode}): odegpt {' '.join(argv)}")
    return result.stdout


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """The piecewise-linear curve through ``points`` (x, y) at ``x`` (None outside it)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def decode_comparison(model_dir: Path, prompts: list[str], tolerance: float, new_tokens: int, rounds: int,
                      threads: int, fixed_step_sizes: tuple[float, ...] = ()) -> dict:
    """Greedy decoding of ``prompts`` with the learned exit (lazy and copy fills), the learned routing (copy and
    interpolate fills) and self-speculation at the swift step size with and without the head's draft stop (where
    routing is calibrated), every token at each of ``fixed_step_sizes``, and plain, interleaved rounds
    in this process: tokens/s (median) of each, and its changed tokens counted as the calibration bounds them: the
    positions of the exit's own output where the plain solve, given the same prefix, would have chosen another token
    (a teacher-forced forward of the plain model over prompt + output). Counting every position after the first
    difference instead (the texts diverge there) is reported too, as ``identical_prefix``."""
    from dataclasses import replace

    import torch

    from odegpt.decoding.adaptive import AdaptiveDepth
    from odegpt.decoding.defaults import DEFAULT_SWIFT_STEP_SIZE
    from odegpt.evaluation.exit_calibration import calibrated_exit, calibrated_threshold
    from odegpt.folders.model_folder import load_model, load_tokenizer

    torch.set_num_threads(threads)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    lazy = calibrated_exit(model_dir, tolerance, AdaptiveDepth(kv_fill="lazy"))
    threshold = lazy.exit_learned
    settings = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id or 0)
    ids = [torch.tensor([tokenizer(prompt)["input_ids"]]) for prompt in prompts]
    # The exit's own loop with no check at all: what the exits save is measured against it as well as against plain.
    variants = {"plain": {}, "exit, lazy fill": {"adaptive": lazy},
                "exit, copy fill": {"adaptive": replace(lazy, kv_fill="copy")},
                "exit's loop, no check": {"adaptive": replace(lazy, kv_fill="copy", check_times=())}}
    swift = DEFAULT_SWIFT_STEP_SIZE
    try:  # routing swift -> the model's step size by the head, where the folder holds its calibration
        route = calibrated_threshold(model_dir, "route", tolerance, swift)
    except ValueError:
        route = None
    if route is not None:
        for fill in ("copy", "interpolate"):
            variants[f"route {swift:g} -> {model.config.step_size:g}, {fill} fill"] = {"adaptive": AdaptiveDepth(
                route_learned=route, swift_step_size=swift, kv_fill=fill)}
        # self-speculation with drafts at the swift step size, without and with the head ending a round's drafting
        # (both give plain decoding's tokens: the head can only make it faster or slower)
        variants[f"drafts a={swift:g}"] = {"draft_step_size": swift}
        variants[f"drafts a={swift:g}, learned draft stop"] = {"draft_step_size": swift, "draft_stop_score": route}
    for step_size in fixed_step_sizes:  # the other baseline: every token at a larger fixed step size
        variants[f"fixed a={step_size:g}"] = {"step_size": step_size}
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, extra in variants.items():
                start, tokens = time.perf_counter(), []
                for prompt in ids:
                    tokens.append(model.generate(prompt, **settings, **extra)[0, prompt.shape[1]:])
                times[name].append(time.perf_counter() - start)
                outputs[name] = tokens
        result = dict(tolerance=tolerance, threshold=threshold, first_check_time=lazy.min_time,
                      check_times=None if lazy.check_times is None else list(lazy.check_times), prompts=len(prompts),
                      new_tokens=new_tokens,
                      rounds=rounds, threads=threads, variants={})
        plain_speed = sum(len(t) for t in outputs["plain"]) / statistics.median(times["plain"])
        for name in variants:
            generated = sum(len(t) for t in outputs[name])
            changed = 0
            for prompt, output in zip(ids, outputs[name]):
                logits = model(torch.cat([prompt[0], output])[None]).logits[0]
                choices = logits[prompt.shape[1] - 1:-1].argmax(-1)  # the plain solve's token at each position
                changed += int((choices != output).sum())
            same = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    for a, b in zip(outputs["plain"], outputs[name])]
            speed = generated / statistics.median(times[name])
            result["variants"][name] = dict(tokens_per_s=speed, speedup=speed / plain_speed,
                                            changed_tokens=changed / generated,
                                            identical_prefix=sum(same) / sum(len(t) for t in outputs["plain"]))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/learned_exit.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="native odegpt model folder (copied, never changed)")
    parser.add_argument("--calibration", nargs="+", required=True, help="text to fit and calibrate the head on")
    parser.add_argument("--data", nargs="+", required=True, help="held-out text to score")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--tolerances", default="0.02,0.05,0.1", help="changed-token tolerances (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=None, help="prepared corpora: validation samples")
    parser.add_argument("--entropies", default="0.5,1,2,3,4", help="entropy-exit thresholds (default: %(default)s)")
    parser.add_argument("--targets", default="0.3,0.5,0.7", help="energy-routing compute targets")
    parser.add_argument("--truncate", default=None,
                        help="solver times of the truncation baseline (default: every step of the a=1 solve)")
    parser.add_argument("--prompts", default=None, help="a file of prompts (one per line) for the decode comparison")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-step-sizes", default="2",
                        help="fixed step sizes decoded beside the learned rules, a baseline (default: %(default)s; "
                             "'' for none)")
    args = parser.parse_args(argv)
    if not args.prompts and not Path(args.data[0]).is_file():
        parser.error(f"--prompts FILE is needed: the decode prompts default to lines of --data's first file, and "
                     f"{args.data[0]} is not a file")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "exit_calibration.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(args.model, model)
        odegpt("calibrate", "--model", str(model), "--data", *args.calibration, "--tolerance", args.tolerances,
               "--seq-len", str(args.seq_len), "--threads", str(args.threads))
    depth = json.loads((model / "config.json").read_text())
    depth = sum(segment["depth"] for segment in depth["segments"])
    report = out / "report" / "results.json"
    if not report.is_file():
        prepared = [c for c in args.calibration if (Path(c) / "manifest.json").is_file()]
        routing = ["--target-compute", args.targets, "--calibration-data", *prepared] if prepared else []
        truncate = args.truncate or ",".join(str(t) for t in range(1, depth))
        odegpt("evaluate", "--model", str(model), "--data", *args.data, "--seq-len", str(args.seq_len),
               "--step-sizes", "1,2,4", "--no-speed", "--truncate", truncate,
               "--exit-entropy", args.entropies, *routing, "--exit", "learned", "--route", "learned",
               "--exit-tolerance", args.tolerances, "--kv-fill", "lazy", "--output", str(out / "report"),
               "--threads", str(args.threads), *(["--num-samples", str(args.num_samples)] if args.num_samples else []))
    document = json.loads(report.read_text())
    # The truncation curve ends at the full solve (a = 1); fixed step sizes are the other baseline at fewer steps.
    full = next(r for r in document["results"] if r["step_size"] == 1.0)
    truncation = [(r["executed_steps"], r["perplexity"]) for r in document["adaptive"] if r["method"] == "truncation"]
    truncation.append((full["solver_steps"], full["perplexity"]))
    fixed = [dict(method="fixed", label=f"fixed a={r['step_size']:g}", executed_steps=r["solver_steps"],
                  flops_per_token=r["flops_per_token"], perplexity=r["perplexity"]) for r in document["results"]]
    rows = []
    for row in fixed + document["adaptive"]:
        truncated = interpolate(truncation, row["executed_steps"])
        rows.append(dict(method=row["method"], label=row["label"], executed_steps=row["executed_steps"],
                         flops_per_token=row["flops_per_token"], perplexity=row["perplexity"],
                         truncated_perplexity=truncated,
                         vs_truncation=None if truncated is None else row["perplexity"] / truncated - 1))
    prompts = Path(args.prompts).read_text().splitlines() if args.prompts else \
        [line for line in Path(args.data[0]).read_text().splitlines() if len(line) > 40][:8]
    decoded = out / "decode.json"  # kept: the rest of the report can be redone without timing again
    if not decoded.is_file():
        fixed = tuple(float(a) for a in args.decode_step_sizes.split(",") if a)
        decoded.write_text(json.dumps([decode_comparison(model, prompts, float(t), args.new_tokens, args.rounds,
                                                         args.threads, () if i else fixed)
                                       for i, t in enumerate(args.tolerances.split(","))]))
    decode = json.loads(decoded.read_text())
    result = dict(model=args.model, data=args.data, calibration=args.calibration, depth=depth, rows=rows,
                  decode=decode)
    (out / "learned_exit.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| rule | mean executed steps | perplexity | truncated solve at those steps | vs truncation |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in sorted(rows, key=lambda r: (r["method"], r["executed_steps"])):
        truncated = "-" if row["truncated_perplexity"] is None else f"{row['truncated_perplexity']:.2f}"
        gain = "-" if row["vs_truncation"] is None else f"{row['vs_truncation']:+.1%}"
        lines.append(f"| {row['label']} | {row['executed_steps']:.2f} | {row['perplexity']:.2f} | {truncated} "
                     f"| {gain} |")
    lines += ["", "| tolerance | decoder | tokens/s | vs plain | changed tokens (same prefix) | identical prefix |",
              "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for d in decode:
        for name, v in d["variants"].items():
            lines.append(f"| {d['tolerance']:g} | {name} | {v['tokens_per_s']:.1f} | {v['speedup']:.2f}x "
                         f"| {v['changed_tokens']:.1%} | {v['identical_prefix']:.1%} |")
    (out / "learned_exit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
