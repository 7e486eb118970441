"""``manifest.json``: what a prepared corpus directory contains, and the proof it is intact.

A prepared corpus is a directory written by `prepare.prepare`::

    DIR/manifest.json          this file (written last, atomically: its presence means "done")
    DIR/train-00000.bin        token ids of shard 0, training split (see `shards`)
    DIR/train-00000.idx        document offsets of shard 0 (.npy int64)
    DIR/val-00000.{bin,idx}    the validation split of the same input range (if --val-fraction)
    DIR/.parts/00000.json      per-shard completion record (lets an interrupted run resume)
    DIR/index_cache/           sample indices built by `datasets` (memory-mapped .npy)

The manifest records the format version, the tokenizer (fingerprint, vocab size, special ids),
the token dtype, every shard's token/document counts and checksums, totals, and counts of what
was skipped (empty documents) or repaired (undecodable bytes).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .files import write_json_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


@dataclass
class ShardFile:
    """One split of one shard: ``{split}-{index:05d}.bin`` and its ``.idx``."""

    tokens: int
    documents: int
    bin_checksum: str
    idx_checksum: str


@dataclass
class ShardRecord:
    """One shard: a contiguous range of input chunks, split into train/val files. ``directory`` is the folder,
    relative to the corpus, that holds its files: "" for a one-node corpus, a task's part
    (``part-00001-of-00004``) in a corpus merged from array-job tasks."""

    index: int
    first_chunk: int
    end_chunk: int
    splits: dict[str, ShardFile]
    config_key: str = ""
    directory: str = ""

    def folder(self, corpus: str | os.PathLike) -> Path:
        return Path(corpus, self.directory)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardRecord":
        d = dict(d)
        d["splits"] = {k: ShardFile(**v) for k, v in d["splits"].items()}
        return cls(**d)


@dataclass
class Manifest:
    format_version: int
    config_key: str
    tokenizer: dict
    dtype: str
    shards: list[ShardRecord]
    totals: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    repaired: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)

    def split_tokens(self, split: str) -> int:
        return sum(s.splits[split].tokens for s in self.shards if split in s.splits)

    def split_documents(self, split: str) -> int:
        return sum(s.splits[split].documents for s in self.shards if split in s.splits)

    def has_split(self, split: str) -> bool:
        return self.split_tokens(split) > 0

    def save(self, directory: str | os.PathLike) -> None:
        write_json_atomic(Path(directory, MANIFEST), asdict(self))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        path = Path(directory, MANIFEST)
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a prepared corpus (no {MANIFEST}); "
                                    f"run `odegpt prepare --output {directory}` first")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {d.get('format_version')}, "
                             f"this odegpt reads version {FORMAT_VERSION}; re-run `odegpt prepare`")
        d["shards"] = [ShardRecord.from_dict(s) for s in d["shards"]]
        return cls(**d)
