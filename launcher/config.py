"""The run configuration: YAML files composed in order, `--set` overrides, strict typed validation.

A run is described by one nested mapping with the sections below. It is built from YAML files
(each may list ``defaults:`` — other files, relative to itself, merged first), merged left to
right, then ``--set section.key=value`` overrides (values parsed as YAML). The result is validated
into dataclasses before anything starts: an unknown key, a wrong type, a batch that does not fit
the world size or a ``seq_len`` beyond the model's positions is a :class:`ConfigError` naming the
key. The DeepSpeed config is *generated* from the validated object, never written by hand, so the
two cannot disagree; what odegpt has no setting for (the flops profiler, the comms logger, NVMe
offload, ZeRO++, ...) a user adds as DeepSpeed config (``deepspeed.extra``, ``--deepspeed-config``),
deep-merged in, with odegpt's own keys winning.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import inspect
import json
import logging
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""


@functools.cache
def model_section() -> type:
    """The ``model`` section: exactly ``OdeGPTConfig``'s keyword arguments, with its defaults and types.

    A model setting is declared once, in the model's own config class; the run config takes its
    fields from there (built on first use: it imports transformers), so the two cannot drift.
    """
    from odegpt.model.configuration_odegpt import OdeGPTConfig

    hints = typing.get_type_hints(OdeGPTConfig.__init__)
    fields = [(name, hints[name], field(default_factory=functools.partial(copy.deepcopy, parameter.default)))
              for name, parameter in inspect.signature(OdeGPTConfig.__init__).parameters.items()
              if name != "self" and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    return dataclasses.make_dataclass("ModelSection", fields)


@dataclass
class TrainSection:
    """Optimization: batch geometry, schedule, objective and the guards that stop a bad run."""

    seq_len: int = 2048
    micro_batch_size: int = 8
    global_batch_size: int = 256  # = micro_batch_size * gradient accumulation * data-parallel ranks
    train_steps: int = 10000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 500
    decay_steps: int | None = None  # cosine length after warmup; None = until train_steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = True
    seed: int = 1234
    # Distribution of the step size `a`, sampled once per optimizer step (odegpt.training.objective), e.g.
    # {choices: [0.5, 1, 2, 4], weights: [1, 3, 1, 1], curriculum_steps: 300} or {low: 0.5, high: 4}.
    # (model.step_size is the one float a model is solved at by default.)
    step_size_distribution: dict = field(default_factory=lambda: {"choices": [1.0]})
    consistency_weight: float = 0.0  # KL(p_1 || p_a) towards the detached a=1 solve, on steps with a != 1
    reference_weight: float = 0.0  # also the a=1 loss (this weight) on steps with a != 1: one more pass
    # Auxiliary read-out losses {time: weight} at intermediate solver times of the drawn solve (where it
    # has a step boundary), e.g. {1: 0.3, 2: 0.3, 3: 0.3}: early read-outs for entropy early exit.
    readout_weights: dict | None = None
    # Solver methods {name: weight} drawn per optimizer step (odegpt.model.solver.METHODS), e.g. {euler: 1, heun: 1};
    # null trains with model.solver only.
    solvers: dict | None = None
    max_nonfinite_steps: int = 3  # stop after this many optimizer steps in a row with a non-finite loss
    dist_timeout_s: int = 600  # collectives with a dead peer fail after this long
    compile: bool = False  # torch.compile each block's attention and MLP branches (ZeRO 0-2)
    # Start from the weights of an odegpt model folder (e.g. `odegpt import` of a pretrained Llama): the model
    # section's shape is taken from the folder, and a shape the config sets otherwise is an error.
    init_from: str | None = None
    relax_lr_scale: float = 1.0  # learning-rate multiplier of the time-continuous relaxation's parameters


@dataclass
class DataSection:
    corpora: list = field(default_factory=list)  # prepared corpus directories (odegpt prepare)
    weights: list | None = None  # blending weights, one per corpus; None = proportional to size
    tokenizer: str | None = None  # tokenizer directory; copied into converted models
    cache_dir: str | None = None  # where sample indices are cached; None = each corpus's index_cache/ (a read-only
    #                               corpus needs one elsewhere)


@dataclass
class EvalSection:
    interval: int = 1000  # optimizer steps between validation passes; 0 = only at the end
    step_sizes: list = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    num_samples: int = 256  # validation sequences, split evenly across data-parallel ranks
    micro_batch_size: int | None = None  # None = train.micro_batch_size
    at_end: bool = True


@dataclass
class CheckpointSection:
    interval: int = 1000  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 3


@dataclass
class LoggingSection:
    interval: int = 10  # optimizer steps between metric records (metrics.jsonl, TensorBoard)
    tensorboard: bool = True
    # For MFU; None = the GPU's dense bf16 peak from its name (odegpt.model.accounting.PEAK_TFLOPS), 0.1 per CPU thread
    peak_tflops_per_device: float | None = None
    progress_bar: bool = True


@dataclass
class DeepSpeedSection:
    """ZeRO settings; everything else in the DeepSpeed config is derived from the other sections."""

    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False  # ZeRO-3 only
    overlap_comm: bool | None = None  # None = on GPU only (on CPU it only costs: ~3x slower ZeRO-2 steps)
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    zero3_init: bool = True  # ZeRO-3: create parameters partitioned (deepspeed.zero.Init), never whole on a rank
    # None = torch's AdamW (fused=True on CUDA: no extension to build), except DeepSpeed's CPU Adam
    # for an optimizer offloaded from GPUs; false = DeepSpeed's FusedAdam/CPUAdam (built on first use)
    torch_adam: bool | None = None
    # DeepSpeed config of your own, deep-merged into the generated one (flops_profiler, comms_logger, NVMe
    # offload, ZeRO++ ...): `config_file` (a ds_config.json; --deepspeed-config FILE) first, then `extra` on top.
    # Keys odegpt derives from its own settings win, with a message naming the setting to change instead.
    config_file: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class RunSection:
    name: str = "odegpt"
    output_dir: str = "runs/odegpt"  # checkpoints/, tensorboard/, metrics.jsonl live here


@dataclass
class RunConfig:
    model: Any = field(default_factory=lambda: model_section()(), metadata={"section": model_section})
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    run: RunSection = field(default_factory=RunSection)

    # ---- derived quantities -------------------------------------------------------------------
    def gradient_accumulation_steps(self, world_size: int) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * world_size)

    def precision_for(self, device_type: str) -> str:
        if self.train.precision == "auto":
            return "bf16" if device_type == "cuda" else "fp32"
        return self.train.precision

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.run.output_dir) / "checkpoints"

    @property
    def eval_step_sizes(self) -> list[float]:
        return [float(a) for a in self.eval.step_sizes]

    def model_config(self):
        """The ``OdeGPTConfig`` of this run (imports transformers)."""
        from odegpt.model.configuration_odegpt import OdeGPTConfig

        return OdeGPTConfig(**dataclasses.asdict(self.model))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # Model settings that do not change the weights or what they compute: a resume may change them.
    RESUMABLE_MODEL_FIELDS = frozenset({"step_size", "max_solver_steps", "use_cache", "initializer_range",
                                        "bos_token_id", "eos_token_id", "pad_token_id"})

    def check_resumable(self, saved: dict, where: str) -> None:
        """Refuse to resume the checkpoint at ``where`` (saved with run config ``saved``) with another model,
        naming every differing ``model.`` field."""
        from odegpt.model.configuration_odegpt import OdeGPTConfig

        def normalized(section: dict) -> dict:  # OdeGPTConfig fills defaults (num_key_value_heads, segments)
            model = OdeGPTConfig(**section)
            return {name: getattr(model, name) for name in dataclasses.asdict(model_section()())}

        old, new = normalized(saved["model"]), normalized(dataclasses.asdict(self.model))
        differing = [f"model.{name} (checkpoint {old[name]!r}, now {new[name]!r})" for name in old
                     if old[name] != new[name] and name not in self.RESUMABLE_MODEL_FIELDS]
        if differing:
            raise ConfigError(f"cannot resume {where} with another model: {'; '.join(differing)}. Resume with the "
                              f"checkpoint's model settings, or start a new run with another run.output_dir")

    # ---- validation ---------------------------------------------------------------------------
    def validate(self, world_size: int | None = None) -> "RunConfig":
        """Check everything that can be checked; with ``world_size`` also the batch geometry."""
        t = self.train
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "train_steps", "max_nonfinite_steps",
                     "dist_timeout_s"):
            _positive(f"train.{name}", getattr(t, name))
        for name in ("lr", "adam_eps"):
            _positive(f"train.{name}", getattr(t, name))
        for name in ("min_lr", "weight_decay", "grad_clip", "consistency_weight", "reference_weight", "relax_lr_scale"):
            if getattr(t, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)!r}")
        if isinstance(t.seed, bool) or not isinstance(t.seed, int) or not 0 <= t.seed < 2**63:
            raise ConfigError(f"train.seed must be an integer in [0, 2**63), got {t.seed!r}")
        if t.min_lr > t.lr:
            raise ConfigError(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
        if t.warmup_steps < 0 or (t.decay_steps is not None and t.decay_steps < 1):
            raise ConfigError("train.warmup_steps must be >= 0 and train.decay_steps >= 1 (or null)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(t, name)!r}")
        if t.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({t.micro_batch_size})")
        from odegpt.model.solver import SolveTooLongError
        from odegpt.training.objective import StepSizeDistribution

        if not isinstance(t.step_size_distribution, dict):
            raise ConfigError(f"train.step_size_distribution must be a mapping ({{choices: [...]}} or {{low: ..., high: ...}}), "
                              f"got {t.step_size_distribution!r}")
        try:
            distribution = StepSizeDistribution.from_dict(t.step_size_distribution)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"train.step_size_distribution: {error}") from None
        try:
            model_config = self.model_config()
        except (ValueError, TypeError) as error:
            raise ConfigError(f"model: {error}") from None
        if t.solvers is not None:
            from odegpt.training.objective import SolverSampler

            try:
                SolverSampler(t.solvers, t.seed)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"train.solvers: {error}") from None
        if t.readout_weights is not None:
            depth = model_config.num_hidden_layers
            if not isinstance(t.readout_weights, dict):
                raise ConfigError(f"train.readout_weights must be a mapping {{time: weight}}, e.g. {{2: 0.5}}, "
                                  f"got {t.readout_weights!r}")
            for time, weight in t.readout_weights.items():
                try:  # a saved config.json holds the times as strings
                    time = float(time) if isinstance(time, str) else time
                except ValueError:
                    pass
                if isinstance(time, bool) or not isinstance(time, (int, float)) or not 0 < time < depth:
                    raise ConfigError(f"train.readout_weights: time {time!r} must be a number in (0, {depth}) "
                                      f"(the trained depth)")
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                    raise ConfigError(f"train.readout_weights: weight {weight!r} at time {time} must be >= 0")
        if t.seq_len > model_config.max_position_embeddings:
            raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_position_embeddings "
                              f"({model_config.max_position_embeddings})")
        # The smallest step size is the longest solve: refuse it here, not after hours of set-up.
        smallest = ("train.step_size_distribution.low", distribution.low) if distribution.choices is None else \
            ("train.step_size_distribution.choices", min(distribution.choices))
        e = self.eval
        for index, a in enumerate(e.step_sizes):
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < math.inf:
                raise ConfigError(f"eval.step_sizes[{index}] must be a finite number > 0, got {a!r}")
        for key, a in [smallest, *((f"eval.step_sizes[{i}]", a) for i, a in enumerate(e.step_sizes))]:
            try:
                model_config.solver_steps(a)
            except SolveTooLongError as error:
                raise ConfigError(f"{key}: {error} (model.max_solver_steps)") from None
        if e.interval < 0 or e.num_samples < 0:
            raise ConfigError("eval.interval and eval.num_samples must be >= 0")
        if e.micro_batch_size is not None:
            _positive("eval.micro_batch_size", e.micro_batch_size)
        if self.checkpoint.interval < 0 or self.checkpoint.keep_last < 1:
            raise ConfigError("checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1")
        _positive("logging.interval", self.logging.interval)

        d = self.data
        if d.weights is not None and len(d.weights) != len(d.corpora):
            raise ConfigError(f"data.weights has {len(d.weights)} entries but data.corpora has {len(d.corpora)}")

        z = self.deepspeed
        if z.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {z.zero_stage!r}")
        if z.offload_param and z.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param needs deepspeed.zero_stage: 3")
        if z.offload_optimizer and z.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        if t.init_from is not None and z.zero_stage == 3 and z.zero3_init:
            raise ConfigError("train.init_from loads the folder's weights whole before DeepSpeed partitions them: "
                              "set deepspeed.zero3_init: false (or use ZeRO 0-2)")
        if t.compile and z.zero_stage == 3:
            raise ConfigError("train.compile needs deepspeed.zero_stage <= 2: ZeRO-3 gathers parameters in "
                              "module hooks that torch.compile does not trace")
        user = self.user_deepspeed_config()
        if self.precision_for("cuda") == "bf16" and (user.get("fp16") or {}).get("enabled"):
            raise ConfigError("deepspeed fp16.enabled: true needs train.precision: fp32 (DeepSpeed's fp16 mixed "
                              f"precision; bf16 is train.precision: bf16), got train.precision: {t.precision}")
        if world_size is not None:
            if world_size < 1:
                raise ConfigError(f"world size must be >= 1, got {world_size}")
            per_step = t.micro_batch_size * world_size
            if t.global_batch_size % per_step:
                raise ConfigError(
                    f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                    f"train.micro_batch_size ({t.micro_batch_size}) x world size ({world_size}) = {per_step}; "
                    f"try --set train.global_batch_size={max(per_step, t.global_batch_size // per_step * per_step)}")
        return self

    # ---- DeepSpeed ----------------------------------------------------------------------------
    def user_deepspeed_config(self) -> dict:
        """The user's own DeepSpeed config: ``deepspeed.config_file`` with ``deepspeed.extra`` merged over it."""
        z = self.deepspeed
        if not isinstance(z.extra, dict):
            raise ConfigError(f"deepspeed.extra must be a mapping of DeepSpeed config keys, got {z.extra!r}")
        from_file: Any = {}
        if z.config_file is not None:
            try:
                from_file = json.loads(Path(z.config_file).read_text())
            except OSError as error:
                raise ConfigError(f"deepspeed.config_file {z.config_file}: cannot be read "
                                  f"({error.strerror or error})") from None
            except ValueError as error:
                raise ConfigError(f"deepspeed.config_file {z.config_file}: not valid JSON ({error})") from None
            if not isinstance(from_file, dict):
                raise ConfigError(f"deepspeed.config_file {z.config_file}: must hold a JSON object of DeepSpeed "
                                  f"config keys, got {type(from_file).__name__}")
        return merge(from_file, z.extra)

    def to_deepspeed_config(self, world_size: int, device_type: str = "cpu",
                            note: Callable[[str], None] | None = None) -> dict:
        """The DeepSpeed config dict: generated from this run config, with the user's own DeepSpeed config
        (:meth:`user_deepspeed_config`) merged in. Where the user sets a key odegpt derives from a setting of
        its own, odegpt's value wins and ``note`` is told which key and which setting; the merged config is
        checked by DeepSpeed's own parser (a ConfigError naming the key) before anything is built."""
        generated = self._generated_deepspeed_config(world_size, device_type)
        user = self.user_deepspeed_config()
        if not user:
            return generated
        merged = merge(user, generated)
        for path, theirs, ours in _clashes(user, generated):
            if path.split(".")[0] in USER_DEFAULTS:
                _set_path(merged, path, theirs)  # a default odegpt has no setting for: the user's value stands
                continue
            if note is not None:
                note(f"DeepSpeed config: {path}={json.dumps(theirs)} from {self._user_source(path)} is replaced by "
                     f"{json.dumps(ours)}, which odegpt derives from {_setting_for(path)}; set that instead")
        _check_with_deepspeed(merged, self._user_source())
        return merged

    def _user_source(self, path: str | None = None) -> str:
        """Where the user's DeepSpeed config (or its key ``path``) comes from: deepspeed.extra and/or the file."""
        z = self.deepspeed
        if path is not None:
            node: Any = z.extra
            for key in path.split("."):
                node = node.get(key, KeyError) if isinstance(node, dict) else KeyError
            return "deepspeed.extra" if node is not KeyError else f"deepspeed.config_file {z.config_file}"
        sources = ([f"deepspeed.config_file {z.config_file}"] if z.config_file else []) + \
            (["deepspeed.extra"] if z.extra else [])
        return " and ".join(sources)

    def _generated_deepspeed_config(self, world_size: int, device_type: str) -> dict:
        self.validate(world_size)
        t, z = self.train, self.deepspeed
        cuda = device_type == "cuda"
        torch_adam = not (cuda and z.offload_optimizer) if z.torch_adam is None else z.torch_adam
        optimizer = {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "eps": t.adam_eps,
                     "weight_decay": t.weight_decay, "torch_adam": torch_adam}
        if torch_adam and cuda and not z.offload_optimizer:
            optimizer["fused"] = True  # torch.optim.AdamW's fused CUDA kernel
        zero: dict[str, Any] = {"stage": z.zero_stage}
        if z.zero_stage >= 1:
            zero.update(reduce_bucket_size=z.reduce_bucket_size, allgather_bucket_size=z.allgather_bucket_size,
                        overlap_comm=(device_type == "cuda") if z.overlap_comm is None else z.overlap_comm,
                        contiguous_gradients=z.contiguous_gradients)
        if z.zero_stage == 3:
            zero.pop("allgather_bucket_size")
            zero.update(stage3_prefetch_bucket_size=z.stage3_prefetch_bucket_size,
                        stage3_param_persistence_threshold=z.stage3_param_persistence_threshold,
                        stage3_gather_16bit_weights_on_model_save=False)
        if z.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
        if z.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
        return {
            "train_batch_size": t.global_batch_size,
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps(world_size),
            "gradient_clipping": t.grad_clip,
            "optimizer": {"type": "AdamW", "params": optimizer},
            "bf16": {"enabled": self.precision_for(device_type) == "bf16"},
            "fp16": {"enabled": False},
            "zero_optimization": zero,
            "steps_per_print": 10 ** 12,  # the launcher logs; keep DeepSpeed quiet
            "wall_clock_breakdown": False,
        }


