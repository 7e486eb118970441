"""The frozen source model distillation reads from (``train.distill_from``), beside the student on every rank.

Under ZeRO 0-2 every rank holds the whole source, in eval mode, without gradients. Under ZeRO-3 it is never whole on
any rank: it is created partitioned (``deepspeed.zero.Init``), its weights are copied in one tensor at a time from the
folder's safetensors (each gathered only while rank 0 fills it), and a DeepSpeed engine without an optimizer gathers
each layer for its forward and frees it after (ZeRO-Inference), as the student's engine does for training.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers.initialization import no_init_weights

from odegpt import OdeGPTForCausalLM
from odegpt.folders.importing import load_as_odegpt
from odegpt.folders.model_folder import load_config


def load_teacher(folder: str, precision: str, device: torch.device, ds_config: dict | None = None):
    """The source of ``folder`` as an odegpt model for :func:`odegpt.training.distillation.teacher_view`: frozen, in
    eval mode, in ``precision`` (fp32 or bf16), on ``device``; partitioned when ``ds_config`` is a ZeRO-3 config."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    zero3 = ds_config is not None and (ds_config.get("zero_optimization") or {}).get("stage") == 3
    if not zero3:
        teacher = load_as_odegpt(folder, dtype).to(device).eval()
        teacher.requires_grad_(False)
        return teacher
    return _partitioned_teacher(folder, dtype, ds_config)


def _partitioned_teacher(folder: str, dtype: torch.dtype, ds_config: dict):
    import deepspeed  # after the launcher chose the accelerator (DS_ACCELERATOR)

    config = load_config(folder)
    if config.model_type != "odegpt":
        raise ValueError(f"train.distill_from {folder}: under ZeRO-3 the source is loaded partitioned from an odegpt "
                         f"folder; import it first (odegpt import --model {folder} --output DIR, exact) and distill "
                         f"from DIR")
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
        teacher = OdeGPTForCausalLM(config)
    parameters = dict(teacher.named_parameters())
    rank = torch.distributed.get_rank()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            for name in weights.keys():
                parameter = parameters.get(name)
                if parameter is None:
                    continue
                with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
                    if rank == 0:
                        parameter.data.copy_(weights.get_tensor(name))
    teacher.requires_grad_(False)
    inference = {key: value for key, value in ds_config.items() if key not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=teacher, config=inference)
    engine.eval()
    return engine
