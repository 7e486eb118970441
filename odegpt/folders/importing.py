"""Import a pretrained Llama-family checkpoint as an odegpt model: exactly (unshared), or retrofitted into shared
segments, optionally with the time-continuous relaxation.

- **Exact import**: every layer of the source becomes an unshared odegpt block with its weights; biases, an
  explicit head size and every rotary scaling come along through transformers' own code, not a copy: the
  frequencies the source's rotary embedding computed once (default, linear, llama3, YaRN, ...), or, for scalings
  that change with the sequence length (dynamic NTK, LongRoPE), transformers' Llama rotary embedding at run time
  (odegpt.model.modeling_odegpt.length_dependent_rotary). So the logits equal the source's under transformers.
- **Retrofitting** (``segments``, e.g. ``1u,6s,1u``): the source's layers are mapped onto the segments in order.
  An unshared segment takes its layers as they are; a shared segment of depth ``D`` takes ``D`` source layers and
  initialises its one block from them by ``init``: ``lower`` (the first of them), ``stepwise`` (the one in the
  middle of the segment's time: with one block per segment, Relaxed Recursive Transformers' rule of taking
  every N/K-th layer picks a single layer, and the first is ``lower``), or ``average`` (their mean). A shared
  block's RMSNorm weights are folded into the linear maps that follow them (``W (g * x) = (W diag g) x``, exact),
  so that layers with different norms become comparable maps and the block's norms are ones.
- **Relaxation** (``relax_rank``): each linear map of a shared block gets a correction that is linear in the
  segment's time between knots at its source layers' times (``OdeGPTLinear``), knot ``k`` initialised from the
  truncated SVD of (source layer ``k``'s folded weight - the shared weight), rank ``relax_rank`` (a rank at or
  above a matrix's own gives it its full rank; ``"full"`` for all). At full rank and ``a = 1``, the step at time
  ``k`` applies exactly layer ``k``'s maps: the model is the source.

Everything the odegpt block cannot represent is refused from ``config.json`` alone, before any weight is read.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from odegpt.errors import InputError
from odegpt.model.accounting import format_count, llama_parameter_count
from odegpt.model.configuration_odegpt import OdeGPTConfig, parse_segments
from odegpt.model.modeling_odegpt import OdeGPTForCausalLM, OdeGPTLinear

from .calibrated_init import CALIBRATED_RULES, BlockFit, InputMoments, fit_block, input_moments
from .gguf_source import is_gguf, load_gguf_source
from .integrity import check_finite_weights
from .model_folder import MAX_FOLDER_LAYERS, load_config, load_model, quiet_transformers

# Architectures whose decoder layer is the odegpt block (pre-norm RMSNorm, rotary attention with optional GQA and
# biases, SwiGLU MLP), by config.json model_type.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
INIT_RULES = ("stepwise", "average", "lower", "fit", "auto")  # fit, auto: with calibration
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Which RMSNorm feeds which linear maps (its weight is folded into them in a shared block).
_NORM_INPUTS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


class UnsupportedModelError(ValueError):
    """A source checkpoint with a feature the odegpt block cannot represent; the message names it and its field."""


def check_importable(config: dict, where: str = "config.json") -> None:
    """Refuse, naming the feature and its config field, a source the odegpt block cannot represent."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not a Llama-family model odegpt imports "
                                    f"(one of {', '.join(FAMILIES)})")
    architectures = config.get("architectures") or [FAMILIES[model_type]]
    if architectures[0] != FAMILIES[model_type]:
        raise UnsupportedModelError(f"{where}: architectures {architectures} is not {FAMILIES[model_type]}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{where}: activation {act!r} (hidden_act) is not the odegpt MLP's SiLU")
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            raise UnsupportedModelError(f"{where}: a mixture of experts ({key}={config[key]}) is not an odegpt MLP")
    for key in ("qk_norm", "use_qk_norm"):
        if config.get(key):
            raise UnsupportedModelError(f"{where}: query/key normalisation ({key}) is not in the odegpt block")
    window, positions = config.get("sliding_window"), config.get("max_position_embeddings", 0)
    uses_window = config.get("use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < positions:
        raise UnsupportedModelError(f"{where}: sliding-window attention (sliding_window={window} < "
                                    f"max_position_embeddings={positions}) is not odegpt's full causal attention")
    if any(kind != "full_attention" for kind in config.get("layer_types") or []):
        raise UnsupportedModelError(f"{where}: layers other than full attention (layer_types) are not odegpt blocks")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"{where}: partial rotary positions (partial_rotary_factor="
                                    f"{config['partial_rotary_factor']}) are not odegpt's")
    check_shape(config, where)


