"""Parallel, streaming, resumable, deterministic preprocessing of raw text into token shards.

How it works, and why each property holds:

* The main process streams documents (`readers`), skips empty ones (counted), assigns each
  to train or val by a seeded hash of its position (which input, which document of it), and groups
  them into *chunks* of about `chunk_chars` characters. Chunk boundaries depend only on the
  input, never on `workers`.
* An array job (`num_tasks`, `task_index`) cuts the sorted inputs into contiguous slices of about
  equal bytes; each task prepares its slice into ``part-I-of-N`` as above, assigning splits by the
  same global positions, and `merge_parts` lists every part's shards in one manifest: the corpus
  holds the documents and tokens a one-node run writes, in the same order.
* Worker processes tokenize chunks (SentencePiece for odegpt's tokenizers, the ``tokenizers`` library's
  ``encode_batch`` for a Hugging Face one, no special tokens added) and append EOS to every document. At
  most ``2 * workers`` chunks are in flight, so peak memory does not grow with the corpus. A
  document over `SEGMENT_CHARS` (1 Mi characters) is tokenized in segments (see `segments` and
  `exact_segments`), each cut where the tokens of the pieces are those of the whole, so memory grows with the
  largest document's size (a ``.txt`` file is read whole: about 3x its size), not with the tokenizer's ~40x of it.
* Results are consumed in chunk order and appended to the current shard; a shard is closed
  after the chunk that brings its train split to `shard_tokens`. Hence the bytes written are
  identical whatever `workers` is.
* A shard is written to ``*.tmp`` files, renamed, then its completion record
  ``.parts/NNNNN.json`` is written (atomically); the manifest is written last. A rerun keeps
  every recorded shard, deletes anything newer or half-written, skips the chunks those shards
  cover (reading them but not tokenizing them) and carries on. Shards left by an unfinished run
  with *different* settings are discarded; a finished corpus with different settings is an error.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import xxhash

from .files import json_digest, write_json_atomic
from .folder_kinds import CORPUS, EMPTY, folder_kind
from .manifest import FORMAT_VERSION, MANIFEST, Manifest, ShardRecord
from .readers import Source, iter_documents, resolve_inputs
from .shards import ShardWriter, choose_dtype, verify_shard
from .tokenizer import HF_FILE, HUGGINGFACE, MODEL_FILE, TokenizerInfo, tokenizer_fingerprint
from .writer_lock import writer_lock

PARTS = ".parts"
# Fewer undecodable bytes than this never make a document "binary": a short text with a stray byte is repaired.
MIN_UNDECODABLE_TO_SKIP = 64


@dataclass
class PrepareConfig:
    """Everything that determines the bytes of a prepared corpus (plus how to run)."""

    inputs: list[str]
    tokenizer: str
    output: str
    workers: int = 1
    text_key: str = "text"
    val_fraction: float = 0.0
    shard_tokens: int = 1 << 27          # ~134M tokens, 256 MiB of uint16 per shard
    chunk_chars: int = 1 << 20           # work unit sent to a worker
    dtype: str = "auto"
    max_files: int | None = None
    seed: int = 1234                     # val assignment
    max_undecodable_fraction: float = 0.1  # skip a document with more undecodable bytes per character (binary)
    progress: bool = True
    stop_after_shards: int | None = None  # testing: simulate an interruption
    num_tasks: int | None = None         # array job: the inputs are cut into this many slices ...
    task_index: int = 0                  # ... and this task prepares this one into OUTPUT/part-I-of-N


@dataclass
class Chunk:
    index: int
    texts: list[str]
    is_val: list[bool]


@dataclass
class ReadCounters:
    documents: int = 0
    empty_documents: int = 0
    undecodable_documents: int = 0
    undecodable_sources: list = field(default_factory=list)  # files of the skipped documents (first 100)
    repaired_documents: int = 0
    replaced_chars: int = 0
    chars: int = 0


def _is_val(source_index: int, document_index: int, seed: int, fraction: float) -> bool:
    """The split of document ``document_index`` of input ``source_index`` (positions in the whole, sorted input
    list): a seeded hash of the two, so an array-job task assigns its slice's documents as one node would."""
    if fraction <= 0:
        return False
    key = source_index.to_bytes(8, "little") + document_index.to_bytes(8, "little")
    return xxhash.xxh64_intdigest(key, seed=seed) < fraction * 2.0**64


