"""``train.compile``: tokens/s of training steps with torch.compile'd blocks against eager, interleaved.

    python benchmarks/bench_compile.py [--steps 20] [--set model.hidden_size=256 ...]

Two copies of the same model (the quickstart's unless ``--set`` says otherwise), one with each block's
attention and MLP branches compiled exactly as ``launcher.train`` does for ``train.compile: true``,
take optimizer steps (forward, backward, AdamW) in turn in ONE process, on the same batches and step
sizes, so machine noise hits both alike. Compilation (one graph per step size) is warmed up first
and reported separately. Prints the median tokens/s of each and their ratio.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

from launcher.config import add_config_arguments


def main() -> int:
    import torch

    from launcher.config import load_config
    from odegpt import OdeGPTForCausalLM
    from odegpt.training.objective import StepSizeDistribution, language_model_loss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="measured steps of each (default: %(default)s)")
    add_config_arguments(parser, default=["quickstart"])
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    t = config.train
    torch.manual_seed(t.seed)
    eager = OdeGPTForCausalLM(config.model_config()).train()
    compiled = copy.deepcopy(eager)
    for block in compiled.model.blocks:  # as launcher.train does for train.compile: true
        block.attention_branch = torch.compile(block.attention_branch)
        block.mlp_branch = torch.compile(block.mlp_branch)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=t.lr)
                  for name, model in (("eager", eager), ("compiled", compiled))}
    step_sizes = StepSizeDistribution.from_dict(t.step_size_distribution)
    step_sizes = list(step_sizes.choices) if step_sizes.choices is not None else [1.0]
    vocab = config.model_config().vocab_size
    tokens = t.micro_batch_size * t.seq_len

    def step(name: str, model, batch, a: float) -> float:
        start = time.perf_counter()
        loss = language_model_loss(model, batch, a)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    start = time.perf_counter()
    for a in step_sizes:  # compile one graph per step size before measuring
        step("compiled", compiled, torch.randint(0, vocab, (t.micro_batch_size, t.seq_len + 1)), a)
    print(f"model {config.model.segments}, hidden {config.model.hidden_size}, micro-batch {t.micro_batch_size} x "
          f"{t.seq_len} tokens, step sizes {step_sizes}, {torch.get_num_threads()} threads; compilation "
          f"{time.perf_counter() - start:.0f}s", flush=True)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for index in range(args.steps + 2):
        batch = torch.randint(0, vocab, (t.micro_batch_size, t.seq_len + 1))
        a = step_sizes[index % len(step_sizes)]
        order = (("eager", eager), ("compiled", compiled)) if index % 2 else (("compiled", compiled), ("eager", eager))
        for name, model in order:
            seconds = step(name, model, batch, a)
            if index >= 2:  # two warm-up rounds
                times[name].append(seconds)
    rates = {name: tokens / statistics.median(values) for name, values in times.items()}
    for name, rate in rates.items():
        print(f"  {name:<9}{rate:>10.0f} tokens/s  (median of {args.steps} steps)")
    print(f"  compiled / eager: {rates['compiled'] / rates['eager']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
