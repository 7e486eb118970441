"""Training datasets over prepared corpora: packing, seeded epochs, blending, rank sharding.

Sample order, from the bottom up:

* **Packing.** A corpus split is one token stream (its shards, memory-mapped, in order;
  documents already end with EOS). Sample ``j`` is tokens ``[j*seq_len, j*seq_len + seq_len + 1)``
  (inputs and shifted targets share one token), so an epoch holds ``(tokens - 1) // seq_len``
  samples and no token is wasted on padding.
* **Epochs.** Each corpus gets a *shuffle index*: for epoch ``e``, a permutation of its epoch's
  samples drawn from ``default_rng([seed, e, corpus id])``, concatenated over as many epochs as
  needed (the last one cut short). Every sample is seen once per epoch.
* **Blending.** With weights ``w``, corpus ``d`` contributes exactly ``round(w_d * N)`` of the
  ``N`` samples (largest remainder), its ``k``-th sample placed at time ``(k + 0.5) / n_d``; the
  global order sorts those times. Every prefix of the order then holds each corpus's share to
  within about one sample (Megatron's greedy blend gives the same guarantee; this is vectorised).
* **Ranks.** `DistributedBatchSampler` cuts the global order into global batches of
  ``micro_batch * dp`` consecutive indices, rank ``r`` taking slice ``r``; it starts at
  ``consumed_samples``, so a resumed run sees exactly what an uninterrupted one would have.

Index arrays are built once per (corpus, split, seq_len, seed, samples) and blend, and cached as
``.npy`` in ``DIR/index_cache/`` (or `cache_dir`), memory-mapped on load. Building takes an
exclusive ``fcntl.flock`` on a lock file beside the cache and writes to a temporary file that is
renamed: on each node one process builds while the others wait, then all map the same file. It
needs no torch.distributed and works on node-local disks. Token shards are never read into RAM.
"""
from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import json_digest
from .manifest import Manifest
from .shards import open_tokens, verify_corpus
from .tokenizer import tokenizer_fingerprint

CACHE_DIR = "index_cache"


