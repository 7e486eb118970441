"""Pretraining entry point: ``python -m launcher.train --config ...`` (or ``odegpt train``).

Runs the same way under the ``deepspeed`` launcher, under ``torchrun`` and as one plain process
(a world of one). The model is plain ``OdeGPTForCausalLM``; everything distributed — ZeRO (with
parameters created partitioned under ZeRO-3), the optimizer, checkpointing — is wrapped around it
here. One optimizer step = one step size ``a`` (drawn from (seed, step), identical on every rank),
``gradient_accumulation_steps`` micro-batches per rank, one all-reduce of the loss and the stop flag.

:class:`Trainer` sets a run up (checks first, writes after, builds last) and :meth:`Trainer.train`
is the loop; evaluation, checkpoints and metrics each decide their own interval.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from data_pipeline.files import write_json_atomic
from data_pipeline.writer_lock import hold_writer_lock

from . import checkpointing, faults
from .checkpointing import Checkpoint, CheckpointError, complete_tags
from .cli import add_train_arguments
from .config import ConfigError, load_config
from .faults import NonFiniteLossError, StartupInterrupted, interruptible_startup
from .launch import free_port
from .leftovers import clear_stale_build_locks
from .metrics import GIB, MetricsLogger, gather_floats, peak_memory_bytes
from .run_folder import check_run_folder


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    return add_train_arguments(
        parser or argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__.split("\n")[0]))


# ---- process set-up ---------------------------------------------------------------------------

def _prepare_environment() -> None:
    """Make a plain process a world of one, pick the accelerator, and keep CPU threads per rank sane
    (the deepspeed launcher does not set OMP_NUM_THREADS; oversubscribed ranks run ~40x slower)."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    # torch loads here, inside the interruptible start-up (seconds), not at import
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


class TrainingError(Exception):
    """A run that cannot start, agreed by every rank: printed once, as one line, exit 2."""


def _describe(error: Exception) -> str:
    return f"config error: {error}" if isinstance(error, ConfigError) else str(error)


def _user_errors() -> tuple[type[Exception], ...]:
    """What bad input (config, checkpoints, corpora) raises during set-up."""
    # torch & co. load inside the rank's interruptible start-up, not at import
    from data_pipeline.shards import ShardError

    return ConfigError, CheckpointError, ShardError, TrainingError, ValueError, OSError


def decided_by_rank_zero(decide: Callable[[], Any]) -> Any:
    """Rank 0 runs ``decide`` (reading files, say) and every rank gets its result — or every rank raises
    its error, so the job ends with one message instead of a stack per rank or a hang."""
    # torch & co. load inside the rank's interruptible start-up, not at import
    import torch.distributed as dist

    payload: list = [None]
    if dist.get_rank() == 0:
        try:
            payload = [(decide(), None)]
        except _user_errors() as error:
            payload = [(None, _describe(error))]
    dist.broadcast_object_list(payload, src=0)
    result, message = payload[0]
    if message is not None:
        raise TrainingError(message)
    return result


def on_every_rank(action: Callable[[], Any]) -> Any:
    """Every rank runs ``action``; if it fails on any of them, every rank raises the first failure."""
    # torch & co. load inside the rank's interruptible start-up, not at import
    import torch.distributed as dist

    try:
        result, message = action(), None
    except _user_errors() as error:
        result, message = None, _describe(error)
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise TrainingError(first)
    return result


def peak_flops_per_device(config, device_type: str, say: Callable[[str], None]) -> float:
    """Peak FLOP/s of one rank's device for MFU: ``logging.peak_tflops_per_device``, else the GPU's dense bf16
    peak from its name (``odegpt.model.accounting.PEAK_TFLOPS``), else 100 GFLOP/s per CPU thread (an AVX2 core:
    2 FMA units x 8 fp32 lanes x 2 x ~3 GHz)."""
    # torch & co. load inside the rank's interruptible start-up, not at import
    import torch

    from odegpt.model.accounting import peak_tflops

    tflops = config.logging.peak_tflops_per_device
    if tflops is None and device_type == "cuda":
        name = torch.cuda.get_device_name()
        tflops = peak_tflops(name)
        if tflops is None:
            tflops = 312.0
            say(f"MFU: no peak known for {name!r}; assuming 312 TFLOP/s, set logging.peak_tflops_per_device")
    elif tflops is None:
        tflops = 0.1 * torch.get_num_threads()
    return tflops * 1e12