def check_shape(config: dict, where: str = "config.json") -> None:
    """Refuse, naming the field, a config.json whose attention shape or rotary scaling transformers would fail on
    with a traceback (or misread): heads that KV heads do not divide, an odd head size, an unknown rope_type."""
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads") or \
        config.get("num_attention_heads")
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads > 0 and kv_heads > 0):
        raise ValueError(f"{where}: num_attention_heads and num_key_value_heads must be integers > 0, got {heads!r} "
                         f"and {kv_heads!r}")
    if heads % kv_heads:
        raise ValueError(f"{where}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads} "
                         f"(grouped-query attention shares each KV head among a whole number of heads)")
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    if head_dim % 2:
        raise ValueError(f"{where}: head_dim {head_dim} is odd; rotary positions rotate pairs of channels")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type not in ("default", *ROPE_INIT_FUNCTIONS):
        raise UnsupportedModelError(f"{where}: rope_type {rope_type!r} is not a rotary scaling transformers knows "
                                    f"({', '.join(('default', *ROPE_INIT_FUNCTIONS))})")


def check_segments_fit(segments: list[dict], num_layers: int) -> None:
    depth = sum(segment["depth"] for segment in segments)
    if depth != num_layers:
        raise ValueError(f"segments cover depth {depth} but the source has {num_layers} layers: their depths must "
                         f"add up to {num_layers}")


@dataclass
class ImportReport:
    source_parameters: int
    parameters: int  # the odegpt model's, the relaxation included
    relaxation_parameters: int
    segments: list[dict]
    init: str
    relax_rank: int | str
    shared_blocks: dict = field(default_factory=dict)  # block index -> (the init rule used, calibrated error or None)


def load_source(source_dir: str | Path):
    """The source's config.json (checked first, with the size it describes against the weights the folder holds and
    this machine's memory), then the model itself in float32, through transformers (never the folder's own code).
    What transformers would load silently wrong (a tied head over distinct weights) is refused too."""
    path = Path(source_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"{path}: {str(error)[:200]}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds no JSON object")
    check_importable(config, str(path))
    stored = check_source_size(source_dir, config)
    try:
        with quiet_transformers():
            model, loading = AutoModelForCausalLM.from_pretrained(source_dir, trust_remote_code=False,
                                                                  dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"{source_dir}: the weights do not match its config.json ({reason})") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if loading.get(kind):
            names = sorted(map(str, loading[kind]))
            raise ValueError(f"{source_dir}: {len(names)} {kind.replace('_', ' ')} for a {config['model_type']!r} "
                             f"model, e.g. {', '.join(names[:3])}; the weights do not match its config.json")
    if model.config.tie_word_embeddings and "lm_head.weight" in stored and \
            not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
        raise ValueError(f"{path}: tie_word_embeddings is true but the weights hold an LM head of their own "
                         f"(lm_head.weight differs from the embedding): set it to false, or drop that tensor")
    check_finite_weights(model.named_parameters(), source_dir)
    return model.eval()