def task_slice(sources: list[Source], num_tasks: int, task_index: int) -> tuple[int, int]:
    """``(first, end)``: the contiguous range of ``sources`` that array-job task ``task_index`` of ``num_tasks``
    prepares, cut at about equal input bytes. Contiguous, so the tasks' parts in task order hold the documents
    in the one-node order."""
    sizes = np.cumsum([0] + [source.size() for source in sources], dtype=np.float64)
    cuts = [0] + [int(np.searchsorted(sizes[1:], k * sizes[-1] / num_tasks, side="left")) + 1
                  for k in range(1, num_tasks)] + [len(sources)]
    cuts = np.maximum.accumulate(np.minimum(cuts, len(sources)))
    return int(cuts[task_index]), int(cuts[task_index + 1])


def part_name(task_index: int, num_tasks: int) -> str:
    return f"part-{task_index:05d}-of-{num_tasks:05d}"


def iter_chunks(sources: list[Source], cfg: PrepareConfig, counters: ReadCounters,
                warn: Callable[[str], None] | None = None, first_source: int = 0) -> Iterator[Chunk]:
    """Group non-empty documents into chunks of ~`chunk_chars` characters, deterministically; ``first_source`` is
    the position of ``sources[0]`` in the whole input list (an array-job task's slice starts later)."""
    texts: list[str] = []
    flags: list[bool] = []
    size = 0
    index = 0
    for source_index, document_index, doc in _numbered_documents(sources, cfg.text_key, first_source):
        if doc.replaced >= MIN_UNDECODABLE_TO_SKIP and doc.undecodable_fraction > cfg.max_undecodable_fraction:
            counters.undecodable_documents += 1
            if len(counters.undecodable_sources) < 100:
                counters.undecodable_sources.append(doc.source)
            if warn is not None:
                warn(f"skipped a document of {doc.source}: {doc.undecodable_fraction:.0%} of it is not UTF-8 text "
                     f"({doc.replaced} undecodable bytes; a binary file? the limit is --max-undecodable-fraction "
                     f"{cfg.max_undecodable_fraction:g})")
            continue
        if doc.replaced:
            counters.repaired_documents += 1
            counters.replaced_chars += doc.replaced
        if not doc.text.strip():
            counters.empty_documents += 1
            continue
        flags.append(_is_val(source_index, document_index, cfg.seed, cfg.val_fraction))
        counters.documents += 1
        counters.chars += len(doc.text)
        texts.append(doc.text)
        size += len(doc.text)
        if size >= cfg.chunk_chars:
            yield Chunk(index, texts, flags)
            texts, flags, size, index = [], [], 0, index + 1
    if texts:
        yield Chunk(index, texts, flags)


def _numbered_documents(sources: list[Source], text_key: str, first_source: int):
    """(position of the source in the whole input list, position of the document in its source, document)."""
    for source_index, source in enumerate(sources, start=first_source):
        for document_index, document in enumerate(iter_documents([source], text_key=text_key)):
            yield source_index, document_index, document


# ---- worker side -------------------------------------------------------------------------------
_SP = None  # SentencePiece (odegpt's tokenizers)
_HF = None  # tokenizers.Tokenizer (a Hugging Face tokenizer)
_EOS = 2
_DTYPE = np.dtype(np.uint16)


@dataclass(frozen=True)
class WorkerTokenizer:
    """What a worker needs to tokenize: the file it reads (``tokenizer.model`` or ``tokenizer.json``), its kind,
    the EOS id appended to every document, and whether a special token written in a text is text
    (a Hugging Face tokenizer's ``split_special_tokens``, as transformers applies it)."""

    path: str
    kind: str
    eos_id: int
    split_special_tokens: bool = False


