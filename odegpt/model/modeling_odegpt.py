"""odegpt: a GPT whose residual stack is an ODE solve, so one set of weights runs at many speeds.

The block is Llama's (RMSNorm pre-norm, rotary positions, SwiGLU MLP, grouped-query attention via
``scaled_dot_product_attention``, no biases). The depth is a list of segments (see the config);
``solver.plan_solve`` turns them and a step size ``a`` into the list of executed steps, and the
forward pass is one loop over that plan. Read top to bottom: norm, rotary, attention, MLP, block,
decoder, LM head.

The model knows nothing of its decoders: self-speculative and adaptive-depth decoding live in
odegpt/decoding and use the model through the few methods at the end of ``OdeGPTForCausalLM``
(embed, attention_inputs, plan, solve, first_attention, state_recorder, keys_values, read_out, new_cache; declared
as ``odegpt.decoding.surface.DecoderModel``); a native export carries them in
its ``custom_generate/`` folder, which transformers installs as ``model.generate``.

This file is copied verbatim into exported model folders, so it imports only torch, transformers
and its sibling files (configuration_odegpt, solver, cache, loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .cache import CACHE_FIELD, OdeCache, StaticOdeCache, output_cache, received_cache
from .configuration_odegpt import OdeGPTConfig, check_step_size
from .loss import shifted_cross_entropy
from .solver import SolvePlan, StateRecorder, first_attention, integrate, plan_solve, relaxation_knots, solver_method


class OdeGPTRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 at least, whatever the compute dtype (bf16 sums of squares lose too much).
        normed = F.rms_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_inv_freq(config: OdeGPTConfig, device: torch.device | None = None) -> torch.Tensor:
    """The rotary inverse frequencies (head_dim/2,): the default ``theta ** (-2i / head_dim)``, or those an imported
    model's rotary scaling gave (``config.rotary_inv_freq``, computed by transformers' own initialisation)."""
    if config.rotary_inv_freq is not None:
        return torch.tensor(config.rotary_inv_freq, dtype=torch.float32, device=device)
    exponents = torch.arange(0, config.head_dim, 2, device=device, dtype=torch.float32) / config.head_dim
    return 1.0 / config.rope_theta ** exponents


# Rotary scalings whose frequencies depend on the longest position of each forward call (dynamic NTK, LongRoPE).
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def scales_with_length(config: OdeGPTConfig) -> bool:
    return (config.source_rope_parameters or {}).get("rope_type") in LENGTH_DEPENDENT_ROPE


def length_dependent_rotary(config: OdeGPTConfig, device: torch.device) -> nn.Module:
    """transformers' own Llama rotary embedding for an imported length-dependent scaling: it recomputes the
    frequencies at every call from the call's longest position, as the source model does (its state included), so
    the import stays exact at every length without a copy of those rules. The config is spelled so that transformers
    4.x (``rope_scaling``, a top-level ``original_max_position_embeddings``) and 5.x (``rope_parameters``) read it."""
    rope = {key: value for key, value in config.source_rope_parameters.items() if key != "rope_theta"}
    original = {"original_max_position_embeddings": rope["original_max_position_embeddings"]} \
        if "original_max_position_embeddings" in rope else {}
    llama = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                        rope_theta=config.rope_theta, rope_scaling=rope, **original)
    return LlamaRotaryEmbedding(llama).to(device)


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """cos/sin tables for the positions in ``position_ids`` (batch, seq), shaped (batch, 1, seq, head_dim), times
    the rotary scaling's attention factor (1 but for YaRN-like scalings)."""
    angles = position_ids[:, None, :, None].float() * inv_freq.to(position_ids.device)
    angles = torch.cat((angles, angles), dim=-1)
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class OdeGPTLinear(nn.Linear):
    """A linear map; in a relaxed shared block (``knots > 0``), ``W + dW(t)`` with a correction ``dW(t)`` that is
    linear in the segment's time ``t`` between knots at the source layers' times (odegpt.folders.importing
    initialises knot ``k`` from layer ``k``'s difference to the shared weights). A knot's correction is low-rank,
    ``up @ down``, or dense when ``rank`` reaches the matrix's own rank; biases are relaxed densely."""

    def __init__(self, in_features: int, out_features: int, bias: bool, knots: int = 0, rank: int | str = 0):
        super().__init__(in_features, out_features, bias=bias)
        self.knots = knots if rank else 0
        if self.knots:
            if rank == "full" or rank >= min(in_features, out_features):
                self.relax_weight = nn.Parameter(torch.zeros(knots, out_features, in_features))
            else:
                self.relax_down = nn.Parameter(torch.zeros(knots, rank, in_features))
                self.relax_up = nn.Parameter(torch.zeros(knots, out_features, rank))
            if bias:
                self.relax_bias = nn.Parameter(torch.zeros(knots, out_features))

    def forward(self, x: torch.Tensor, time: float = 0.0) -> torch.Tensor:
        y = super().forward(x)
        for knot, weight in relaxation_knots(time, self.knots) if self.knots else ():
            if hasattr(self, "relax_weight"):
                correction = F.linear(x, self.relax_weight[knot])
            else:
                correction = F.linear(F.linear(x, self.relax_down[knot]), self.relax_up[knot])
            if self.bias is not None:
                correction = correction + self.relax_bias[knot]
            y = y + weight * correction
        return y

    def merged(self, time: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias this map applies at ``time`` (for the unrolled export)."""
        weight, bias = self.weight.detach().clone(), None if self.bias is None else self.bias.detach().clone()
        for knot, share in relaxation_knots(time, self.knots) if self.knots else ():
            delta = (self.relax_weight[knot] if hasattr(self, "relax_weight")
                     else self.relax_up[knot] @ self.relax_down[knot])
            weight += share * delta.detach()
            if bias is not None:
                bias += share * self.relax_bias[knot].detach()
        return weight, bias


class OdeGPTAttention(nn.Module):
    def __init__(self, config: OdeGPTConfig, knots: int = 0):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        relax = dict(knots=knots, rank=config.relax_rank)
        bias = config.attention_bias
        self.q_proj = OdeGPTLinear(config.hidden_size, self.num_heads * self.head_dim, bias, **relax)
        self.k_proj = OdeGPTLinear(config.hidden_size, self.num_kv_heads * self.head_dim, bias, **relax)
        self.v_proj = OdeGPTLinear(config.hidden_size, self.num_kv_heads * self.head_dim, bias, **relax)
        self.o_proj = OdeGPTLinear(self.num_heads * self.head_dim, config.hidden_size, config.attention_output_bias,
                                   **relax)

    def keys_values(self, x, cos, sin, time: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and the values of the (normed) inputs ``x``, shaped (batch, kv heads, seq, head_dim)."""
        batch, seq, _ = x.shape
        k = self.k_proj(x, time).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, time).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k * cos + rotate_half(k) * sin, v

    def forward(self, x, cos, sin, mask, cache: OdeCache | None, slot: int, time: float = 0.0,
                cache_position: torch.Tensor | None = None) -> torch.Tensor:
        """``cache_position``: the columns a static cache writes these keys and values at (None for a dynamic one,
        which appends them)."""
        batch, seq, _ = x.shape
        q = self.q_proj(x, time).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k, v = self.keys_values(x, cos, sin, time)
        if cache is not None:  # one slot per block evaluation
            k, v = cache.update(k, v, slot) if cache_position is None else \
                cache.update(k, v, slot, {"cache_position": cache_position})
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, -1), time)


