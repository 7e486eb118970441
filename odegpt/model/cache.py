"""The KV cache of an odegpt model: one slot per block evaluation of a solve, for exactly one solve.

A solve at step size ``a`` executes ``ceil(D / a)`` steps per shared segment, and its method evaluates
the block once (Euler) or more (Heun: twice) per step, so the number of cache slots depends on ``a`` and
the method, not on the trained depth that transformers would preallocate from ``num_hidden_layers``.
The cache grows one slot per evaluation on first use and remembers the step size and method it was
built with: keys and values computed by one solve are meaningless to another, so reusing the cache
with a different ``a`` or method is an error rather than silently wrong output.

``StaticOdeCache`` is the same cache preallocated: every slot's keys and values for a fixed number of positions,
written in place at the positions a forward names. Its shapes and addresses never change, which is what a compiled
decode step needs (one graph for every position; CUDA graphs replay fixed addresses), as gpt-fast and transformers'
``StaticCache`` do; it is bound to its solve the same way.

Which transformers runs a folder is its user's choice, so the cache also answers to both names
transformers has given it: ``past_key_values`` until 5.23, ``cache`` from 5.24 on (forward()'s
argument and every model output's field). ``CACHE_FIELD`` is read off the installed output classes,
a feature test rather than a version test, and ``received_cache`` turns a cache passed under a name
this file does not know into an error naming the transformers version: the next rename upstream
must stop generation loudly, not decode every token without its past (wrong tokens, silently).

This file is copied verbatim into exported model folders, so it imports only torch and transformers.
"""
from __future__ import annotations

import torch
import transformers
from transformers import DynamicCache
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

# The name under which the installed transformers passes the KV cache to forward() and reads it from outputs.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def received_cache(cache: Cache | None, past_key_values: Cache | None, other_kwargs: dict) -> Cache | None:
    """The one KV cache a forward() was given, under either of its names.

    Raises if it was given twice, or if ``other_kwargs`` (the forward's ``**kwargs``) hold a cache under
    a name no transformers release used when this file was written."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("give the KV cache once, as cache= or past_key_values=, not both")
    for name, value in other_kwargs.items():
        if isinstance(value, Cache):
            raise TypeError(
                f"transformers {transformers.__version__} passed the KV cache as {name!r}, a name this odegpt model "
                f"does not read (it reads 'cache' and 'past_key_values'); decoding would ignore the cache and give "
                f"wrong tokens. Use an earlier transformers release, or export the model again with a newer odegpt.")
    return cache if cache is not None else past_key_values


def output_cache(output) -> Cache | None:
    """The KV cache a model output carries, whatever transformers named its field."""
    return output.get(CACHE_FIELD)


class OdeCache(DynamicCache):
    """A ``DynamicCache`` whose layers are block evaluations of a solve, bound to the solve that filled it."""

    def __init__(self, step_size: float | None = None) -> None:
        super().__init__()  # no config: layers are created lazily, one per block evaluation
        self.step_size = step_size
        self.solver: str | None = None
        self.num_steps: int | None = None  # cache slots: executed steps x the method's evaluations per step

    def bind(self, step_size: float, num_steps: int, solver: str = "euler") -> None:
        """Tie the cache to the solve that uses it (step size and solver method); raise if it belongs to another."""
        if self.step_size is None or (self.solver is None and step_size == self.step_size):
            self.step_size, self.num_steps, self.solver = step_size, num_steps, solver
        elif step_size != self.step_size or solver != self.solver:
            raise ValueError(
                f"this KV cache was built at step_size={self.step_size} with the {self.solver} solver "
                f"({self.num_steps} slots) and cannot be used at step_size={step_size} with {solver} ({num_steps} "
                f"slots): its keys and values belong to another solve. Start a new cache (or a new generate call) "
                f"for the new solve."
            )
        else:
            self.num_steps = num_steps

    def advance(self, new: int) -> None:
        """``new`` more positions have been written by a forward (a dynamic cache has grown by itself)."""

    def crop_to(self, length: int) -> None:
        """Keep the first ``length`` positions of every step's keys and values (e.g. drop rejected drafts)."""
        excess = self.get_seq_length() - length
        if length < 0 or excess < 0:
            raise ValueError(f"cannot crop a cache of {self.get_seq_length()} positions to {length}")
        if excess:
            self.crop(-excess)  # transformers' DynamicCache.crop takes how many positions to remove


class StaticOdeCache(OdeCache):
    """An ``OdeCache`` preallocated for ``max_length`` positions of ``batch_size`` rows and written in place.

    Its slots (one per block evaluation of the solve) are allocated when it is first bound, and another step size or
    solver is refused as ``OdeCache`` refuses them. ``update`` writes new keys and values at the columns given as
    ``cache_kwargs["cache_position"]`` and returns the whole buffer: attention reads every column under a mask that
    hides those not yet written, or cropped (``OdeGPTModel.static_attention_inputs`` builds it), so a step has one
    shape at every position. ``get_seq_length`` is the number of columns written; who feeds tokens moves it
    (:meth:`advance`, which the model's forward calls), outside any compiled region."""

    def __init__(self, batch_size: int, max_length: int, num_key_value_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 step_size: float | None = None) -> None:
        super().__init__(step_size)
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"a static KV cache needs batch_size and max_length >= 1, got {batch_size} and "
                             f"{max_length}")
        self.rows, self.max_length = batch_size, max_length  # not batch_size: Cache has that property
        self.buffer_shape = (batch_size, num_key_value_heads, max_length, head_dim)
        self.buffer_dtype, self.buffer_device = dtype, torch.device("cpu" if device is None else device)
        self.key_buffers: list[torch.Tensor] = []
        self.value_buffers: list[torch.Tensor] = []
        self.length = 0

    def bind(self, step_size: float, num_steps: int, solver: str = "euler") -> None:
        super().bind(step_size, num_steps, solver)
        while len(self.key_buffers) < num_steps:  # allocated once, at the first solve's size
            for buffers in (self.key_buffers, self.value_buffers):
                buffer = torch.zeros(self.buffer_shape, dtype=self.buffer_dtype, device=self.buffer_device)
                if self.buffer_device.type == "cuda":  # CUDA graphs may replay writes to it: its address must not move
                    torch._dynamo.mark_static_address(buffer)
                buffers.append(buffer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys and values (batch, kv heads, new, head_dim) at the columns ``cache_kwargs["cache_position"]``
        (a long tensor of ``new`` columns) of slot ``layer_idx``; the slot's whole buffer."""
        position = None if cache_kwargs is None else cache_kwargs.get("cache_position")
        if position is None:
            raise ValueError("a static KV cache is written at given columns: pass cache_position (the model's "
                             "attention inputs for this cache carry it)")
        keys, values = self.key_buffers[layer_idx], self.value_buffers[layer_idx]
        keys.index_copy_(2, position, key_states)
        values.index_copy_(2, position, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def check_room(self, batch_size: int, new: int) -> None:
        """Raise unless ``new`` more positions of a batch of ``batch_size`` rows fit."""
        if batch_size != self.rows:
            raise ValueError(f"this static KV cache holds {self.rows} rows, not {batch_size}")
        if self.length + new > self.max_length:
            raise ValueError(f"this static KV cache holds {self.max_length} positions: {self.length} written, "
                             f"{new} more do not fit")

    def advance(self, new: int) -> None:
        """``new`` more columns have been written (by a forward over that many tokens)."""
        self.check_room(self.rows, new)
        self.length += new

    def crop_to(self, length: int) -> None:
        """Keep the first ``length`` positions; what lies beyond is masked until written again."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        self.length = length