def worker_tokenizer(directory: str | os.PathLike, info: TokenizerInfo) -> WorkerTokenizer:
    """The `WorkerTokenizer` of a tokenizer folder of either kind."""
    if info.kind == HUGGINGFACE:
        from .tokenizer import load_huggingface

        reference = load_huggingface(directory)
        split = bool(getattr(reference, "split_special_tokens", False))
        tokenizer = WorkerTokenizer(str(Path(directory) / HF_FILE), HUGGINGFACE, info.eos_id, split)
        _check_same_encoding(directory, tokenizer, reference)
        return tokenizer
    return WorkerTokenizer(str(Path(directory) / MODEL_FILE), info.kind, info.eos_id)


# A text on which the tokenizers library reading tokenizer.json must give transformers' ids: code, runs of spaces and
# line breaks, tabs, digits, accents, CJK, an emoji, a contraction (the EOS token's text is added to it).
PROBE_TEXT = ("def f(x):\n    return x  +  1\t# don't\n\n\n  Ünïcödé 中文 🙂 12345 3.14\r\nEnd. ")


def _check_same_encoding(directory: str | os.PathLike, tokenizer: WorkerTokenizer, reference) -> None:
    """prepare tokenizes with ``tokenizer.json`` alone; transformers (evaluate, generate) may read more of the
    folder (a class that rebuilds the tokenizer, a config that changes it). Refuse a folder the two read apart."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(tokenizer.path)
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = tokenizer.split_special_tokens
    text = PROBE_TEXT + (reference.eos_token or "")
    ours, theirs = backend.encode(text, add_special_tokens=False).ids, reference(text, add_special_tokens=False)
    if list(ours) != list(theirs["input_ids"]):
        raise ValueError(f"tokenizer {directory}: its {HF_FILE} read by the tokenizers library and the tokenizer "
                         f"transformers loads from the folder encode the same text differently ({list(ours)[:8]} "
                         f"against {list(theirs['input_ids'])[:8]}): save the tokenizer again with save_pretrained")


def _init_worker(tokenizer: WorkerTokenizer, dtype: str) -> None:
    global _SP, _HF, _EOS, _DTYPE
    if tokenizer.kind == HUGGINGFACE:
        from tokenizers import Tokenizer

        _SP, _HF = None, Tokenizer.from_file(tokenizer.path)
        _HF.no_truncation()
        _HF.no_padding()
        _HF.encode_special_tokens = tokenizer.split_special_tokens
    else:
        import sentencepiece as spm

        _SP, _HF = spm.SentencePieceProcessor(model_file=tokenizer.path, num_threads=1), None
    _EOS, _DTYPE = tokenizer.eos_id, np.dtype(dtype)


def _spawned_worker(tokenizer: WorkerTokenizer, dtype: str) -> None:
    """A worker process: one thread each (the ``tokenizers`` library would otherwise use every core in every
    worker), then as in this process."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _init_worker(tokenizer, dtype)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """``--workers 1`` tokenizes in this process, on one thread, as a worker does."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def encode_texts(texts: list[str]) -> list:
    """The worker tokenizer's ids of each text, no special tokens added."""
    if _HF is not None:
        return [encoding.ids for encoding in _HF.encode_batch(texts, add_special_tokens=False)]
    return _SP.encode(texts, out_type=int, num_threads=1)


def _encode_one(text: str) -> list[int]:
    return encode_texts([text])[0]


def _pack(ids: list) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), _DTYPE)
    pos = 0
    for x in ids:
        out[pos:pos + len(x)] = x
        pos += len(x)
        out[pos] = _EOS
        pos += 1
    return out, lengths


# A document longer than this is tokenized segment by segment, each segment's ids packed at once: the
# tokenizer's working memory grows ~40x the length of the string it is given (2.2 GB for one 50 MB line).
SEGMENT_CHARS = 1 << 20


