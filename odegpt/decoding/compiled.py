"""A compiled decode step: tokens fed through a static KV cache by one graph, as gpt-fast decodes.

Eager decoding runs a forward's few hundred operators one by one from Python and grows its KV cache by
concatenation, which at batch 1 on a CPU costs as much as a fifth of a token's time beside reading the weights.
:class:`DecodeStep` instead writes into a preallocated cache (``model.new_cache(rows, length)``, an
``odegpt.model.cache.StaticOdeCache`` bound to its solve like any odegpt cache) and runs the whole solve of a token as
one ``torch.compile`` graph: inductor's fused kernels on a CPU, replayed as a CUDA graph on a GPU (mode
``reduce-overhead``; the cache's buffers keep fixed addresses). The graph is the model's own decoder surface traced
once (``embed``, ``attention_inputs``, ``solve``, i.e. ``odegpt.model.solver.integrate`` over the plan: the one solve
loop, ``read_out``), so it computes what the eager path computes; the eager path stays the reference, and
``compile=False`` runs the same step without compiling it. On a CPU the compiled path also lays the model's tall
weight matrices out column-major at batch 1 (:func:`stream_along_longer_side`: same values, faster
matrix-vector products), row-major for larger batches.

A graph depends on the plan (step size, solver), the batch and cache sizes and whether the batch is padded: the
position comes in as a tensor, so one graph serves every position. One token per row is what decoding feeds most;
several read out at every position (a verification) are compiled once more, their count left symbolic; several read
out at the last only (a prompt, a draft's catch-up: once, or now and then) run the same step eagerly.

This file is copied into exported model folders (``custom_generate/``), so it imports only torch.
"""
from __future__ import annotations

import os
import shutil

import torch

# Graphs the decoders may need in one process: per plan (target, draft), one token or several, padded or not, and a
# few batch and cache sizes. torch's default of 8 recompilations of one function would fall back to eager silently.
_RECOMPILE_LIMIT = 64
_compiled: dict[str, object] = {}  # device type -> the compiled step


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why the step cannot be compiled on ``device`` here, or None when it can (on a CPU, inductor needs a C++
    compiler)."""
    if torch.device(device).type == "cpu" and not any(shutil.which(name) for name in
                                                      (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        return "torch.compile on a CPU needs a C++ compiler (g++ or clang++), and none is on PATH"
    return None


def stream_along_longer_side(model, rows: int = 1) -> int:
    """Lay out each CPU weight matrix with more outputs than inputs for products with ``rows`` rows: column-major for
    one row (its transpose made contiguous: the same values and shape, other strides), row-major again for more;
    returns how many it laid out anew (0 when they already were).

    At batch 1 every linear map is a matrix-vector product, and MKL's runs fastest when its contiguous rows are the
    long ones: on SmolLM2-135M's float32 weights streamed from memory, 14.0 against 18.1 GB/s for an MLP
    up-projection (1536 x 576), 13.3 against 24.9 for its tied LM head (49152 x 576), while the wide down-projection
    is fastest as it is; with 8 rows the LM head is slower column-major (3.5 against 5.2 GB/s). The compiled step of
    one row then decodes 1.2x faster with the same tokens. A tied embedding shares the LM head's layout (a lookup
    reads a strided row)."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, torch.nn.Linear) or weight.device.type != "cpu" or weight.ndim != 2 or \
                    weight.shape[0] <= weight.shape[1]:
                continue
            column_major = weight.stride() == (1, weight.shape[0])
            if rows == 1 and not column_major:
                weight.data = weight.data.t().contiguous().t()
                count += 1
            elif rows > 1 and column_major:
                weight.data = weight.data.contiguous()
                count += 1
    return count


def _step(model, plan, cache, tokens: torch.Tensor, past_len: torch.Tensor, attention_mask: torch.Tensor | None,
          keep: int = 0):
    """The solve of ``tokens`` written after ``past_len`` (a one-element tensor) cached positions: float logits and
    final states of the last ``keep`` of them (0: all). What gets compiled."""
    h = model.embed(tokens)
    inputs = model.attention_inputs(h, attention_mask, past_len, cache)
    h = model.solve(h, plan, inputs, cache)
    h = h[:, -keep:] if keep else h
    return model.read_out(h).float(), h


def _compiled_step(device: torch.device):
    if device.type not in _compiled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on a GPU
        _compiled[device.type] = torch.compile(_step, fullgraph=True, dynamic=False, mode=mode)
    return _compiled[device.type]


class DecodeStep:
    """Feeds tokens through ``model`` solved along ``plan`` into the static ``cache`` (``model.new_cache(rows,
    length)``): ``step(tokens, attention_mask, keep)`` gives the float logits (batch, keep or seq, vocab) and final
    states of the last ``keep`` (0: all) of ``tokens`` (batch, seq) fed after the cached positions, and moves the cache
    on. ``attention_mask`` (batch, up to the cache's length) marks real tokens of a left-padded batch (1) among every
    column so far, or is None. With ``compile`` the step is a ``torch.compile`` graph; without, it runs eagerly."""

    def __init__(self, model, plan, cache, compile: bool = True) -> None:
        self.model, self.plan, self.cache = model, plan, cache
        self.device = model.device
        self.run = _compiled_step(self.device) if compile else _step
        self.compiled = compile
        self.laid_out_for: int | None = None  # the rows the model's weights are laid out for (CPU, compiled)

    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, keep: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        cache, (rows, seq) = self.cache, tokens.shape
        if self.compiled and self.device.type == "cpu" and self.laid_out_for != rows:  # graphs follow the strides
            stream_along_longer_side(self.model, rows)
            self.laid_out_for = rows
        keep = 0 if keep >= seq else keep
        compiled = self.compiled and (seq == 1 or keep == 0)  # a prompt is fed once: not worth a graph
        cache.bind(self.plan.step_size, self.plan.num_slots, self.plan.method.name)
        cache.check_room(rows, seq)
        past_len = torch.tensor([cache.get_seq_length()], device=tokens.device)
        if attention_mask is not None:  # every column, so the graph's shapes do not change as the text grows
            attention_mask = torch.nn.functional.pad(attention_mask, (0, cache.max_length - attention_mask.shape[1]),
                                                     value=1)
        if compiled and seq > 1:  # one graph for every count of several tokens
            torch._dynamo.maybe_mark_dynamic(tokens, 1)
        run = self.run if compiled else _step
        logits, states = run(self.model, self.plan, cache, tokens, past_len, attention_mask, keep)
        cache.advance(seq)
        if compiled and self.device.type == "cuda":  # a CUDA graph's outputs are overwritten by its next replay
            logits, states = logits.clone(), states.clone()
        return logits, states