# Generated DeepSpeed keys the user's own config may change: odegpt has no setting of its own for them.
USER_DEFAULTS = frozenset({"steps_per_print", "wall_clock_breakdown", "fp16"})
# Where odegpt's other generated keys come from (the longest matching prefix names the setting to change).
_DEEPSPEED_KEY_SOURCES = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / train.micro_batch_size / the world size",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr, train.adam_*, train.weight_decay and deepspeed.torch_adam",
    "bf16": "train.precision",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_param",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "odegpt convert (reads the fp32 partitions)",
    "checkpoint": "odegpt's checkpoint loading (--resume)",
}


def _setting_for(path: str) -> str:
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        source = _DEEPSPEED_KEY_SOURCES.get(".".join(parts[:end]))
        if source is not None:
            return source
    if parts[0] == "zero_optimization" and len(parts) > 1 and parts[1] in {f.name for f in
                                                                           dataclasses.fields(DeepSpeedSection)}:
        return f"deepspeed.{parts[1]}"
    return "the run config"


def _clashes(user: dict, generated: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, user value, generated value) wherever both set a key to different values."""
    found = []
    for key, theirs in user.items():
        if key not in generated:
            continue
        ours, path = generated[key], f"{prefix}{key}"
        if isinstance(theirs, dict) and isinstance(ours, dict):
            found += _clashes(theirs, ours, f"{path}.")
        elif theirs != ours:
            found.append((path, theirs, ours))
    return found


def _set_path(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        tree = tree[key]
    tree[last] = copy.deepcopy(value)


def _check_with_deepspeed(config: dict, source: str) -> None:
    """Parse ``config`` with DeepSpeed's own ``DeepSpeedConfig`` (its section models refuse unknown keys and
    wrong types): a user's typo is a one-line ConfigError here, not a stack trace on every rank."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

    # The batch size is checked against the world size here already; DeepSpeed would check it against one rank.
    check = {key: value for key, value in config.items() if key != "train_batch_size"}
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        DeepSpeedConfig(check)
    except Exception as error:  # pydantic's ValidationError, DeepSpeed's asserts and ValueErrors
        errors = getattr(error, "errors", None)
        if callable(errors):
            reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
            reason = f"{getattr(error, 'title', '')}: {reason}"
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"DeepSpeed rejects the config merged from {source}: {reason}") from None
    finally:
        logger.setLevel(level)


