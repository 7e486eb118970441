"""A compiled decode step: tokens fed through a static KV cache by one graph, as gpt-fast decodes.

Eager decoding runs a forward's few hundred operators one by one from Python and grows its KV cache by
concatenation, which at batch 1 on a CPU costs as much as a fifth of a token's time beside reading the weights.
:class:`DecodeStep` instead writes into a preallocated cache (``model.new_cache(rows, length)``, an
``odegpt.model.cache.StaticOdeCache`` bound to its solve like any odegpt cache) and runs the whole solve of a token as
one ``torch.compile`` graph: inductor's fused kernels on a CPU, replayed as a CUDA graph on a GPU (mode
``reduce-overhead``; the cache's buffers keep fixed addresses). The graph is the model's own decoder surface traced
once (``embed``, ``attention_inputs``, ``solve``, i.e. ``odegpt.model.solver.integrate`` over the plan: the one solve
loop, ``read_out``), so it computes what the eager path computes; the eager path stays the reference, and
``compile=False`` runs the same step without compiling it. On a CPU at batch 1 every linear map is a matrix-vector
product, which MKL runs on one thread: the compiled step has inductor write those of matrices up to
``DECOMPOSED_MAX_SIDE`` on a side as its own vectorised reductions, parallel over the outputs (inductor's
``decompose_mm_pass``), and lays the larger ones (LM heads) out column-major for MKL (:func:`lay_out_for_rows`: same
values, faster products), everything row-major for larger batches.

A graph depends on the plan (step size, solver), the batch and cache sizes and whether the batch is padded: the
position comes in as a tensor, so one graph serves every position. One token per row is what decoding feeds most;
several read out at every position (a verification) are compiled once more, their count left symbolic; several read
out at the last only (a prompt, a draft's catch-up: once, or now and then) run the same step eagerly.

This file is copied into exported model folders (``custom_generate/``), so it imports only torch.
"""
from __future__ import annotations

import contextlib
import os
import shutil

import torch

# Graphs the decoders may need in one process: per plan (target, draft), one token or several, padded or not, and a
# few batch and cache sizes. torch's default of 8 recompilations of one function would fall back to eager silently.
_RECOMPILE_LIMIT = 64
# Matrix-vector products (one row, CPU) of weights at most this long on either side are inductor's reductions, parallel
# over outputs: on SmolLM2-135M's float32 MLP (1536 x 576), row-major, 18.3 GB/s on 1 thread and 24.5 on 2, against
# MKL's 13.6-14.3 at its best layout on either (it does not use the second thread). A 49152 x 576 LM head is no faster
# so (11-20 GB/s against MKL's 21-23 column-major), hence the bound: hidden and MLP sides below it, vocabularies above.
DECOMPOSED_MAX_SIDE = 16384
_compiled: dict[str, object] = {}  # device type -> the compiled step


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why the step cannot be compiled on ``device`` here, or None when it can (on a CPU, inductor needs a C++
    compiler)."""
    if torch.device(device).type == "cpu" and not any(shutil.which(name) for name in
                                                      (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        return "torch.compile on a CPU needs a C++ compiler (g++ or clang++), and none is on PATH"
    return None


def lay_out_for_rows(model, rows: int = 1) -> int:
    """Lay out each CPU weight matrix for the compiled step's products with ``rows`` rows: column-major for one row
    where MKL computes the product (a tall matrix beyond ``DECOMPOSED_MAX_SIDE``: its transpose made contiguous, the
    same values and shape, other strides), row-major everywhere else; returns how many it laid out anew (0 when they
    already were).

    MKL's matrix-vector product runs fastest when its contiguous rows are the long ones: 13.3 against 24.9 GB/s for
    SmolLM2-135M's tied LM head (49152 x 576) streamed from memory; with 8 rows the LM head is slower column-major (3.5
    against 5.2 GB/s). Inductor's own reductions (the smaller matrices at one row) read each output's weights as one
    contiguous row: row-major. A tied embedding shares the LM head's layout (a lookup reads a strided row)."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, torch.nn.Linear) or weight.device.type != "cpu" or weight.ndim != 2:
                continue
            by_mkl = weight.shape[0] > weight.shape[1] and max(weight.shape) > DECOMPOSED_MAX_SIDE
            column_major = rows == 1 and by_mkl
            if column_major != (weight.stride() == (1, weight.shape[0])):
                weight.data = weight.data.t().contiguous().t() if column_major else weight.data.contiguous()
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
        settings = {}
        if device.type == "cuda":  # CUDA graphs on a GPU
            settings = {"mode": "reduce-overhead"}
        elif device.type == "cpu":  # one-row products as inductor's parallel reductions (bound: _decomposition_bound)
            settings = {"options": {"post_grad_fusion_options": {"decompose_mm_pass": {}}}}
        _compiled[device.type] = torch.compile(_step, fullgraph=True, dynamic=False, **settings)
    return _compiled[device.type]


@contextlib.contextmanager
def _decomposition_bound():
    """Inductor decides which one-row products become its reductions by a bound it reads from a module global while
    it compiles (its option is read once, when that module is imported): ``DECOMPOSED_MAX_SIDE`` only around odegpt's
    own compiled calls, so other compiled code in the process keeps torch's default."""
    from torch._inductor.fx_passes import decompose_mem_bound_mm as passes

    before = passes.cpu_max_other_dimension_decomposition
    passes.cpu_max_other_dimension_decomposition = DECOMPOSED_MAX_SIDE
    try:
        yield
    finally:
        passes.cpu_max_other_dimension_decomposition = before


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
            lay_out_for_rows(self.model, rows)
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
        with _decomposition_bound() if compiled and self.device.type == "cpu" else contextlib.nullcontext():
            logits, states = run(self.model, self.plan, cache, tokens, past_len, attention_mask, keep)
        cache.advance(seq)
        if compiled and self.device.type == "cuda":  # a CUDA graph's outputs are overwritten by its next replay
            logits, states = logits.clone(), states.clone()
        return logits, states
