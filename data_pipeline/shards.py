"""Token shards on disk: Megatron-style ``.bin`` + ``.idx`` pairs.

* ``{split}-{i:05d}.bin``: the token ids of the shard's documents, concatenated, each document
  followed by EOS; raw little-endian ``uint16`` (vocab <= 65536) or ``uint32``. Read with
  ``np.memmap``: nothing is ever loaded into RAM.
* ``{split}-{i:05d}.idx``: a ``.npy`` int64 array of document start offsets into the ``.bin``,
  ``documents + 1`` long (the last entry is the token count).

Both files are written under a temporary name and renamed when complete, and their xxh3-64
checksums are recorded in the manifest; `verify_shard` turns any truncation or corruption into
a `ShardError` that names the file, never silent garbage.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from .manifest import Manifest, ShardFile


class ShardError(ValueError):
    """A shard on disk does not match its manifest (truncated, corrupted or missing)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def choose_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """uint16 when every id fits, else uint32; a requested dtype too small is an error."""
    if requested not in ("auto", "uint16", "uint32"):
        raise ValueError(f"dtype must be auto, uint16 or uint32, got {requested!r}")
    if vocab_size > 2**32:
        raise ValueError(f"vocabulary of {vocab_size} tokens does not fit uint32")
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    dtype = np.dtype(requested)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise ValueError(f"vocabulary of {vocab_size} tokens does not fit {requested} "
                         f"(max {np.iinfo(dtype).max + 1}); use --dtype uint32 or auto")
    return dtype


def file_checksum(path: str | os.PathLike, block: int = 1 << 24) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ShardWriter:
    """Appends documents' tokens to ``{split}-{i}.bin.tmp``; `close` writes the ``.idx`` and renames."""

    directory: Path
    split: str
    index: int
    dtype: np.dtype
    tokens: int = 0
    lengths: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = shard_name(self.split, self.index)
        self._tmp = self.directory / f"{self.name}.bin.tmp"
        self._file = open(self._tmp, "wb")
        self._hash = xxhash.xxh3_64()

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append a run of documents: their concatenated tokens and per-document lengths."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.tokens += len(tokens)
        self.lengths.append(np.asarray(lengths, dtype=np.int64))

    def close(self) -> ShardFile:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        assert offsets[-1] == self.tokens
        idx_tmp = self.directory / f"{self.name}.idx.tmp"
        with open(idx_tmp, "wb") as f:
            np.save(f, offsets)
            f.flush()
            os.fsync(f.fileno())
        idx_checksum = file_checksum(idx_tmp)
        os.replace(self._tmp, self.directory / f"{self.name}.bin")
        os.replace(idx_tmp, self.directory / f"{self.name}.idx")
        return ShardFile(tokens=self.tokens, documents=len(lengths),
                         bin_checksum=self._hash.hexdigest(), idx_checksum=idx_checksum)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def verify_shard(directory: str | os.PathLike, split: str, index: int, record: ShardFile,
                 dtype: np.dtype, checksum: bool = True) -> None:
    """Raise `ShardError` naming the file if a shard's size, offsets or checksums disagree."""
    name = shard_name(split, index)
    bin_path, idx_path = Path(directory, f"{name}.bin"), Path(directory, f"{name}.idx")
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise ShardError(f"shard file {path} is missing")
    expected = record.tokens * np.dtype(dtype).itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise ShardError(f"shard {bin_path} is {actual} bytes, manifest says {expected} "
                         f"({record.tokens} {np.dtype(dtype).name} tokens): truncated or overwritten")
    if checksum:
        if (got := file_checksum(bin_path)) != record.bin_checksum:
            raise ShardError(f"shard {bin_path} checksum {got} does not match manifest "
                             f"{record.bin_checksum}: corrupted")
        if (got := file_checksum(idx_path)) != record.idx_checksum:
            raise ShardError(f"shard index {idx_path} checksum {got} does not match manifest "
                             f"{record.idx_checksum}: corrupted")
    try:
        offsets = np.load(idx_path, mmap_mode="r")
    except Exception as error:
        raise ShardError(f"shard index {idx_path} is unreadable: {error}") from None
    if len(offsets) != record.documents + 1 or (len(offsets) and int(offsets[-1]) != record.tokens):
        raise ShardError(f"shard index {idx_path} disagrees with manifest "
                         f"({len(offsets) - 1} documents, expected {record.documents})")


def verify_corpus(directory: str | os.PathLike, manifest: Manifest | None = None,
                  checksum: bool = True) -> Manifest:
    """Verify every shard of a prepared corpus against its manifest; return the manifest."""
    manifest = manifest or Manifest.load(directory)
    dtype = np.dtype(manifest.dtype)
    for shard in manifest.shards:
        for split, record in shard.splits.items():
            verify_shard(shard.folder(directory), split, shard.index, record, dtype, checksum=checksum)
            if checksum:  # the full check, once per node: every id against the vocabulary too
                check_ids(shard.folder(directory), split, shard.index, record, dtype, manifest.tokenizer["vocab_size"])
    return manifest


def check_ids(directory: str | os.PathLike, split: str, index: int, record: ShardFile, dtype: np.dtype,
              vocab_size: int, block: int = 1 << 24) -> None:
    """Raise `ShardError` if a shard holds a token id outside the vocabulary (it would index past the embedding)."""
    tokens = open_tokens(directory, split, index, record, dtype)
    for start in range(0, len(tokens), block):
        largest = int(tokens[start:start + block].max())
        if largest >= vocab_size:
            raise ShardError(f"shard {Path(directory, shard_name(split, index))}.bin holds token id {largest}, "
                             f"outside the tokenizer's vocabulary of {vocab_size}: corrupted or from another "
                             f"tokenizer")


def open_tokens(directory: str | os.PathLike, split: str, index: int, record: ShardFile,
                dtype: np.dtype) -> np.ndarray:
    """Memory-map one shard's tokens (size-checked; never loads the data)."""
    path = Path(directory, f"{shard_name(split, index)}.bin")
    if not path.is_file():
        raise ShardError(f"shard file {path} is missing")
    expected = record.tokens * np.dtype(dtype).itemsize
    if path.stat().st_size != expected:
        raise ShardError(f"shard {path} is {path.stat().st_size} bytes, manifest says {expected}: "
                         f"truncated or overwritten")
    if record.tokens == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(record.tokens,))
