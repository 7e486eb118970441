"""Evaluation data: token batches from prepared corpora (their validation split) and from raw text.

``--data`` takes both, told apart by a ``manifest.json``: a prepared corpus gives its fixed validation samples of
``seq_len + 1`` tokens (the evenly spread subset training evaluates), raw text (files, folders, globs, ``stdlib``)
is tokenized with the model folder's tokenizer and scored with a sliding window (odegpt.evaluation.perplexity).
Everything is checked before a model is loaded: a refusal is a ValueError naming the input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.datasets import build_datasets
from data_pipeline.manifest import MANIFEST, Manifest
from data_pipeline.readers import iter_documents, resolve_inputs
from data_pipeline.tokenizer import has_tokenizer
from odegpt.errors import InputError
from odegpt.folders.model_folder import check_vocabulary, load_tokenizer

from .perplexity import Batch, evaluation_indices, window_batches


@dataclass(frozen=True)
class EvaluationData:
    """How to cut evaluation data into batches: ``seq_len`` input tokens per window, a window every ``stride`` tokens
    of raw text (default: disjoint), ``batch_size`` windows per batch, at most ``num_samples`` validation samples of
    a prepared corpus (default: all), the text field of .jsonl/.parquet inputs, and where a read-only corpus keeps
    its index cache."""

    seq_len: int
    stride: int | None = None
    batch_size: int = 8
    num_samples: int | None = None
    text_key: str = "text"
    cache_dir: str | None = None


def is_prepared(path: str) -> bool:
    return (Path(path) / MANIFEST).is_file()


def evaluation_batches(data: list[str], model_dir: str | Path, cut: EvaluationData,
                       vocab_size: int | None = None) -> list[Batch]:
    """Batches of ``data``: prepared corpora first, then raw text; a tokenizer larger than the model's
    ``vocab_size`` (corpus or folder) is refused."""
    prepared = [path for path in data if is_prepared(path)]
    raw = [path for path in data if not is_prepared(path)]
    if cut.stride is not None and not raw:
        raise InputError("--stride applies to raw text; prepared corpora are scored in their fixed validation "
                         "samples of seq_len + 1 tokens (use --seq-len)")
    sources = raw_text_sources(raw, model_dir) if raw else []
    batches = prepared_batches(prepared, model_dir, cut, vocab_size) if prepared else []
    if sources:
        batches += raw_text_batches(sources, model_dir, cut, vocab_size)
    return batches


def prepared_batches(corpora: list[str], model_dir: str | Path, cut: EvaluationData,
                     vocab_size: int | None = None) -> list[torch.Tensor]:
    """(B, seq_len + 1) token batches of the prepared corpora's validation samples; corpora tokenized with a
    vocabulary larger than the model's ``vocab_size``, or by another tokenizer than the folder's, are refused."""
    # The model folder's tokenizer (odegpt's or a Hugging Face one), when it has one, must be the one the corpora
    # were prepared with.
    tokenizer_dir = model_dir if has_tokenizer(model_dir) else None
    try:
        # The whole validation split, unshuffled; then the same evenly spread subset training evaluates.
        _, valid = build_datasets(corpora, None, cut.seq_len, seed=0, num_train_samples=0, num_valid_samples=None,
                                  tokenizer_dir=tokenizer_dir, cache_dir=cut.cache_dir)
        for corpus in corpora:
            check_vocabulary(int(Manifest.load(corpus).tokenizer["vocab_size"]), vocab_size,
                             f"--data: the tokenizer of corpus {corpus}")
    except (OSError, ValueError) as error:
        raise InputError(f"--data: {error}") from None
    if len(valid) == 0:
        raise InputError(f"--data: {', '.join(corpora)} has no validation samples of {cut.seq_len + 1} tokens")
    indices = evaluation_indices(len(valid), cut.num_samples)
    return [torch.from_numpy(np.stack([valid[i] for i in indices[start:start + cut.batch_size]]))
            for start in range(0, len(indices), cut.batch_size)]


def raw_text_sources(inputs: list[str], model_dir: str | Path) -> list:
    """The files (or saved datasets) behind raw-text inputs; checked before any model is loaded."""
    try:
        sources = resolve_inputs(inputs)
    except (OSError, ValueError) as error:
        raise InputError(f"--data: {error}") from None
    if not (Path(model_dir) / "tokenizer.json").is_file() and not (Path(model_dir) / "tokenizer_config.json").is_file():
        raise InputError(f"--model: {model_dir} has no tokenizer files, needed to tokenize raw text "
                         f"(odegpt convert copies the run's tokenizer into the folder)")
    return sources


def raw_text_batches(sources: list, model_dir: str | Path, cut: EvaluationData,
                     vocab_size: int | None = None) -> list[Batch]:
    """Sliding-window (input ids, targets) batches over raw documents, tokenized with the model's tokenizer.
    Each document is framed by EOS on both sides, as packed training data puts one before and after it:
    its first token is predicted after an EOS, and its closing EOS is scored too."""
    tokenizer = load_tokenizer(model_dir, vocab_size)
    frame = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    documents = []
    try:
        for document in tqdm(iter_documents(sources, text_key=cut.text_key), desc="tokenize", unit="doc",
                             leave=False):
            if document.text:
                ids = tokenizer(document.text, add_special_tokens=False)["input_ids"]
                documents.append(torch.tensor(frame + ids + frame, dtype=torch.long))
    except (OSError, ValueError) as error:
        raise InputError(f"--data: {error}") from None
    if not documents:
        raise InputError(f"--data: no text in {', '.join(str(source.path) for source in sources)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return window_batches(documents, cut.seq_len, cut.stride or cut.seq_len, cut.batch_size, pad_id=pad)


def scored_tokens(batches: list[Batch]) -> int:
    """How many tokens ``batches`` score (a (B, L + 1) batch scores B * L; a pair, its targets that are not
    ignored)."""
    return sum(batch[:, 1:].numel() if isinstance(batch, torch.Tensor) else int((batch[1] != -100).sum())
               for batch in batches)


def calibration_batches(data: list[str], model_dir: str | Path, cut: EvaluationData, max_tokens: int
                        ) -> list[Batch]:
    """At most ``max_tokens`` tokens of calibration text in batches: prepared corpora give the first samples of
    their *training* order (so a validation split stays held out), raw text its windows, tokenized with the folder's
    tokenizer."""
    prepared = [path for path in data if is_prepared(path)]
    raw = [path for path in data if not is_prepared(path)]
    samples = max(1, max_tokens // cut.seq_len)
    batches: list[Batch] = []
    if prepared:
        try:
            train, _ = build_datasets(prepared, None, cut.seq_len, seed=0, num_train_samples=samples,
                                      num_valid_samples=0, cache_dir=cut.cache_dir)
        except (OSError, ValueError) as error:
            raise InputError(f"--calibration: {error}") from None
        rows = [train[i] for i in range(min(samples, len(train)))]
        batches += [torch.from_numpy(np.stack(rows[start:start + cut.batch_size]))
                    for start in range(0, len(rows), cut.batch_size)]
    if raw:
        batches += raw_text_batches(raw_text_sources(raw, model_dir), model_dir, cut)
    kept, tokens = [], 0
    for batch in batches:
        if tokens >= max_tokens:
            break
        kept.append(batch)
        tokens += batch[:, 1:].numel() if isinstance(batch, torch.Tensor) else batch[0].numel()
    return kept
