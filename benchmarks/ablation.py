"""The step-size ablation, one command: ``python benchmarks/ablation.py``.

Trains every variant in ``configs/ablation/`` (one YAML file each, on top of ``base.yaml``: the
same model size and token budget) through the public commands a user would type —
``odegpt launch`` (CPU ranks, ZeRO-2), ``odegpt convert``, ``odegpt evaluate`` — and writes into
``--output-dir``:

- ``results.json``: per variant its settings, the budget it used (tokens seen and training FLOPs,
  extra a=1 passes of the objective included) and the evaluation report (perplexity, solver steps,
  FLOPs/token, decode tokens/s and speedup per step size);
- ``results.md``: the table;
- ``perplexity.png`` (perplexity against a, one line per variant) and ``pareto.png`` (perplexity
  against decode speedup over a=1).

Resumable: a variant's finished stages are skipped and an interrupted training continues from its
last checkpoint, so rerunning the command after a crash, or with one more variant, costs only what
is missing. Tokenizer and prepared corpus are reused from ``--data-from`` (the quickstart's), made
there first if missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python benchmarks/ablation.py` from anywhere, without installing

from launcher.config import CONFIG_DIR, RunConfig, load_config  # noqa: E402
from launcher.launch import free_port  # noqa: E402
from launcher.stages import Stages  # noqa: E402

ODEGPT = [sys.executable, "-m", "odegpt"]
VARIANT_DIR = CONFIG_DIR / "ablation"
DEFAULT_VARIANTS = ("a-unshared", "b-shared-a1", "c-shared-random", "d-partial-random", "e-random-consistency",
                    "f-random-a1-half", "g-random-reference")


@dataclass
class Variant:
    name: str  # the file's stem: the variant's folder under --output-dir
    label: str  # the file's first comment line up to a colon: "# (c) shared, random a: details..."
    description: str  # the rest of that line
    path: Path

    @classmethod
    def from_argument(cls, spec: str) -> Variant:
        path = Path(spec)
        if not path.is_file():
            path = VARIANT_DIR / (spec if spec.endswith(".yaml") else f"{spec}.yaml")
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in VARIANT_DIR.glob("*.yaml") if p.stem != "base"))
            raise SystemExit(f"ablation: no variant {spec!r} (a YAML path, or one of: {known})")
        first = (path.read_text().splitlines() or [""])[0]
        label, _, description = first.lstrip("# ").partition(":") if first.startswith("#") else (path.stem, "", "")
        return cls(path.stem, label.strip(), description.strip(), path.resolve())


# ---- budget --------------------------------------------------------------------------------------

def training_budget(config: RunConfig) -> dict:
    """Tokens seen and training FLOPs of a run, the a=1 passes and read-outs of the objective included (the same
    sampler and cost function as training, so this is exact, not an estimate of the draws)."""
    from odegpt.training.objective import StepSizeDistribution, StepSizeSampler, objective_flops_per_token

    t = config.train
    model_config = config.model_config()
    sampler = StepSizeSampler(StepSizeDistribution.from_dict(t.step_size_distribution), t.seed)
    tokens_per_step = t.global_batch_size * t.seq_len
    flops: dict[float, float] = {}
    total = 0.0
    for step in range(t.train_steps):
        a = sampler.sample(step)
        if a not in flops:
            flops[a] = objective_flops_per_token(model_config, a, t.seq_len, t.consistency_weight, t.reference_weight,
                                                 t.readout_weights)
        total += flops[a] * tokens_per_step
    return {"tokens": t.train_steps * tokens_per_step, "training_flops": total, "optimizer_steps": t.train_steps}


def training_seconds(run_dir: Path) -> float | None:
    """Seconds spent in optimizer steps (evaluation and saves excluded), from the run's metrics."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    config = json.loads((run_dir / "config.json").read_text())["train"]
    tokens_per_step = config["global_batch_size"] * config["seq_len"]
    # a train row's tokens/s covers the steps since the previous row (every logging.interval steps)
    seconds, previous = 0.0, 0
    for r in rows:
        if r["kind"] == "train":
            if r["tokens_per_s"] > 0:
                seconds += tokens_per_step * max(r["step"] - previous, 1) / r["tokens_per_s"]
            previous = r["step"]
    return seconds


