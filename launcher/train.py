"""Pretraining entry point: ``python -m launcher.train --config ...`` (or ``odegpt train``).

Runs the same way under the ``deepspeed`` launcher, under ``torchrun`` and as one plain process
(a world of one). The model is plain ``OdeGPTForCausalLM``; everything distributed — ZeRO, the
optimizer, checkpointing — is wrapped around it here. One optimizer step = one step size ``a``
(drawn from (seed, step), identical on every rank), ``gradient_accumulation_steps`` micro-batches
per rank, one all-reduce of the loss and the stop flag.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from .launch import free_port


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", nargs="+", required=True, metavar="YAML",
                        help="config files merged in order (paths, or names under configs/, e.g. quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set train.lr=3e-4 (repeatable; value parsed as YAML)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (newest complete checkpoint in run.output_dir, else start fresh), "
                             "'none', or a checkpoint directory (default: %(default)s)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


# ---- process set-up ---------------------------------------------------------------------------

def _prepare_environment() -> None:
    """Make a plain process a world of one, pick the accelerator, and keep CPU threads per rank sane
    (the deepspeed launcher does not set OMP_NUM_THREADS; oversubscribed ranks run ~40x slower)."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def _log(rank: int, message: str) -> None:
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def peak_flops(config, device_type: str) -> float:
    """Peak FLOP/s of one rank's device for MFU: configured, else an A100's bf16 312 TFLOP/s on GPU,
    or 100 GFLOP/s per thread on CPU (an AVX2 core: 2 FMA units x 8 fp32 lanes x 2 x ~3 GHz)."""
    import torch

    tflops = config.logging.peak_tflops_per_device
    if tflops is None:
        tflops = 312.0 if device_type == "cuda" else 0.1 * torch.get_num_threads()
    return tflops * 1e12


