"""Checks of a typed run config, one function per section, each error one line naming the key.

:func:`validate` composes them: everything that can be checked before a run starts is checked here, so a
mistake costs a second, not the set-up of a cluster job. Types are already right (:mod:`.loading`); these
are the ranges and the agreements between settings.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, shown

if TYPE_CHECKING:
    from odegpt.model.configuration_odegpt import OdeGPTConfig
    from odegpt.training.objective import StepSizeDistribution

    from .schema import DataSection, DeepSpeedSection, EvalSection, RunConfig, TrainSection

# Model settings that do not change the weights or what they compute: a resume may change them.
RESUMABLE_MODEL_FIELDS = frozenset({"step_size", "max_solver_steps", "use_cache", "initializer_range",
                                    "bos_token_id", "eos_token_id", "pad_token_id"})
# What the user hands to DeepSpeed as is (DeepSpeed's own parser checks it): not swept for non-finite numbers.
_PASSED_TO_DEEPSPEED = {"deepspeed.extra"}


def validate(config: RunConfig, world_size: int | None = None) -> None:
    """Check every section, then how they fit together; with ``world_size`` also the batch geometry."""
    check_finite_numbers(config)
    check_train(config.train)
    distribution = check_step_size_distribution(config.train)
    model_config = check_model(config)
    check_solvers(config.train)
    check_readout_weights(config.train, model_config)
    check_distillation(config.train, model_config)
    check_exit_head(config.train, model_config)
    check_eval(config.eval)
    check_sequence_and_solve_lengths(config, model_config, distribution)
    check_checkpoint_and_logging(config)
    check_data(config.data)
    check_deepspeed(config)
    if world_size is not None:
        check_world_size(config.train, world_size)


# ---- helpers -----------------------------------------------------------------------------------

def positive(key: str, value: Any) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {shown(value)}")


def at_least_zero(key: str, value: Any) -> None:
    if not value >= 0:  # NaN fails too
        raise ConfigError(f"{key} must be >= 0, got {shown(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite_numbers(config: RunConfig) -> None:
    """Every number in every setting is finite: NaN passes ``x < 0`` checks (``grad_clip: .nan`` trained with
    ``"gradient_clipping": NaN``) and infinity a ``> 0`` one (``lr: .inf`` ran until its loss was NaN)."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for setting in dataclasses.fields(values):
            key = f"{section.name}.{setting.name}"
            if key not in _PASSED_TO_DEEPSPEED:
                _check_finite(key, getattr(values, setting.name))


def _check_finite(key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(f"{key}[{index}]", item)
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_finite(f"{key}.{name}", item)


# ---- one section each --------------------------------------------------------------------------

def check_train(train: TrainSection) -> None:
    """The optimizer, schedule and guards: counts > 0, rates and weights in range, a known precision."""
    for name in ("seq_len", "micro_batch_size", "global_batch_size", "train_steps", "max_nonfinite_steps",
                 "dist_timeout_s", "lr", "adam_eps"):
        positive(f"train.{name}", getattr(train, name))
    for name in ("min_lr", "weight_decay", "grad_clip", "consistency_weight", "reference_weight", "relax_lr_scale"):
        at_least_zero(f"train.{name}", getattr(train, name))
    if isinstance(train.seed, bool) or not isinstance(train.seed, int) or not 0 <= train.seed < 2**63:
        raise ConfigError(f"train.seed must be an integer in [0, 2**63), got {shown(train.seed)}")
    if train.min_lr > train.lr:
        raise ConfigError(f"train.min_lr ({train.min_lr}) must not exceed train.lr ({train.lr})")
    if train.warmup_steps < 0 or (train.decay_steps is not None and train.decay_steps < 1):
        raise ConfigError("train.warmup_steps must be >= 0 and train.decay_steps >= 1 (or null)")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be in [0, 1), got {shown(getattr(train, name))}")
    if train.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {shown(train.precision)}")
    if train.global_batch_size % train.micro_batch_size:
        raise ConfigError(f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                          f"train.micro_batch_size ({train.micro_batch_size})")


def check_step_size_distribution(train: TrainSection) -> StepSizeDistribution:
    """``train.step_size_distribution`` as the trainer will read it."""
    from odegpt.training.objective import StepSizeDistribution  # imports torch: not for `odegpt --help`

    if not isinstance(train.step_size_distribution, dict):
        raise ConfigError(f"train.step_size_distribution must be a mapping ({{choices: [...]}} or {{low: ..., "
                          f"high: ...}}), got {shown(train.step_size_distribution)}")
    try:
        return StepSizeDistribution.from_dict(train.step_size_distribution)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"train.step_size_distribution: {error}") from None


