"""Weights that are not numbers: refused on load instead of turned into blank text and "perplexity inf".

A weight file whose bytes were overwritten (a bad disk, a partial copy, a crafted file) often still
loads: safetensors checks shapes and offsets, not values. One NaN in a norm turns every logit into NaN,
and a weight of 1e35 overflows every state into the uniform distribution; the commands would then report
garbage with exit code 0. Every command that loads weights
(evaluate, generate, export, convert) checks them first and names the first bad tensor.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def nonfinite_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int, int]]:
    """(name, non-finite elements, elements) of every floating-point tensor holding a NaN or an infinity."""
    found = []
    with torch.no_grad():
        for name, tensor in named_tensors:
            if tensor.is_floating_point() and tensor.device.type != "meta":
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    found.append((name, bad, tensor.numel()))
    return found


# No trained model holds a weight this large: its products overflow every float format odegpt computes in
# (float16's largest number is 65504), and an overflowed state reads out as the uniform distribution.
MAX_WEIGHT_MAGNITUDE = 1e6


def check_finite_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Raise ``ValueError`` naming the tensors of ``where`` that hold NaN or infinite values, or finite values too
    large for any trained model (beyond ``MAX_WEIGHT_MAGNITUDE``)."""
    named_tensors = list(named_tensors)
    bad = nonfinite_tensors(named_tensors)
    if not bad:
        with torch.no_grad():
            for name, tensor in named_tensors:
                if tensor.is_floating_point() and tensor.device.type != "meta" and tensor.numel():
                    largest = float(tensor.abs().max())
                    if largest > MAX_WEIGHT_MAGNITUDE:
                        raise ValueError(f"{where} has weights of magnitude {largest:.3g} in {name}, beyond any trained "
                                         f"model's ({MAX_WEIGHT_MAGNITUDE:g}): their activations overflow; the "
                                         f"weight file is damaged or was edited")
    if bad:
        listed = ", ".join(f"{name} ({count:,} of {total:,})" for name, count, total in bad[:3])
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise ValueError(f"{where} has non-finite weights (NaN or infinity): {listed}{more}; the weight file is "
                         f"damaged or the training diverged; use another checkpoint or copy the file again")
