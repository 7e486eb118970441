"""Input formats: turn paths and globs into a stream of documents, one at a time.

Supported inputs (each may also be ``.gz`` or ``.zst``/``.zstd`` compressed, except parquet):

* ``.txt`` ``.text`` ``.md`` ``.rst`` ``.py``: a whole file is one document;
* ``.jsonl`` ``.ndjson`` ``.json``: one JSON object per line, the document is ``obj[text_key]``
  (a ``.json`` file holding one top-level array is also accepted);
* ``.parquet``: column ``text_key``, read in record batches;
* a directory written by Hugging Face ``datasets`` ``save_to_disk``: column ``text_key``
  (memory-mapped Arrow; a ``DatasetDict`` contributes its splits in name order);
* any other directory: every supported file under it, recursively, in sorted order;
* ``stdlib``: the ``.py`` sources of the running interpreter's standard library, a real
  ~20-30 MB corpus present on every machine (the quickstart and tests use it).

Everything streams: only one document (or one parquet batch) is in memory at a time, except a
``.txt`` document or a top-level ``.json`` array, which are read whole. Bad bytes never stop a
run and are never silently lost: undecodable UTF-8 is replaced by U+FFFD and counted in
`Document.replaced`. Missing files, globs matching nothing, unsupported suffixes, malformed JSON
and missing text fields are errors that name the file (and line).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

STDLIB = "stdlib"
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py"}
JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
COMPRESSION_SUFFIXES = {".gz", ".zst", ".zstd"}
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Source:
    """One input: a file (`kind` text|jsonl|parquet) or a saved HF dataset (`kind` hf)."""

    path: str
    kind: str
    compression: str | None = None

    def size(self) -> int:
        p = Path(self.path)
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size


@dataclass
class Document:
    """A document's text and how many characters had to be replaced to decode it."""

    text: str
    replaced: int = 0
    source: str = ""  # the file it came from (set by iter_documents)

    @property
    def undecodable_fraction(self) -> float:
        """Replaced characters per character: ~0 for text with a stray bad byte, ~0.4 for random bytes."""
        return self.replaced / max(1, len(self.text))


def stdlib_files() -> list[str]:
    """The running interpreter's standard-library ``.py`` files (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [str(p) for p in root.rglob("*.py")
             if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()]
    if not files:
        raise FileNotFoundError(f"no standard-library sources found under {root} ({sys.executable})")
    return sorted(files)


def _is_hf_dataset_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _classify(path: str) -> Source:
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    compression = None
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        compression = "gzip" if suffixes[-1] == ".gz" else "zstd"
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in TEXT_SUFFIXES:
        return Source(path, "text", compression)
    if suffix in JSON_SUFFIXES:
        return Source(path, "jsonl", compression)
    if suffix == ".parquet" and compression is None:
        return Source(path, "parquet")
    raise ValueError(f"unsupported input file {path!r}: expected .txt/.md/.py, .jsonl/.json, .parquet "
                     f"(text and json may be .gz or .zst compressed) or a saved Hugging Face dataset")


def resolve_inputs(patterns: list[str], max_files: int | None = None) -> list[Source]:
    """Expand paths, globs, directories and ``stdlib`` into a sorted, deterministic source list.

    `max_files` keeps only the first N sources (handy for quick runs on ``stdlib``).
    """
    if not patterns:
        raise ValueError("no input given")
    if max_files is not None and (isinstance(max_files, bool) or max_files < 1):
        raise ValueError(f"--max-files must be >= 1 (or left out for every file), got {max_files}")
    sources: list[Source] = []
    for pattern in patterns:
        if pattern == STDLIB:
            sources += [Source(f, "text") for f in stdlib_files()]
            continue
        path = Path(pattern)
        if path.is_dir():
            if _is_hf_dataset_dir(path):
                sources.append(Source(str(path), "hf"))
                continue
            found = sorted(str(f) for f in path.rglob("*") if f.is_file() and _supported(f))
            if not found:
                raise FileNotFoundError(f"input directory {pattern!r} holds no supported files")
            _warn_about_links_out_of(path, found)
            sources += [_classify(f) for f in found]
        elif path.is_file():
            sources.append(_classify(str(path)))
        elif glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"input glob {pattern!r} matched no files")
            sources += [_classify(f) for f in found]
        else:
            raise FileNotFoundError(f"input file {pattern!r} does not exist")
    return sources[:max_files] if max_files else sources


def _warn_about_links_out_of(folder: Path, files: list[str]) -> None:
    """Name each file found in ``folder`` that a symbolic link (to it, or to a folder holding it) puts outside
    ``folder``: it is read, but a user who gave a folder may not expect text from elsewhere in the corpus."""
    root = folder.resolve()
    for file in files:
        target = Path(file).resolve()
        if not target.is_relative_to(root):
            print(f"odegpt: warning: input {file} is a symbolic link to {target}, outside {folder}; it is read",
                  file=sys.stderr)


def _supported(path: Path) -> bool:
    try:
        _classify(str(path))
        return True
    except ValueError:
        return False


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode (UTF-16 when the bytes start with its byte-order mark); undecodable bytes become U+FFFD and are
    counted (never an exception). NUL characters are no text either: valid UTF-8, but what binary files and
    UTF-16 without a byte-order mark are full of, so they are replaced and counted too (such a file is then
    skipped as binary instead of tokenized as ``d\x00e\x00f\x00``)."""
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8"
    try:
        text, replaced = raw.decode(encoding), 0
    except UnicodeDecodeError:
        text = raw.decode(encoding, errors="replace")
        replaced = text.count("\ufffd") - (raw.count("\ufffd".encode()) if encoding == "utf-8" else 0)
    if "\x00" in text:
        replaced += text.count("\x00")
        text = text.replace("\x00", "\ufffd")
    return text.removeprefix("\ufeff") if encoding == "utf-16" else text, replaced


