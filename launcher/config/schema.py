"""The run configuration's schema: one dataclass per section, each key with its type, default and comment.

A run is one nested mapping with the sections of :class:`RunConfig`. The comments beside the keys are the
documentation: ``python -m launcher.config.reference`` turns this file into docs/config.md. The ``model``
section is not written here: it is ``OdeGPTConfig``'s keyword arguments, read from its signature, so a model
setting is declared once. Loading (YAML, ``--set``, typing) is :mod:`.loading`, the checks :mod:`.validation`,
the DeepSpeed config :mod:`.deepspeed`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import deepspeed as deepspeed_generation
from . import validation

if TYPE_CHECKING:
    from odegpt.model.configuration_odegpt import OdeGPTConfig


@functools.cache
def model_section() -> type:
    """The ``model`` section: exactly ``OdeGPTConfig``'s keyword arguments, with its defaults and types.

    A model setting is declared once, in the model's own config class; the run config takes its
    fields from there (built on first use: it imports transformers), so the two cannot drift.
    """
    from odegpt.model.configuration_odegpt import OdeGPTConfig  # transformers: not for `odegpt --help`

    hints = typing.get_type_hints(OdeGPTConfig.__init__)
    fields = [(name, hints[name], field(default_factory=functools.partial(copy.deepcopy, parameter.default)))
              for name, parameter in inspect.signature(OdeGPTConfig.__init__).parameters.items()
              if name != "self" and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    section = dataclasses.make_dataclass("ModelSection", fields)
    section.__doc__ = "The model's shape and solver: OdeGPTConfig's keyword arguments."
    return section


@dataclass
class TrainSection:
    """Optimization: batch geometry, schedule, objective and the guards that stop a bad run."""

    seq_len: int = 2048  # tokens per training sequence
    micro_batch_size: int = 8  # sequences per rank in one forward and backward
    global_batch_size: int = 256  # = micro_batch_size * gradient accumulation * data-parallel ranks
    train_steps: int = 10000  # optimizer steps of the whole run
    lr: float = 3e-4  # peak learning rate, reached after warmup_steps
    min_lr: float = 3e-5  # where the cosine decay ends
    warmup_steps: int = 500  # linear warmup from lr / warmup_steps
    decay_steps: int | None = None  # cosine length after warmup; None = until train_steps
    weight_decay: float = 0.1  # AdamW's, on matrices only (not on norms and embeddings)
    adam_beta1: float = 0.9  # in [0, 1)
    adam_beta2: float = 0.95  # in [0, 1)
    adam_eps: float = 1e-8  # AdamW's epsilon (> 0)
    grad_clip: float = 1.0  # the global gradient norm is clipped to this; 0 = no clipping
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = True  # recompute each block's activations in the backward pass
    seed: int = 1234  # initial weights, the step-size and solver draws and the data order, in [0, 2**63)
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
    lm_weight: float = 1.0  # weight of the next-token CE (drawn `a` and a=1 pass); 0 with distill_from: distill alone
    # Distillation from a source model (odegpt.training.distillation): a model folder, odegpt or Llama (imported as
    # unshared layers), run frozen beside the student with the same tokens; its depth must be the student's.
    distill_from: str | None = None
    distill_kl_weight: float = 1.0  # T^2 KL(p_source || p_student) at the drawn `a`
    distill_temperature: float = 1.0  # the temperature T of both distributions in that KL
    # The student's state after each solver step against the source's stream after the layer at the same time
    # (relative squared error; at a=2 the states after layers 2, 4, ...).
    distill_trajectory_weight: float = 0.0
    # The warm start: the trajectory term alone, each solver step from the source's state at its start (the steps
    # train independently); distill_steps_per_sample of them per micro-batch (0: every one).
    distill_stepwise: bool = False
    distill_steps_per_sample: int = 0  # stepwise: pieces of the solve trained per micro-batch (0: every one)
    distill_precision: str = "fp32"  # the source's compute precision: fp32 | bf16
    # The learned exit head (model.exit_head) trained beside the model: its error, this weight, at every state of the
    # drawn solve against log KL(p_end || p(state)) on exit_head_positions token positions per micro-batch.
    exit_head_weight: float = 0.0
    exit_head_positions: int = 256  # positions per micro-batch the exit head is trained on (each costs a read-out)


@dataclass
class DataSection:
    """What the run reads: prepared corpora and the tokenizer they were made with."""

    corpora: list = field(default_factory=list)  # prepared corpus directories (odegpt prepare)
    weights: list | None = None  # blending weights, one per corpus; None = proportional to size
    tokenizer: str | None = None  # tokenizer directory; copied into converted models
    # Where sample indices are cached; None = each corpus's index_cache/ (a read-only corpus needs one elsewhere).
    cache_dir: str | None = None


@dataclass
class EvalSection:
    """Validation perplexity during training, at several step sizes."""

    interval: int = 1000  # optimizer steps between validation passes; 0 = only at the end
    step_sizes: list = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # the step sizes `a` it measures at
    num_samples: int = 256  # validation sequences, split evenly across data-parallel ranks
    micro_batch_size: int | None = None  # None = train.micro_batch_size
    at_end: bool = True  # also a validation pass after the last step


@dataclass
class CheckpointSection:
    """DeepSpeed checkpoints under run.output_dir/checkpoints, to resume from and to convert."""

    interval: int = 1000  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 3  # complete checkpoints kept; older ones are removed


@dataclass
class LoggingSection:
    """Training metrics: metrics.jsonl, TensorBoard and the progress bar."""

    interval: int = 10  # optimizer steps between metric records (metrics.jsonl, TensorBoard)
    tensorboard: bool = True  # also write TensorBoard events to run.output_dir/tensorboard
    # For MFU (TFLOP/s, > 0); None = the GPU's dense bf16 peak from its name (odegpt.model.accounting.PEAK_TFLOPS),
    # 0.1 per CPU thread.
    peak_tflops_per_device: float | None = None
    progress_bar: bool = True  # a tqdm bar on rank 0


@dataclass
class DeepSpeedSection:
    """ZeRO settings; everything else in the DeepSpeed config is derived from the other sections."""

    zero_stage: int = 2  # 0 (data parallel), 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters) partitioned
    offload_optimizer: bool = False  # optimizer states and step on the CPU (ZeRO >= 1)
    offload_param: bool = False  # ZeRO-3 only
    overlap_comm: bool | None = None  # None = on GPU only (on CPU it only costs: ~3x slower ZeRO-2 steps)
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are reduced (less fragmentation)
    reduce_bucket_size: int = 500_000_000  # elements reduced at once
    allgather_bucket_size: int = 500_000_000  # elements gathered at once (ZeRO 1-2)
    stage3_prefetch_bucket_size: int = 50_000_000  # ZeRO-3: parameter elements fetched ahead of use
    stage3_param_persistence_threshold: int = 100_000  # ZeRO-3: parameters smaller than this stay whole on every rank
    zero3_init: bool = True  # ZeRO-3: create parameters partitioned (deepspeed.zero.Init), never whole on a rank
    # None = torch's AdamW (fused=True on CUDA: no extension to build), except DeepSpeed's CPU Adam
    # for an optimizer offloaded from GPUs; false = DeepSpeed's FusedAdam/CPUAdam (built on first use)
    torch_adam: bool | None = None
    # DeepSpeed config of your own, deep-merged into the generated one (flops_profiler, comms_logger, NVMe
    # offload, ZeRO++ ...): `config_file` (a ds_config.json; --deepspeed-config FILE) first, then `extra` on top.
    # Keys odegpt derives from its own settings win, with a message naming the setting to change instead.
    config_file: str | None = None
    extra: dict = field(default_factory=dict)  # DeepSpeed config keys, e.g. {flops_profiler: {enabled: true}}


@dataclass
class RunSection:
    """The run's name and folder."""

    name: str = "odegpt"  # a label for the run
    output_dir: str = "runs/odegpt"  # checkpoints/, tensorboard/, metrics.jsonl live here