# ---- stages --------------------------------------------------------------------------------------

def final_checkpoint_done(config: RunConfig) -> bool:
    from launcher.checkpointing import COMPLETE, tag_for

    return (config.checkpoint_dir / tag_for(config.train.train_steps) / COMPLETE).is_file()


def check_same_run(config: RunConfig, run_dir: Path, name: str) -> None:
    """Refuse to mix two configurations in one folder (e.g. a rerun with another budget): the model,
    train and deepspeed sections saved there must equal this run's (settings added since with their
    defaults do not count as a difference; paths and names may differ)."""
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved, current = json.loads(saved_path.read_text()), json.loads(json.dumps(config.to_dict()))
    differing = [f"{section}.{key}" for section in ("model", "train", "deepspeed")
                 for key in saved.get(section, {}).keys() & current[section].keys()
                 if saved[section][key] != current[section][key]]
    if differing:
        raise SystemExit(f"ablation: {run_dir} holds variant {name!r} trained with other settings "
                         f"({', '.join(sorted(differing))}); remove the folder or choose another --output-dir")


def evaluate(model_dir: Path, data_dir: Path, eval_dir: Path, args, env: dict, progress: Stages) -> dict:
    """The evaluation report of one model (`odegpt evaluate --output --no-speed`): perplexity, solver
    steps and FLOPs/token per step size, kept in ``eval_dir``. Decode speed is measured apart, every
    variant side by side (:func:`decode_speeds`)."""
    report = eval_dir / "results.json"
    kept = json.loads(report.read_text()) if report.is_file() else None
    if kept is not None and _same_evaluation(kept, args):
        print(f"exists: {report}")
        return kept
    if kept is not None:  # evaluate writes over it when it succeeds
        print(f"stale: {report} was made at other step sizes or another context; evaluating again")
    progress.run(ODEGPT + ["evaluate", "--model", str(model_dir), "--data", str(data_dir), "--step-sizes",
                           args.step_sizes, "--seq-len", str(args.seq_len), "--num-samples",
                           str(args.num_samples), "--output", str(eval_dir), "--no-speed"], env=env)
    return json.loads(report.read_text())


def _same_evaluation(report: dict, args) -> bool:
    """Whether a kept report scored what this run asks: the same step sizes at the same context length."""
    asked = sorted(float(a) for a in args.step_sizes.split(","))
    kept = sorted(row["step_size"] for row in report["results"])
    return report.get("seq_len") == args.seq_len and len(asked) == len(kept) and all(map(math.isclose, asked, kept))


def ensure_data(data_from: Path, vocab_size: int, env: dict, progress: Stages) -> tuple[Path, Path]:
    tokenizer, data = data_from / "tokenizer", data_from / "data"
    progress.begin(f"tokenizer and prepared stdlib corpus in {data_from}")
    if (tokenizer / "tokenizer.json").is_file():
        print(f"exists: {tokenizer}")
    else:
        progress.run(ODEGPT + ["tokenizer", "--input", "stdlib", "--vocab-size", str(vocab_size),
                               "--output", str(tokenizer)], env=env)
    if (data / "manifest.json").is_file():
        print(f"exists: {data}")
    else:
        progress.run(ODEGPT + ["prepare", "--input", "stdlib", "--tokenizer", str(tokenizer), "--output", str(data),
                               "--val-fraction", "0.01", "--workers", "2"], env=env)
    return tokenizer, data


