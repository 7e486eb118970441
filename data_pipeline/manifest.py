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
    def from_dict(cls, d: dict) -> ShardRecord:
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

    def save(self, directory: str | os.PathLike) -> None:
        write_json_atomic(Path(directory, MANIFEST), asdict(self))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
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
        try:
            d["shards"] = [ShardRecord.from_dict(s) for s in d["shards"]]
            manifest = cls(**d)
        except (TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{path} is not a manifest odegpt wrote ({error}); re-run `odegpt prepare`") from None
        manifest.check(path)
        return manifest

    def check(self, path: Path) -> None:
        """Refuse, in one line naming the field, what would otherwise read the tokens wrongly or twice: a dtype
        that is not an unsigned integer wide enough for the vocabulary, a shard listed twice, or a shard whose
        index or folder is not a plain number or a path inside the corpus."""
        vocab = self.tokenizer.get("vocab_size") if isinstance(self.tokenizer, dict) else None
        if not _is_count(vocab) or vocab < 1:
            raise ValueError(f"{path}: tokenizer.vocab_size must be a positive integer, got {vocab!r}")
        if self.dtype not in TOKEN_DTYPES:
            raise ValueError(f"{path}: dtype {self.dtype!r} is not a token dtype odegpt writes "
                             f"({', '.join(TOKEN_DTYPES)}); the tokens would be misread")
        if vocab > TOKEN_DTYPES[self.dtype]:
            raise ValueError(f"{path}: dtype {self.dtype} holds ids below {TOKEN_DTYPES[self.dtype]}, but the "
                             f"tokenizer's vocab_size is {vocab}")
        seen = set()
        for shard in self.shards:
            where = f"{path}: shard {shard.index!r}"
            if not _is_count(shard.index):
                raise ValueError(f"{where}: its index must be an integer >= 0")
            folder = Path(shard.directory) if isinstance(shard.directory, str) else None
            if folder is None or folder.is_absolute() or ".." in folder.parts:
                raise ValueError(f"{where}: directory {shard.directory!r} must be a folder inside the corpus")
            if (shard.directory, shard.index) in seen:
                raise ValueError(f"{where}{f' in {shard.directory}' if shard.directory else ''} is listed twice; "
                                 f"its tokens would be read twice")
            seen.add((shard.directory, shard.index))
            for split, record in shard.splits.items():
                if split not in SPLITS or not _is_count(record.tokens) or not _is_count(record.documents):
                    raise ValueError(f"{where}: split {split!r} needs integer tokens and documents >= 0, got "
                                     f"{record.tokens!r} and {record.documents!r}")


# The token dtypes a corpus may be written in, with how many ids each holds.
TOKEN_DTYPES = {"uint16": 2**16, "uint32": 2**32}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
