"""What a run reports: ``metrics.jsonl``, TensorBoard, the progress bar, and the memory each rank uses.

Rank 0 writes; every rank calls (memory is gathered from all ranks). Training metrics are recorded
every ``logging.interval`` optimizer steps (and at the last): that step's loss, step size, learning
rate and gradient norm, with tokens/s and MFU measured over the steps since the previous record.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

GIB = 2 ** 30


def peak_memory_bytes(device_type: str) -> int:
    """This rank's peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on CPU."""
    if device_type == "cuda":
        # torch & co.: launcher.train imports this module before a rank's interruptible start-up
        import torch

        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def gather_floats(value: float) -> list[float]:
    """``value`` from every rank, in rank order (a collective)."""
    # torch & co.: launcher.train imports this module before a rank's interruptible start-up
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    values = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(values, torch.tensor(value, dtype=torch.float64, device=device))
    return [float(v) for v in values]


class MetricsLogger:
    def __init__(self, output_dir: Path, rank: int, interval: int, total_steps: int, start_step: int,
                 tensorboard: bool, progress_bar: bool, fresh: bool) -> None:
        self.rank, self.interval, self.total_steps = rank, interval, total_steps
        self.file = self.writer = None
        if rank == 0:
            if fresh:  # a fresh run does not append to an old run's metrics
                (output_dir / "metrics.jsonl").unlink(missing_ok=True)
            self.file = open(output_dir / "metrics.jsonl", "a")
            if tensorboard:
                # torch & co.: launcher.train imports this module before a rank's interruptible start-up
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step)
        self.progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             disable=rank != 0 or not progress_bar, file=sys.stderr)
        self._window_start, self._window_flops, self._window_tokens = time.perf_counter(), 0.0, 0

    def say(self, message: str) -> None:
        if self.rank == 0:
            self.progress.write(message, file=sys.stderr)

    def record(self, kind: str, step: int, values: dict) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def train_step(self, step: int, values: dict, tokens: int, flops: float, peak_flops: float,
                   device_type: str, last: bool = False) -> None:
        """Called on every rank after every optimizer step; records every ``interval`` steps and at the last."""
        self._window_tokens += tokens
        self._window_flops += flops
        self.progress.update(1)
        terms = {name: f"{value:.4f}" for name, value in values.get("terms", {}).items()}
        self.progress.set_postfix(loss=f"{values['loss']:.4f}", **terms, a=f"{values['step_size']:g}",
                                  lr=f"{values['lr']:.2e}", refresh=False)
        if step % self.interval and not last:
            return
        seconds = max(time.perf_counter() - self._window_start, 1e-9)
        memory = [m / GIB for m in gather_floats(float(peak_memory_bytes(device_type)))]
        self.record("train", step, {**values, "tokens_per_s": self._window_tokens / seconds,
                                    "mfu": self._window_flops / seconds / peak_flops,
                                    "peak_memory_gib": max(memory), "peak_memory_gib_per_rank": memory})
        self._window_start, self._window_flops, self._window_tokens = time.perf_counter(), 0.0, 0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (evaluation, checkpointing) out of the throughput window."""
        self._window_start += seconds

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


# ---- reading a run's metrics back (scripts/gpu_smoke.sh) ------------------------------------------

def summarize(output_dir: str | Path, skip_fraction: float = 0.2) -> dict:
    """Throughput of a finished run from its ``metrics.jsonl``: medians of tokens/s and MFU over the records
    after the first ``skip_fraction`` of steps (warm-up, compilation), the peak memory of each rank, and
    the last loss. Raises ``ValueError`` when there is nothing to summarize or the loss is not finite."""
    path = Path(output_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    if not train:
        raise ValueError(f"{path} holds no training records")
    last_step = train[-1]["step"]
    steady = [r for r in train if r["step"] > skip_fraction * last_step] or train[-1:]
    if not math.isfinite(train[-1]["loss"]):
        raise ValueError(f"{path}: the last loss is {train[-1]['loss']}")
    return {"steps": last_step, "ranks": len(train[-1]["peak_memory_gib_per_rank"]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu": statistics.median(r["mfu"] for r in steady),
            "peak_memory_gib_per_rank": train[-1]["peak_memory_gib_per_rank"], "loss": train[-1]["loss"]}


def main(argv: list[str] | None = None) -> int:
    """``python -m launcher.metrics RUN_DIR ...``: one throughput row per finished run; exit 1 if one is bad."""
    parser = argparse.ArgumentParser(prog="python -m launcher.metrics", description=main.__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    args = parser.parse_args(argv)
    print(f"{'ranks':>5} {'steps':>6} {'tokens/s':>10} {'tokens/s/rank':>14} {'MFU':>6} {'loss':>7}"
          "  peak memory per rank (GiB)")
    failed = False
    for run in args.runs:
        try:
            s = summarize(run)
        except (OSError, ValueError, KeyError) as error:
            print(f"{run}: {error}", file=sys.stderr)
            failed = True
            continue
        print(f"{s['ranks']:>5} {s['steps']:>6} {s['tokens_per_s']:>10.0f} {s['tokens_per_s'] / s['ranks']:>14.0f} "
              f"{s['mfu']:>6.1%} {s['loss']:>7.3f}  " + " ".join(f"{m:.1f}" for m in s["peak_memory_gib_per_rank"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