def decode_speeds(model_dirs: dict[str, Path], step_sizes: list[float], rounds: int, new_tokens: int) -> dict:
    """Batch-1 greedy decode tokens/s of every (variant, a).

    Speed depends on the architecture and the blocks the solve executes, not on the weights, so each
    distinct (architecture, executed blocks) is timed once, with one of the models that has it: the
    variants trained alike at another objective share a measurement, an unshared model is one
    measurement at every a. All of them are timed interleaved in this one process
    (``odegpt.evaluation.throughput``, the timing loop of `odegpt evaluate` and `odegpt bench`), so that they
    compare with each other on a noisy shared machine."""
    import torch
    from tqdm import tqdm

    from odegpt.evaluation.throughput import Variant as Timed
    from odegpt.evaluation.throughput import measure_interleaved, random_prompt
    from odegpt.folders.model_folder import load_model
    from odegpt.model.solver import plan_solve

    torch.set_num_threads(1)
    models = {name: load_model(path) for name, path in model_dirs.items()}
    shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                    "tie_word_embeddings")
    work: dict[tuple, tuple[str, float]] = {}  # what is timed -> (a model that has it, a)
    key_of: dict[tuple[str, float], tuple] = {}
    for name, model in models.items():
        config = model.config
        for a in step_sizes:
            blocks = tuple(step.block for step in plan_solve(config.segments, a, config.max_solver_steps))
            key = (tuple(getattr(config, f) for f in shape_fields), json.dumps(config.segments), blocks)
            work.setdefault(key, (name, a))
            key_of[name, a] = key
    timed = {key: Timed(models[name], {"step_size": a}) for key, (name, a) in work.items()}
    vocab_size = min(model.config.vocab_size for model in models.values())
    with tqdm(total=rounds * len(timed), desc=f"decode speed, {len(timed)} distinct solves interleaved",
              unit="run") as bar:
        measured = measure_interleaved(timed, {"batch 1": random_prompt(vocab_size, 1, 32)}, new_tokens, rounds,
                                       on_measurement=bar.update)
    return {pair: measured[key, "batch 1"].decode_tokens_per_s for pair, key in key_of.items()}


def with_decode_speeds(report: dict, name: str, speeds: dict) -> dict:
    """The evaluation report with the side-by-side decode speeds filled in."""
    one = next(v for (n, a), v in speeds.items() if n == name and math.isclose(a, 1.0))
    for row in report["results"]:
        speed = next(v for (n, a), v in speeds.items() if n == name and math.isclose(a, row["step_size"]))
        row["decode_tokens_per_s"], row["decode_speedup"] = speed, speed / one
    return report


# ---- report --------------------------------------------------------------------------------------

def _ppl(entry: dict, a: float) -> float | None:
    for row in entry["evaluation"]["results"]:
        if math.isclose(row["step_size"], a):
            return row["perplexity"]
    return None