@dataclass
class RunConfig:
    """A whole run: one object per section, typed and validated before anything starts."""

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

    def model_config(self) -> OdeGPTConfig:
        """The ``OdeGPTConfig`` of this run (imports transformers)."""
        from odegpt.model.configuration_odegpt import OdeGPTConfig  # transformers: not for `odegpt --help`

        return OdeGPTConfig(**dataclasses.asdict(self.model))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # Model settings that do not change the weights or what they compute: a resume may change them.
    RESUMABLE_MODEL_FIELDS = validation.RESUMABLE_MODEL_FIELDS

    def check_resumable(self, saved: dict, where: str) -> None:
        """Refuse to resume the checkpoint at ``where`` (saved with run config ``saved``) with another model,
        naming every differing ``model.`` field."""
        validation.check_resumable(self, saved, where)

    def validate(self, world_size: int | None = None) -> RunConfig:
        """Check everything that can be checked; with ``world_size`` also the batch geometry."""
        validation.validate(self, world_size)
        return self

    # ---- DeepSpeed ----------------------------------------------------------------------------
    def user_deepspeed_config(self) -> dict:
        """The user's own DeepSpeed config: ``deepspeed.config_file`` with ``deepspeed.extra`` merged over it."""
        return deepspeed_generation.user_deepspeed_config(self.deepspeed)

    def to_deepspeed_config(self, world_size: int, device_type: str = "cpu",
                            note: Callable[[str], None] | None = None) -> dict:
        """The DeepSpeed config dict, generated from this run config with the user's own merged in
        (:func:`.deepspeed.to_deepspeed_config`)."""
        return deepspeed_generation.to_deepspeed_config(self, world_size, device_type, note)