class OdeGPTMLP(nn.Module):
    def __init__(self, config: OdeGPTConfig, knots: int = 0):
        super().__init__()
        relax = dict(knots=knots, rank=config.relax_rank)
        self.gate_proj = OdeGPTLinear(config.hidden_size, config.intermediate_size, config.mlp_bias, **relax)
        self.up_proj = OdeGPTLinear(config.hidden_size, config.intermediate_size, config.mlp_bias, **relax)
        self.down_proj = OdeGPTLinear(config.intermediate_size, config.hidden_size, config.mlp_bias, **relax)

    def forward(self, x: torch.Tensor, time: float = 0.0) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, time)) * self.up_proj(x, time), time)


class OdeGPTBlock(nn.Module):
    """The vector field F = Attn(norm(.)) then MLP(norm(.)); the solver decides the step. ``time`` is the solve's
    time; a relaxed shared block (``knots`` > 0) varies its linear maps with the time inside its segment, which
    starts at ``segment_start``."""

    def __init__(self, config: OdeGPTConfig, knots: int = 0, segment_start: float = 0.0):
        super().__init__()
        self.segment_start = segment_start
        self.input_layernorm = OdeGPTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = OdeGPTAttention(config, knots)
        self.post_attention_layernorm = OdeGPTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = OdeGPTMLP(config, knots)

    def attention_branch(self, h, time: float = 0.0, **attention_inputs) -> torch.Tensor:
        return self.self_attn(self.input_layernorm(h), time=time - self.segment_start, **attention_inputs)

    def mlp_branch(self, h, time: float = 0.0) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(h), time - self.segment_start)

    def keys_values(self, h, cos, sin, time: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values this block's step would attend with at state ``h`` (no attention, no MLP)."""
        return self.self_attn.keys_values(self.input_layernorm(h), cos, sin, time - self.segment_start)


def attention_mask_for(
    padding_mask: torch.Tensor | None, query_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """A boolean (batch, 1, query, key) mask: causal, and blind to padded keys.

    Returns None when plain causal attention is exact (no padding, no past, or one new token),
    which lets SDPA take its fastest kernels. A padded query row that would see no key at all
    is allowed to see itself, so SDPA never normalises over an empty set (its output is unused).
    """
    if padding_mask is None or bool(padding_mask.all()):
        if past_len == 0 or query_len == 1:
            return None
        padding_mask = None
    key_len = past_len + query_len
    key_positions = torch.arange(key_len, device=device)
    query_positions = torch.arange(past_len, key_len, device=device)
    mask = (key_positions[None, :] <= query_positions[:, None])[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, -key_len:].bool()
        mask = mask | (~mask.any(-1, keepdim=True) & (key_positions == query_positions[:, None]))
    return mask


class OdeGPTExitHead(nn.Module):
    """The learned exit rule: from a state ``h`` at solve time ``t``, a prediction of ``log KL(p_end || p(h))``, how far
    its read-out still is from the read-out at the end of the step-size-1 solve (odegpt/training/exit_head.py trains
    it). It reads what the final norm leaves of the state (its direction), the log of its norm and ``t`` over the
    depth: a dot product per check (linear) or one small hidden layer, never the LM head."""

    def __init__(self, config: OdeGPTConfig):
        super().__init__()
        features = config.hidden_size + 2
        self.hidden = nn.Linear(features, config.exit_head) if config.exit_head else None
        self.score = nn.Linear(config.exit_head or features, 1)
        self.depth = float(config.num_hidden_layers)

    def features(self, h: torch.Tensor, time: float | torch.Tensor) -> torch.Tensor:
        h = h.float()
        norm = h.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        time = torch.as_tensor(time, dtype=h.dtype, device=h.device).expand_as(norm) / self.depth
        return torch.cat([h / norm * h.shape[-1] ** 0.5, norm.log(), time], dim=-1)

    def forward(self, h: torch.Tensor, time: float | torch.Tensor) -> torch.Tensor:
        x = self.features(h, time).to(self.score.weight.dtype)
        if self.hidden is not None:
            x = F.silu(self.hidden(x))
        return self.score(x).squeeze(-1).float()


class OdeGPTPreTrainedModel(PreTrainedModel):
    config_class = OdeGPTConfig
    config: OdeGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OdeGPTBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True


class OdeGPTModel(OdeGPTPreTrainedModel):
    """Embedding, the solve over all segments, final norm."""

    def __init__(self, config: OdeGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # All distinct blocks in segment order: a shared segment owns one, an unshared one owns `depth`. With the
        # time-continuous relaxation a shared block has one knot per unit of its segment's time (its source layers).
        blocks, start = [], 0.0
        for segment in config.segments:
            if segment["shared"]:
                knots = segment["depth"] if config.relax_rank else 0
                blocks.append(OdeGPTBlock(config, knots=knots, segment_start=start))
            else:
                blocks.extend(OdeGPTBlock(config) for _ in range(segment["depth"]))
            start += segment["depth"]
        self.blocks = nn.ModuleList(blocks)
        self.norm = OdeGPTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._rotary_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see rotary_table
        self._length_rotaries: dict[torch.device, nn.Module] = {}  # see length_dependent_rotary; not submodules
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: OdeCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        step_size: float | None = None,
        output_hidden_states: bool | None = None,
        cache: OdeCache | None = None,
        solver: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``step_size`` and ``solver`` override the config's for this call. ``output_hidden_states=True`` also
        returns the state before the first step and after every executed step (before the final norm), e.g.
        to read out intermediate times. The KV cache comes as ``cache`` or ``past_key_values`` (transformers'
        name from 5.24 on, and before)."""
        past_key_values = received_cache(cache, past_key_values, kwargs)
        plan = self.plan(step_size, solver)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = OdeCache()
        if past_key_values is not None:
            if not isinstance(past_key_values, OdeCache):
                raise TypeError(f"odegpt needs an odegpt OdeCache (one slot per block evaluation), "
                                f"got {type(past_key_values).__name__}")
            past_key_values.bind(plan.step_size, plan.num_slots, plan.method.name)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if isinstance(past_key_values, StaticOdeCache):  # attention reads its whole buffer; keys go after past_len
            attention = self.static_attention_inputs(h, attention_mask, past_len, past_key_values, position_ids)
        else:
            cos, sin, mask = self.attention_inputs(h, attention_mask, position_ids, past_len)
            attention = dict(cos=cos, sin=sin, mask=mask)

        recorder = StateRecorder(h) if output_hidden_states else None
        checkpoint = self._gradient_checkpointing_func if self.gradient_checkpointing and self.training else None
        h = integrate(self.blocks, h, plan, past_key_values, hook=recorder, checkpoint=checkpoint, **attention)
        if past_key_values is not None:
            past_key_values.advance(h.shape[1])
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), hidden_states=None if recorder is None else
                                       tuple(recorder.states), **{CACHE_FIELD: past_key_values})

    def plan(self, step_size: float | None = None, solver: str | None = None) -> SolvePlan:
        """The solve at ``step_size`` with ``solver`` (the config's where not given); bad values raise ValueError."""
        step_size = self.config.step_size if step_size is None else check_step_size(step_size)
        method = solver_method(self.config.solver if solver is None else solver).name
        return plan_solve(self.config.segments, step_size, self.config.max_solver_steps, method)

    def attention_inputs(self, h: torch.Tensor, attention_mask: torch.Tensor | None,
                         position_ids: torch.LongTensor | None, past_len: int):
        """Rotary tables and the attention mask for new states ``h`` (batch, seq, hidden) after ``past_len``
        cached positions; a left-padded batch counts positions from its first real token."""
        batch, seq = h.shape[:2]
        mask = attention_mask_for(attention_mask, seq, past_len, h.device)
        # Every position we count is below the table's end, and the frequencies do not change with the length.
        in_table = past_len + seq <= self.config.max_position_embeddings and not scales_with_length(self.config)
        if position_ids is None and attention_mask is None and in_table:  # decoding's case: one slice of the table
            cos, sin = self.rotary_table(h.device, h.dtype)
            return cos[None, None, past_len:past_len + seq], sin[None, None, past_len:past_len + seq], mask
        if position_ids is None:
            if attention_mask is not None:  # left padding: count only real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(past_len, past_len + seq, device=h.device)[None].expand(batch, -1)
            if in_table:
                cos, sin = self.rotary_table(h.device, h.dtype)
                return cos[position_ids][:, None], sin[position_ids][:, None], mask
        if scales_with_length(self.config):
            if h.device not in self._length_rotaries:
                self._length_rotaries[h.device] = length_dependent_rotary(self.config, h.device)
            cos, sin = self._length_rotaries[h.device](h, position_ids)
            return cos[:, None], sin[:, None], mask
        cos, sin = rotary_cos_sin(position_ids, rotary_inv_freq(self.config), self.config.rotary_attention_scaling,
                                  h.dtype)
        return cos, sin, mask

    def static_attention_inputs(self, h: torch.Tensor, attention_mask: torch.Tensor | None,
                                past_len: int | torch.Tensor, cache: StaticOdeCache,
                                position_ids: torch.LongTensor | None = None) -> dict:
        """Attention inputs for new states ``h`` (batch, seq, hidden) written into a static ``cache`` after ``past_len``
        positions: the columns they go to (``cache_position``), their rotary tables, and a mask over the cache's whole
        buffer that shows each query the real keys at or before its own column (left padding as in the dynamic path:
        ``attention_mask`` covers the first columns, 1 = a real token; a padded query sees itself). ``past_len`` may
        be a one-element long tensor, a compiled step's input: then one graph serves every position."""
        batch, seq = h.shape[:2]
        if scales_with_length(self.config):
            raise ValueError("a static KV cache cannot hold keys whose rotary frequencies change with each call's "
                             "length (an imported dynamic or LongRoPE scaling): decode with the dynamic cache")
        if isinstance(past_len, int):
            cache.check_room(batch, seq)
        keys = torch.arange(cache.max_length, device=h.device)
        columns = torch.arange(seq, device=h.device) + past_len
        visible = keys <= columns[:, None]  # (seq, columns): causal over the buffer; later columns are stale or empty
        if attention_mask is None:
            mask = visible[None, None]
            positions = columns[None].expand(batch, -1) if position_ids is None else position_ids
        else:
            real = F.pad(attention_mask.bool(), (0, cache.max_length - attention_mask.shape[-1]), value=True)
            mask = ((visible[None] & real[:, None]) | (keys == columns[:, None])[None])[:, None]
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, columns] if position_ids is None else position_ids
        if cache.max_length <= self.config.max_position_embeddings:
            cos, sin = self.rotary_table(h.device, h.dtype)
            cos, sin = cos[positions][:, None], sin[positions][:, None]
        else:
            cos, sin = rotary_cos_sin(positions, rotary_inv_freq(self.config), self.config.rotary_attention_scaling,
                                      h.dtype)
        return dict(cos=cos, sin=sin, mask=mask, cache_position=columns)

    def rotary_table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of every position below ``max_position_embeddings``, (positions, head_dim), made once per
        device and dtype: decoding would otherwise recompute its one row of them at every token."""
        config = self.config
        key = (device, dtype, config.head_dim, config.rope_theta, config.max_position_embeddings,
               None if config.rotary_inv_freq is None else tuple(config.rotary_inv_freq),
               config.rotary_attention_scaling)
        if key not in self._rotary_tables:
            # An ordinary tensor even when first asked for under inference_mode, so training can use it later.
            with torch.inference_mode(False), torch.no_grad():
                positions = torch.arange(config.max_position_embeddings, device=device)[None]
                cos, sin = rotary_cos_sin(positions, rotary_inv_freq(config, device), config.rotary_attention_scaling,
                                          dtype)
            self._rotary_tables[key] = cos[0, 0], sin[0, 0]
        return self._rotary_tables[key]


class OdeGPTForCausalLM(OdeGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: OdeGPTConfig):
        super().__init__(config)
        self.model = OdeGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.exit_head = OdeGPTExitHead(config) if config.exit_head is not None else None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: OdeCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        step_size: float | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        cache: OdeCache | None = None,
        solver: str | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``step_size`` and ``solver`` override the config's for this call; ``labels`` follow the HF
        convention (the same tokens as ``input_ids``, shifted here, -100 ignored)."""
        past_key_values = received_cache(cache, past_key_values, kwargs)
        if labels is not None and use_cache is None:
            use_cache = False  # scoring a sequence keeps no cache unless asked to
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            step_size=step_size, output_hidden_states=output_hidden_states, solver=solver,
        )
        h = outputs.last_hidden_state
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None if labels is None else shifted_cross_entropy(logits, labels)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      **{CACHE_FIELD: output_cache(outputs)})

    # ---- The model as decoders use it (odegpt/decoding): embed, solve, read out, a cache ---------------------

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The state at time 0."""
        return self.model.embed_tokens(input_ids)

    def attention_inputs(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         past_len: int | torch.Tensor = 0, cache=None):
        """Rotary tables and mask for states ``h`` after ``past_len`` cached positions, as a dict for :meth:`solve`;
        for a static ``cache`` (:meth:`new_cache` with a length), over its whole buffer and with the columns to write,
        ``past_len`` then possibly a one-element tensor (``OdeGPTModel.static_attention_inputs``)."""
        if isinstance(cache, StaticOdeCache):
            return self.model.static_attention_inputs(h, attention_mask, past_len, cache)
        cos, sin, mask = self.model.attention_inputs(h, attention_mask, None, past_len)
        return dict(cos=cos, sin=sin, mask=mask)

    def plan(self, step_size: float | None = None, solver: str | None = None) -> SolvePlan:
        """The solve at ``step_size`` with ``solver`` (``odegpt.model.solver.SolvePlan``), the config's where not
        given."""
        return self.model.plan(step_size, solver)

    def solve(self, h: torch.Tensor, plan: SolvePlan, attention_inputs: dict, cache=None, hook=None, start: int = 0,
              stop: int | None = None, first_attention: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate states ``h`` along ``plan`` (the one loop, ``odegpt.model.solver.integrate``); the final state.
        ``start``/``stop``/``first_attention`` take a part of it (steps ``start`` to ``stop``), as integrate says."""
        return integrate(self.model.blocks, h, plan, cache, hook=hook, start=start, stop=stop,
                         first_attention=first_attention, **attention_inputs)

    def first_attention(self, h: torch.Tensor, plan: SolvePlan, index: int, attention_inputs: dict, cache=None
                        ) -> torch.Tensor:
        """Step ``index``'s first attention branch at states ``h``, its keys and values to ``cache``: what a solve at
        another step size that reaches that step at the same state shares (``odegpt.model.solver.first_attention``)."""
        return first_attention(self.model.blocks, h, plan, index, cache, **attention_inputs)

    def state_recorder(self, h: torch.Tensor) -> StateRecorder:
        """A solve hook that keeps the state before the first step and after every step, with their times."""
        return StateRecorder(h)

    def keys_values(self, block: int, h: torch.Tensor, attention_inputs: dict, time: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values block ``block`` would attend with at states ``h`` at solve time ``time`` (no
        attention, no MLP)."""
        return self.model.blocks[block].keys_values(h, attention_inputs["cos"], attention_inputs["sin"], time)

    @property
    def time_dependent(self) -> bool:
        """Whether a shared block's maps vary with time (the relaxation): then a state projected at one step is not
        projected the same at another."""
        return bool(self.config.relax_rank)

    @property
    def rotary_scales_with_length(self) -> bool:
        """Whether rotary frequencies follow each call's longest position (an imported dynamic NTK or LongRoPE
        scaling): then keys computed in one call are not those of the same positions computed in another."""
        return scales_with_length(self.config)

    def read_out(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of states ``h`` at any time: the final norm and LM head, as at the end of the solve."""
        return self.lm_head(self.model.norm(h))

    def exit_score(self, h: torch.Tensor, time: float | torch.Tensor) -> torch.Tensor:
        """The learned exit head's prediction for states ``h`` at solve time ``time``: ``log KL(p_end || p(h))``, the
        distance of their read-out to the end of the step-size-1 solve (float32; a ValueError without a head)."""
        if self.exit_head is None:
            raise ValueError("this model has no learned exit head (config.exit_head is null): train one "
                             "(train.exit_head_weight) or fit one (odegpt calibrate)")
        return self.exit_head(h, time)

    def new_cache(self, batch_size: int | None = None, max_length: int | None = None) -> OdeCache:
        """An empty KV cache of this model's layout (one slot per block evaluation, bound to its step size and
        solver on first use), for decoders that keep their own (odegpt/decoding); with ``max_length``, a static one
        preallocated for ``batch_size`` rows of that many positions (what a compiled decode step writes into)."""
        if max_length is None:
            return OdeCache()
        config = self.config
        return StaticOdeCache(batch_size, max_length, config.num_key_value_heads, config.head_dim, self.dtype,
                              self.device)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """The model owns its cache layout: one slot per executed step, not per trained layer."""
        if (
            model_kwargs.get(CACHE_FIELD) is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation in (None, "dynamic")
        ):
            model_kwargs[CACHE_FIELD] = self.new_cache()
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


__all__ = ["OdeGPTConfig", "OdeGPTForCausalLM", "OdeGPTModel", "OdeGPTPreTrainedModel"]
