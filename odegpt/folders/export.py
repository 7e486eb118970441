"""Exports of an odegpt model (the import of Llama-family models is odegpt.folders.importing).

- native: a ``save_pretrained`` folder (safetensors) carrying its configuration and modeling code,
  so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without odegpt;
- unrolled: a standard ``LlamaForCausalLM`` for one step size ``a``. Executed step ``k`` of the
  solve becomes Llama layer ``k``, with its ``dt`` folded into ``o_proj`` and ``down_proj``
  (``h + dt * W x == h + (dt * W) x``), so any Llama engine serves the accelerated model with its
  own KV cache;
"""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

from odegpt.model.accounting import format_count, model_cost
from odegpt.model.configuration_odegpt import OdeGPTConfig
from odegpt.model.modeling_odegpt import OdeGPTForCausalLM, OdeGPTLinear
from odegpt.model.solver import solver_method

from .model_folder import quiet_transformers

DECODING_DIR = Path(__file__).resolve().parent.parent / "decoding"
# Block weights that multiply a residual branch's output: where a step's dt is folded in.
_BRANCH_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def copy_tokenizer(source: str | Path | None, output_dir: str | Path) -> list[str]:
    """Copy the tokenizer files found in ``source`` into ``output_dir``; return their names. A tokenizer travels with
    its model folder whole: odegpt's (the Hugging Face files, the SentencePiece model and odegpt's record of special
    ids and fingerprint) or a Hugging Face tokenizer's (tokenizer.json, its configs, vocabulary files and chat
    template; ``data_pipeline.folder_kinds.TOKENIZER_ENTRIES``). A tokenizer written before its config named a
    class transformers 4.x knows gets one in the copy."""
    from data_pipeline.folder_kinds import TOKENIZER_ENTRIES
    from data_pipeline.tokenizer import make_tokenizer_config_portable

    if source is None or Path(source).resolve() == Path(output_dir).resolve():
        return []
    copied = sorted(name for name in TOKENIZER_ENTRIES if (Path(source) / name).is_file())
    for name in copied:
        shutil.copyfile(Path(source) / name, Path(output_dir) / name)
    make_tokenizer_config_portable(output_dir)
    return copied


def save_pretrained(model, output_dir: Path) -> None:
    """``model.save_pretrained`` quietly, a failed write (a full disk: safetensors raises its own error, not an
    OSError) reported as the OSError it is, naming the folder."""
    try:
        with quiet_transformers():
            model.save_pretrained(output_dir)
    except SafetensorError as error:
        full = "StorageFull" in str(error) or "No space left" in str(error)
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else
                      f"cannot write the weights ({str(error)[:200]})", str(output_dir)) from None


