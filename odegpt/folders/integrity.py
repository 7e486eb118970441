"""Weights that are not numbers: refused on load instead of turned into blank text and "perplexity inf".

A weight file whose bytes were overwritten (a bad disk, a partial copy, a crafted file) often still
loads: safetensors checks shapes and offsets, not values. One NaN in a norm turns every logit into NaN,
and a weight of 1e35 overflows every state into the uniform distribution; the commands would then report
garbage with exit code 0. Every command that loads weights
(evaluate, generate, export, convert) checks them first and names the first bad tensor.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# No trained model holds a weight this large: its products overflow every float format odegpt computes in
# (float16's largest number is 65504), and an overflowed state reads out as the uniform distribution.
MAX_WEIGHT_MAGNITUDE = 1e6


def check_finite_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Raise ``ValueError`` naming the tensors of ``where`` that hold NaN or infinite values, or finite values too
    large for any trained model (beyond ``MAX_WEIGHT_MAGNITUDE``). One reduction per tensor: its largest magnitude,
    which is not finite exactly when the tensor holds a NaN or an infinity."""
    bad, too_large = [], None
    with torch.no_grad():
        for name, tensor in named_tensors:
            if not tensor.is_floating_point() or tensor.device.type == "meta" or not tensor.numel():
                continue
            largest = float(tensor.abs().max())
            if not math.isfinite(largest):
                bad.append((name, int((~torch.isfinite(tensor)).sum()), tensor.numel()))
            elif largest > MAX_WEIGHT_MAGNITUDE and too_large is None:
                too_large = name, largest
    if bad:
        listed = ", ".join(f"{name} ({count:,} of {total:,})" for name, count, total in bad[:3])
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise ValueError(f"{where} has non-finite weights (NaN or infinity): {listed}{more}; the weight file is "
                         f"damaged or the training diverged; use another checkpoint or copy the file again")
    if too_large is not None:
        name, largest = too_large
        raise ValueError(f"{where} has weights of magnitude {largest:.3g} in {name}, beyond any trained model's "
                         f"({MAX_WEIGHT_MAGNITUDE:g}): their activations overflow; the weight file is damaged or was "
                         f"edited")