def check_model(config: RunConfig) -> OdeGPTConfig:
    """The ``model`` section, checked by ``OdeGPTConfig`` itself."""
    try:
        return config.model_config()
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model: {error}") from None


def check_solvers(train: TrainSection) -> None:
    if train.solvers is None:
        return
    from odegpt.training.objective import SolverSampler  # imports torch: not for `odegpt --help`

    try:
        SolverSampler(train.solvers, train.seed)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"train.solvers: {error}") from None


def check_readout_weights(train: TrainSection, model_config: OdeGPTConfig) -> None:
    """``{time: weight}``: times strictly inside the trained depth, weights finite and >= 0."""
    if train.readout_weights is None:
        return
    depth = model_config.num_hidden_layers
    if not isinstance(train.readout_weights, dict):
        raise ConfigError(f"train.readout_weights must be a mapping {{time: weight}}, e.g. {{2: 0.5}}, "
                          f"got {shown(train.readout_weights)}")
    for time, weight in train.readout_weights.items():
        try:  # a saved config.json holds the times as strings
            time = float(time) if isinstance(time, str) else time
        except ValueError:
            pass
        if not _is_number(time) or not 0 < time < depth:
            raise ConfigError(f"train.readout_weights: time {shown(time)} must be a number in (0, {depth}) "
                              f"(the trained depth)")
        if not _is_number(weight) or not 0 <= weight < math.inf:
            raise ConfigError(f"train.readout_weights: weight {shown(weight)} at time {time} must be >= 0")


def check_exit_head(train: TrainSection, model_config: OdeGPTConfig) -> None:
    """Training the exit head needs one in the model."""
    at_least_zero("train.exit_head_weight", train.exit_head_weight)
    positive("train.exit_head_positions", train.exit_head_positions)
    if train.exit_head_weight > 0 and model_config.exit_head is None:
        raise ConfigError("train.exit_head_weight trains the learned exit head, and model.exit_head is null: set "
                          "model.exit_head (0 for a linear head, N for a hidden layer of N)")
    if train.exit_head_weight > 0 and getattr(model_config, "exit_to_tail", False):
        raise ConfigError("train.exit_head_weight trains the exit head on the read-out of each state, and "
                          "model.exit_to_tail says it is fitted for the exit to the tail: set train.exit_head_weight "
                          "to 0 and fit it with `odegpt calibrate --exit-to tail`")


def check_distillation(train: TrainSection, model_config: OdeGPTConfig) -> None:
    """The distillation settings, and the source against the student: the same vocabulary, and, for the
    trajectory term, the same depth (its layers are the times the student's states are compared at)."""
    from odegpt.training.distillation import Distillation  # imports torch: only when a run is validated

    at_least_zero("train.lm_weight", train.lm_weight)
    if train.distill_precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.distill_precision must be fp32 or bf16, got {shown(train.distill_precision)}")
    if train.distill_from is None:
        distilling = [key for key in ("distill_stepwise", "distill_steps_per_sample", "distill_trajectory_weight")
                      if getattr(train, key)]
        if distilling or train.lm_weight <= 0:
            setting = f"train.{distilling[0]}" if distilling else "train.lm_weight: 0"
            raise ConfigError(f"{setting} needs train.distill_from: the source model folder to distill from")
        return
    try:
        Distillation(train.distill_kl_weight, train.distill_temperature, train.distill_trajectory_weight,
                     train.distill_stepwise, train.distill_steps_per_sample)
    except ValueError as error:
        raise ConfigError(f"train.distill_{error}") from None
    path = Path(train.distill_from) / "config.json"
    try:
        source = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"train.distill_from: cannot read {path}: {str(error)[:200]}") from None
    if source.get("vocab_size") != model_config.vocab_size:
        raise ConfigError(f"train.distill_from {train.distill_from}: its vocabulary of {source.get('vocab_size')} "
                          f"tokens is not the student's {model_config.vocab_size}: distill from the model the "
                          f"student was made from")
    depth = source.get("num_hidden_layers") if source.get("model_type") != "odegpt" else \
        sum(segment["depth"] for segment in source.get("segments", []))
    if train.distill_trajectory_weight > 0 and depth != model_config.num_hidden_layers:
        raise ConfigError(f"train.distill_trajectory_weight: the source {train.distill_from} has {depth} layers and "
                          f"the student a depth of {model_config.num_hidden_layers}; the trajectory compares the "
                          f"student at time t with the source after layer t, so they must be equal")


def check_eval(eval_section: EvalSection) -> None:
    for index, step_size in enumerate(eval_section.step_sizes):
        if not _is_number(step_size) or not 0 < step_size < math.inf:
            raise ConfigError(f"eval.step_sizes[{index}] must be a finite number > 0, got {shown(step_size)}")
    if eval_section.interval < 0 or eval_section.num_samples < 0:
        raise ConfigError("eval.interval and eval.num_samples must be >= 0")
    if eval_section.micro_batch_size is not None:
        positive("eval.micro_batch_size", eval_section.micro_batch_size)


