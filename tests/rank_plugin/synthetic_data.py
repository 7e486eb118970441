"""Synthetic training data for the tests' training runs (``data.corpora: [synthetic]``, see sitecustomize.py)."""
from __future__ import annotations

import numpy as np

SYNTHETIC_CORPUS = "synthetic"
SYNTHETIC_VOCAB = 64


class SyntheticTokens:
    """Sample ``i``: an arithmetic sequence of token ids modulo the vocabulary, from a seeded start and stride,
    so a model can learn it and every rank and resume sees the same sample."""

    def __init__(self, num_samples: int, seq_len: int, vocab: int, seed: int) -> None:
        self.num_samples, self.seq_len, self.vocab, self.seed = num_samples, seq_len, vocab, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        start, stride = rng.integers(0, self.vocab), rng.integers(1, 5)
        return ((start + stride * np.arange(self.seq_len + 1)) % self.vocab).astype(np.int64)
