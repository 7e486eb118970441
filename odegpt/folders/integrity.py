"""Weights that are not numbers: refused on load instead of turned into blank text and "perplexity inf".

A weight file whose bytes were overwritten (a bad disk, a partial copy, a crafted file) often still
loads: safetensors checks shapes and offsets, not values. One NaN in a norm turns every logit into NaN,
and the commands would then report garbage with exit code 0. Every command that loads weights
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


def check_finite_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Raise ``ValueError`` naming the tensors of ``where`` that hold NaN or infinite values."""
    bad = nonfinite_tensors(named_tensors)
    if bad:
        listed = ", ".join(f"{name} ({count:,} of {total:,})" for name, count, total in bad[:3])
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise ValueError(f"{where} has non-finite weights (NaN or infinity): {listed}{more}; the weight file is "
                         f"damaged or the training diverged; use another checkpoint or copy the file again")
