"""The model as odegpt's decoders see it: the few methods self-speculative decoding and adaptive depth call.

``OdeGPTForCausalLM`` implements it (odegpt/model/modeling_odegpt.py, the end of the class). The decoders live
above the model and are copied into exported folders (``custom_generate/``) apart from it, so they name no model
class: this protocol is what they may rely on, declared once.

This file is copied into exported model folders with its siblings, so it imports only torch.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class DecoderModel(Protocol):
    """What a decoder calls. A plan is ``odegpt.model.solver.SolvePlan`` (step size, method, and every step with
    its block, length, start and end time and cache slots); a hook is any object with some of
    ``odegpt.model.solver.SolveHook``'s methods."""

    config: Any  # OdeGPTConfig: step_size, solver_steps(), vocab_size, ...

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The state at time 0."""

    def attention_inputs(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         past_len: int | torch.Tensor = 0, cache=None) -> dict:
        """Rotary tables and mask for states ``h`` after ``past_len`` cached positions (for a static ``cache``, over
        its whole buffer, with the columns to write; ``past_len`` then possibly a one-element tensor)."""

    def plan(self, step_size: float | None = None, solver: str | None = None) -> Any:
        """The solve at a step size (a SolvePlan)."""

    def solve(self, h: torch.Tensor, plan: Any, attention_inputs: dict, cache=None, hook=None, start: int = 0,
              stop: int | None = None, first_attention: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate ``h`` along ``plan`` (or steps ``start`` to ``stop`` of it); the final state."""

    def first_attention(self, h: torch.Tensor, plan: Any, index: int, attention_inputs: dict,
                        cache=None) -> torch.Tensor:
        """Step ``index``'s first attention branch at ``h``, its keys and values to ``cache``."""

    def state_recorder(self, h: torch.Tensor) -> Any:
        """A hook that keeps the state before the first step and after every step (``states``, ``times``)."""

    def keys_values(self, block: int, h: torch.Tensor, attention_inputs: dict,
                    time: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values block ``block`` would attend with at ``h`` at solve time ``time``."""

    def read_out(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of states at any time: the final norm and LM head."""

    def new_cache(self, batch_size: int | None = None, max_length: int | None = None) -> Any:
        """An empty KV cache of the model's layout (one slot per block evaluation); with ``max_length``, a static one
        preallocated for ``batch_size`` rows."""

    @property
    def time_dependent(self) -> bool:
        """Whether a shared block's maps vary with solve time (the relaxation)."""

    @property
    def rotary_scales_with_length(self) -> bool:
        """Whether rotary frequencies follow each call's longest position."""
