"""The KV cache of an odegpt model: one slot per executed solver step, for exactly one step size.

A solve at step size ``a`` executes ``ceil(D / a)`` steps per shared segment, so the number of
cache slots depends on ``a``, not on the trained depth that transformers would preallocate from
``num_hidden_layers``. The cache grows one slot per step on first use and remembers the step size
it was built at: keys and values computed at one ``a`` are meaningless at another, so reusing the
cache with a different ``a`` is an error rather than silently wrong output.

This file is copied verbatim into exported model folders, so it imports only torch and transformers.
"""
from __future__ import annotations

from transformers import DynamicCache


class OdeCache(DynamicCache):
    """A ``DynamicCache`` whose layers are solver steps, bound to the step size that filled it."""

    def __init__(self, step_size: float | None = None) -> None:
        super().__init__()  # no config: layers are created lazily, one per solver step
        self.step_size = step_size
        self.num_steps: int | None = None

    def bind(self, step_size: float, num_steps: int) -> None:
        """Tie the cache to the solve that uses it; raise if it belongs to another step size."""
        if self.step_size is None:
            self.step_size, self.num_steps = step_size, num_steps
        elif step_size != self.step_size:
            raise ValueError(
                f"this KV cache was built at step_size={self.step_size} ({self.num_steps} solver steps) and "
                f"cannot be used at step_size={step_size} ({num_steps} steps): its keys and values belong to "
                f"another solve. Start a new cache (or a new generate call) for the new step size."
            )
        else:
            self.num_steps = num_steps

    def crop_to(self, length: int) -> None:
        """Keep the first ``length`` positions of every step's keys and values (e.g. drop rejected drafts)."""
        excess = self.get_seq_length() - length
        if length < 0 or excess < 0:
            raise ValueError(f"cannot crop a cache of {self.get_seq_length()} positions to {length}")
        if excess:
            self.crop(-excess)  # transformers' DynamicCache.crop takes how many positions to remove