# ---- the run ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"odegpt train: config error: {error}", file=sys.stderr)
        return 2
    _prepare_environment()
    # DeepSpeed's ZeRO-2 still calls torch's deprecated all_gather_into_tensor: one warning per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    import deepspeed
    import torch
    import torch.distributed as dist

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                               timeout=datetime.timedelta(seconds=config.train.dist_timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        return _train(config, args, rank, world_size, device_type)
    except ConfigError as error:
        _log(rank, f"odegpt train: config error: {error}")
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config, args, rank: int, world_size: int, device_type: str) -> int:
    import deepspeed
    import torch
    import torch.distributed as dist
    from torch.optim.lr_scheduler import LambdaLR
    from tqdm import tqdm

    from odegpt import OdeGPTForCausalLM
    from odegpt.accounting import model_cost
    from odegpt.evaluation import nll_sums, perplexity
    from odegpt.objective import StepSizeDistribution, StepSizeSampler, language_model_loss

    from . import checkpointing, data, faults
    from .config import ConfigError
    from .optim import parameter_groups, schedule_for

    config.validate(world_size)
    t = config.train
    output_dir = Path(config.run.output_dir)
    checkpoint_dir = config.checkpoint_dir
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    model_config = config.model_config()
    if config.data.tokenizer:
        from data_pipeline.tokenizer import load_tokenizer

        tokenizer_vocab = len(load_tokenizer(config.data.tokenizer))
        if tokenizer_vocab > model_config.vocab_size:
            raise ConfigError(f"model.vocab_size ({model_config.vocab_size}) is smaller than the tokenizer's "
                              f"vocabulary ({tokenizer_vocab}, {config.data.tokenizer})")

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = OdeGPTForCausalLM(model_config)
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    schedule = schedule_for(t)
    ds_config = config.to_deepspeed_config(world_size, device_type)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, t.weight_decay), config=ds_config,
        # A plain function, so the schedule is not restored from a checkpoint: after a resume the
        # configured schedule (perhaps with a new train.train_steps) applies from the saved step on.
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda index: schedule(index)))
    grad_accum = config.gradient_accumulation_steps(world_size)

    train_ds, valid_ds = data.build_datasets(config)
    sampler = StepSizeSampler(StepSizeDistribution.from_dict(t.step_size), t.seed)

    # ---- resume ----
    step, consumed_samples = 0, 0
    resume = checkpointing.resolve_resume(args.resume, checkpoint_dir)
    if resume is not None:
        client = checkpointing.load(engine, *resume)["odegpt"]
        if client["config"]["model"] != config.to_dict()["model"]:
            raise ConfigError(f"the model section differs from the checkpoint's ({resume[0] / resume[1]})")
        step, consumed_samples = client["step"], client["consumed_samples"]
        _log(rank, f"resumed from {resume[0] / resume[1]}: step {step}, {consumed_samples} samples consumed")
    elif rank == 0 and (output_dir / "metrics.jsonl").exists():
        (output_dir / "metrics.jsonl").unlink()  # a fresh run does not append to an old run's metrics

    def client_state() -> dict:
        return {"odegpt": {"step": step, "consumed_samples": consumed_samples, "config": config.to_dict(),
                           "step_size_sampler": sampler.state_dict(), "world_size": world_size}}

    writer = None
    if rank == 0 and config.logging.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=step)
    metrics_file = open(output_dir / "metrics.jsonl", "a") if rank == 0 else None

    def record(kind: str, values: dict) -> None:
        if rank != 0:
            return
        metrics_file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        metrics_file.flush()
        if writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(f"{kind}/{key}", value, step)

    device = engine.device
    eval_micro = config.eval.micro_batch_size or t.micro_batch_size
    eval_batches = [batch.to(device) for batch in
                    data.valid_batches(valid_ds, config.eval.num_samples, eval_micro, rank, world_size)] \
        if valid_ds is not None and config.eval.num_samples else []

    def evaluate() -> dict[float, float]:
        sums = nll_sums(engine.module, eval_batches, config.eval_step_sizes)
        totals = torch.tensor([[s, n] for s, n in sums.values()], dtype=torch.float64, device=device)
        dist.all_reduce(totals)  # NCCL needs device tensors; gloo takes CPU ones
        result = {a: perplexity(float(s), int(n)) for a, (s, n) in zip(sums, totals.tolist())}
        record("valid", {f"ppl_a{a:g}": p for a, p in result.items()})
        _log(rank, f"step {step}: validation perplexity " +
             "  ".join(f"a={a:g}: {p:.2f}" for a, p in result.items()))
        return result

    saved_step = step if resume is not None else None

    def save() -> None:
        nonlocal saved_step
        if saved_step == step:
            return
        path = checkpointing.save(engine, checkpoint_dir, step, client_state(), config.checkpoint.keep_last)
        saved_step = step
        _log(rank, f"step {step}: saved checkpoint {path}")

    stop = faults.StopRequest().install()
    guard = faults.NonFiniteGuard(t.max_nonfinite_steps)
    batches = data.train_micro_batches(train_ds, consumed_samples, t.micro_batch_size, rank, world_size)
    tokens_per_step = t.global_batch_size * t.seq_len
    peak = peak_flops(config, device_type) * world_size
    costs: dict[float, object] = {}
    progress = tqdm(total=t.train_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                    disable=rank != 0 or not config.logging.progress_bar, file=sys.stderr)
    _log(rank, f"training {num_parameters:,} parameters on {world_size} rank(s), "
               f"ZeRO-{config.deepspeed.zero_stage}, {config.precision_for(device_type)}, "
               f"{grad_accum} micro-batch(es) of {t.micro_batch_size} per rank per step")
    exit_code = 0
    try:
        while step < t.train_steps:
            step_start = time.perf_counter()
            a = sampler.sample(step)
            faults.maybe_kill(rank, step)
            engine.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for _ in range(grad_accum):
                tokens = next(batches).to(device)
                loss = language_model_loss(engine, tokens, a, t.consistency_weight)
                if faults.inject_nonfinite(step):
                    loss = loss * float("nan")
                loss_sum += loss.detach().double()
                # A non-finite micro-batch back-propagates zero instead (collectives stay aligned).
                engine.backward(torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)))
                engine.step()
            reduced = torch.stack([loss_sum / grad_accum,
                                   torch.tensor(float(stop.requested), dtype=torch.float64, device=device)])
            dist.all_reduce(reduced)
            step_loss, stop_now = reduced[0].item() / world_size, reduced[1].item() > 0
            step += 1
            consumed_samples += t.global_batch_size

            tokens_per_s = tokens_per_step / max(time.perf_counter() - step_start, 1e-9)  # excludes eval/saves
            if a not in costs:
                costs[a] = model_cost(model_config, step_size=a, seq_len=t.seq_len)
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else math.nan
            record("train", {"loss": step_loss, "step_size": a, "lr": scheduler.get_last_lr()[0],
                             "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                             "mfu": costs[a].training_flops_per_token * tokens_per_s / peak,
                             "executed_steps": costs[a].executed_steps})
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", a=f"{a:g}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            guard.update(step, step_loss, math.isfinite(step_loss))
            if stop_now:
                if not guard.streak:  # never checkpoint a step with a non-finite loss
                    save()
                _log(rank, f"stopping on {stop.signal_name or 'a signal on another rank'} at step {step}; "
                           f"resume with --resume auto")
                return 0
            if guard.streak:
                continue
            if config.eval.interval and step % config.eval.interval == 0 and step < t.train_steps and eval_batches:
                evaluate()
            if config.checkpoint.interval and step % config.checkpoint.interval == 0:
                save()
        if config.eval.at_end and eval_batches:
            evaluate()
        save()
    except faults.NonFiniteLossError as error:
        _log(rank, f"odegpt train: {error}")
        exit_code = 3
    finally:
        progress.close()
        if writer is not None:
            writer.close()
        if metrics_file is not None:
            metrics_file.close()
    if exit_code == 0:
        _log(rank, f"done: {step} steps, {consumed_samples} samples; checkpoints in {checkpoint_dir}, "
                   f"metrics in {output_dir / 'metrics.jsonl'}")
    return exit_code


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
