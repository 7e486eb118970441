"""The retrofit experiment, one command: ``python benchmarks/retrofit.py``.

A pretrained Llama cannot be downloaded here, so the experiment makes one, then retrofits it:

1. **source**: an unshared 8-layer model trained on the stdlib corpus at a = 1 (``configs/retrofit/source.yaml``,
   through ``benchmarks/ablation.py``), exported as a plain ``LlamaForCausalLM`` folder: the "pretrained" model.
2. **import**: ``odegpt import`` of that folder into segments ``1u,6s,1u`` with each init rule (stepwise, average,
   lower) at relax rank 0, printing the perplexity before and after; the init rule whose import is best then
   also at relax ranks 8 and full; and each rule at rank 0 into ``1u,7s`` (two blocks: 36% of the source's
   parameters).
3. **uptrain**: every import, and the same shape from random weights, for the same tokens (a quarter of the
   source's) with the randomized objective (``configs/retrofit/base.yaml``), evaluated at a = 0.5, 1, 2, 4 with
   the source beside them (the ablation harness: ``results.md``, ``perplexity.png``, ``pareto.png``).
4. **headroom**: the adaptive-depth report and its headroom analysis (``benchmarks/adaptive_report.py``,
   ``benchmarks/adaptive_headroom.py``) on the best retrofitted model beside the model from scratch.

Everything lands in ``--output-dir`` (default ``runs/retrofit``) and is resumable: finished stages are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "retrofit"
ODEGPT = [sys.executable, "-m", "odegpt"]
INITS = ("stepwise", "average", "lower")


def run(command: list[str], env: dict, log: Path | None = None) -> str:
    """Run ``command``, echo and return its stdout; stop the experiment if it fails."""
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, env=env, text=True, capture_output=True, cwd=REPO)
    sys.stdout.write(result.stdout)
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-5000:])
        raise SystemExit(f"retrofit: failed ({result.returncode}): {' '.join(command)}")
    return result.stdout


def plot_against_parameters(results: dict, out: Path) -> Path:
    """``parameters.png``: perplexity at each evaluated a against each model's parameter count (relaxation
    included), the source and the model from scratch among them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from odegpt.folders.model_folder import load_config
    from odegpt.model.accounting import model_cost

    figure, ax = plt.subplots(figsize=(7, 4.5))
    for variant in results["variants"]:
        parameters = model_cost(load_config(out / variant["name"] / "model")).parameters
        rows = variant["evaluation"]["results"]
        ax.scatter([parameters] * len(rows), [r["perplexity"] for r in rows], s=12, alpha=0.6)
        one = next(r["perplexity"] for r in rows if r["step_size"] == 1.0)
        ax.annotate(f"{variant['label']} ({variant['budget']['tokens'] / 1e6:.2f}M tokens)", (parameters, one),
                    fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("parameters (relaxation included)")
    ax.set_ylabel("validation perplexity at a = 0.5, 1, 2, 4")
    ax.set_yscale("log")
    ax.set_title("retrofitted from an 8-layer source, uptrained on a quarter of its tokens")
    figure.tight_layout()
    path = out / "parameters.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_variant(path: Path, title: str, init_from: Path) -> None:
    """An uptraining variant: configs/retrofit/base.yaml started from the imported folder ``init_from``."""
    path.write_text(f"# {title}\ndefaults: [{CONFIGS / 'base.yaml'}]\ntrain:\n  init_from: {init_from}\n")


def ablation(variants: list[str], out: Path, args, env: dict) -> None:
    run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--variants", *variants, "--output-dir", str(out),
         "--data-from", args.data_from, "--reference", "source", "--step-sizes", "0.5,1,2,4",
         "--num-samples", str(args.num_samples), "--rounds", str(args.rounds), "--decode-tokens", "64"], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/retrofit.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--output-dir", default="runs/retrofit", help="default: %(default)s")
    parser.add_argument("--data-from", default="runs/quickstart",
                        help="folder with tokenizer/ and data/ (the quickstart's), made there if missing")
    parser.add_argument("--num-samples", type=int, default=256, help="validation sequences per step size")
    parser.add_argument("--rounds", type=int, default=3, help="decode-speed rounds (interleaved, median)")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks per training (default: %(default)s)")
    parser.add_argument("--uptrain", choices=("all", "best"), default="all",
                        help="uptrain every import (all, about an hour on 2 cores) or only the best rank-0 import of "
                             "each shape, 1u,6s,1u and 1u,7s, beside the model from scratch (best, about 20 minutes)")
    args = parser.parse_args(argv)
    out = (REPO / args.output_dir).resolve() if not Path(args.output_dir).is_absolute() else Path(args.output_dir)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. The pretrained source, and its plain Llama export.
    ablation([str(CONFIGS / "source.yaml")], out, args, env)
    timings["source"] = time.perf_counter() - start
    source_llama = out / "source-llama"
    if not (source_llama / "config.json").is_file():
        run(ODEGPT + ["export", "--model", str(out / "source" / "model"), "--format", "unrolled", "--step-size", "1",
                      "--output", str(source_llama)], env)

    # 2. Imports: each init rule at rank 0, then the best one at ranks 8 and full.
    data = str(Path(args.data_from) / "data")
    imports = out / "import"
    imported: dict[str, float] = {}

    def do_import(name: str, init: str, rank: str, segments: str = "1u,6s,1u") -> float:
        target, log = imports / name, imports / f"{name}.log"
        if not (target / "config.json").is_file():
            imports.mkdir(parents=True, exist_ok=True)
            run(ODEGPT + ["import", "--model", str(source_llama), "--output", str(target), "--segments", segments,
                          "--init", init, "--relax-rank", rank, "--data", data, "--seq-len", "128",
                          "--max-batches", "32", "--overwrite"], env, log)
        else:
            print(log.read_text().splitlines()[0] if log.is_file() else f"exists: {target}")
        line = next(line for line in log.read_text().splitlines() if line.startswith("perplexity"))
        return float(line.split("imported a=1 ")[1].split()[0])

    for init in INITS:
        imported[f"{init}-r0"] = do_import(f"{init}-r0", init, "0")
    best = min(INITS, key=lambda init: imported[f"{init}-r0"])
    variant_dir = out / "variants"
    variant_dir.mkdir(parents=True, exist_ok=True)
    relaxed = []
    for rank in ("8", "full"):
        name = f"{best}-r{rank}"
        imported[name] = do_import(name, best, rank)
        path = variant_dir / f"{name}.yaml"
        write_variant(path, f"{best}, rank {rank}: retrofitted from the source ({best} init, the best import at "
                      f"rank 0), relaxation rank {rank}, uptrained", imports / name)
        relaxed.append(str(path))
    # The shape that fits the goal's 40% of the source's parameters: the tied embedding is 14% of this small source,
    # so three of its eight blocks (1u,6s,1u) hold 46% and two (1u,7s: the last layer shared too) 36%.
    for init in INITS:
        compact = f"{init}-1u7s-r0"
        imported[compact] = do_import(compact, init, "0", segments="1u,7s")
        (variant_dir / f"{compact}.yaml").write_text(
            f"# {init}, rank 0, segments 1u,7s: retrofitted from the source with the last layer in the shared block, "
            f"uptrained\ndefaults: [{CONFIGS / 'base.yaml'}]\nmodel:\n  segments: 1u,7s\ntrain:\n  init_from: "
            f"{imports / compact}\n")
        relaxed.append(str(variant_dir / f"{compact}.yaml"))
    timings["imports"] = time.perf_counter() - start - timings["source"]

    # 3. Uptraining, and the same shape from scratch, evaluated beside the source.
    for init in INITS:
        write_variant(variant_dir / f"{init}-r0.yaml", f"{init}, rank 0: retrofitted from the source ({init} init), "
                      f"no relaxation, uptrained", imports / f"{init}-r0")
    variants = [str(CONFIGS / "source.yaml"), *(str(variant_dir / f"{init}-r0.yaml") for init in INITS), *relaxed,
                str(CONFIGS / "scratch.yaml")]
    if args.uptrain == "best":
        compact_best = min(INITS, key=lambda init: imported[f"{init}-1u7s-r0"])
        variants = [str(CONFIGS / "source.yaml"), str(variant_dir / f"{best}-r0.yaml"),
                    str(variant_dir / f"{compact_best}-1u7s-r0.yaml"), str(CONFIGS / "scratch.yaml")]
    ablation(variants, out, args, env)
    timings["uptraining"] = time.perf_counter() - start - timings["source"] - timings["imports"]

    # 4. Adaptive headroom: the best retrofitted model against the model from scratch.
    results = json.loads((out / "results.json").read_text())
    a1 = {v["name"]: next(r["perplexity"] for r in v["evaluation"]["results"] if r["step_size"] == 1.0)
          for v in results["variants"]}
    retrofitted = [name for name in a1 if name not in ("source", "scratch")]
    best_model = min(retrofitted, key=a1.get)
    headroom = out / "adaptive"
    if not (headroom / "results.md").is_file():
        run([sys.executable, str(REPO / "benchmarks" / "adaptive_report.py"),
             "--models", str(out / best_model / "model"), str(out / "scratch" / "model"),
             "--data", data, "--output", str(headroom)], env)
    summary = {"imported_a1_perplexity_before_uptraining": imported, "best_init_at_rank_0": best,
               "a1_perplexity_after_uptraining": a1, "best_retrofitted": best_model,
               "minutes": {k: v / 60 for k, v in timings.items()}}
    (out / "retrofit.json").write_text(json.dumps(summary, indent=2))
    plot_against_parameters(results, out)
    print(json.dumps(summary, indent=2))
    print(f"retrofit: done in {(time.perf_counter() - start) / 60:.1f} min; table {out / 'results.md'}, "
          f"plots {out / 'perplexity.png'} {out / 'pareto.png'}, headroom {headroom / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
