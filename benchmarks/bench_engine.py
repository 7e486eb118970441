"""The DeepSpeed engine's own cost: one rank, ZeRO 0-3, against plain PyTorch, interleaved.

    python benchmarks/bench_engine.py [--stages 0 1 2 3] [--steps 8] [--set model.hidden_size=512 ...]

`bench_training.py` times whole `odegpt launch` runs one after another, so machine noise and the
training loop's own work (logging, the loss all-reduce) land in its ratios. Here both optimizer
steps — the same model, batch, objective, AdamW and clipping — alternate in ONE process, step
after step, so the ratio is the engine's overhead alone. Each stage runs in a fresh process.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from launcher.config import add_config_arguments


def measure(stage: int, steps: int, overrides: list[str]) -> tuple[float, float]:
    import deepspeed
    import torch

    from launcher.config import load_config
    from launcher.optim import parameter_groups
    from odegpt import OdeGPTForCausalLM
    from odegpt.training.objective import language_model_loss

    deepspeed.init_distributed(dist_backend="gloo")
    config = load_config(["quickstart"], [*overrides, f"deepspeed.zero_stage={stage}"])
    t = config.train
    accumulation = config.gradient_accumulation_steps(1)
    torch.manual_seed(t.seed)
    plain_model = OdeGPTForCausalLM(config.model_config()).train()
    engine_model = OdeGPTForCausalLM(config.model_config()).train()
    optimizer = torch.optim.AdamW(parameter_groups(plain_model, t.weight_decay), lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    engine, *_ = deepspeed.initialize(model=engine_model, config=config.to_deepspeed_config(1, "cpu"),
                                      model_parameters=parameter_groups(engine_model, t.weight_decay))
    vocab = config.model_config().vocab_size
    batches = [torch.randint(0, vocab, (t.micro_batch_size, t.seq_len + 1)) for _ in range(accumulation)]

    def plain_step() -> float:
        start = time.perf_counter()
        for tokens in batches:
            (language_model_loss(plain_model, tokens, 1.0) / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def engine_step() -> float:
        start = time.perf_counter()
        for tokens in batches:
            engine.backward(language_model_loss(engine, tokens, 1.0))
            engine.step()
        return time.perf_counter() - start

    plain_step(), engine_step()  # warm-up
    plain, ds = [], []
    for _ in range(steps):
        plain.append(plain_step())
        ds.append(engine_step())
    return statistics.median(plain), statistics.median(ds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=8)
    add_config_arguments(parser, configs=False)
    parser.add_argument("--one-stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_stage is not None:
        plain, ds = measure(args.one_stage, args.steps, args.overrides)
        print(f"RESULT {plain} {ds}")
        return 0
    print(f"quickstart model {' '.join(args.overrides)}, 1 rank, fp32, CPU; median of {args.steps} "
          f"interleaved optimizer steps")
    for stage in args.stages:
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(29500 + stage + 17), "DS_ACCELERATOR": "cpu",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
        cmd = [sys.executable, __file__, "--one-stage", str(stage), "--steps", str(args.steps)]
        cmd += [f"--set={o}" for o in args.overrides]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        plain, ds = map(float, out.rsplit("RESULT ", 1)[1].split())
        print(f"  ZeRO-{stage}: plain {plain * 1e3:7.1f} ms/step  DeepSpeed {ds * 1e3:7.1f} ms/step  "
              f"ratio (tokens/s DeepSpeed / plain) {plain / ds:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
