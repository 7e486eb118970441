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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from odegpt.errors import InputError
from odegpt.model.accounting import format_count
from odegpt.model.configuration_odegpt import OdeGPTConfig, parse_segments
from odegpt.model.modeling_odegpt import OdeGPTForCausalLM, OdeGPTLinear

from .integrity import check_finite_weights
from .model_folder import load_config, load_model, quiet_transformers

# Architectures whose decoder layer is the odegpt block (pre-norm RMSNorm, rotary attention with optional GQA and
# biases, SwiGLU MLP), by config.json model_type.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
INIT_RULES = ("stepwise", "average", "lower")
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
    for field in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(field):
            raise UnsupportedModelError(f"{where}: a mixture of experts ({field}={config[field]}) is not an odegpt MLP")
    for field in ("qk_norm", "use_qk_norm"):
        if config.get(field):
            raise UnsupportedModelError(f"{where}: query/key normalisation ({field}) is not in the odegpt block")
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


def load_source(source_dir: str | Path):
    """The source's config.json (checked first), then the model itself in float32, through transformers (never
    the folder's own code)."""
    path = Path(source_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    check_importable(config, str(path))
    with quiet_transformers():
        model, loading = AutoModelForCausalLM.from_pretrained(source_dir, trust_remote_code=False, dtype=torch.float32,
                                                              output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if loading.get(kind):
            names = sorted(map(str, loading[kind]))
            raise ValueError(f"{source_dir}: {len(names)} {kind.replace('_', ' ')} for a {config['model_type']!r} "
                             f"model, e.g. {', '.join(names[:3])}; the weights do not belong to its config.json")
    check_finite_weights(model.named_parameters(), source_dir)
    return model.eval()


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


def _truncated(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``delta`` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()


@torch.no_grad()
def retrofit(source, segments: list[dict] | str | None = None, init: str = "stepwise",
             relax_rank: int | str = 0) -> tuple[OdeGPTForCausalLM, ImportReport]:
    """An odegpt model from a loaded Llama-family ``source``: exact when every segment is unshared (the default)."""
    num_layers = source.config.num_hidden_layers
    segments = [{"depth": num_layers, "shared": False}] if segments is None else \
        parse_segments(segments) if isinstance(segments, str) else segments
    check_segments_fit(segments, num_layers)
    if init not in INIT_RULES:
        raise ValueError(f"init must be one of {', '.join(INIT_RULES)}, got {init!r}")
    config = odegpt_config_for(source, segments, relax_rank)
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
            _init_shared(target.blocks[block_index], group, init, relax_rank)
            block_index += 1
        layer_index += depth
    relaxation = sum(p.numel() for name, p in model.named_parameters() if ".relax_" in name)
    report = ImportReport(source_parameters=sum(p.numel() for p in source.parameters()),
                          parameters=sum(p.numel() for p in model.parameters()), relaxation_parameters=relaxation,
                          segments=segments, init=init, relax_rank=relax_rank)
    return model, report


def _init_shared(block, group, init: str, relax_rank: int | str) -> None:
    """A shared block from the source layers ``group`` of its segment (norms folded into the maps)."""
    maps = [_layer_maps(layer, fold_norms=True) for layer in group]
    chosen = {"lower": [0], "stepwise": [len(group) // 2], "average": list(range(len(group)))}[init]
    for norm in _NORM_INPUTS:
        block.get_submodule(norm).weight.fill_(1.0)
    for name in _LINEARS:
        weight = torch.stack([maps[i][name][0] for i in chosen]).mean(0)
        biases = [maps[i][name][1] for i in chosen]
        bias = None if biases[0] is None else torch.stack(biases).mean(0)
        linear: OdeGPTLinear = block.get_submodule(name)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        if not linear.knots:
            continue
        for knot, layer_maps in enumerate(maps):
            layer_weight, layer_bias = layer_maps[name]
            delta = layer_weight - weight
            if hasattr(linear, "relax_weight"):
                linear.relax_weight[knot].copy_(delta)
            else:
                up, down = _truncated(delta, linear.relax_down.shape[1])
                linear.relax_up[knot].copy_(up)
                linear.relax_down[knot].copy_(down)
            if layer_bias is not None:
                linear.relax_bias[knot].copy_(layer_bias - bias)


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
    init: str = "stepwise"
    relax_rank: int | str = 0
    data: list[str] | None = None
    seq_len: int = 256
    max_batches: int = 16

    def checked(self) -> ImportRequest:
        """This request with its segments and rank parsed, or a ValueError naming the flag (no weight is read)."""
        relax_rank = parse_relax_rank(self.relax_rank) if isinstance(self.relax_rank, str) else self.relax_rank
        segments = parse_segments(self.segments) if isinstance(self.segments, str) else self.segments
        if self.init not in INIT_RULES:
            raise InputError(f"--init must be one of {', '.join(INIT_RULES)}, got {self.init!r}")
        if self.seq_len < 2 or self.max_batches < 1:
            raise InputError(f"--seq-len must be >= 2 and --max-batches >= 1, got {self.seq_len} and "
                             f"{self.max_batches}")
        return ImportRequest(self.source, segments, self.init, relax_rank, self.data, self.seq_len, self.max_batches)


def import_model(request: ImportRequest):
    """``(source, odegpt model, report)`` of a checked request (a folder, or a GGUF file: odegpt.folders.gguf_source);
    a source that cannot be imported is an InputError."""
    from .gguf_source import is_gguf, load_gguf_source

    try:
        source = load_gguf_source(request.source) if is_gguf(request.source) else load_source(request.source)
        model, report = retrofit(source, request.segments, request.init, request.relax_rank)
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
    return (f"imported {type(source).__name__} ({source.config.num_hidden_layers} layers, "
            f"{format_count(report.source_parameters)} parameters) as segments {layout}{init}: "
            f"{format_count(without)} parameters without the relaxation, {format_count(report.parameters)} with it "
            f"(relax rank {report.relax_rank}: {format_count(report.relaxation_parameters)}; "
            f"{report.parameters / report.source_parameters:.0%} of the source)")
