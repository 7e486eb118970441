"""``odegpt convert``: a DeepSpeed training checkpoint -> a native odegpt model folder.

ZeRO 1-3 checkpoints hold the fp32 master weights as per-rank flat partitions; DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` consolidates them. Stage 0 has no partitions (and
that tool refuses it): in fp32 its weights are the ``module`` entry of the model-states file; in
bf16 the fp32 master copies are the optimizer's ``fp32_groups``, in the order of the launcher's
parameter groups. The model shape comes from the run config saved with the checkpoint.

The checkpoint is verified first (every file listed in its ``COMPLETE`` marker present with its
saved size, every file a checkpoint that loads with ``weights_only=True``), and every load —
DeepSpeed's included — runs under ``checkpointing.safe_loading``: a crafted checkpoint cannot run code.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from data_pipeline.folder_kinds import MODEL
from data_pipeline.tokenizer import load_tokenizer
from odegpt import OdeGPTConfig, OdeGPTForCausalLM
from odegpt.folders.export import save_native
from odegpt.folders.integrity import check_finite_weights
from odegpt.folders.output_folder import claimed_output

from . import checkpointing
from .checkpointing import CheckpointError
from .optim import parameter_groups


def _locate(checkpoint: str | Path) -> checkpointing.Checkpoint:
    """A checkpoint tag directory, or a checkpoints directory (its newest complete checkpoint), verified."""
    path = Path(checkpoint)
    if (path / checkpointing.COMPLETE).is_file():
        return checkpointing.verify(path.parent, path.name)
    tag = checkpointing.latest_complete_tag(path)
    if tag is None:
        raise CheckpointError(f"no complete checkpoint at {checkpoint} (a directory of step_* checkpoints, or one "
                              f"of them, with a {checkpointing.COMPLETE} marker)")
    return checkpointing.verify(path, tag)


def load_state_dict(checkpoint_dir: Path, tag: str) -> tuple[dict, dict]:
    """(fp32 model state dict, odegpt's saved state with the run config) of one verified checkpoint tag."""
    checkpoint = checkpointing.verify(Path(checkpoint_dir), tag)
    return _load_weights(checkpoint), checkpoint.state


def _load_weights(checkpoint: checkpointing.Checkpoint) -> dict:
    run_config = checkpoint.state["config"]
    if run_config["deepspeed"]["zero_stage"] == 0:
        model_states = checkpointing.load_file(checkpoint.path / "mp_rank_00_model_states.pt")
        state_dict = {name: tensor.float() for name, tensor in model_states["module"].items()}
        master = (model_states.get("optimizer") or {}).get("fp32_groups")
        if master is not None:  # bf16/fp16 training: prefer the fp32 master weights
            state_dict.update(_stage0_master_weights(run_config, master, checkpoint.path))
        return state_dict
    # deepspeed logs the accelerator it picks on import: only once a checkpoint is read
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()), checkpointing.safe_loading():  # it prints every tensor
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.directory), tag=checkpoint.tag)
    except Exception as error:  # files that verified but do not fit together
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {checkpoint.path} cannot be consolidated: {reason}") from None


def _stage0_master_weights(run_config: dict, fp32_groups: list[list], where: Path) -> dict:
    """Name the fp32 master copies of a stage-0 mixed-precision checkpoint by rebuilding the
    optimizer's parameter groups (same model config, same grouping) and pairing them in order."""
    with torch.device("meta"):  # shapes and order only
        model = OdeGPTForCausalLM(OdeGPTConfig(**run_config["model"]))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, run_config["train"]["weight_decay"])
    if [len(g["params"]) for g in groups] != [len(g) for g in fp32_groups]:
        raise CheckpointError(f"{where}: the optimizer's fp32 groups do not match the model's parameter groups")
    weights = {}
    for group, masters in zip(groups, fp32_groups):
        for parameter, master in zip(group["params"], masters):
            if tuple(master.shape) != tuple(parameter.shape):
                raise CheckpointError(f"{where}: fp32 master of {names[id(parameter)]} has shape "
                                      f"{tuple(master.shape)}, the model {tuple(parameter.shape)}")
            weights[names[id(parameter)]] = master.float()
    return weights


def convert(checkpoint: str | Path, output_dir: str | Path, tokenizer_dir: str | None = None,
            overwrite: bool = False) -> Path:
    """Write ``output_dir`` (safetensors, config, modeling code, tokenizer); returns it. The folder is written
    whole or not at all, and never over the run's folder or the checkpoints (``odegpt.folders.output_folder``)."""
    located = _locate(checkpoint)
    # Never the checkpoints folder, nothing inside it, nor a folder holding it (the run's own, say).
    with claimed_output(Path(output_dir), MODEL, overwrite, located.directory, "checkpoints") as staging:
        tokenizer_dir = _tokenizer_dir(located, tokenizer_dir)
        save_native(_consolidated_model(located, tokenizer_dir), staging, tokenizer_dir=tokenizer_dir)
    return Path(output_dir)


def _tokenizer_dir(located: checkpointing.Checkpoint, tokenizer_dir: str | None) -> str | None:
    """The tokenizer folder to copy into the model: ``tokenizer_dir``, else the run's ``data.tokenizer``, when it
    holds Hugging Face tokenizer files."""
    tokenizer_dir = tokenizer_dir or (located.state["config"].get("data") or {}).get("tokenizer")
    return tokenizer_dir if tokenizer_dir and Path(tokenizer_dir, "tokenizer.json").is_file() else None


def _consolidated_model(located: checkpointing.Checkpoint, tokenizer_dir: str | None):
    """The checkpoint's model in eval mode: its consolidated fp32 weights, checked finite and against its config,
    with the special ids of the tokenizer in ``tokenizer_dir`` (if any)."""
    tokenizer = None
    if tokenizer_dir is not None:  # odegpt's or a Hugging Face tokenizer; one that does not load, before the weights
        tokenizer = load_tokenizer(tokenizer_dir)
    state_dict = _load_weights(located)
    try:
        check_finite_weights(state_dict.items(), f"checkpoint {located.path}")
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    model_fields = dict(located.state["config"]["model"])
    if tokenizer is not None:
        model_fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    config = OdeGPTConfig(**model_fields)
    model = OdeGPTForCausalLM(config)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise CheckpointError(f"checkpoint {located.path} does not match its model config: "
                              f"{str(error).strip().splitlines()[-1].strip()}") from None
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint {located.path} does not match its model config: "
                              f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    if tied:
        model.tie_weights()
    return model.eval()