def segments(text: str, size: int = SEGMENT_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``size`` characters. A piece ends after a line break in the
    second half of its window if there is one, else before a run of spaces, else anywhere. The tokenizer
    is trained on lines, so none of its pieces spans a line break, and SentencePiece starts a word at a
    run of spaces: cutting there gives exactly the tokens of the whole text."""
    start = 0
    while len(text) - start > size:
        low, end = start + size // 2, start + size
        cut = text.rfind("\n", low, end) + 1
        if cut <= start:
            cut = text.rfind(" ", low, end)
            while cut > start and text[cut - 1] == " ":
                cut -= 1
            if cut <= start:
                cut = end  # no line break or space: a cut inside a word changes the tokens around it
        yield text[start:cut]
        start = cut
    yield text[start:]


# A cut of a Hugging Face tokenizer's text is tried only where pre-tokenizers end a piece in every tokenizer
# odegpt has met (byte-level BPE, SentencePiece-based): after a line break between two characters that are not
# whitespace, else before a run of spaces that follows one; each is then tested (see `cuts_exactly`).
_LINE_CUT = re.compile(r"\S\n(?=\S)")
_SPACE_CUT = re.compile(r"\S(?= )")
CUT_CONTEXT = 1024  # characters each side of a cut that `cuts_exactly` tokenizes
CUT_ATTEMPTS = 16   # cuts tested for one segment before the rest of the document is tokenized whole


def cuts_exactly(text: str, cut: int, encode: Callable[[str], list[int]], context: int = CUT_CONTEXT) -> bool:
    """Whether the tokens of ``text`` around ``cut`` (``context`` characters each side) are those of its two sides
    tokenized apart. Byte-level BPE pre-tokenizers keep whitespace in other pieces than SentencePiece does (a
    newline with the spaces after it, a space with the word after it), and some add a space to every text they
    are given: a cut that one tokenizer allows, another does not."""
    left, right = text[max(0, cut - context):cut], text[cut:cut + context]
    return list(encode(left + right)) == list(encode(left)) + list(encode(right))


def _cut_candidates(text: str, start: int, size: int) -> Iterator[int]:
    """Where a segment starting at ``start`` may end: line breaks then spaces, last first, in the second half of its
    window; then (a window with neither: a long run without whitespace) the first ones after it."""
    low, end = start + size // 2, start + size
    for pattern in (_LINE_CUT, _SPACE_CUT):
        for match in reversed(list(pattern.finditer(text, low, end))):
            yield match.end()
    for pattern in (_LINE_CUT, _SPACE_CUT):
        match = pattern.search(text, end)
        if match is not None:
            yield match.end()


def exact_segments(text: str, encode: Callable[[str], list[int]], size: int = SEGMENT_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces whose tokens (``encode``: a Hugging Face tokenizer's) are exactly those of the
    whole: each cut is a candidate of `_cut_candidates` that `cuts_exactly` accepts. A piece is at most ``size``
    characters unless its window has no line break or space; when ``CUT_ATTEMPTS`` candidates fail (a tokenizer
    that adds a space to every text it is given), the rest of the text is one piece: exact, at the memory cost of
    its length."""
    start = 0
    while len(text) - start > size:
        cut = next((candidate for attempt, candidate in zip(range(CUT_ATTEMPTS), _cut_candidates(text, start, size))
                    if cuts_exactly(text, candidate, encode)), None)
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encode_long(text: str) -> np.ndarray:
    pieces = exact_segments(text, _encode_one) if _HF is not None else segments(text)
    return np.concatenate([np.asarray(_encode_one(piece), dtype=_DTYPE) for piece in pieces])


def _tokenize_chunk(chunk: Chunk) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    short = [i for i, text in enumerate(chunk.texts) if len(text) <= SEGMENT_CHARS]
    ids: list = [None] * len(chunk.texts)
    for i, encoded in zip(short, encode_texts([chunk.texts[i] for i in short])):
        ids[i] = encoded
    for i, text in enumerate(chunk.texts):
        if ids[i] is None:
            ids[i] = _encode_long(text)
    out = {}
    for split, want in (("train", False), ("val", True)):
        out[split] = _pack([x for x, v in zip(ids, chunk.is_val) if v == want])
    return chunk.index, out


# ---- main side ---------------------------------------------------------------------------------
def _config_key(cfg: PrepareConfig, sources: list[Source], fingerprint: str, dtype: np.dtype,
                first_source: int = 0) -> str:
    desc = {
        "format_version": FORMAT_VERSION, "tokenizer": fingerprint, "dtype": dtype.name,
        "text_key": cfg.text_key, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
        "shard_tokens": cfg.shard_tokens, "chunk_chars": cfg.chunk_chars,
        "max_undecodable_fraction": cfg.max_undecodable_fraction, "split_assignment": "source,document",
        "first_source": first_source, "sources": [(s.path, s.kind, s.compression, s.size()) for s in sources],
    }
    return json_digest(desc)


def _splits(cfg: PrepareConfig) -> tuple[str, ...]:
    return ("train", "val") if cfg.val_fraction > 0 else ("train",)


def _load_finished(out: Path, key: str, dtype: np.dtype) -> list[ShardRecord]:
    """Completed shards of an earlier run with the same config, contiguous from shard 0."""
    done: list[ShardRecord] = []
    while (path := out / PARTS / f"{len(done):05d}.json").is_file():
        try:
            record = ShardRecord.from_dict(json.loads(path.read_text()))
            if record.config_key != key:
                break
            for split, f in record.splits.items():  # size and checksums: a damaged or replaced shard is redone
                verify_shard(out, split, record.index, f, dtype, checksum=True)
        except Exception:
            break
        done.append(record)
    return done


def _remove_unfinished(out: Path, keep: int) -> None:
    for path in out.iterdir():
        name = path.name
        if name.endswith(".tmp") or ".tmp" in name:
            path.unlink()
        elif name.startswith(("train-", "val-")) and int(name.split("-")[1][:5]) >= keep:
            path.unlink()
    for path in (out / PARTS).glob("*.json"):
        if int(path.stem) >= keep:
            path.unlink()


def prepare(cfg: PrepareConfig) -> Manifest:
    """Tokenize `cfg.inputs` into shards under `cfg.output`; return the manifest.

    Rerunning with the same settings resumes (or returns at once when already complete); an
    output directory prepared with different settings is an error rather than a silent mix. One process
    writes a corpus at a time (a second is refused, naming the first: ``writer_lock``).
    """
    if not 0 <= cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if not 0 <= cfg.max_undecodable_fraction <= 1:
        raise ValueError(f"--max-undecodable-fraction must be in [0, 1], got {cfg.max_undecodable_fraction}")
    if cfg.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be >= 1, got {cfg.shard_tokens}")
    if not 0 <= cfg.seed < 2**63:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {cfg.seed}")
    num_tasks = 1 if cfg.num_tasks is None else cfg.num_tasks
    if num_tasks < 1 or not 0 <= cfg.task_index < num_tasks:
        raise ValueError(f"--num-tasks must be >= 1 and --task-index in 0..{num_tasks - 1}, got task "
                         f"{cfg.task_index} of {num_tasks}")
    all_sources = resolve_inputs(cfg.inputs, max_files=cfg.max_files)
    first_source, end_source = task_slice(all_sources, num_tasks, cfg.task_index)
    sources = all_sources[first_source:end_source]
    tok_dir = Path(cfg.tokenizer)
    info = TokenizerInfo.load(tok_dir)
    fingerprint = tokenizer_fingerprint(tok_dir)
    if fingerprint != info.fingerprint:
        raise ValueError(f"tokenizer {tok_dir}: {MODEL_FILE} fingerprint {fingerprint} does not match "
                         f"the recorded {info.fingerprint}; the directory was modified")
    worker = worker_tokenizer(tok_dir, info)
    dtype = choose_dtype(info.vocab_size, cfg.dtype)
    key = _config_key(cfg, sources, fingerprint, dtype, first_source)
    task = None
    out = Path(cfg.output)
    check_corpus_output(out)
    if cfg.num_tasks is not None:  # an array job (of one task, too): its part, for --merge
        if (out / MANIFEST).is_file():
            raise ValueError(f"{out} already holds a merged or one-node corpus; array-job parts go into a new --output")
        task = {"index": cfg.task_index, "num_tasks": cfg.num_tasks, "first_source": first_source,
                "end_source": end_source, "num_sources": len(all_sources),
                "job_key": _config_key(cfg, all_sources, fingerprint, dtype)}
        out = out / part_name(cfg.task_index, cfg.num_tasks)
        check_corpus_output(out)
    with writer_lock(out, "corpus"):
        return _prepare_locked(cfg, out, sources, first_source, key, task, info, fingerprint, dtype, worker)


def check_corpus_output(out: Path) -> None:
    """A corpus is written into a new or empty folder, or resumed in a corpus of its own; any other folder (a model,
    a run, a tokenizer, shard files with no manifest or completion records that say whose they are) is refused."""
    found = folder_kind(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file, not a folder")
    if found.kind not in (EMPTY, CORPUS):
        raise ValueError(f"--output {out} is {found.describe()}: prepare writes a corpus only into a new or empty "
                         f"folder, or resumes one of its own; choose another --output")


def _prepare_locked(cfg: PrepareConfig, out: Path, sources: list[Source], first_source: int, key: str, task,
                    info: TokenizerInfo, fingerprint: str, dtype: np.dtype, worker: WorkerTokenizer) -> Manifest:
    """:func:`prepare` once its inputs are checked and it holds ``out``'s writer lock."""
    from tqdm import tqdm

    if (out / MANIFEST).is_file():
        manifest = Manifest.load(out)
        if manifest.config_key == key:
            return manifest
        raise ValueError(f"{out} already holds a corpus prepared with different inputs or settings; "
                         f"choose another --output or delete it")
    (out / PARTS).mkdir(exist_ok=True)
    done = _load_finished(out, key, dtype)
    _remove_unfinished(out, keep=len(done))
    skip_chunks = done[-1].end_chunk if done else 0
    counters = ReadCounters()
    start = time.time()
    bar = tqdm(unit="tok", unit_scale=True, desc=f"prepare ({cfg.workers} workers)", disable=not cfg.progress,
               smoothing=0.1)
    if done:
        bar.write(f"resuming: {len(done)} finished shard(s) kept, skipping {skip_chunks} chunks")
    sink = _ShardSink(out, _splits(cfg), dtype, key, done, skip_chunks, cfg, bar)
    warn = lambda message: bar.write(message, file=sys.stderr)  # noqa: E731
    chunks = (c for c in iter_chunks(sources, cfg, counters, warn=warn, first_source=first_source)
              if c.index >= skip_chunks)
    try:
        _tokenize_into(sink, chunks, worker, dtype, cfg.workers)
    except BaseException:
        sink.abort()
        bar.close()
        raise
    bar.close()
    return _write_manifest(out, cfg, sources, key, task, info, fingerprint, dtype, done, counters, time.time() - start)


class _ShardSink:
    """Where tokenized chunks go, in chunk order: appended to the current shard, which is closed (its files renamed,
    its completion record written) once its train split reaches ``shard_tokens``."""

    def __init__(self, out: Path, splits: tuple[str, ...], dtype: np.dtype, key: str, done: list[ShardRecord],
                 first_chunk: int, cfg: PrepareConfig, bar) -> None:
        self.out, self.splits, self.dtype, self.key, self.done, self.cfg, self.bar = \
            out, splits, dtype, key, done, cfg, bar
        self.writers: dict[str, ShardWriter] | None = None
        self.first_chunk, self.last_chunk = first_chunk, first_chunk - 1

    def consume(self, index: int, result: dict) -> None:
        """Append one tokenized chunk (raise InterruptedError after ``stop_after_shards``: a test's interruption)."""
        self.last_chunk = index
        if self.writers is None:
            self.writers = {s: ShardWriter(self.out, s, len(self.done), self.dtype) for s in self.splits}
        for split in self.splits:
            tokens, lengths = result[split]
            self.writers[split].append(tokens, lengths)
            self.bar.update(len(tokens))
        if self.writers["train"].tokens >= self.cfg.shard_tokens:
            self.close(index + 1)
            self.bar.set_postfix(shards=len(self.done), refresh=False)
            if self.cfg.stop_after_shards is not None and len(self.done) >= self.cfg.stop_after_shards:
                raise InterruptedError(f"stopped after {len(self.done)} shards (stop_after_shards)")

    def close(self, end_chunk: int | None = None) -> None:
        """Close the open shard, if any: it covers the chunks up to ``end_chunk`` (default: the last consumed)."""
        if self.writers is None:
            return
        end_chunk = self.last_chunk + 1 if end_chunk is None else end_chunk
        files = {s: w.close() for s, w in self.writers.items()}
        record = ShardRecord(index=len(self.done), first_chunk=self.first_chunk, end_chunk=end_chunk, splits=files,
                             config_key=self.key)
        write_json_atomic(self.out / PARTS / f"{record.index:05d}.json", asdict(record))
        self.done.append(record)
        self.writers, self.first_chunk = None, end_chunk

    def abort(self) -> None:
        for writer in (self.writers or {}).values():
            writer.abort()


def _tokenize_into(sink: _ShardSink, chunks: Iterator[Chunk], tokenizer: WorkerTokenizer, dtype: np.dtype,
                   workers: int) -> None:
    """Tokenize ``chunks`` in ``workers`` processes (in this one for 1), consumed in chunk order, at most
    ``2 * workers`` in flight; then close the last shard."""
    if workers == 1:
        with _one_thread():
            _init_worker(tokenizer, dtype.name)
            for chunk in chunks:
                sink.consume(*_tokenize_chunk(chunk))
    else:
        with mp.get_context("spawn").Pool(workers, initializer=_spawned_worker,
                                          initargs=(tokenizer, dtype.name)) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
                if len(pending) >= 2 * workers:
                    sink.consume(*pending.popleft().get())
            while pending:
                sink.consume(*pending.popleft().get())
            pool.terminate()
    sink.close()


def _write_manifest(out: Path, cfg: PrepareConfig, sources: list[Source], key: str, task, info: TokenizerInfo,
                    fingerprint: str, dtype: np.dtype, done: list[ShardRecord], counters: ReadCounters,
                    elapsed: float) -> Manifest:
    """The finished corpus's manifest, written last: its presence says the corpus is complete."""
    splits = _splits(cfg)
    manifest = Manifest(
        format_version=FORMAT_VERSION, config_key=key,
        tokenizer={"kind": info.kind, "fingerprint": fingerprint, "vocab_size": info.vocab_size,
                   "model_type": info.model_type, **info.special_ids(), "path": str(Path(cfg.tokenizer).resolve())},
        dtype=dtype.name, shards=done,
        inputs={"patterns": list(cfg.inputs), "files": len(sources), "bytes": sum(s.size() for s in sources),
                "text_key": cfg.text_key, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                "shard_tokens": cfg.shard_tokens, **({} if task is None else {"task": task})},
        skipped={"empty_documents": counters.empty_documents,
                 "undecodable_documents": counters.undecodable_documents,
                 "undecodable_files": counters.undecodable_sources},
        repaired={"documents_with_undecodable_bytes": counters.repaired_documents,
                  "replaced_characters": counters.replaced_chars},
    )
    manifest.totals = {"documents": counters.documents, "characters": counters.chars,
                       "shards": len(done),
                       **{f"{s}_tokens": manifest.split_tokens(s) for s in splits},
                       **{f"{s}_documents": manifest.split_documents(s) for s in splits},
                       "seconds": round(elapsed, 3)}
    manifest.save(out)
    return manifest


# ---- array jobs: one manifest over the parts the tasks wrote --------------------------------------------------

_PART = re.compile(r"part-(\d{5})-of-(\d{5})")


def merge_parts(output: str | os.PathLike) -> Manifest:
    """Check the ``part-I-of-N`` folders an array job's tasks wrote under ``output`` and write one
    ``output/manifest.json`` listing their shards in task order (nothing is copied). Every part must be finished,
    each task exactly once, all from the same job (inputs and settings), their input slices covering the inputs
    in order; anything else is a ValueError naming the part."""
    out = Path(output)
    if not out.is_dir():
        raise ValueError(f"{out} is not a folder: run `odegpt prepare --num-tasks N --task-index I --output {out}` "
                         f"for every task first")
    with writer_lock(out, "corpus"):
        for leftover in out.glob(f".{MANIFEST}.tmp*"):  # an earlier merge killed while writing it
            leftover.unlink()
        return _merge_locked(out)


def _merge_locked(out: Path) -> Manifest:
    """:func:`merge_parts` once it holds the corpus's writer lock."""
    if (out / MANIFEST).is_file():
        raise ValueError(f"{out} already holds a manifest: it is merged, or a one-node corpus")
    folders = sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("part-")) if out.is_dir() else []
    if not folders:
        raise ValueError(f"{out} holds no part-*-of-* folders: run `odegpt prepare --num-tasks N --task-index I "
                         f"--output {out}` for every task first")
    named: dict[Path, tuple[int, int]] = {}
    for folder in folders:
        match = _PART.fullmatch(folder.name)
        if match is None:
            raise ValueError(f"{folder} is not a part of an array job (part-IIIII-of-NNNNN)")
        named[folder] = int(match[1]), int(match[2])
    counts = sorted({count for _, count in named.values()})
    if len(counts) > 1:
        raise ValueError(f"{out} holds parts of array jobs of {' and '.join(map(str, counts))} tasks: one job's parts "
                         f"only")
    num_tasks = counts[0]
    parts: dict[int, tuple[Path, Manifest]] = {}
    for folder, (index, count) in named.items():
        if not (folder / MANIFEST).is_file():
            raise ValueError(f"{folder} is unfinished (no {MANIFEST}): rerun task {index} of {count}")
        manifest = Manifest.load(folder)
        task = manifest.inputs.get("task") or {}
        if task.get("index") != index or task.get("num_tasks") != count:
            raise ValueError(f"{folder} holds task {task.get('index')} of {task.get('num_tasks')}, not what its "
                             f"name says: a copied or foreign part")
        parts[index] = (folder, manifest)
    missing = sorted(set(range(num_tasks)) - set(parts))
    if missing:
        raise ValueError(f"{out / part_name(missing[0], num_tasks)} is missing: task {missing[0]} of {num_tasks} "
                         f"has not run (or failed); run it, then merge")
    ordered = [parts[index] for index in range(num_tasks)]
    first = ordered[0][1]
    job_key, end = first.inputs["task"]["job_key"], 0
    for folder, manifest in ordered:
        task = manifest.inputs["task"]
        if task["job_key"] != job_key or manifest.tokenizer["fingerprint"] != first.tokenizer["fingerprint"]:
            raise ValueError(f"{folder} was prepared from other inputs or settings than {ordered[0][0]}: a part of "
                             f"another array job")
        if task["first_source"] != end:
            raise ValueError(f"{folder} starts at input {task['first_source']}, the part before ends at {end}")
        end = task["end_source"]
    if end != first.inputs["task"]["num_sources"]:
        raise ValueError(f"the parts cover inputs 0..{end} of {first.inputs['task']['num_sources']}")

    def total(key: str) -> int:
        return sum(manifest.totals.get(key, 0) for _, manifest in ordered)

    splits = sorted({split for _, m in ordered for s in m.shards for split in s.splits}, key=("train", "val").index)
    merged = Manifest(
        format_version=FORMAT_VERSION, config_key=json_digest({"job": job_key, "parts": [m.config_key
                                                                                          for _, m in ordered]}),
        tokenizer=first.tokenizer, dtype=first.dtype,
        shards=[replace(shard, directory=folder.name) for folder, manifest in ordered for shard in manifest.shards],
        inputs={**{k: v for k, v in first.inputs.items() if k != "task"}, "files": end,
                "bytes": sum(m.inputs["bytes"] for _, m in ordered), "parts": num_tasks},
        skipped={"empty_documents": sum(m.skipped["empty_documents"] for _, m in ordered),
                 "undecodable_documents": sum(m.skipped.get("undecodable_documents", 0) for _, m in ordered),
                 "undecodable_files": [f for _, m in ordered for f in m.skipped.get("undecodable_files", [])][:100]},
        repaired={key: sum(m.repaired[key] for _, m in ordered) for key in first.repaired},
    )
    merged.totals = {"documents": total("documents"), "characters": total("characters"),
                     "shards": len(merged.shards),
                     **{f"{s}_tokens": merged.split_tokens(s) for s in splits},
                     **{f"{s}_documents": merged.split_documents(s) for s in splits},
                     "seconds": max(m.totals.get("seconds", 0.0) for _, m in ordered)}
    merged.save(out)
    return merged
