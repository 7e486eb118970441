"""The next-token loss: one shifted cross-entropy for the model's ``labels``, training and evaluation.

This file is copied verbatim into exported model folders (the modeling code imports it), so it
imports only torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean",
                          ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy, in fp32, of position ``t`` of ``logits`` (batch, T, vocab) predicting ``tokens[:, t + 1]``.

    ``tokens`` is the sequence the logits were computed from: (batch, T) as Hugging Face ``labels``
    (the last position predicts nothing), or (batch, T + 1) with the one token after the inputs.
    Targets equal to ``ignore_index`` do not count.
    """
    targets = tokens[:, 1:]
    logits = logits[:, :targets.shape[1]]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().to(logits.device),
                           ignore_index=ignore_index, reduction=reduction)