def check_sequence_and_solve_lengths(config: RunConfig, model_config: OdeGPTConfig,
                                     distribution: StepSizeDistribution) -> None:
    """Sequences fit the model's positions, and the longest solve (the smallest step size, trained or
    evaluated) fits ``model.max_solver_steps``: refused here, not after hours of set-up."""
    from odegpt.model.solver import SolveTooLongError  # imports torch: not for `odegpt --help`

    if config.train.seq_len > model_config.max_position_embeddings:
        raise ConfigError(f"train.seq_len ({config.train.seq_len}) exceeds model.max_position_embeddings "
                          f"({model_config.max_position_embeddings})")
    if distribution.choices is None:
        smallest = ("train.step_size_distribution.low", distribution.low)
    else:
        smallest = ("train.step_size_distribution.choices", min(distribution.choices))
    evaluated = [(f"eval.step_sizes[{index}]", a) for index, a in enumerate(config.eval.step_sizes)]
    for key, step_size in [smallest, *evaluated]:
        try:
            model_config.solver_steps(step_size)
        except SolveTooLongError as error:
            raise ConfigError(f"{key}: {error} (model.max_solver_steps)") from None


def check_checkpoint_and_logging(config: RunConfig) -> None:
    if config.checkpoint.interval < 0 or config.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1")
    positive("logging.interval", config.logging.interval)
    if config.logging.peak_tflops_per_device is not None:
        positive("logging.peak_tflops_per_device", config.logging.peak_tflops_per_device)


def check_data(data: DataSection) -> None:
    if data.weights is not None and len(data.weights) != len(data.corpora):
        raise ConfigError(f"data.weights has {len(data.weights)} entries but data.corpora has {len(data.corpora)}")
    for index, weight in enumerate(data.weights or []):
        if not _is_number(weight) or not weight >= 0:
            raise ConfigError(f"data.weights[{index}] must be a number >= 0, got {shown(weight)}")


def check_deepspeed(config: RunConfig) -> None:
    """ZeRO settings that fit together and with training, and the user's own DeepSpeed config readable."""
    zero: DeepSpeedSection = config.deepspeed
    if zero.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {shown(zero.zero_stage)}")
    if zero.offload_param and zero.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param needs deepspeed.zero_stage: 3")
    if zero.offload_optimizer and zero.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    if config.train.init_from is not None and zero.zero_stage == 3 and zero.zero3_init:
        raise ConfigError("train.init_from loads the folder's weights whole before DeepSpeed partitions them: "
                          "set deepspeed.zero3_init: false (or use ZeRO 0-2)")
    if config.train.compile and zero.zero_stage == 3:
        raise ConfigError("train.compile needs deepspeed.zero_stage <= 2: ZeRO-3 gathers parameters in "
                          "module hooks that torch.compile does not trace")
    user = config.user_deepspeed_config()
    if config.precision_for("cuda") == "bf16" and (user.get("fp16") or {}).get("enabled"):
        raise ConfigError("deepspeed fp16.enabled: true needs train.precision: fp32 (DeepSpeed's fp16 mixed "
                          f"precision; bf16 is train.precision: bf16), got train.precision: {config.train.precision}")


def check_world_size(train: TrainSection, world_size: int) -> None:
    """The global batch splits into whole micro-batches on every rank."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({train.micro_batch_size}) x world size ({world_size}) = {per_step}; "
            f"try --set train.global_batch_size={max(per_step, train.global_batch_size // per_step * per_step)}")


# ---- resuming ----------------------------------------------------------------------------------

def check_resumable(config: RunConfig, saved: dict, where: str) -> None:
    """Refuse to resume the checkpoint at ``where`` (saved with run config ``saved``) with another model,
    naming every differing ``model.`` field."""
    from odegpt.model.configuration_odegpt import OdeGPTConfig  # transformers: not for `odegpt --help`

    names = [setting.name for setting in dataclasses.fields(config.model)]

    def normalized(section: dict) -> dict:  # OdeGPTConfig fills defaults (num_key_value_heads, segments)
        model = OdeGPTConfig(**section)
        return {name: getattr(model, name) for name in names}

    old, new = normalized(saved["model"]), normalized(dataclasses.asdict(config.model))
    differing = [f"model.{name} (checkpoint {shown(old[name])}, now {shown(new[name])})" for name in old
                 if old[name] != new[name] and name not in RESUMABLE_MODEL_FIELDS]
    if differing:
        raise ConfigError(f"cannot resume {where} with another model: {'; '.join(differing)}. Resume with the "
                          f"checkpoint's model settings, or start a new run with another run.output_dir")