# ---- building from YAML -----------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser, default: list[str] | None = None,
                         configs: bool = True) -> None:
    """``--config A B ...`` (required unless there is a ``default``; left out with ``configs=False``) and
    repeatable ``--set KEY=VALUE``: how every command that runs or plans a run takes its config."""
    if configs:
        parser.add_argument("--config", nargs="+", required=default is None, default=default, metavar="YAML",
                            help="config files merged in order: paths, or names under configs/ (e.g. quickstart, "
                                 "or model/125m-shared train/pretrain deepspeed/zero2)"
                                 + (f" (default: {' '.join(default)})" if default else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key after merging, e.g. --set train.lr=3e-4 (repeatable; the value "
                             "is parsed as YAML)")
    parser.add_argument("--deepspeed-config", dest="overrides", action=_DeepSpeedConfigFile, metavar="JSON",
                        help="a DeepSpeed config file (ds_config.json) merged into the generated DeepSpeed config; "
                             "keys odegpt derives from its own settings win, with a message "
                             "(= --set deepspeed.config_file=JSON)")


class _DeepSpeedConfigFile(argparse.Action):
    """``--deepspeed-config FILE`` as the override ``deepspeed.config_file=<absolute FILE>`` (in order with --set)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        overrides = list(getattr(namespace, self.dest, None) or [])
        overrides.append(f"deepspeed.config_file={json.dumps(str(Path(value).resolve()))}")
        setattr(namespace, self.dest, overrides)


def _positive(name: str, value: Any) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, else relative to the repository's ``configs/`` (``.yaml`` optional)."""
    candidates = [Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config file {str(name)!r} not found (also looked in {CONFIG_DIR})")


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """One YAML file with its ``defaults:`` merged underneath it."""
    path = resolve_config_path(path)
    if path in _seen:
        raise ConfigError(f"config {path} includes itself through defaults: {' -> '.join(map(str, _seen))}")
    try:
        data = _parse_yaml(path.read_text(), str(path)) or {}
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    merged: dict = {}
    for include in data.pop("defaults", None) or []:
        include_path = path.parent / include
        merged = merge(merged, load_yaml(include_path if include_path.is_file() else include, _seen + (path,)))
    return merge(merged, data)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``3e-4`` and ``1e6`` are numbers (YAML 1.2 and most
    users agree; PyYAML alone wants ``3.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _parse_yaml(text: str, where: str) -> Any:
    """YAML (see :class:`_Loader`), with a syntax error as one line naming ``where``, the line and the column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML: {problem}{position}") from None


def merge(base: dict, override: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else (lists included) is replaced."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def apply_override(tree: dict, assignment: str) -> dict:
    """Apply one ``section.key=value`` (value parsed as YAML) to a raw config tree."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    value = _parse_yaml(raw, f"--set {assignment}: the value") if raw.strip() else None
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value
    return tree


def build_config(tree: dict) -> RunConfig:
    """Typed ``RunConfig`` from a raw tree; unknown keys and wrong types are errors."""
    init_from = (tree.get("train") or {}).get("init_from") if isinstance(tree.get("train"), dict) else None
    if init_from is not None:
        tree = {**tree, "model": model_from_folder(str(init_from), tree.get("model") or {})}
    return _build(RunConfig, tree, "")


def model_from_folder(folder: str, configured: dict) -> dict:
    """The ``model`` section of a run that starts from ``folder`` (``train.init_from``): the folder's, with the
    settings that do not change the weights (step size, solver limit, special ids) as ``configured`` says; any
    other ``model.`` key the config sets must agree with the folder."""
    from odegpt.model.configuration_odegpt import OdeGPTConfig

    path = Path(folder) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"train.init_from: cannot read {path}: {error}") from None
    if saved.get("model_type") != OdeGPTConfig.model_type:
        raise ConfigError(f"train.init_from: {folder} holds a {saved.get('model_type')!r} model, not an odegpt one; "
                          f"import it first (odegpt import --model {folder} --output DIR)")
    names = [f.name for f in dataclasses.fields(model_section())]
    try:
        folder_model = OdeGPTConfig(**{k: v for k, v in saved.items() if k in names})
        merged = OdeGPTConfig(**{**{k: v for k, v in saved.items() if k in names}, **configured})
    except (ValueError, TypeError) as error:
        raise ConfigError(f"train.init_from {folder}: {error}") from None
    differing = [f"model.{name} is {getattr(merged, name)!r} in the config but {getattr(folder_model, name)!r} in "
                 f"{folder}" for name in configured if name in names and name not in RunConfig.RESUMABLE_MODEL_FIELDS
                 and getattr(merged, name) != getattr(folder_model, name)]
    if differing:
        raise ConfigError(f"train.init_from: {'; '.join(differing)}: the shape comes from the folder; remove those "
                          f"keys from the config or make them agree")
    return {name: getattr(merged, name) for name in names}


def load_config(paths: list[str] | tuple = (), overrides: list[str] | tuple = (),
                world_size: int | None = None) -> RunConfig:
    """Compose ``paths`` in order, apply ``overrides``, validate; the one way runs get their config."""
    tree: dict = {}
    for path in paths:
        tree = merge(tree, load_yaml(path))
    for assignment in overrides:
        tree = apply_override(tree, assignment)
    return build_config(tree).validate(world_size)


# Keys renamed since configs were first written: named in the error instead of "unknown key".
RENAMED = {"train": {"step_size": "step_size_distribution"}}


def _build(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    sections = {f.name: f.metadata["section"]() for f in dataclasses.fields(cls) if "section" in f.metadata}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if where in RENAMED and set(unknown) & set(RENAMED[where]):
        old = sorted(set(unknown) & set(RENAMED[where]))[0]
        raise ConfigError(f"{where}.{old} is now {where}.{RENAMED[where][old]}; rename it in your config")
    if unknown:
        place = f"section {where!r}" if where else "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(repr(f'{where}.{k}' if where else k) for k in unknown)} "
                          f"in {place}; valid keys: {', '.join(sorted(names))}")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = sections.get(name, hints[name])
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        else:
            values[name] = _coerce(value, hint, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a simple type hint; accept YAML's string spelling of floats (3e-4)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {options}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint in (list, dict) or typing.get_origin(hint) in (list, dict):
        origin = typing.get_origin(hint) or hint
        if isinstance(value, origin):
            return value
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} must be {name}, got {value!r} ({type(value).__name__})")
