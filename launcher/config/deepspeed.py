"""The DeepSpeed config: generated from the run config, never written by hand, so the two cannot disagree.

What odegpt has no setting for (the flops profiler, the comms logger, NVMe offload, ZeRO++, ...) a user adds as
DeepSpeed config of their own (``deepspeed.config_file``, ``--deepspeed-config``, then ``deepspeed.extra``),
deep-merged in with odegpt's own keys winning, and the result is parsed by DeepSpeed's own ``DeepSpeedConfig``
before anything is built.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, one_line, shown
from .limits import read_limited
from .trees import merge, set_path

if TYPE_CHECKING:
    from .schema import DeepSpeedSection, RunConfig

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


def user_deepspeed_config(section: DeepSpeedSection) -> dict:
    """The user's own DeepSpeed config: ``deepspeed.config_file`` with ``deepspeed.extra`` merged over it."""
    if not isinstance(section.extra, dict):
        raise ConfigError(f"deepspeed.extra must be a mapping of DeepSpeed config keys, got {shown(section.extra)}")
    from_file: Any = {}
    if section.config_file is not None:
        where = f"deepspeed.config_file {section.config_file}"
        try:
            from_file = json.loads(read_limited(section.config_file, "deepspeed.config_file"))
        except ConfigError:
            raise
        except OSError as error:
            raise ConfigError(f"{where}: cannot be read ({error.strerror or error})") from None
        except ValueError as error:  # JSON and UTF-8 errors
            raise ConfigError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"{where}: must hold a JSON object of DeepSpeed config keys, got "
                              f"{type(from_file).__name__}")
    return merge(from_file, section.extra)


def to_deepspeed_config(config: RunConfig, world_size: int, device_type: str = "cpu",
                        note: Callable[[str], None] | None = None) -> dict:
    """The DeepSpeed config dict: generated from ``config``, with the user's own DeepSpeed config
    (:func:`user_deepspeed_config`) merged in. Where the user sets a key odegpt derives from a setting of its
    own, odegpt's value wins and ``note`` is told which key and which setting; the merged config is checked by
    DeepSpeed's own parser (a ConfigError naming the key) before anything is built."""
    generated = generated_deepspeed_config(config, world_size, device_type)
    user = user_deepspeed_config(config.deepspeed)
    if not user:
        return generated
    merged = merge(user, generated)
    for path, theirs, ours in _clashes(user, generated):
        if path.split(".")[0] in USER_DEFAULTS:
            set_path(merged, path, theirs)  # a default odegpt has no setting for: the user's value stands
            continue
        if note is not None:
            note(f"DeepSpeed config: {path}={one_line(json.dumps(theirs), 200)} from "
                 f"{_user_source(config.deepspeed, path)} is replaced by {json.dumps(ours)}, which odegpt derives "
                 f"from {_setting_for(path, config.deepspeed)}; set that instead")
    _check_with_deepspeed(merged, _user_source(config.deepspeed))
    return merged


def generated_deepspeed_config(config: RunConfig, world_size: int, device_type: str) -> dict:
    """What odegpt's own settings say, for ``world_size`` ranks on ``device_type`` (validates ``config`` first)."""
    config.validate(world_size)
    train, section = config.train, config.deepspeed
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps(world_size),
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": _optimizer_params(config, device_type)},
        "bf16": {"enabled": config.precision_for(device_type) == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": _zero_optimization(section, device_type),
        "steps_per_print": 10 ** 12,  # the launcher logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def _optimizer_params(config: RunConfig, device_type: str) -> dict:
    train, section = config.train, config.deepspeed
    cuda = device_type == "cuda"
    torch_adam = not (cuda and section.offload_optimizer) if section.torch_adam is None else section.torch_adam
    params = {"lr": train.lr, "betas": [train.adam_beta1, train.adam_beta2], "eps": train.adam_eps,
              "weight_decay": train.weight_decay, "torch_adam": torch_adam}
    if torch_adam and cuda and not section.offload_optimizer:
        params["fused"] = True  # torch.optim.AdamW's fused CUDA kernel
    return params


def _zero_optimization(section: DeepSpeedSection, device_type: str) -> dict:
    zero: dict[str, Any] = {"stage": section.zero_stage}
    if section.zero_stage >= 1:
        zero.update(reduce_bucket_size=section.reduce_bucket_size,
                    allgather_bucket_size=section.allgather_bucket_size,
                    overlap_comm=(device_type == "cuda") if section.overlap_comm is None else section.overlap_comm,
                    contiguous_gradients=section.contiguous_gradients)
    if section.zero_stage == 3:
        zero.pop("allgather_bucket_size")
        zero.update(stage3_prefetch_bucket_size=section.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=section.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=False)
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if section.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    return zero


def _user_source(section: DeepSpeedSection, path: str | None = None) -> str:
    """Where the user's DeepSpeed config (or its key ``path``) comes from: deepspeed.extra and/or the file."""
    if path is not None:
        node: Any = section.extra
        for key in path.split("."):
            node = node.get(key, KeyError) if isinstance(node, dict) else KeyError
        return "deepspeed.extra" if node is not KeyError else f"deepspeed.config_file {section.config_file}"
    sources = ([f"deepspeed.config_file {section.config_file}"] if section.config_file else []) + \
        (["deepspeed.extra"] if section.extra else [])
    return " and ".join(sources)


def _setting_for(path: str, section: DeepSpeedSection) -> str:
    """The odegpt setting a generated DeepSpeed key ``path`` comes from."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        source = _DEEPSPEED_KEY_SOURCES.get(".".join(parts[:end]))
        if source is not None:
            return source
    if parts[0] == "zero_optimization" and len(parts) > 1 and \
            parts[1] in {setting.name for setting in dataclasses.fields(section)}:
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


def _check_with_deepspeed(config: dict, source: str) -> None:
    """Parse ``config`` with DeepSpeed's own ``DeepSpeedConfig`` (its section models refuse unknown keys and
    wrong types): a user's typo is a one-line ConfigError here, not a stack trace on every rank."""
    from deepspeed.runtime.config import DeepSpeedConfig  # seconds to import: not for `odegpt --help`
    from deepspeed.utils import logger

    # The batch size is checked against the world size here already; DeepSpeed would check it against one rank.
    check = {key: value for key, value in config.items() if key != "train_batch_size"}
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        DeepSpeedConfig(check)
    except Exception as error:  # noqa: BLE001 - pydantic's ValidationError, DeepSpeed's asserts, ValueErrors ...
        errors = getattr(error, "errors", None)
        if callable(errors):
            reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
            reason = f"{getattr(error, 'title', '')}: {reason}"
        else:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"DeepSpeed rejects the config merged from {source}: {reason}") from None
    finally:
        logger.setLevel(level)