def initialize_partitions(model, seed: int, rank: int) -> None:
    """Initialize a model built under ``deepspeed.zero.Init`` where it lies: each rank draws its own slice of
    every parameter (``ds_tensor``) with the model's own ``_init_weights`` (normal(0, initializer_range) for
    matrices, ones for norms: element-wise rules, so a flat slice takes them as well as the whole tensor).
    Nothing is gathered, so no rank ever holds a whole layer twice; the random stream is seeded by
    (``train.seed``, rank), so the initial weights depend on the number of ranks (resumes are exact)."""
    # torch & co. load inside the rank's interruptible start-up, not at import
    import numpy as np
    import torch

    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
        for module in model.modules():
            parameters = list(module.parameters(recurse=False))
            placeholders = [p.data for p in parameters]
            for parameter in parameters:
                parameter.data = parameter.ds_tensor.data
            try:
                model._init_weights(module)
            finally:
                for parameter, placeholder in zip(parameters, placeholders):
                    parameter.data = placeholder


# ---- the trainer ------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float  # mean over ranks and micro-batches
    step_size: float
    stop: bool  # a stop signal arrived on some rank
    solver: str | None = None  # the drawn solver method, when train.solvers draws one
    terms: dict[str, float] = field(default_factory=dict)  # the loss's weighted terms (ce, kl, trajectory, ...)


class Evaluator:
    """Validation perplexity at ``eval.step_sizes`` on a fixed, evenly spread subset of the validation split."""

    def __init__(self, model, batches: list, step_sizes: list[float], interval: int, at_end: bool,
                 description: str = "") -> None:
        self.model, self.batches, self.step_sizes = model, batches, step_sizes
        self.interval, self.at_end, self.description = interval, at_end, description

    def due(self, step: int, last: bool) -> bool:
        if not self.batches:
            return False
        return self.at_end if last else bool(self.interval) and step % self.interval == 0

    def run(self) -> dict[float, float]:
        """Collective: every rank scores its share, the sums are all-reduced."""
        # torch & co. load inside the rank's interruptible start-up, not at import
        import torch
        import torch.distributed as dist

        from odegpt.evaluation.perplexity import nll_sums, perplexity

        sums = nll_sums(self.model, self.batches, self.step_sizes)
        device = self.batches[0].device
        totals = torch.tensor([[s, n] for s, n in sums.values()], dtype=torch.float64, device=device)
        dist.all_reduce(totals)  # NCCL needs device tensors; gloo takes CPU ones
        return {a: perplexity(float(s), int(n)) for a, (s, n) in zip(sums, totals.tolist())}


def gradient_norm(model) -> float | None:
    """The L2 norm of ``model``'s gradients (None when it holds none, as under DeepSpeed's bf16 wrapper)."""
    # torch & co. load inside the rank's interruptible start-up, not at import
    import torch

    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


