"""Turning the configured corpora into per-rank micro-batches (training) and shards (validation).

The datasets are the prepared corpora (``data_pipeline.datasets``); sample ``i`` is the i-th sample of the
global training order, so a run resumes exactly from ``consumed_samples`` alone.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from data_pipeline.datasets import DistributedBatchSampler
from data_pipeline.datasets import build_datasets as build
from data_pipeline.manifest import Manifest
from data_pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint
from odegpt.evaluation.perplexity import evaluation_indices

from .config import ConfigError, RunConfig


def check_corpora(config: RunConfig) -> None:
    """Before anything starts: every corpus is prepared, and its token ids — and the tokenizer's — fit
    ``model.vocab_size`` (an id beyond it would end the run deep inside the embedding)."""
    vocab_size = config.model.vocab_size
    if config.data.tokenizer:
        try:
            tokenizer_vocab = len(load_tokenizer(config.data.tokenizer))
        except (OSError, ValueError) as error:
            raise ConfigError(f"data.tokenizer: {error}") from None
        if tokenizer_vocab > vocab_size:
            raise ConfigError(f"model.vocab_size ({vocab_size}) is smaller than the tokenizer's vocabulary "
                              f"({tokenizer_vocab}, data.tokenizer {config.data.tokenizer})")
    if not config.data.corpora:
        raise ConfigError("data.corpora is empty: list at least one prepared corpus directory")
    for index, corpus in enumerate(config.data.corpora):
        try:
            manifest = Manifest.load(corpus)
        except (OSError, ValueError) as error:
            raise ConfigError(f"data.corpora[{index}]: {error}") from None
        corpus_vocab = int(manifest.tokenizer["vocab_size"])
        if corpus_vocab > vocab_size:
            raise ConfigError(f"data.corpora[{index}] ({corpus}) holds token ids up to {corpus_vocab - 1} (its "
                              f"manifest's tokenizer has {corpus_vocab} tokens) but model.vocab_size is "
                              f"{vocab_size}; set model.vocab_size >= {corpus_vocab}")


def run_tokenizer(config: RunConfig) -> dict | None:
    """The tokenizer the run's token ids come from, as ``{"path", "fingerprint"}``: ``data.tokenizer``, else the
    one the corpora's manifests record (they agree: ``build_datasets`` checks it); None when nothing says
    (data that is not a prepared corpus). Saved with each checkpoint, so a resume can compare."""
    if config.data.tokenizer:
        try:
            return {"path": str(config.data.tokenizer), "fingerprint": tokenizer_fingerprint(config.data.tokenizer)}
        except (OSError, ValueError) as error:
            raise ConfigError(f"data.tokenizer: {error}") from None
    for corpus in config.data.corpora:
        try:
            recorded = Manifest.load(corpus).tokenizer
        except (OSError, ValueError):
            continue  # not a prepared corpus: check_corpora names it
        return {"path": recorded.get("path"), "fingerprint": recorded.get("fingerprint")}
    return None


def _described(tokenizer: dict) -> str:
    return f"{tokenizer.get('path')} (fingerprint {str(tokenizer.get('fingerprint'))[:12]}...)"


def check_resumed_tokenizer(saved: dict | None, current: dict | None, where: str) -> None:
    """Refuse to resume the checkpoint at ``where`` (whose run used tokenizer ``saved``) with token ids from
    another tokenizer: its embedding rows would mean other tokens. Checkpoints from before the tokenizer was
    recorded (``saved`` None) are resumed as they were."""
    if not saved or not current or saved.get("fingerprint") == current.get("fingerprint"):
        return
    raise ConfigError(f"cannot resume {where} with another tokenizer: the checkpoint's run used {_described(saved)}, "
                      f"this run uses {_described(current)}. Resume with the checkpoint's data.tokenizer and "
                      f"corpora, or start a new run with another run.output_dir")


def check_init_from_tokenizer(config: RunConfig, current: dict | None) -> None:
    """``train.init_from``: a model folder that holds a tokenizer must hold the run's (same fingerprint)."""
    folder = config.train.init_from
    if folder is None or current is None:
        return
    try:
        fingerprint = tokenizer_fingerprint(folder)
    except FileNotFoundError:
        return  # the folder holds no tokenizer to compare with
    except (OSError, ValueError) as error:
        raise ConfigError(f"train.init_from {folder}: its tokenizer cannot be read ({error})") from None
    if fingerprint != current.get("fingerprint"):
        raise ConfigError(f"train.init_from {folder} was trained with another tokenizer: "
                          f"{_described({'path': folder, 'fingerprint': fingerprint})}, but this run's token ids "
                          f"come from {_described(current)}; train with the folder's tokenizer (and corpora "
                          f"prepared with it)")


def build_datasets(config: RunConfig):
    """(train, valid) datasets sized for the whole run."""
    if not config.data.corpora:
        raise ConfigError("data.corpora is empty: list at least one prepared corpus directory")
    t = config.train
    return build(list(config.data.corpora), config.data.weights, t.seq_len, t.seed,
                   t.train_steps * t.global_batch_size,
                   # None: the whole validation split, unshuffled, from which valid_batches picks
                   None if config.eval.num_samples else 0, config.data.tokenizer, cache_dir=config.data.cache_dir)


def _collate(dataset, indices) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(dataset[int(i)], dtype=np.int64) for i in indices]))


def train_micro_batches(dataset, consumed_samples: int, micro_batch_size: int, rank: int, world_size: int
                        ) -> Iterator[torch.Tensor]:
    """This rank's micro-batches in global order, starting after ``consumed_samples``."""
    sampler = DistributedBatchSampler(len(dataset), consumed_samples, micro_batch_size, rank, world_size)
    for indices in sampler:
        yield _collate(dataset, indices)


def valid_batches(dataset, num_samples: int, micro_batch_size: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's micro-batches of the ``num_samples`` evaluation samples (spread evenly over the
    validation split, as ``odegpt evaluate`` picks them). Every rank gets the same number: ZeRO-3
    needs every rank to run the same forwards."""
    chosen = evaluation_indices(len(dataset), num_samples)
    per_rank = len(chosen) // world_size
    indices = chosen[rank * per_rank:(rank + 1) * per_rank]
    return [_collate(dataset, indices[i:i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]
