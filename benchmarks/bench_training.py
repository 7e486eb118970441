"""Training throughput benchmark (a script, not a test): ``python benchmarks/bench_training.py``.

Tokens/s of the DeepSpeed engine under ZeRO 0-3 on 1 and 2 CPU ranks, each against a plain
PyTorch loop (AdamW, clipping, the same model, micro-batch, accumulation and a = 1) in one process
with the same threads. Median step time after warm-up, from the run's metrics. DeepSpeed runs go
through ``odegpt launch`` on the quickstart model; results go to ``<work-dir>/results.json``.

Quality (perplexity per step size after equal budgets, per objective) is the ablation's job:
``python benchmarks/ablation.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from launcher.launch import free_port

ODEGPT = [sys.executable, "-m", "odegpt"]


def _run(cmd: list[str], env: dict | None = None, capture: bool = False) -> str:
    result = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-4000:]}")
    return result.stdout


def prepare_data(work: Path, reuse: Path) -> tuple[Path, Path]:
    tokenizer, data = reuse / "tokenizer", reuse / "data"
    if (tokenizer / "tokenizer.json").is_file() and (data / "manifest.json").is_file():
        return tokenizer, data
    tokenizer, data = work / "tokenizer", work / "data"
    if not (tokenizer / "tokenizer.json").is_file():
        _run(ODEGPT + ["tokenizer", "--input", "stdlib", "--vocab-size", "2048", "--output", str(tokenizer)])
    if not (data / "manifest.json").is_file():
        _run(ODEGPT + ["prepare", "--input", "stdlib", "--tokenizer", str(tokenizer), "--output", str(data),
                       "--val-fraction", "0.01", "--workers", "2", "--no-progress"])
    return tokenizer, data


def median_tokens_per_s(output_dir: Path, skip: int) -> float:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] > skip)


def deepspeed_throughput(work: Path, common: list[str], stage: int, ranks: int, steps: int) -> float:
    out = work / f"throughput-zero{stage}-{ranks}rank"
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks)), "DS_ACCELERATOR": "cpu"}
    _run(ODEGPT + ["launch", "--num-gpus", str(ranks), "--master-port", str(free_port()), "--quiet",
                   "--resume", "none", "--config", "quickstart", *common,
                   f"--set=run.output_dir={out}", f"--set=deepspeed.zero_stage={stage}",
                   f"--set=train.train_steps={steps}", "--set=train.step_size_distribution={choices: [1.0]}",
                   "--set=eval.interval=0", "--set=eval.at_end=false", "--set=checkpoint.interval=0",
                   "--set=logging.tensorboard=false", "--set=logging.progress_bar=false"], env=env)
    return median_tokens_per_s(out, skip=steps // 5)


def pytorch_throughput(common: list[str], steps: int) -> float:
    """The same step as launcher.train, without DeepSpeed: one process, AdamW, clipping, a = 1."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from launcher import data
    from launcher.config import load_config
    from launcher.optim import parameter_groups, schedule_for
    from odegpt import OdeGPTForCausalLM
    from odegpt.training.objective import language_model_loss

    torch.set_num_threads(os.cpu_count() or 1)
    config = load_config(["quickstart"], [c.removeprefix("--set=") for c in common] + [f"train.train_steps={steps}"])
    t = config.train
    torch.manual_seed(t.seed)
    model = OdeGPTForCausalLM(config.model_config()).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    scheduler = LambdaLR(optimizer, schedule_for(t))
    train_ds, _ = data.build_datasets(config)
    batches = data.train_micro_batches(train_ds, 0, t.micro_batch_size, 0, 1)
    accumulation = t.global_batch_size // t.micro_batch_size
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        for _ in range(accumulation):
            loss = language_model_loss(model, next(batches), 1.0) / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        rates.append(t.global_batch_size * t.seq_len / (time.perf_counter() - start))
    return statistics.median(rates[steps // 5:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="runs/bench")
    parser.add_argument("--reuse-data", default="runs/quickstart", help="tokenizer/ and data/ from here if present")
    parser.add_argument("--throughput-steps", type=int, default=40)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. --set model.hidden_size=512 to measure "
                             "throughput on a larger model (ZeRO-3's per-module cost is fixed, so tiny "
                             "models exaggerate it)")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer, data_dir = prepare_data(work, Path(args.reuse_data))
    common = [f"--set=data.corpora=[{data_dir}]", f"--set=data.tokenizer={tokenizer}",
              *(f"--set={override}" for override in args.overrides)]
    results: dict = {"throughput": {}}

    print(f"throughput: quickstart model{' with ' + ' '.join(args.overrides) if args.overrides else ''}, fp32, "
          f"micro-batch 8, global batch 16 x 128 tokens, a=1, {os.cpu_count()} cores", flush=True)
    plain = pytorch_throughput(common, args.throughput_steps)
    results["throughput"]["pytorch_1proc"] = plain
    print(f"  {'plain PyTorch, 1 process':<28}{plain:>10.0f} tokens/s", flush=True)
    for ranks in (1, 2):
        for stage in (0, 1, 2, 3):
            rate = deepspeed_throughput(work, common, stage, ranks, args.throughput_steps)
            results["throughput"][f"zero{stage}_{ranks}rank"] = rate
            print(f"  {f'DeepSpeed ZeRO-{stage}, {ranks} rank(s)':<28}{rate:>10.0f} tokens/s  "
                  f"ratio to plain {rate / plain:.2f}", flush=True)

    (work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