def _fix_surrogates(text: str) -> tuple[str, int]:
    """JSON can carry lone surrogates (``"\\ud800"``) that are not encodable; replace them."""
    if not _SURROGATES.search(text):
        return text, 0
    return _SURROGATES.subn("\ufffd", text)


def _open_binary(source: Source) -> BinaryIO:
    if source.compression == "gzip":
        return gzip.open(source.path, "rb")
    if source.compression == "zstd":
        raw = open(source.path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(source.path, "rb")


def _iter_text(source: Source) -> Iterator[Document]:
    with _open_binary(source) as f:
        text, replaced = decode(f.read())
    yield Document(text, replaced)


def _json_text(obj, text_key: str, where: str) -> Document:
    if not isinstance(obj, dict) or text_key not in obj:
        raise ValueError(f"{where}: no field {text_key!r} (use --text-key to choose the text field)")
    value = obj[text_key]
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_key!r} is {type(value).__name__}, not a string")
    text, replaced = _fix_surrogates(value)
    return Document(text, replaced)


def _iter_jsonl(source: Source, text_key: str) -> Iterator[Document]:
    with _open_binary(source) as f:
        first = f.peek(64)[:64] if hasattr(f, "peek") else b""
        if first.lstrip().startswith(b"["):  # one top-level JSON array
            text, replaced = decode(f.read())
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source.path}: malformed JSON: {error}") from None
            except RecursionError:
                raise ValueError(f"{source.path}: JSON nested too deeply to read") from None
            for i, obj in enumerate(rows):
                doc = _json_text(obj, text_key, f"{source.path}[{i}]")
                yield Document(doc.text, doc.replaced + (replaced if i == 0 else 0))
            return
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            line, replaced = decode(raw)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{source.path}:{lineno}: malformed JSON line: {error}") from None
            except RecursionError:
                raise ValueError(f"{source.path}:{lineno}: JSON nested too deeply to read") from None
            doc = _json_text(obj, text_key, f"{source.path}:{lineno}")
            yield Document(doc.text, doc.replaced + replaced)


def _iter_parquet(source: Source, text_key: str) -> Iterator[Document]:
    # pyarrow (seconds): only for parquet inputs
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(source.path)
    if text_key not in pf.schema_arrow.names:
        raise ValueError(f"{source.path}: no column {text_key!r} (columns: {pf.schema_arrow.names}); "
                         f"use --text-key")
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            text, replaced = _fix_surrogates(value or "")
            yield Document(text, replaced)


def _iter_hf(source: Source, text_key: str) -> Iterator[Document]:
    # datasets (seconds): only for saved Hugging Face datasets
    import datasets

    loaded = datasets.load_from_disk(source.path)
    splits = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for ds in splits:
        if text_key not in ds.column_names:
            raise ValueError(f"{source.path}: no column {text_key!r} (columns: {ds.column_names}); "
                             f"use --text-key")
        for batch in ds.select_columns([text_key]).iter(batch_size=1024):
            for value in batch[text_key]:
                text, replaced = _fix_surrogates(value or "")
                yield Document(text, replaced)


def iter_source(source: Source, text_key: str = "text") -> Iterator[Document]:
    """Documents of one source, in file order. Read errors name the file."""
    try:
        if source.kind == "text":
            yield from _iter_text(source)
        elif source.kind == "jsonl":
            yield from _iter_jsonl(source, text_key)
        elif source.kind == "parquet":
            yield from _iter_parquet(source, text_key)
        elif source.kind == "hf":
            yield from _iter_hf(source, text_key)
        else:
            raise ValueError(f"unknown source kind {source.kind!r} for {source.path}")
    except (OSError, EOFError) as error:
        raise OSError(f"could not read {source.path}: {error}") from error
    except Exception as error:
        if type(error).__module__.startswith(("zstandard", "pyarrow")):
            raise OSError(f"could not read {source.path}: {error}") from error
        raise


def iter_documents(sources: list[Source], text_key: str = "text") -> Iterator[Document]:
    """All documents of all sources, in order."""
    for source in sources:
        for document in iter_source(source, text_key):
            document.source = source.path
            yield document