# ---- token streams ---------------------------------------------------------------------------
class TokenStream:
    """The memory-mapped token stream of one split of a prepared corpus."""

    def __init__(self, directory: str | os.PathLike, split: str = "train", manifest: Manifest | None = None):
        self.directory = Path(directory)
        self.split = split
        self.manifest = manifest or Manifest.load(directory)
        dtype = np.dtype(self.manifest.dtype)
        self.shards = [open_tokens(s.folder(directory), split, s.index, s.splits[split], dtype)
                       for s in self.manifest.shards if split in s.splits and s.splits[split].tokens > 0]
        sizes = np.array([len(s) for s in self.shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self.starts[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64, crossing shard boundaries as needed."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside {self.directory} "
                             f"{self.split} ({self.num_tokens} tokens)")
        out = np.empty(length, np.int64)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = 0
        while pos < length:
            offset = start + pos - int(self.starts[shard])
            take = min(length - pos, len(self.shards[shard]) - offset)
            out[pos:pos + take] = self.shards[shard][offset:offset + take]
            pos += take
            shard += 1
        return out

    def samples_per_epoch(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)


# ---- cached index arrays -----------------------------------------------------------------------
@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached_array(path: Path, build: Callable[[Path], None],
                 valid: Callable[[np.ndarray], bool] | None = None) -> np.ndarray:
    """Memory-map ``path``, building it first (under a file lock, via temp file + rename) if absent, or again if
    ``valid`` says the cached array is not what ``build`` writes (a damaged or edited cache is rebuilt, not used).

    `build(tmp_path)` must write a ``.npy`` file at `tmp_path`. Concurrent callers on the same
    file system block on the lock; exactly one builds, the others then map the finished file.
    """
    if valid is not None and path.is_file():
        cached = _valid_array(path, valid)
        if cached is not None:
            return cached
        print(f"odegpt: index cache {path} is damaged (not the index it names); rebuilding it", file=sys.stderr)
        with _file_lock(path.with_name(path.name + ".lock")):
            if _valid_array(path, valid) is None:  # not rebuilt meanwhile by another rank
                path.unlink(missing_ok=True)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(f"cannot create index cache {path.parent}: {error}; "
                          f"pass cache_dir= a writable directory") from None
        with _file_lock(path.with_name(path.name + ".lock")):
            if not path.is_file():
                tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
                try:
                    build(tmp)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def _valid_array(path: Path, valid: Callable[[np.ndarray], bool]) -> np.ndarray | None:
    """``path`` memory-mapped if it is a readable ``.npy`` that ``valid`` accepts, else None."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return array if valid(array) else None


def _key(*parts) -> str:
    return json_digest(parts)


def _corpus_key(manifest: Manifest) -> str:
    """Identifies a corpus's exact bytes: its settings key and every shard checksum."""
    return _key(manifest.config_key, [[f.bin_checksum for f in s.splits.values()] for s in manifest.shards])


def build_shuffle_index(path: Path, epoch_samples: int, num_samples: int, seed: int, corpus_seed: int) -> None:
    """Write ``num_samples`` sample ids: per-epoch permutations of ``range(epoch_samples)``.

    Written epoch by epoch into an ``.npy`` memmap, so memory is one epoch's permutation.
    """
    dtype = np.int32 if epoch_samples < 2**31 else np.int64
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(num_samples,))
    pos, epoch = 0, 0
    while pos < num_samples:
        rng = np.random.default_rng([seed, epoch, corpus_seed])
        perm = rng.permutation(epoch_samples).astype(dtype, copy=False)
        take = min(epoch_samples, num_samples - pos)
        out[pos:pos + take] = perm[:take]
        pos, epoch = pos + take, epoch + 1
    out.flush()
    del out


def is_shuffle_index(order: np.ndarray, epoch_samples: int, num_samples: int) -> bool:
    """Whether ``order`` can be what :func:`build_shuffle_index` wrote: its length, an integer dtype, and its first
    and last epochs permutations of ``range(epoch_samples)`` (the last one cut short). A zeroed or overwritten file
    fails; checking two epochs keeps this O(epoch) however many epochs a run spans."""
    if order.ndim != 1 or len(order) != num_samples or order.dtype.kind not in "iu":
        return False
    last_start = (num_samples - 1) // epoch_samples * epoch_samples
    for start in {0, last_start}:
        chunk = np.asarray(order[start:start + epoch_samples])
        if len(chunk) and (chunk.min() < 0 or chunk.max() >= epoch_samples or
                           np.unique(chunk).size != len(chunk)):
            return False
    return True


def blend_counts(weights: np.ndarray, num_samples: int) -> np.ndarray:
    """Samples per corpus: ``weights * N`` rounded by largest remainder, summing to exactly N."""
    raw = weights * num_samples
    counts = np.floor(raw).astype(np.int64)
    short = num_samples - int(counts.sum())
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def build_blend_index(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(corpus of each global sample, its rank within that corpus), evenly interleaved."""
    counts = blend_counts(weights, num_samples)
    times = np.concatenate([(np.arange(n) + 0.5) / n for n in counts if n > 0])
    corpus = np.concatenate([np.full(n, d, np.int64) for d, n in enumerate(counts) if n > 0])
    order = np.lexsort((corpus, times))
    dataset_index = corpus[order].astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    dataset_sample_index = order - starts[dataset_index]
    return dataset_index, dataset_sample_index.astype(np.int64)


# ---- datasets ----------------------------------------------------------------------------------
@dataclass
class _Part:
    stream: TokenStream
    order: np.ndarray | None  # sample ids in global order for this corpus; None = identity


class PackedDataset:
    """Map-style dataset: ``ds[i]`` is the i-th sample (int64, ``seq_len + 1`` tokens) of the order.

    Works as a torch ``Dataset`` (it only needs ``__len__``/``__getitem__``) without importing torch.
    """

    def __init__(self, parts: list[_Part], seq_len: int, num_samples: int,
                 dataset_index: np.ndarray | None = None, dataset_sample_index: np.ndarray | None = None):
        self.parts, self.seq_len, self.num_samples = parts, seq_len, num_samples
        self.dataset_index, self.dataset_sample_index = dataset_index, dataset_sample_index
        if dataset_index is None:  # concatenation of the parts, in order
            self._bounds = np.cumsum([0] + [len(p.order) if p.order is not None
                                            else p.stream.samples_per_epoch(seq_len) for p in parts])

    def __len__(self) -> int:
        return self.num_samples

    def locate(self, i: int) -> tuple[int, int]:
        """(corpus number, sample id within that corpus's epoch) of global sample i."""
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for a dataset of {self.num_samples} samples")
        i %= self.num_samples
        if self.dataset_index is not None:
            d, k = int(self.dataset_index[i]), int(self.dataset_sample_index[i])
        else:
            d = int(np.searchsorted(self._bounds, i, side="right")) - 1
            k = i - int(self._bounds[d])
        order = self.parts[d].order
        return d, int(order[k]) if order is not None else k

    def __getitem__(self, i: int) -> np.ndarray:
        d, sample = self.locate(int(i))
        return self.parts[d].stream.read(sample * self.seq_len, self.seq_len + 1)


def _check_tokenizers(corpora: list[str], manifests: list[Manifest], tokenizer_dir: str | None) -> None:
    if tokenizer_dir is not None:
        want = tokenizer_fingerprint(tokenizer_dir)
        for path, m in zip(corpora, manifests):
            if m.tokenizer["fingerprint"] != want:
                raise ValueError(
                    f"corpus {path} was tokenized with tokenizer {m.tokenizer.get('path')} "
                    f"(fingerprint {m.tokenizer['fingerprint']}) but the model uses tokenizer "
                    f"{tokenizer_dir} (fingerprint {want}); re-run `odegpt prepare --tokenizer {tokenizer_dir}`")
    prints = {m.tokenizer["fingerprint"] for m in manifests}
    if len(prints) > 1:
        raise ValueError("corpora were tokenized with different tokenizers: "
                         + ", ".join(f"{p} ({m.tokenizer['fingerprint']})" for p, m in zip(corpora, manifests)))


def _cache_dir(corpus: str, cache_dir: str | None, manifest: Manifest) -> Path:
    if cache_dir is None:
        return Path(corpus) / CACHE_DIR
    return Path(cache_dir) / _corpus_key(manifest)


def _verify_once(corpus: str, manifest: Manifest, cache: Path) -> None:
    """Checksum every shard the first time a corpus is used on this node (then a marker file)."""
    marker = cache / f"verified-{_corpus_key(manifest)}"
    if marker.is_file():
        return
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / "verify.lock"):
        if not marker.is_file():
            verify_corpus(corpus, manifest, checksum=True)
            marker.write_text("ok\n")


def _build_split(corpora: list[str], manifests: list[Manifest], weights: np.ndarray, split: str,
                 seq_len: int, seed: int, num_samples: int | None, cache_dir: str | None,
                 shuffle: bool) -> PackedDataset:
    streams = []
    for path, m in zip(corpora, manifests):
        stream = TokenStream(path, split, m)
        if stream.samples_per_epoch(seq_len) < 1 and (num_samples is None or num_samples > 0):
            what = "validation split" if split == "val" else "training split"
            hint = " (prepare it with --val-fraction > 0)" if split == "val" else ""
            raise ValueError(f"corpus {path} has {stream.num_tokens} tokens in its {what}, fewer than "
                             f"one sample of seq_len + 1 = {seq_len + 1}{hint}")
        streams.append(stream)
    if num_samples is None:  # every sample of every corpus once, in stream order (validation)
        total = sum(s.samples_per_epoch(seq_len) for s in streams)
        return PackedDataset([_Part(s, None) for s in streams], seq_len, total)
    if num_samples == 0:
        return PackedDataset([], seq_len, 0, np.zeros(0, np.uint16), np.zeros(0, np.int64))

    counts = blend_counts(weights, num_samples)
    parts = []
    for path, m, stream, n in zip(corpora, manifests, streams, counts):
        cache = _cache_dir(path, cache_dir, m)
        epoch = stream.samples_per_epoch(seq_len)
        ckey = _corpus_key(m)
        name = f"shuffle-{_key(ckey, split, seq_len, seed, int(n), shuffle)}.npy"
        corpus_seed = int(ckey[:8], 16)
        if n == 0:
            order = np.zeros(0, np.int64)
        elif shuffle:
            order = cached_array(cache / name, lambda tmp: build_shuffle_index(tmp, epoch, int(n), seed, corpus_seed),
                                 valid=lambda order: is_shuffle_index(order, epoch, int(n)))
        else:
            order = np.arange(int(n), dtype=np.int64) % epoch
        parts.append(_Part(stream, order))
    if len(corpora) == 1:
        return PackedDataset(parts, seq_len, num_samples)
    cache = _cache_dir(corpora[0], cache_dir, manifests[0])
    bkey = _key([_corpus_key(m) for m in manifests], [float(w) for w in weights], split, num_samples)
    dataset_index = cached_array(cache / f"blend-{bkey}-corpus.npy",
                                 lambda tmp: np.save(tmp, build_blend_index(weights, num_samples)[0]))
    sample_index = cached_array(cache / f"blend-{bkey}-sample.npy",
                                lambda tmp: np.save(tmp, build_blend_index(weights, num_samples)[1]))
    return PackedDataset(parts, seq_len, num_samples, dataset_index, sample_index)


def build_datasets(corpora: list[str], weights: list[float] | None, seq_len: int, seed: int,
                   num_train_samples: int, num_valid_samples: int | None = None,
                   tokenizer_dir: str | None = None, cache_dir: str | None = None,
                   verify_checksums: bool = True) -> tuple[PackedDataset, PackedDataset]:
    """Train and validation datasets over prepared corpora (directories written by `prepare`).

    Args:
        corpora: prepared corpus directories.
        weights: blending weights (normalised; default equal). Corpus ``d`` supplies exactly
            ``round(w_d * N)`` samples, evenly interleaved.
        seq_len: tokens per sample are ``seq_len + 1`` (inputs ``x[:-1]``, targets ``x[1:]``).
        seed: seeds the per-epoch shuffles (train: `seed`, validation: `seed + 1`).
        num_train_samples: length of the training order (as many epochs as needed).
        num_valid_samples: ``None`` -> every validation sample of every corpus once, unshuffled
            and unweighted (a fixed evaluation set); ``0`` -> an empty dataset; ``n`` -> ``n``
            samples blended by `weights` and shuffled like training.
        tokenizer_dir: if given, every corpus must have been tokenized with this tokenizer
            (fingerprints compared; ValueError naming both otherwise).
        cache_dir: where index arrays go (default ``<corpus>/index_cache``); use it when corpora
            sit on a read-only file system.
        verify_checksums: checksum every shard once per node (marker file in the cache); shard
            sizes are always checked.

    Validation comes from the ``val`` split written by ``prepare --val-fraction F``; a corpus
    without one raises ValueError (unless ``num_valid_samples == 0``): validation data is never
    carved silently out of training data.

    Returns:
        (train, valid): `PackedDataset` objects; ``ds[i]`` is an int64 array of ``seq_len + 1``.
    """
    if not corpora:
        raise ValueError("no corpus given")
    if seq_len < 1 or num_train_samples < 0:
        raise ValueError(f"need seq_len >= 1 and num_train_samples >= 0 (got {seq_len}, {num_train_samples})")
    if weights is None:
        weights = [1.0] * len(corpora)
    if len(weights) != len(corpora) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights {weights} must be {len(corpora)} non-negative numbers with a positive sum")
    w = np.asarray(weights, np.float64) / float(sum(weights))
    manifests = [Manifest.load(c) for c in corpora]
    _check_tokenizers(corpora, manifests, tokenizer_dir)
    if verify_checksums:
        for c, m in zip(corpora, manifests):
            _verify_once(c, m, _cache_dir(c, cache_dir, m))
    train = _build_split(corpora, manifests, w, "train", seq_len, seed, num_train_samples, cache_dir, True)
    if num_valid_samples == 0:
        valid = PackedDataset([], seq_len, 0, np.zeros(0, np.uint16), np.zeros(0, np.int64))
    else:
        valid = _build_split(corpora, manifests, w, "val", seq_len, seed + 1, num_valid_samples, cache_dir, True)
    return train, valid


# ---- rank sharding ------------------------------------------------------------------------------
class DistributedBatchSampler:
    """Megatron's ``MegatronPretrainingSampler``: this rank's micro-batches of sample indices.

    Global batch ``b`` is indices ``[consumed + b*mb*dp, consumed + (b+1)*mb*dp)``; rank ``r``
    yields slice ``[r*mb, (r+1)*mb)`` of it. Starting at `consumed_samples` (a global count,
    saved in checkpoints) makes resume exact; ranks never overlap and leave no gaps. A last
    incomplete global batch is dropped (every rank must take the same number of steps).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if total_samples <= 0:
            raise ValueError(f"no samples to consume: total_samples={total_samples}")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} not in [0, total_samples={total_samples}]")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank, self.size = data_parallel_rank, data_parallel_size
        self.global_batch = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.rank * self.micro_batch_size
        for b in range(len(self)):
            start = first + b * self.global_batch
            yield list(range(start, start + self.micro_batch_size))
