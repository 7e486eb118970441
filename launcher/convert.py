"""``odegpt convert``: a DeepSpeed training checkpoint -> a native odegpt model folder.

ZeRO 1-3 checkpoints hold the fp32 master weights as per-rank flat partitions; DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` consolidates them. Stage 0 has no partitions (and
that tool refuses it): in fp32 its weights are the ``module`` entry of the model-states file; in
bf16 the fp32 master copies are the optimizer's ``fp32_groups``, in the order of the launcher's
parameter groups. The model shape comes from the run config stored in the checkpoint's client state.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from . import checkpointing


def _locate(checkpoint: str | Path) -> tuple[Path, str]:
    resolved = checkpointing.resolve_resume(str(checkpoint), Path(checkpoint))
    if resolved is None:
        raise FileNotFoundError(f"no complete checkpoint at {checkpoint}")
    return resolved


def load_state_dict(checkpoint_dir: Path, tag: str) -> tuple[dict, dict]:
    """(fp32 model state dict, the run's client state) of one checkpoint tag."""
    import torch

    # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_model_states.pt; the others mp_rank_00_model_states.pt.
    candidates = [checkpoint_dir / tag / name for name in ("mp_rank_00_model_states.pt",
                                                            "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{checkpoint_dir / tag} holds no DeepSpeed model-states file")
    model_states = torch.load(path, map_location="cpu", weights_only=False)
    client = model_states.get("odegpt")
    if client is None:
        raise ValueError(f"{checkpoint_dir / tag} was not written by odegpt's launcher (no 'odegpt' client state)")
    if client["config"]["deepspeed"]["zero_stage"] == 0:
        state_dict = {name: tensor.float() for name, tensor in model_states["module"].items()}
        master = (model_states.get("optimizer") or {}).get("fp32_groups")
        if master is not None:  # bf16/fp16 training: prefer the fp32 master weights
            state_dict.update(_stage0_master_weights(client["config"], master, checkpoint_dir / tag))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints every tensor it reconstructs
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    return state_dict, client


def _stage0_master_weights(run_config: dict, fp32_groups: list[list], where: Path) -> dict:
    """Name the fp32 master copies of a stage-0 mixed-precision checkpoint by rebuilding the
    optimizer's parameter groups (same model config, same grouping) and pairing them in order."""
    import torch

    from odegpt import OdeGPTConfig, OdeGPTForCausalLM

    from .optim import parameter_groups

    with torch.device("meta"):  # shapes and order only
        model = OdeGPTForCausalLM(OdeGPTConfig(**run_config["model"]))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, run_config["train"]["weight_decay"])
    if [len(g["params"]) for g in groups] != [len(g) for g in fp32_groups]:
        raise ValueError(f"{where}: the optimizer's fp32 groups do not match the model's parameter groups")
    weights = {}
    for group, masters in zip(groups, fp32_groups):
        for parameter, master in zip(group["params"], masters):
            if tuple(master.shape) != tuple(parameter.shape):
                raise ValueError(f"{where}: fp32 master of {names[id(parameter)]} has shape "
                                 f"{tuple(master.shape)}, the model {tuple(parameter.shape)}")
            weights[names[id(parameter)]] = master.float()
    return weights


def convert(checkpoint: str | Path, output_dir: str | Path, tokenizer_dir: str | None = None) -> Path:
    """Write ``output_dir`` (safetensors, config, modeling code, tokenizer); returns it."""
    from odegpt import OdeGPTConfig, OdeGPTForCausalLM
    from odegpt.export import save_native

    checkpoint_dir, tag = _locate(checkpoint)
    state_dict, client = load_state_dict(checkpoint_dir, tag)
    run_config = client["config"]
    tokenizer_dir = tokenizer_dir or run_config["data"].get("tokenizer")
    special = {}
    if tokenizer_dir and Path(tokenizer_dir, "tokenizer.json").is_file():
        from data_pipeline.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    else:
        tokenizer_dir = None
    config = OdeGPTConfig(**run_config["model"], **special)
    model = OdeGPTForCausalLM(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {checkpoint_dir / tag} does not match the model: "
                         f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    if tied:
        model.tie_weights()
    return save_native(model.eval(), output_dir, tokenizer_dir=tokenizer_dir)
