"""ZeRO-3's ``deepspeed.zero.Init``: per-rank peak memory while the trainer builds the model, with and without it.

    python benchmarks/bench_zero_init.py [--ranks 2] [--set model.hidden_size=2048 ...]

Runs ``odegpt launch`` on CPU ranks twice with the same model (by default ~220M parameters, 0.8 GiB
in fp32: unshared, 12 layers of hidden 1024 and a 32000-token vocabulary, ~450x the quickstart's),
ZeRO-3, once with ``deepspeed.zero3_init: true`` (the default: parameters created partitioned) and
once with ``false`` (the whole model built on every rank, then partitioned by ``deepspeed.initialize``).
Each run ends right after the engine is built (the test-only fault hook kills rank 0 before step 0);
the trainer's ``build`` record in ``metrics.jsonl`` has every rank's peak RSS before and after building.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from launcher.config import add_config_arguments
from launcher.launch import free_port

REPO = Path(__file__).resolve().parent.parent
MODEL = {"model.vocab_size": 32000, "model.hidden_size": 1024, "model.intermediate_size": 2816,
         "model.num_attention_heads": 16, "model.num_key_value_heads": 16, "model.tie_word_embeddings": "false",
         "model.segments": "[{depth: 12, shared: false}]"}


def build_record(work: Path, ranks: int, zero_init: bool, overrides: list[str]) -> dict:
    out = work / f"zero3-init-{str(zero_init).lower()}"
    settings = {**MODEL, "data.builder": "test_launcher_train:build_synthetic", "data.corpora": "[synthetic]",
                "data.tokenizer": "null", "run.output_dir": str(out), "deepspeed.zero_stage": 3,
                "deepspeed.zero3_init": str(zero_init).lower(), "train.seq_len": 16, "train.micro_batch_size": 1,
                "train.global_batch_size": ranks, "train.train_steps": 1, "train.activation_checkpointing": "false",
                "eval.num_samples": 0, "logging.progress_bar": "false", "logging.tensorboard": "false"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO / "tests"),
           "ODEGPT_FAULT_KILL": "0:0"}  # stop once built: rank 0 dies as step 0 starts
    cmd = [sys.executable, "-m", "odegpt", "launch", "--num-gpus", str(ranks), "--master-port", str(free_port()),
           "--quiet", "--resume", "none", "--config", "quickstart",
           *[f"--set={k}={v}" for k, v in settings.items()], *[f"--set={o}" for o in overrides]]
    subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["kind"] == "build")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    add_config_arguments(parser, configs=False)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-zero-init-") as work:
        records = {zero_init: build_record(Path(work), args.ranks, zero_init, args.overrides)
                   for zero_init in (True, False)}
    first = records[True]
    print(f"{first['parameters'] / 1e6:.0f}M parameters, the whole model {first['model_gib']:.2f} GiB (fp32); "
          f"ZeRO-3 on {args.ranks} CPU ranks; peak RSS per rank (GiB)")
    print(f"  {'':<22}" + "".join(f"{f'rank {r}: before -> after (+built)':>36}" for r in range(args.ranks)))
    for zero_init, record in records.items():
        cells = [f"{b:.2f} -> {a:.2f} (+{a - b:.2f})" for b, a in zip(record["peak_memory_gib_before"],
                                                                      record["peak_memory_gib_after"])]
        print(f"  {'zero.Init' if zero_init else 'without zero.Init':<22}" + "".join(f"{c:>36}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