def save_native(model: OdeGPTForCausalLM, output_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a self-contained Hugging Face folder (safetensors + modeling code via auto_map)."""
    output_dir = Path(output_dir)
    save_pretrained(model, output_dir)
    add_fields_older_clients_read(output_dir)
    copy_decoders(output_dir)
    copy_tokenizer(tokenizer_dir, output_dir)
    return output_dir


def copy_calibrations(model_dir: str | Path, output_dir: str | Path) -> list[str]:
    """Copy the thresholds calibrated for a model's weights (``*_calibration.json``: the learned exit's and energy
    routing's) from ``model_dir`` into ``output_dir``: a native folder of the same weights decodes with them."""
    copied = sorted(path.name for path in Path(model_dir).glob("*_calibration.json"))
    for name in copied:
        shutil.copyfile(Path(model_dir) / name, Path(output_dir) / name)
    return copied


def copy_decoders(output_dir: str | Path) -> list[str]:
    """Copy odegpt's decoders (odegpt/decoding) into ``output_dir/custom_generate``: transformers loads
    ``custom_generate/generate.py`` with ``trust_remote_code=True`` and installs its ``generate`` as
    ``model.generate``, so the folder alone decodes self-speculatively and with adaptive depth."""
    target = Path(output_dir) / "custom_generate"
    target.mkdir(exist_ok=True)
    copied = sorted(path.name for path in DECODING_DIR.glob("*.py") if path.name != "__init__.py")
    for name in copied:
        shutil.copyfile(DECODING_DIR / name, target / name)
    return copied


def add_fields_older_clients_read(output_dir: str | Path) -> dict:
    """Write into ``output_dir/config.json`` the fields transformers 4.x reads where 5.x moved them, so one folder
    means the same model to every client (and the engines that read config.json the 4.x way, e.g. ctranslate2):

    - ``rope_theta`` at the top level: 4.x never looks inside ``rope_parameters`` and silently uses 10000;
    - ``rope_scaling``: 4.x's name for the rotary scaling (null for default positions, else the parameters);
    - ``torch_dtype``: the weights' dtype as transformers before 4.56 reads it.

    transformers 5 reads them too (``rope_parameters`` and ``dtype`` win, and they agree). Returns the config."""
    from data_pipeline.files import write_json_atomic

    path = Path(output_dir) / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if rope is not None:
        config["rope_theta"] = rope["rope_theta"]
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
        config["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if config.get("dtype") is not None:
        config["torch_dtype"] = config["dtype"]
    config = dict(sorted(config.items()))
    write_json_atomic(path, config)
    return config


def llama_config_for(config: OdeGPTConfig, num_layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.source_rope_parameters
                             or {"rope_type": "default", "rope_theta": config.rope_theta}),
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
        attention_bias=config.attention_bias or config.attention_output_bias,  # Llama's: all four projections
        mlp_bias=config.mlp_bias,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def unroll_to_llama(model: OdeGPTForCausalLM, step_size: float, solver: str | None = None) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` computing ``model`` solved at ``step_size``: one layer per executed step. A solver
    method whose step is not one residual layer (``SolverMethod.not_unrollable``) is refused with its reason."""
    config = model.config
    plan = model.plan(step_size, solver)
    if plan.method.not_unrollable is not None:
        raise ValueError(f"the {plan.method.name} solver cannot be unrolled to Llama layers: "
                         f"{plan.method.not_unrollable}")
    source = model.state_dict()
    state = {
        "model.embed_tokens.weight": source["model.embed_tokens.weight"],
        "model.norm.weight": source["model.norm.weight"],
        "lm_head.weight": source["lm_head.weight"],
    }
    llama_config = llama_config_for(config, len(plan))
    with no_init_weights():  # every weight is overwritten below
        llama = LlamaForCausalLM(llama_config)
    names = set(llama.state_dict())
    for layer, step in enumerate(plan):
        module = model.model.blocks[step.block]
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{layer}.{name}.weight"] = getattr(module, name).weight.detach().clone()
        for name, linear in module.named_modules():
            if not isinstance(linear, OdeGPTLinear):
                continue
            # A relaxed map applies its weights at the step's time (segment-local), merged here exactly.
            weight, bias = linear.merged(step.start - module.segment_start)
            scale = step.dt if f"{name}.weight" in _BRANCH_OUTPUTS else 1.0
            state[f"model.layers.{layer}.{name}.weight"] = weight * scale
            if f"model.layers.{layer}.{name}.bias" in names:  # Llama biases all four projections when any
                state[f"model.layers.{layer}.{name}.bias"] = (torch.zeros(weight.shape[0], dtype=weight.dtype)
                                                              if bias is None else bias * scale)
    llama.load_state_dict(state, strict=True)
    return llama.to(model.dtype).eval()


def save_unrolled(
    model: OdeGPTForCausalLM, output_dir: str | Path, step_size: float, tokenizer_dir: str | Path | None = None,
    solver: str | None = None,
) -> Path:
    output_dir = Path(output_dir)
    save_pretrained(unroll_to_llama(model, step_size, solver), output_dir)
    add_fields_older_clients_read(output_dir)
    copy_tokenizer(tokenizer_dir, output_dir)
    return output_dir


# ---- GGUF: the unrolled Llama in llama.cpp's file format ----------------------------------------------

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# llama.cpp's block quantizations: 32 weights of a row share one float16 scale (Q8_0: int8 weights; Q4_0: 4-bit).
GGUF_QUANTIZED = ("q8_0", "q4_0")
GGUF_BLOCK = 32
# Llama tensor names -> GGUF names (llama.cpp's gguf-py tensor map for the llama architecture).
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _rotary_halves_to_pairs(weight, num_heads: int):
    """Reorder a q/k projection's output rows from Hugging Face's rotary layout (each head's first half rotates
    with its second half) to llama.cpp's (adjacent pairs rotate together), as llama.cpp's own converter does."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_file_name(step_size: float, dtype: str) -> str:
    return f"odegpt-a{step_size:g}-{dtype}.gguf"


def gguf_tensor_type(name: str, shape: tuple[int, ...], dtype: str, tied: bool):
    """The ``GGMLQuantizationType`` a tensor of the export (GGUF ``name``, numpy ``shape``: rows last) is stored in
    for the file type ``dtype``, keeping in higher precision what llama.cpp keeps there:

    - vectors (the norms) stay f32, as in every file llama.cpp's converter writes;
    - f32, f16, bf16: every matrix in that type;
    - q8_0: every matrix in Q8_0, as ``convert_hf_to_gguf.py --outtype q8_0`` (and ``llama-quantize Q8_0``) store
      them, the token embedding and output matrix included;
    - q4_0: matrices in Q4_0 except the output matrix (``output.weight``, or the token embedding when it is tied to
      the output, as llama.cpp reads it then), which ``llama-quantize`` stores in Q6_K, or in Q8_0 when its rows are
      not a multiple of Q6_K's 256 (so SmolLM2's); the ``gguf`` package has no Q6_K quantizer, so it is Q8_0 here;
    - a matrix whose rows (``shape[-1]``) are not a multiple of the 32-weight block stays f16, as
      ``convert_hf_to_gguf.py`` falls back to f16 for a tensor it cannot quantize.
    """
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or dtype == "f32":
        return types.F32
    if dtype not in GGUF_QUANTIZED:
        return {"f16": types.F16, "bf16": types.BF16}[dtype]
    if shape[-1] % GGUF_BLOCK:
        return types.F16
    output = name == "output.weight" or (tied and name == "token_embd.weight")
    return types.Q8_0 if dtype == "q8_0" or output else types.Q4_0


def save_gguf(model: OdeGPTForCausalLM, output_dir: str | Path, step_size: float, tokenizer_dir: str | Path,
              dtype: str = "f16", name: str = "odegpt") -> Path:
    """Write ``output_dir/odegpt-a{step}-{dtype}.gguf``: the model unrolled at ``step_size`` as a llama.cpp
    ``llama`` model, with the vocabulary of ``tokenizer_dir`` written so that llama.cpp tokenizes a text exactly as
    the folder's tokenizer does (odegpt's SentencePiece or a Hugging Face byte-level BPE: ``gguf_vocabulary``).
    Matrices are stored in ``dtype`` (f32, f16, bf16, or quantized by the ``gguf`` package's quantizer to q8_0 or
    q4_0); norms stay f32, and a quantized file keeps what llama.cpp keeps in higher precision
    (:func:`gguf_tensor_type`)."""
    import gguf

    from .gguf_vocabulary import gguf_vocabulary

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    check_gguf_model(model.config)
    vocabulary = gguf_vocabulary(tokenizer_dir, model.config.vocab_size)
    llama = unroll_to_llama(model, step_size).float()
    output = Path(output_dir) / gguf_file_name(step_size, dtype)
    output.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(output), "llama")
    _write_gguf_hyperparameters(writer, model.config, llama.config.num_hidden_layers, name, dtype)
    vocabulary.write(writer)
    _write_gguf_tensors(writer, llama, model.config, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return output


def check_gguf_model(config: OdeGPTConfig) -> None:
    """The GGUF export writes llama.cpp's bias-free llama with default rotary positions; anything else is refused."""
    unsupported = [name for name in ("attention_bias", "attention_output_bias", "mlp_bias") if getattr(config, name)]
    if config.rotary_inv_freq is not None:
        unsupported.append(f"rotary scaling {config.source_rope_parameters}")
    if unsupported:
        raise ValueError(f"the GGUF export writes llama.cpp's bias-free llama with default rotary positions; this "
                         f"model has {', '.join(unsupported)}: export it unrolled (--format unrolled) and convert that "
                         f"folder with llama.cpp's convert_hf_to_gguf.py")


def _write_gguf_hyperparameters(writer, config: OdeGPTConfig, layers: int, name: str, dtype: str) -> None:
    """The llama architecture's keys. The head size is written too (key and value length): llama.cpp otherwise
    takes hidden_size / heads, which an imported model's explicit head_dim need not be."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter and quantizer write it


def _write_gguf_tensors(writer, llama: LlamaForCausalLM, config: OdeGPTConfig, dtype: str) -> None:
    """The unrolled Llama's tensors under llama.cpp's names, q/k rows in its rotary order, each in the type
    :func:`gguf_tensor_type` gives it for ``dtype``."""
    import gguf

    for source, tensor in llama.state_dict().items():
        if source == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads token_embd.weight as the output matrix when output.weight is absent
        tensor = tensor.detach().to(torch.float32)
        if source.startswith("model.layers."):
            layer, rest = source.removeprefix("model.layers.").split(".", 1)
            target = f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"
            if rest == "self_attn.q_proj.weight":
                tensor = _rotary_halves_to_pairs(tensor, config.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                tensor = _rotary_halves_to_pairs(tensor, config.num_key_value_heads)
        else:
            target = _GGUF_NAMES[source]
        data = tensor.numpy()
        quantization = gguf_tensor_type(target, data.shape, dtype, config.tie_word_embeddings)
        if quantization == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, data.astype(np.float32))
        else:
            writer.add_tensor(target, gguf.quants.quantize(data, quantization), raw_dtype=quantization)


EXPORT_FORMATS = ("native", "unrolled", "gguf")
_GGUF_DTYPE_NAMES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", None: "f16",
                     **{name: name for name in GGUF_QUANTIZED}}


def check_export(config, model_dir: str | Path, kind: str, step_size: float | None, dtype: str | None = None) -> float:
    """The step size an export of ``kind`` is written at (default: the model's), checked with everything else an
    export needs against the folder's config before any weight is read; a ValueError names the flag. A quantized
    ``dtype`` (q8_0, q4_0) is a GGUF file type: the folder formats store float32, bfloat16 or float16."""
    from data_pipeline.tokenizer import has_tokenizer

    from .model_folder import check_tokenizer_folder

    if kind not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {kind!r}")
    if dtype is not None and dtype not in _GGUF_DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {', '.join(name for name in _GGUF_DTYPE_NAMES if name)}, got "
                         f"{dtype!r}")
    if dtype in GGUF_QUANTIZED and kind != "gguf":
        raise ValueError(f"--dtype {dtype} quantizes a GGUF file (--format gguf); a {kind} folder stores float32, "
                         f"bfloat16 or float16")
    if kind == "gguf" and not has_tokenizer(model_dir):
        raise ValueError(f"--format gguf needs the model's tokenizer in {model_dir} (odegpt's tokenizer.model, or a "
                         f"Hugging Face tokenizer.json), for the GGUF vocabulary (odegpt convert copies the run's "
                         f"tokenizer into the model folder)")
    check_tokenizer_folder(model_dir, config.vocab_size)  # as generate checks it: files, odegpt's record, size
    if kind == "gguf":
        from .gguf_vocabulary import gguf_vocabulary

        gguf_vocabulary(model_dir, config.vocab_size)  # one line now, not after the weights are read
    if config.model_type != "odegpt":  # a Llama: its odegpt config exists once it is imported
        return 1.0 if step_size is None else step_size
    step_size = config.step_size if step_size is None else step_size
    config.solver_steps(step_size, "--step-size")  # a finite real > 0 whose solve fits max_solver_steps
    reason = solver_method(config.solver).not_unrollable
    if kind != "native" and reason is not None:
        raise ValueError(f"--format {kind}: the {config.solver} solver cannot be unrolled to Llama layers: {reason}")
    return step_size


def write_export(model: OdeGPTForCausalLM, output_dir: Path, kind: str, step_size: float, tokenizer_dir: str | Path,
                 dtype: str | None = None) -> Path:
    """Write ``model`` as ``kind`` (native, unrolled or gguf) into ``output_dir``; the path written (the folder, or
    the .gguf file in it)."""
    if kind == "unrolled":
        return save_unrolled(model, output_dir, step_size, tokenizer_dir=tokenizer_dir)
    if kind == "gguf":
        return save_gguf(model, output_dir, step_size, tokenizer_dir, _GGUF_DTYPE_NAMES[dtype])
    model.config.step_size = step_size
    save_native(model, output_dir, tokenizer_dir=tokenizer_dir)
    copy_calibrations(tokenizer_dir, output_dir)  # the source folder: its thresholds hold for these weights
    return output_dir


def format_size(size: int) -> str:
    """A file size in decimal units: ``"463 B"``, ``"12.4 kB"``, ``"145.3 MB"``, ``"1.2 GB"``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def gguf_tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each type the GGUF file at ``path`` holds (``{"Q4_0": 210, "Q8_0": 1, "F32": 61}``),
    most first."""
    import collections

    import gguf

    counts = collections.Counter(tensor.tensor_type.name for tensor in gguf.GGUFReader(str(path)).tensors)
    return dict(counts.most_common())


def describe_export(model: OdeGPTForCausalLM, kind: str, step_size: float, written: Path, dtype: str | None) -> str:
    """The line ``odegpt export`` prints: what was written, at which step size and cost, where (a GGUF file: its
    type, the tensors of each storage type in it and its size)."""
    cost, trained = model_cost(model.config, step_size), model.config.num_hidden_layers
    if kind == "unrolled":
        return (f"unrolled LlamaForCausalLM at step size {step_size:g}: {cost.executed_steps} layers (trained depth "
                f"{trained}), {format_count(cost.flops_per_token)} FLOPs/token -> {written}")
    if kind == "gguf":
        types = ", ".join(f"{count} {name}" for name, count in gguf_tensor_types(written).items())
        return (f"GGUF (llama, {_GGUF_DTYPE_NAMES[dtype]}: {types} tensors; {format_size(written.stat().st_size)}) "
                f"at step size {step_size:g}: {cost.executed_steps} layers (trained depth {trained}), "
                f"{format_count(cost.flops_per_token)} FLOPs/token -> {written}")
    return (f"native odegpt folder (default step size {step_size:g}, {cost.executed_steps} solver steps, "
            f"{format_count(cost.parameters)} parameters) -> {written}")