class Trainer:
    def __init__(self, config, resume: str | None, rank: int, world_size: int, device_type: str) -> None:
        # deepspeed reads DS_ACCELERATOR on import (set at start-up); torch & co.: in the start-up, not at import
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        from odegpt.evaluation.perplexity import evaluation_indices
        from odegpt.training.objective import SolverSampler, StepSizeDistribution, StepSizeSampler

        from . import data
        from .optim import parameter_groups, schedule_for

        self.config, self.rank, self.world_size, self.device_type = config, rank, world_size, device_type
        config.validate(world_size)
        t = self.config.train
        self.output_dir, self.checkpoint_dir = Path(config.run.output_dir), config.checkpoint_dir
        # The DeepSpeed config, with the user's own merged in (clashes said once, a bad key refused by every rank).
        ds_config = decided_by_rank_zero(lambda: config.to_deepspeed_config(world_size, device_type, note=self.say))

        # 1. Check everything a user can get wrong before writing or building anything.
        checkpoint, self.tokenizer_record = decided_by_rank_zero(lambda: self._check_before_writing(resume))
        if checkpoint is not None and checkpoint.universal:  # DeepSpeed then reads zero/ for any world size
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        train_ds, valid_ds = on_every_rank(lambda: data.build_datasets(config))

        # 2. Only now write: the run's config and metrics.
        if rank == 0:
            self._write_run_files(ds_config)
        self.step = checkpoint.state["step"] if checkpoint else 0
        self.consumed_samples = checkpoint.state["consumed_samples"] if checkpoint else 0
        self.metrics = MetricsLogger(self.output_dir, rank, config.logging.interval, t.train_steps, self.step,
                                     config.logging.tensorboard, config.logging.progress_bar, fresh=checkpoint is None)

        # 3. Build: the model (partitioned from birth under ZeRO-3), the engine, the data streams.
        self.model = self._build_model(ds_config)
        schedule = schedule_for(t)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model,
            model_parameters=parameter_groups(self.model, t.weight_decay, t.lr, t.relax_lr_scale), config=ds_config,
            # A plain function, so the schedule is not restored from a checkpoint: after a resume the
            # configured schedule (perhaps with a new train.train_steps) applies from the saved step on.
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda index: schedule(index)))
        self.device = self.engine.device
        self.teacher, self.distill = self._build_teacher(ds_config)
        engine_config = self.engine._config  # DeepSpeed's parse of ds_config: what the engine runs with
        self.metrics.record("engine", self.step, {
            "zero_stage": self.engine.zero_optimization_stage(),
            "wall_clock_breakdown": self.engine.wall_clock_breakdown(),
            "flops_profiler": engine_config.flops_profiler_config.enabled,
            "load_universal_checkpoint": self.engine.load_universal_checkpoint()})
        self.checkpointer = checkpointing.Checkpointer(self.engine, self.checkpoint_dir, config.checkpoint.interval,
                                                       config.checkpoint.keep_last)
        if checkpoint is not None:
            self.checkpointer.load(checkpoint)
            saved_on = checkpoint.state.get("world_size")
            self.say(f"resumed from {checkpoint.path}" + (f" (DeepSpeed universal checkpoint, saved on {saved_on} "
                                                          f"rank(s), now {world_size})" if checkpoint.universal else "")
                     + f": step {self.step}, {self.consumed_samples} samples consumed")
        self.sampler = StepSizeSampler(StepSizeDistribution.from_dict(t.step_size_distribution), t.seed)
        saved_sampler = checkpoint.state.get("step_size_sampler") if checkpoint else None
        if saved_sampler is not None and saved_sampler != self.sampler.state_dict():
            # A pure function of (seed, step): a resume draws what the run would have drawn, unless the settings
            # changed, which is allowed (a new curriculum, say) but said.
            self.say(f"the step-size draws change at step {self.step}: the checkpoint drew from {saved_sampler}, "
                     f"this run draws from {self.sampler.state_dict()} (train.step_size_distribution, train.seed)")
        self.solvers = None if t.solvers is None else SolverSampler(t.solvers, t.seed)
        self.grad_accum = config.gradient_accumulation_steps(world_size)
        self.batches = data.train_micro_batches(train_ds, self.consumed_samples, t.micro_batch_size, rank, world_size)
        eval_micro = config.eval.micro_batch_size or t.micro_batch_size
        eval_batches = [batch.to(self.device) for batch in data.valid_batches(
            valid_ds, config.eval.num_samples, eval_micro, rank, world_size)] \
            if valid_ds is not None and config.eval.num_samples else []
        scored = 0 if valid_ds is None else len(evaluation_indices(len(valid_ds), config.eval.num_samples))
        self.evaluator = Evaluator(self.engine.module, eval_batches, config.eval_step_sizes, config.eval.interval,
                                   config.eval.at_end, f"{scored // world_size * world_size} validation samples of "
                                                       f"{t.seq_len} tokens")
        self.peak_flops = peak_flops_per_device(config, device_type, self.say) * world_size
        self.stop = faults.StopRequest().install()
        self.guard = faults.NonFiniteGuard(t.max_nonfinite_steps, checkpoint_dir=self.checkpoint_dir)
        self._costs: dict[tuple, tuple[int, float]] = {}  # (a, solver) -> (solver steps, training FLOPs/token)
        self._grad_norm: float | None = None  # measured here where DeepSpeed reports none (ZeRO-0)

    def _check_before_writing(self, resume: str | None) -> tuple[Checkpoint | None, dict | None]:
        """Rank 0, before anything is written or built: the run folder (then held), the corpora and the tokenizer
        (a folder to ``init_from`` trained with the same one), the checkpoint to resume (the same model, tokenizer
        and world size). Returns (checkpoint or None, the run's tokenizer record)."""
        # torch & co. load inside the rank's interruptible start-up, not at import
        from . import data

        config = self.config
        check_run_folder(self.output_dir)
        hold_writer_lock(self.output_dir, "run folder")  # rank 0 holds it until the process ends
        data.check_corpora(config)
        tokenizer = data.run_tokenizer(config)
        data.check_init_from_tokenizer(config, tokenizer)
        checkpoint = checkpointing.choose(resume, self.checkpoint_dir, note=self.say)
        if checkpoint is not None:
            config.check_resumable(checkpoint.state["config"], str(checkpoint.path))
            data.check_resumed_tokenizer(checkpoint.state.get("tokenizer"), tokenizer, str(checkpoint.path))
            checkpointing.check_world_size(checkpoint, self.world_size)
        return checkpoint, tokenizer

    def _write_run_files(self, ds_config: dict) -> None:
        """The run's config.json and the DeepSpeed config the engine is given (rank 0, after every check)."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.output_dir / "config.json", self.config.to_dict())
        write_json_atomic(self.output_dir / "deepspeed_config.json", ds_config)

    def _build_teacher(self, ds_config: dict):
        """The frozen source and the distillation settings (``train.distill_*``), or (None, None)."""
        # torch & co. load inside the rank's interruptible start-up, not at import
        from odegpt.model.accounting import model_cost
        from odegpt.training.distillation import Distillation
        from odegpt.training.objective import describe_objective

        from .teacher import load_teacher

        t = self.config.train
        self.source_config = None
        if t.distill_from is None:
            self.say("loss = " + describe_objective(t.consistency_weight, t.reference_weight, t.readout_weights,
                                                    t.lm_weight))
            return None, None
        start = time.perf_counter()
        teacher = load_teacher(t.distill_from, t.distill_precision, self.device, ds_config)
        self.say(f"distilling from {t.distill_from} ({t.distill_precision}, loaded in "
                 f"{time.perf_counter() - start:.1f}s)")
        distill = Distillation(t.distill_kl_weight, t.distill_temperature, t.distill_trajectory_weight,
                               t.distill_stepwise, t.distill_steps_per_sample)
        self.say("loss = " + describe_objective(t.consistency_weight, t.reference_weight, t.readout_weights,
                                                t.lm_weight, distill))
        self.source_config = getattr(teacher, "module", teacher).config
        held = [p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in teacher.parameters()]
        self.metrics.record("teacher", self.step, {
            "source": t.distill_from, "parameters": int(model_cost(self.source_config).parameters),
            "parameters_held_per_rank": [int(n) for n in gather_floats(float(sum(held)))]})
        return teacher, distill

    def say(self, message: str) -> None:
        if self.rank == 0:
            metrics = getattr(self, "metrics", None)
            if metrics is not None:
                metrics.say(message)
            else:
                print(message, file=sys.stderr, flush=True)

    def _build_model(self, ds_config: dict):
        """``OdeGPTForCausalLM``; under ZeRO-3 created partitioned (``deepspeed.zero.Init``) and initialized
        partition by partition (:func:`initialize_partitions`): no rank ever holds the whole model."""
        # deepspeed reads DS_ACCELERATOR on import (set at start-up); torch & co.: in the start-up, not at import
        import deepspeed
        import torch

        from odegpt import OdeGPTForCausalLM
        from odegpt.model.accounting import model_cost

        t, model_config = self.config.train, self.config.model_config()
        zero_init = self.config.deepspeed.zero_stage == 3 and self.config.deepspeed.zero3_init
        before, start = peak_memory_bytes(self.device_type), time.perf_counter()
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        if zero_init:
            # torch & co. load inside the rank's interruptible start-up, not at import
            from transformers.initialization import no_init_weights

            with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = OdeGPTForCausalLM(model_config)
            initialize_partitions(model, t.seed, self.rank)
            model.tie_weights()
        else:
            model = OdeGPTForCausalLM(model_config)
        if t.init_from is not None:  # the weights of an imported or trained folder (its shape is the config's)
            # torch & co. load inside the rank's interruptible start-up, not at import
            from odegpt.folders.model_folder import load_model

            model.load_state_dict(load_model(t.init_from).float().state_dict(), strict=True)
            self.say(f"initialised from {t.init_from}")
        if t.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if t.compile:
            for block in model.model.blocks:  # the solver calls the two branches of each block
                block.attention_branch = torch.compile(block.attention_branch)
                block.mlp_branch = torch.compile(block.mlp_branch)
        memory = [(b / GIB, a / GIB) for b, a in zip(gather_floats(float(before)),
                                                      gather_floats(float(peak_memory_bytes(self.device_type))))]
        held = {id(p): p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters()}
        parameters = model_cost(model_config, seq_len=t.seq_len).parameters
        model_gib = parameters * (2 if self.config.precision_for(self.device_type) == "bf16" else 4) / GIB
        self.metrics.record("build", self.step, {
            "parameters": parameters, "model_gib": model_gib, "zero_init": zero_init,
            "parameters_held_per_rank": [int(n) for n in gather_floats(float(sum(held.values())))],
            "seconds": time.perf_counter() - start, "peak_memory_gib_before": [b for b, _ in memory],
            "peak_memory_gib_after": [a for _, a in memory]})
        self.say(f"built {parameters:,} parameters ({model_gib:.2f} GiB) in {time.perf_counter() - start:.1f}s"
                 + (f", created partitioned over {self.world_size} rank(s) (zero.Init)" if zero_init else "")
                 + "; peak memory per rank " + ", ".join(f"{a:.2f} GiB" for _, a in memory))

        return model

    # ---- the loop -----------------------------------------------------------------------------

    def train(self) -> int:
        """Optimizer steps until ``train.train_steps``; stop (after saving) on SIGTERM/SIGINT. Returns the exit code."""
        t = self.config.train
        self.say(f"training on {self.world_size} rank(s), ZeRO-{self.config.deepspeed.zero_stage}, "
                 f"{self.config.precision_for(self.device_type)}, {self.grad_accum} micro-batch(es) of "
                 f"{t.micro_batch_size} per rank per step")
        while self.step < t.train_steps:
            result = self.train_step()
            self.step += 1
            self.consumed_samples += t.global_batch_size
            self.log(result, last=self.step == t.train_steps or result.stop)
            self.guard.update(self.step, result.loss, math.isfinite(result.loss))
            if result.stop:
                return self.stop_on_signal()
            if not self.guard.streak:  # never evaluate or checkpoint a step with a non-finite loss
                self.maybe_evaluate(last=False)
                self.maybe_save()
        self.maybe_evaluate(last=True)
        self.save()
        self.say(f"done: {self.step} steps, {self.consumed_samples} samples; checkpoints in {self.checkpoint_dir}, "
                 f"metrics in {self.output_dir / 'metrics.jsonl'}")
        return 0

    def train_step(self) -> StepResult:
        """One optimizer step at this step's ``a``: ``grad_accum`` micro-batches, then one all-reduce of the
        loss and the stop flag (so every rank stops at the same step)."""
        # torch & co. load inside the rank's interruptible start-up, not at import
        import torch
        import torch.distributed as dist

        a = self.sampler.sample(self.step)
        solver = None if self.solvers is None else self.solvers.sample(self.step)
        self.engine.train()
        names = self.term_names()
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)  # the terms, then the loss
        for _ in range(self.grad_accum):
            terms = self.micro_batch_loss(next(self.batches).to(self.device), a, solver)
            loss = sum(terms.values())
            sums += torch.stack([*(terms[name].detach().double() if name in terms else sums.new_zeros(())
                                   for name in names), loss.detach().double()])
            # A non-finite micro-batch back-propagates zero instead (collectives stay aligned).
            self.engine.backward(torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)))
            if self.engine.zero_optimization_stage() == 0 and self.engine.is_gradient_accumulation_boundary():
                self._grad_norm = gradient_norm(self.engine.module)  # reduced, not yet clipped or applied
            self.engine.step()
        stop = torch.tensor([float(self.stop.requested)], dtype=torch.float64, device=self.device)
        reduced = torch.cat([sums / self.grad_accum, stop])
        dist.all_reduce(reduced)
        means = (reduced[:-1] / self.world_size).tolist()
        return StepResult(loss=means[-1], step_size=a, stop=reduced[-1].item() > 0, solver=solver,
                          terms=dict(zip(names, means[:-1])) if len(names) > 1 else {})

    def term_names(self) -> list[str]:
        """The loss terms this run can have (odegpt.training.objective.objective_terms), in a fixed order for the
        all-reduce: a step whose draw has no term counts it 0."""
        t = self.config.train
        names = [] if self.distill is not None and self.distill.stepwise else \
            ["ce"] * (t.lm_weight > 0) + ["readout"] * bool(t.readout_weights) + \
            ["reference"] * (t.reference_weight > 0 and t.lm_weight > 0) + ["consistency"] * (t.consistency_weight > 0)
        if self.distill is not None:
            distilled = ["kl"] * (self.distill.kl_weight > 0) + ["trajectory"] * (self.distill.trajectory_weight > 0)
            names += ["trajectory"] if self.distill.stepwise else \
                distilled + [f"reference_{name}" for name in distilled] * (t.reference_weight > 0)
        if t.exit_head_weight > 0 and not (self.distill is not None and self.distill.stepwise):
            names.append("exit")
        return names or ["ce"]

    def micro_batch_loss(self, tokens, step_size: float, solver: str | None = None) -> dict:
        # torch & co. load inside the rank's interruptible start-up, not at import
        from odegpt.training.objective import objective_terms

        t = self.config.train
        return objective_terms(self.engine, tokens, step_size, t.consistency_weight, t.reference_weight,
                               t.readout_weights, solver, t.lm_weight, self.distill, self.teacher,
                               t.exit_head_weight, t.exit_head_positions)

    # ---- what the loop delegates to: each decides its own interval ---------------------------------

    def log(self, result: StepResult, last: bool) -> None:
        # torch & co. load inside the rank's interruptible start-up, not at import
        from odegpt.model.accounting import model_cost
        from odegpt.training.objective import objective_flops_per_token

        t = self.config.train
        a, solver = result.step_size, result.solver
        if (a, solver) not in self._costs:  # solver steps at a; training FLOPs/token, the a=1 passes included
            model_config = self.config.model_config()
            self._costs[a, solver] = (model_cost(model_config, a, t.seq_len).executed_steps,
                                      objective_flops_per_token(model_config, a, t.seq_len, t.consistency_weight,
                                                                t.reference_weight, t.readout_weights, solver,
                                                                self.distill, self.source_config))
        executed_steps, flops_per_token = self._costs[a, solver]
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None or not math.isfinite(float(grad_norm)):  # ZeRO-0 computes it only to clip, if at all
            grad_norm = self._grad_norm if self._grad_norm is not None else grad_norm
        tokens = t.global_batch_size * t.seq_len
        self.metrics.train_step(self.step, {
            "loss": result.loss, "step_size": a, "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "executed_steps": executed_steps, **({} if solver is None else {"solver": solver}),
            **({"terms": result.terms} if result.terms else {})},
            tokens=tokens, flops=flops_per_token * tokens, peak_flops=self.peak_flops, device_type=self.device_type,
            last=last)

    def stop_on_signal(self) -> int:
        if not self.guard.streak:  # never checkpoint a step with a non-finite loss
            self.save()
        self.say(f"stopping on {self.stop.signal_name or 'a signal on another rank'} at step {self.step}; "
                 f"resume with --resume auto")
        return 0

    def maybe_evaluate(self, last: bool) -> None:
        if not self.evaluator.due(self.step, last) or (not last and self.step == self.config.train.train_steps):
            return
        start = time.perf_counter()
        result = self.evaluator.run()
        self.metrics.record("valid", self.step, {f"ppl_a{a:g}": p for a, p in result.items()})
        self.say(f"step {self.step}: validation perplexity ({self.evaluator.description}) "
                 + "  ".join(f"a={a:g}: {p:.2f}" for a, p in result.items()))
        self.metrics.exclude(time.perf_counter() - start)

    def maybe_save(self) -> None:
        start = time.perf_counter()
        path = self.checkpointer.maybe_save(self.step, self.state_dict())
        if path is not None:
            self.say(f"step {self.step}: saved checkpoint {path}")
            self.metrics.exclude(time.perf_counter() - start)

    def save(self) -> None:
        path = self.checkpointer.save(self.step, self.state_dict())
        if path is not None:
            self.say(f"step {self.step}: saved checkpoint {path}")

    def state_dict(self) -> dict:
        """What the engine does not know, saved beside its files as ``odegpt_state.json``."""
        return {"step": self.step, "consumed_samples": self.consumed_samples, "config": self.config.to_dict(),
                "step_size_sampler": self.sampler.state_dict(), "world_size": self.world_size,
                "tokenizer": self.tokenizer_record}  # {"path", "fingerprint"} or None: a resume compares it

    def close(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()


# ---- the run ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    started = time.time()
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"odegpt train: config error: {error}", file=sys.stderr)
        return 2
    try:
        with interruptible_startup():
            device_type = _start_process()
    except StartupInterrupted as interrupted:
        print(f"odegpt train: stopped by {interrupted} during start-up; nothing was written", file=sys.stderr)
        return interrupted.exit_code

    # deepspeed reads DS_ACCELERATOR on import (set at start-up); torch & co.: in the start-up, not at import
    import deepspeed
    import torch.distributed as dist

    # The rendezvous blocks in C, where a Python signal handler would wait for its timeout: default signals here.
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                               timeout=datetime.timedelta(seconds=config.train.dist_timeout_s))
    rank = dist.get_rank()
    trainer = None
    try:
        with interruptible_startup():
            trainer = Trainer(config, args.resume, rank, dist.get_world_size(), device_type)
        return trainer.train()
    except StartupInterrupted as interrupted:
        if rank == 0:
            removed = _remove_startup_outputs(config, started)
            print(f"odegpt train: stopped by {interrupted} during start-up"
                  + (f"; removed what it had written ({', '.join(removed)})" if removed else ""),
                  file=sys.stderr, flush=True)
        return interrupted.exit_code
    except (ConfigError, CheckpointError, TrainingError) as error:
        if rank == 0:
            print(f"odegpt train: {_describe(error)}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLossError as error:
        if rank == 0:
            print(f"odegpt train: {error}", file=sys.stderr, flush=True)
        return 3
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _start_process() -> str:
    """Everything before the rendezvous, interruptible: the environment, the accelerator, and torch-extension
    build locks left by killed builds (DeepSpeed would wait on them forever). Returns the device type."""
    _prepare_environment()
    # DeepSpeed's ZeRO-2/3 still call torch's deprecated all_gather_into_tensor: one warning per call.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # torch loads here, inside the interruptible start-up (seconds), not at import
    import torch

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if os.environ.get("LOCAL_RANK", "0") == "0":
        # Only locks from before this job's ranks started: a sibling rank may be building right now.
        clear_stale_build_locks(lambda message: print(f"odegpt train: {message}", file=sys.stderr, flush=True),
                                older_than=psutil.Process().create_time() - 10)
    if device_type == "cpu":
        skip_shared_memory_allreduce()
    return device_type


def _remove_startup_outputs(config, started: float) -> list[str]:
    """After a start-up interrupted by a signal: remove the files this process wrote into a run that has no
    checkpoint (its config.json, metrics, an empty checkpoints/ folder). A run with a checkpoint is left as
    it is: its config.json was checked against the checkpoint, and its metrics are the run's history."""
    output_dir = Path(config.run.output_dir)
    if complete_tags(config.checkpoint_dir):
        return []
    removed = []
    for name in ("config.json", "deepspeed_config.json", "metrics.jsonl", "tensorboard", ".odegpt.lock"):
        path = output_dir / name
        if path.exists() and path.stat().st_mtime >= started:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(name)
    for folder in (config.checkpoint_dir, output_dir):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
    return removed


def skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce in this process.

    DeepSpeed JIT-compiles that op (``deepspeed_shm_comm``) in every process that starts its
    communication backend on CPU, and every rank of a launch then creates a 66 MB buffer in
    /dev/shm that nothing removes. Only tensor-parallel inference (``inference_all_reduce``) uses it;
    training's collectives go through gloo. Skipping it saves the first run's compile (which needs a
    C++ toolchain), the shared memory leaked per run, and the hang of every later start when a
    killed build leaves its lock file behind.
    """
    # By module name: the attribute deepspeed.comm.torch is the torch package deepspeed.comm imports.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def exit_without_finalization(code: int) -> None:
    """End a rank process at once, once the run has closed and flushed everything it writes.

    At interpreter finalization, gloo objects that DeepSpeed still references are destroyed while their
    worker threads are live, and now and then that aborts the process ("terminate called without an
    active exception", exit -6) after a run that finished and saved everything: the launcher then reports
    a failure (seen once in CI on a ZeRO-3 rank, after `done:`; pytorch/pytorch#179291 describes the
    race). Skipping finalization avoids it; logging, stdout and stderr are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    from launcher.train import main as importable_main  # this module's one copy, not a second one as __main__

    exit_without_finalization(importable_main())