def _check_layer_shapes(source_dir: str | Path, config: dict, stored: dict[str, int]) -> None:
    """Refuse a config.json whose shapes its first layer's weights contradict (heads x head_dim, KV heads, the MLP's
    width), from the safetensors headers, before a model is built from it."""
    d = int(config.get("hidden_size") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or d // max(heads, 1))
    inner = int(config.get("intermediate_size") or 0)
    expected = {"self_attn.q_proj.weight": ("num_attention_heads x head_dim x hidden_size", heads * head_dim * d),
                "self_attn.k_proj.weight": ("num_key_value_heads x head_dim x hidden_size", kv_heads * head_dim * d),
                "mlp.up_proj.weight": ("intermediate_size x hidden_size", inner * d)}
    for name, (formula, elements) in expected.items():
        held = stored.get(f"model.layers.0.{name}")
        if held is not None and held != elements:
            raise ValueError(f"{source_dir}/config.json does not describe its weights: model.layers.0.{name} holds "
                             f"{held:,} values, its {formula} is {elements:,}")


def check_source_size(source_dir: str | Path, config: dict) -> dict[str, int]:
    """The tensors the folder's safetensors hold (name -> elements, from their headers), after refusing a config.json
    that describes more layers than they hold, or a model this machine's memory cannot take in float32."""
    files = sorted(Path(source_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{source_dir} holds no safetensors weights (a pytorch_model.bin is a pickle, which odegpt "
                         f"never loads: it can run code); save the model with save_pretrained(safe_serialization=True)")
    layers = config.get("num_hidden_layers", 0)
    if not isinstance(layers, int) or not 0 < layers <= MAX_FOLDER_LAYERS:
        raise ValueError(f"{source_dir}/config.json asks for {layers:,} layers; odegpt loads 1 to "
                         f"{MAX_FOLDER_LAYERS:,}")
    stored: dict[str, int] = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                stored.update({name: math.prod(handle.get_slice(name).get_shape()) for name in handle.keys()})
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file} is not a readable safetensors file ({error})") from None
    held = {int(name.split(".")[2]) for name in stored if name.startswith("model.layers.")}
    if held != set(range(layers)):
        raise ValueError(f"{source_dir}/config.json describes {layers} layers but its weights hold {len(held)} "
                         f"(model.layers.*): the config and the weights belong to different models")
    parameters = llama_parameter_count(config)
    needed, available = 4 * parameters, psutil.virtual_memory().available
    if needed > available:
        raise ValueError(f"{source_dir}/config.json describes a model of {parameters:,} parameters "
                         f"({needed / 2**30:.1f} GiB in float32), more than this machine's {available / 2**30:.1f} GiB "
                         f"of free memory")
    _check_layer_shapes(source_dir, config, stored)
    return stored


def odegpt_config_for(source, segments: list[dict], relax_rank: int | str) -> OdeGPTConfig:
    sc = source.config
    rotary = source.model.rotary_emb  # the source's own rotary embedding: transformers computed its frequencies
    rope = dict(getattr(sc, "rope_parameters", None) or {"rope_type": "default", "rope_theta": sc.rope_theta})
    default_rope = rope.get("rope_type", "default") == "default" and float(rotary.attention_scaling) == 1.0
    return OdeGPTConfig(
        vocab_size=sc.vocab_size, hidden_size=sc.hidden_size, intermediate_size=sc.intermediate_size,
        num_attention_heads=sc.num_attention_heads, num_key_value_heads=sc.num_key_value_heads,
        head_dim=getattr(sc, "head_dim", None) or sc.hidden_size // sc.num_attention_heads,
        max_position_embeddings=sc.max_position_embeddings, rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=sc.rms_norm_eps, tie_word_embeddings=bool(sc.tie_word_embeddings), segments=segments,
        attention_bias=bool(source.model.layers[0].self_attn.q_proj.bias is not None),
        attention_output_bias=bool(source.model.layers[0].self_attn.o_proj.bias is not None),
        mlp_bias=bool(source.model.layers[0].mlp.down_proj.bias is not None),
        source_rope_parameters=None if default_rope else rope,
        rotary_inv_freq=None if default_rope else rotary.inv_freq.float().tolist(),
        rotary_attention_scaling=float(rotary.attention_scaling),
        relax_rank=relax_rank, bos_token_id=sc.bos_token_id, eos_token_id=sc.eos_token_id,
        pad_token_id=sc.pad_token_id,
    )


def _layer_maps(layer, fold_norms: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{linear name: (weight, bias)}`` of a source layer, the RMSNorm weights folded in when asked."""
    maps = {}
    for name in _LINEARS:
        linear = layer.get_submodule(name)
        maps[name] = (linear.weight.detach().float().clone(),
                      None if linear.bias is None else linear.bias.detach().float().clone())
    if fold_norms:
        for norm, names in _NORM_INPUTS.items():
            gain = layer.get_submodule(norm).weight.detach().float()
            for name in names:
                maps[name] = (maps[name][0] * gain[None, :], maps[name][1])
    return maps


@torch.no_grad()
def retrofit(source, segments: list[dict] | str | None = None, init: str = "stepwise", relax_rank: int | str = 0,
             moments: InputMoments | None = None) -> tuple[OdeGPTForCausalLM, ImportReport]:
    """An odegpt model from a loaded Llama-family ``source``: exact when every segment is unshared (the default).
    With ``moments`` of the source's inputs on calibration text (``calibrated_init.input_moments``), the shared
    blocks and their relaxation are fitted to what the layers compute on that text."""
    num_layers = source.config.num_hidden_layers
    segments = [{"depth": num_layers, "shared": False}] if segments is None else \
        parse_segments(segments) if isinstance(segments, str) else segments
    check_segments_fit(segments, num_layers)
    if init not in INIT_RULES:
        raise ValueError(f"init must be one of {', '.join(INIT_RULES)}, got {init!r}")
    config = odegpt_config_for(source, segments, relax_rank)
    fits: dict[int, BlockFit] = {}
    model = OdeGPTForCausalLM(config).eval()
    target = model.model
    target.embed_tokens.weight.copy_(source.model.embed_tokens.weight)
    target.norm.weight.copy_(source.model.norm.weight)
    if not config.tie_word_embeddings:
        model.lm_head.weight.copy_(source.lm_head.weight)
    layers, block_index, layer_index = source.model.layers, 0, 0
    for segment in segments:
        depth = segment["depth"]
        group = layers[layer_index:layer_index + depth]
        if not segment["shared"]:
            for layer in group:
                target.blocks[block_index].load_state_dict(layer.state_dict(), strict=True)
                block_index += 1
        else:
            fits[block_index] = _init_shared(target.blocks[block_index], group,
                                             list(range(layer_index, layer_index + depth)), init, moments)
            block_index += 1
        layer_index += depth
    relaxation = sum(p.numel() for name, p in model.named_parameters() if ".relax_" in name)
    report = ImportReport(source_parameters=sum(p.numel() for p in source.parameters()),
                          parameters=sum(p.numel() for p in model.parameters()), relaxation_parameters=relaxation,
                          segments=segments, init=init, relax_rank=relax_rank,
                          shared_blocks={index: (fit.rule, fit.error) for index, fit in fits.items()})
    return model, report


def _init_shared(block, group, layers: list[int], init: str, moments: InputMoments | None) -> BlockFit:
    """A shared block from the source layers ``group`` (indices ``layers``) of its segment, norms folded into the
    maps, by ``init`` (``auto``: the rule with the least output error on the calibration ``moments``)."""
    maps = [_layer_maps(layer, fold_norms=True) for layer in group]
    linears: dict[str, OdeGPTLinear] = {name: block.get_submodule(name) for name in _LINEARS}
    low_rank = next((linear.relax_down.shape[1] for linear in linears.values() if hasattr(linear, "relax_down")), None)
    if init == "auto":
        if moments is None:
            raise ValueError("init 'auto' chooses each shared block's rule by its error on calibration text: give "
                             "--calibration")
        chosen = min((fit_block(rule, maps, layers, moments, low_rank) for rule in CALIBRATED_RULES),
                     key=lambda fit: fit.error)
    else:
        chosen = fit_block(init, maps, layers, moments, low_rank)
    for norm in _NORM_INPUTS:
        block.get_submodule(norm).weight.fill_(1.0)
    for name, linear in linears.items():
        weight, bias = chosen.weights[name], chosen.biases[name]
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        for knot, layer_maps in enumerate(maps if linear.knots else []):
            layer_weight, layer_bias = layer_maps[name]
            if hasattr(linear, "relax_weight"):
                linear.relax_weight[knot].copy_(layer_weight - weight)
            else:
                up, down = chosen.knots[name][knot]
                linear.relax_up[knot].copy_(up)
                linear.relax_down[knot].copy_(down)
            if layer_bias is not None:
                linear.relax_bias[knot].copy_(layer_bias - bias)
    return chosen


def parse_relax_rank(text: str) -> int | str:
    if text == "full":
        return "full"
    if not text.isdigit():
        raise ValueError(f"--relax-rank must be an integer >= 0 or 'full', got {text!r}")
    return int(text)


def load_as_odegpt(folder: str | Path, dtype: torch.dtype | None = None) -> OdeGPTForCausalLM:
    """An odegpt model from ``folder``: an odegpt folder as it is, a Llama folder (an unrolled export, or any Llama)
    imported exactly as an unshared odegpt model with its weights; refused from its config.json, before any weight
    is read, when it cannot be imported."""
    config = load_config(folder)
    if config.model_type == "llama":
        try:
            check_importable(config.to_dict(), f"{folder}/config.json")
        except UnsupportedModelError as error:  # length-dependent rotary scaling, another activation, ...
            raise InputError(f"{folder}: this Llama cannot be imported: {error}") from None
    model = load_model(folder, config)
    if config.model_type == "llama":
        stored = model.dtype
        model = retrofit(model.float())[0].to(stored)
    return model if dtype is None else model.to(dtype)


@dataclass
class ImportRequest:
    """What ``odegpt import`` was asked: the source folder, the layout (``segments``, e.g. ``"1u,6s,1u"``; None is an
    exact import), the shared blocks' init rule and relaxation rank, and the text to compare the two on."""

    source: str
    segments: str | list[dict] | None = None
    init: str | None = None  # stepwise, or auto with calibration
    relax_rank: int | str = 0
    data: list[str] | None = None
    seq_len: int = 256
    max_batches: int = 16
    calibration: list[str] | None = None
    calibration_tokens: int = 32768

    def checked(self) -> ImportRequest:
        """This request with its segments and rank parsed, or a ValueError naming the flag (no weight is read)."""
        relax_rank = parse_relax_rank(self.relax_rank) if isinstance(self.relax_rank, str) else self.relax_rank
        segments = parse_segments(self.segments) if isinstance(self.segments, str) else self.segments
        init = self.init or ("auto" if self.calibration else "stepwise")
        if init not in INIT_RULES:
            raise InputError(f"--init must be one of {', '.join(INIT_RULES)}, got {init!r}")
        if init in ("fit", "auto") and not self.calibration:
            raise InputError(f"--init {init} fits the shared blocks on calibration text: give --calibration")
        if self.calibration_tokens < 1:
            raise InputError(f"--calibration-tokens must be >= 1, got {self.calibration_tokens}")
        if self.seq_len < 2 or self.max_batches < 1:
            raise InputError(f"--seq-len must be >= 2 and --max-batches >= 1, got {self.seq_len} and "
                             f"{self.max_batches}")
        return replace(self, segments=segments, init=init, relax_rank=relax_rank)


def import_model(request: ImportRequest, calibration: list | None = None):
    """``(source, odegpt model, report)`` of a checked request (a folder, or a GGUF file: odegpt.folders.gguf_source);
    a source that cannot be imported is an InputError. With ``calibration`` token batches, the shared blocks are
    fitted to what the source's layers compute on them (odegpt.folders.calibrated_init)."""
    try:
        source = load_gguf_source(request.source) if is_gguf(request.source) else load_source(request.source)
        moments = None if calibration is None else input_moments(source, calibration)
        model, report = retrofit(source, request.segments, request.init, request.relax_rank, moments)
    except UnsupportedModelError as error:
        raise InputError(str(error)) from None
    except ValueError as error:
        raise InputError(f"--model {request.source}: {error}") from None
    return source, model, report


def describe_import(source, report: ImportReport) -> str:
    """The line ``odegpt import`` prints: the source, the layout and what its parameters became."""
    layout = ",".join(f"{s['depth']}{'s' if s['shared'] else 'u'}" for s in report.segments)
    without = report.parameters - report.relaxation_parameters
    init = "" if all(not s["shared"] for s in report.segments) else f", init {report.init}"
    if any(error is not None for _, error in report.shared_blocks.values()):
        init += " (" + ", ".join(f"block {index}: {rule}, output error {error:.1%}" for index, (rule, error)
                                 in report.shared_blocks.items()) + " on the calibration text)"
    return (f"imported {type(source).__name__} ({source.config.num_hidden_layers} layers, "
            f"{format_count(report.source_parameters)} parameters) as segments {layout}{init}: "
            f"{format_count(without)} parameters without the relaxation, {format_count(report.parameters)} with it "
            f"(relax rank {report.relax_rank}: {format_count(report.relaxation_parameters)}; "
            f"{report.parameters / report.source_parameters:.0%} of the source)")