def write_markdown(summary: dict, path: Path) -> str:
    step_sizes = summary["step_sizes"]
    reference = next((v for v in summary["variants"] if v["name"] == summary["reference"]), None)
    header = (["variant"] + [f"ppl a={a:g}" for a in step_sizes]
              + ["ppl(4)/ppl(1)", f"a=1 vs ({summary['reference']})", "train tokens", "train TFLOP",
                 "decode tok/s a=1", "decode speedup " + " / ".join(f"a={a:g}" for a in step_sizes)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in summary["variants"]:
        rows = {row["step_size"]: row for row in v["evaluation"]["results"]}
        ppl1, ppl4 = _ppl(v, 1.0), _ppl(v, 4.0)
        ref1 = _ppl(reference, 1.0) if reference else None
        one = next((row for a, row in rows.items() if math.isclose(a, 1.0)), {})
        cells = [v["label"]] + [f"{rows[a]['perplexity']:.2f}" if a in rows else "" for a in step_sizes]
        cells.append(f"{ppl4 / ppl1:.3f}" if ppl1 and ppl4 else "")
        cells.append(f"{100 * (ppl1 / ref1 - 1):+.1f}%" if ppl1 and ref1 else "")
        cells.append(f"{v['budget']['tokens'] / 1e6:.2f}M")
        cells.append(f"{v['budget']['training_flops'] / 1e12:.1f}")
        speed = one.get("decode_tokens_per_s")
        cells.append(f"{speed:.0f}" if speed else "n/a")
        speedups = [rows[a].get("decode_speedup") if a in rows else None for a in step_sizes]
        cells.append(" / ".join(f"{s:.2f}x" for s in speedups) if all(speedups) else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + ("\n\nTraining FLOPs count the solver steps of every drawn a and the objective's "
                               "extra a=1 passes (forward and backward = 3x forward).\n")
    path.write_text(text)
    return text


def save_perplexity_figure(fig, ax, path: Path) -> Path:
    """Label the y axis, add grid and legend, write ``path`` and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in summary["variants"]:
        results = v["evaluation"]["results"]
        ax.plot([r["step_size"] for r in results], [r["perplexity"] for r in results], marker="o", label=v["label"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(summary["step_sizes"], [f"{a:g}" for a in summary["step_sizes"]])
    ax.set_xlabel("step size a (solver steps = ceil(depth / a))")
    ax.set_title(f"Perplexity against step size, {summary['variants'][0]['budget']['tokens'] / 1e6:.2f}M tokens each")
    written.append(save_perplexity_figure(fig, ax, out / "perplexity.png"))

    measured = all(r.get("decode_tokens_per_s") for v in summary["variants"] for r in v["evaluation"]["results"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in summary["variants"]:
        results = v["evaluation"]["results"]
        one = next(r for r in results if math.isclose(r["step_size"], 1.0))
        xs = [r["decode_tokens_per_s"] if measured else one["flops_per_token"] / r["flops_per_token"] for r in results]
        ys = [r["perplexity"] for r in results]
        (line,) = ax.plot(xs, ys, marker="o", label=v["label"])
        for x, y, r in zip(xs, ys, results):
            ax.annotate(f"a={r['step_size']:g}", (x, y), fontsize=6, color=line.get_color(),
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("decode tokens/s (batch 1, every variant timed interleaved in one process)" if measured
                  else "FLOP speedup over a=1 (decode speed not measured)")
    ax.set_title("Perplexity against speed: one set of weights per line")
    written.append(save_perplexity_figure(fig, ax, out / "pareto.png"))
    return written


# ---- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/ablation.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="NAME_OR_YAML",
                        help="variant configs: names under configs/ablation/ or YAML paths "
                             "(default: %(default)s)")
    parser.add_argument("--output-dir", default="runs/ablation", help="default: %(default)s")
    parser.add_argument("--data-from", default="runs/quickstart",
                        help="folder with tokenizer/ and data/ to reuse, made there if missing (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant, e.g. --set train.train_steps=1200 (a new budget "
                             "needs a new --output-dir)")
    parser.add_argument("--ranks", type=int, default=2,
                        help="CPU ranks per training, 1 thread each (default: %(default)s)")
    parser.add_argument("--step-sizes", default="0.5,1,2,3,4", help="evaluated step sizes (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=512,
                        help="validation sequences per step size (default: %(default)s)")
    parser.add_argument("--reference", default="b-shared-a1",
                        help="variant whose a=1 perplexity the 'a=1 cost' column compares to (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=15,
                        help="decode speed: interleaved rounds over every (variant, a), median (default: %(default)s)")
    parser.add_argument("--decode-tokens", type=int, default=128,
                        help="decode speed: greedy tokens per timed run, batch 1 (default: %(default)s)")
    args = parser.parse_args(argv)

    variants = [Variant.from_argument(spec) for spec in args.variants]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false"}
    progress = Stages("ablation", 2 + 3 * len(variants), show_load=True)
    load_start = os.getloadavg()
    base = load_config([variants[0].path], args.overrides)
    tokenizer, data_dir = ensure_data(Path(args.data_from), base.model.vocab_size, env, progress)
    args.seq_len = base.train.seq_len

    summary = {"reference": args.reference, "step_sizes": [float(a) for a in args.step_sizes.split(",")],
               "ranks": args.ranks, "omp_num_threads": env["OMP_NUM_THREADS"], "overrides": args.overrides,
               "load_average_at_start": load_start, "variants": []}
    for variant in variants:
        run_dir = out / variant.name
        overrides = [f"data.corpora=[{data_dir}]", f"data.tokenizer={tokenizer}", f"run.output_dir={run_dir}",
                     f"run.name={variant.name}", *args.overrides]
        config = load_config([variant.path], overrides, world_size=args.ranks)
        budget = training_budget(config)
        t = config.train
        progress.begin(f"{variant.label}: train {budget['tokens'] / 1e6:.2f}M tokens "
                       f"({t.train_steps} steps x {t.global_batch_size} x {t.seq_len}), "
                       f"{budget['training_flops'] / 1e12:.1f} TFLOP, {args.ranks} CPU ranks")
        check_same_run(config, run_dir, variant.name)
        if final_checkpoint_done(config):
            print(f"exists: {config.checkpoint_dir} (step {t.train_steps})")
        else:
            progress.run(ODEGPT + ["launch", "--num-gpus", str(args.ranks), "--master-port", str(free_port()),
                                   "--quiet", "--resume", "auto", "--config", str(variant.path),
                                   *[f"--set={o}" for o in overrides]], env=env)

        progress.begin(f"{variant.label}: convert")
        model_dir = run_dir / "model"
        if (model_dir / "config.json").is_file():
            print(f"exists: {model_dir}")
        else:
            progress.run(ODEGPT + ["convert", "--checkpoint", str(config.checkpoint_dir), "--output", str(model_dir)],
                         env=env)

        progress.begin(f"{variant.label}: evaluate at a = {args.step_sizes}")
        report = evaluate(model_dir, data_dir, run_dir / "eval", args, env, progress)
        print("  " + "  ".join(f"a={r['step_size']:g}: {r['perplexity']:.2f}" for r in report["results"]))
        summary["variants"].append({
            "name": variant.name, "label": variant.label, "description": variant.description,
            "config": str(variant.path.relative_to(REPO)) if variant.path.is_relative_to(REPO) else str(variant.path),
            "segments": config.model.segments, "step_size_distribution": t.step_size_distribution,
            "consistency_weight": t.consistency_weight, "reference_weight": t.reference_weight, "lr": t.lr,
            "budget": {**budget, "training_seconds": training_seconds(run_dir)},
            "evaluation": report,
        })

    progress.begin(f"decode speed at batch 1 of {len(variants)} variants x {len(summary['step_sizes'])} step sizes, "
                   f"interleaved, {args.rounds} rounds")
    speeds = decode_speeds({v["name"]: out / v["name"] / "model" for v in summary["variants"]}, summary["step_sizes"],
                           args.rounds, args.decode_tokens)
    for v in summary["variants"]:
        with_decode_speeds(v["evaluation"], v["name"], speeds)
    summary["decode"] = {"batch_size": 1, "prompt_tokens": 32, "new_tokens": args.decode_tokens,
                         "rounds": args.rounds, "threads": 1, "measured_once_per": "architecture and executed blocks"}

    summary["load_average_at_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    table = write_markdown(summary, out / "results.md")
    plots = write_plots(summary, out)
    print(f"\n=== ablation done in {(time.perf_counter() - progress.start) / 60:.1f} min "
          f"(load average {load_start[0]:.1f} at start, {summary['load_average_at_end'][0]:.1f} at end)\n")
    print(table)
    print(f"results  {out / 'results.json'}  {out / 'results.md'}")
    print("plots    " + "  ".join(str(p) for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
