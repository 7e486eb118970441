"""`odegpt tokenizer`, `odegpt prepare` and `odegpt inspect`.

Registered through the ``odegpt.commands`` entry points. This module imports nothing heavy at
module level (handlers import what they need) so that `odegpt --help` stays fast. Bad input is a
ValueError from the library, printed by ``odegpt``'s main in one line with exit code 2; ``inspect``
exits 1 when it finds a corpus damaged.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

_INPUT_HELP = ("input files, directories or globs (quote globs): .txt/.md/.py (a file is a document), "
               ".jsonl/.json (field --text-key), .parquet, .gz/.zst compressed text or json, a "
               "Hugging Face dataset saved with save_to_disk, or 'stdlib' for this Python's "
               "standard-library sources")


def _si(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M': tqdm's own SI formatting, as its progress bars print it."""
    # tqdm (15 ms): not for odegpt --help
    from tqdm import tqdm

    return tqdm.format_sizeof(n, unit)


# ---- tokenizer ---------------------------------------------------------------------------------
def register_tokenizer(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenizer", help="train a SentencePiece tokenizer (with a Hugging Face twin)",
        description="Train a SentencePiece BPE/unigram tokenizer with byte fallback and fixed special "
                    "ids (unk=0 bos=1 eos=2 pad=3) on a bounded, seeded sample of lines from the "
                    "inputs. OUTPUT gets tokenizer.model, Hugging Face tokenizer files (so "
                    "AutoTokenizer.from_pretrained(OUTPUT) works) and odegpt_tokenizer.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB", help=_INPUT_HELP)
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (including 256 byte tokens)")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece algorithm")
    p.add_argument("--output", required=True, metavar="DIR", help="tokenizer directory to write")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="lines sampled from the inputs (bounds memory on large corpora)")
    p.add_argument("--text-key", default="text", help="text field of json/parquet/dataset inputs")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N input files")
    p.add_argument("--seed", type=int, default=0, help="seed of the line sample")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_tokenizer)


def run_tokenizer(args) -> int:
    # sentencepiece and the tokenizer libraries: not for odegpt --help
    from .tokenizer import train_tokenizer

    start = time.time()
    try:
        info = train_tokenizer(args.input, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
                               max_sentences=args.max_sentences, seed=args.seed, text_key=args.text_key,
                               max_files=args.max_files, progress=not args.no_progress and sys.stderr.isatty())
    except RuntimeError as error:  # SentencePiece refuses its settings (too large a vocabulary for the text, ...)
        raise ValueError(str(error).strip().splitlines()[-1]) from None
    print(f"tokenizer  {args.output}")
    print(f"  model      {info.model_type}, vocab {info.vocab_size}, byte fallback")
    print(f"  special    unk={info.unk_id} bos={info.bos_id} eos={info.eos_id} pad={info.pad_id}")
    print(f"  trained on {info.sampled_sentences} sampled lines in {time.time() - start:.1f}s")
    print(f"  fingerprint {info.fingerprint}")
    if info.vocab_size != args.vocab_size:
        print(f"  note: the inputs only supported {info.vocab_size} of the {args.vocab_size} requested pieces")
    return 0


# ---- prepare -----------------------------------------------------------------------------------
def register_prepare(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenize a corpus into memory-mappable shards",
        description="Tokenize inputs in parallel worker processes into .bin/.idx token shards plus "
                    "OUTPUT/manifest.json. Streaming (flat memory), resumable (rerun after an "
                    "interruption to continue) and deterministic (same bytes for any --workers).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="PATH_OR_GLOB", help=_INPUT_HELP + " (required but with --merge)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer folder: one written by `odegpt tokenizer`, or any Hugging Face fast tokenizer "
                        "(tokenizer.json, e.g. a model folder from `odegpt import`); required but with --merge")
    p.add_argument("--output", required=True, metavar="DIR", help="prepared corpus directory")
    p.add_argument("--num-tasks", type=int, default=None,
                   help="array job: cut the inputs into this many slices (at about equal bytes), one per task "
                        "(default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--task-index", type=int, default=None,
                   help="array job: the slice this task prepares, into OUTPUT/part-I-of-N (default: "
                        "$SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else 0)")
    p.add_argument("--merge", action="store_true",
                   help="after every task of an array job: check the parts under OUTPUT and write OUTPUT/manifest.json "
                        "over them (no shard is copied); the corpus then trains like any other")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--text-key", default="text", help="text field of json/parquet/dataset inputs")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of documents (seeded hash) written to the validation split")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="training tokens per shard")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto",
                   help="token dtype (auto: uint16 if the vocabulary fits)")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N input files")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/validation assignment")
    p.add_argument("--max-undecodable-fraction", type=float, default=0.1,
                   help="skip (count, name in the manifest, and warn about) a document with more undecodable "
                        "bytes per character than this: a binary file; fewer are replaced by U+FFFD")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def array_task(num_tasks: int | None, task_index: int | None, environ=os.environ) -> tuple[int | None, int]:
    """(number of tasks, this task's index): the flags, else Slurm's array variables, else (None, 0): no array."""
    if num_tasks is None and "SLURM_ARRAY_TASK_COUNT" in environ:
        num_tasks = int(environ["SLURM_ARRAY_TASK_COUNT"])
    if task_index is not None and num_tasks is None:
        raise ValueError("--task-index needs --num-tasks (or a Slurm array job)")
    if task_index is None:
        task_index = int(environ.get("SLURM_ARRAY_TASK_ID", 0)) - int(environ.get("SLURM_ARRAY_TASK_MIN", 0)) \
            if "SLURM_ARRAY_TASK_COUNT" in environ else 0
    return num_tasks, task_index


def run_prepare(args) -> int:
    # numpy and the readers: not for odegpt --help
    from .prepare import PrepareConfig, merge_parts, prepare

    if args.merge:
        m = merge_parts(args.output)
    else:
        if not args.input or not args.tokenizer:
            raise ValueError("--input and --tokenizer are required (all but --merge need them)")
        num_tasks, task_index = array_task(args.num_tasks, args.task_index)
        m = prepare(PrepareConfig(inputs=args.input, tokenizer=args.tokenizer, output=args.output,
                                  workers=args.workers, text_key=args.text_key, val_fraction=args.val_fraction,
                                  shard_tokens=args.shard_tokens, dtype=args.dtype, max_files=args.max_files,
                                  seed=args.seed, max_undecodable_fraction=args.max_undecodable_fraction,
                                  progress=not args.no_progress, num_tasks=num_tasks, task_index=task_index))
    if args.merge:
        t = m.totals
        print(f"merged     {args.output}: {m.inputs['parts']} parts, {t['shards']} shards, {t['documents']} documents, "
              f"{t.get('train_tokens', 0)} train and {t.get('val_tokens', 0)} val tokens")
        return 0
    t = m.totals
    seconds = max(t.get("seconds", 0.0), 1e-9)
    tokens = t.get("train_tokens", 0) + t.get("val_tokens", 0)
    task = m.inputs.get("task")
    print(f"prepared   {args.output}" + ("" if task is None else f" part {task['index']} of {task['num_tasks']} "
                                          f"(inputs {task['first_source']}..{task['end_source'] - 1} of "
                                          f"{task['num_sources']})"))
    print(f"  documents  {t['documents']} ({t.get('train_documents', 0)} train, {t.get('val_documents', 0)} val)")
    print(f"  tokens     {tokens} ({t.get('train_tokens', 0)} train, {t.get('val_tokens', 0)} val), {m.dtype}")
    print(f"  shards     {t['shards']}")
    print(f"  skipped    {m.skipped['empty_documents']} empty documents, "
          f"{m.skipped.get('undecodable_documents', 0)} not text (binary); repaired "
          f"{m.repaired['documents_with_undecodable_bytes']} documents "
          f"({m.repaired['replaced_characters']} undecodable bytes replaced)")
    print(f"  speed      {_si(m.inputs['bytes'] / seconds, 'B/s')}, {_si(tokens / seconds)} tokens/s "
          f"({seconds:.1f}s, {args.workers} workers)")
    return 0


# ---- inspect -----------------------------------------------------------------------------------
def register_inspect(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="summarise a prepared corpus and verify its shards",
        description="Print a prepared corpus's documents, tokens, shards and tokenizer, then verify "
                    "every shard's size, offsets and checksum against the manifest. Exits 1 on any "
                    "mismatch, naming the shard.")
    p.add_argument("directory", metavar="DIR", help="prepared corpus directory")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification (sizes still checked)")
    p.set_defaults(func=run_inspect)


def _check_tokenizer_record(m) -> None:
    """The manifest's tokenizer fields (vocab size, special ids, fingerprint) against the tokenizer directory
    it names, when that is here: an edited manifest would make training build a model of the wrong size."""
    # sentencepiece and the tokenizer libraries: not for odegpt --help
    from .tokenizer import TokenizerInfo, tokenizer_fingerprint

    directory = Path(m.tokenizer.get("path") or "")
    if not directory.is_dir():
        return
    info = TokenizerInfo.load(directory)
    actual = {"kind": info.kind, "vocab_size": info.vocab_size, **info.special_ids(),
              "fingerprint": tokenizer_fingerprint(directory)}
    differing = [f"{key} {m.tokenizer.get(key)!r} (tokenizer: {value!r})" for key, value in actual.items()
                 if key in m.tokenizer and m.tokenizer[key] != value]
    if differing:
        raise ValueError(f"manifest.json does not match its tokenizer {directory}: {', '.join(differing)}; the "
                         f"manifest was edited or the tokenizer replaced; re-run `odegpt prepare`")


def run_inspect(args) -> int:
    # numpy (the shards): not for odegpt --help
    from .manifest import Manifest
    from .shards import ShardError, verify_corpus

    try:
        m = Manifest.load(args.directory)
    except (OSError, ValueError) as error:  # inspect reports a corpus it cannot read as a finding: exit 1
        print(f"odegpt inspect: {error}", file=sys.stderr)
        return 1
    tok = m.tokenizer
    print(f"corpus     {args.directory} (format {m.format_version})")
    print(f"  inputs     {' '.join(m.inputs.get('patterns', []))} ({m.inputs.get('files')} files, "
          f"{_si(m.inputs.get('bytes', 0), 'B')})")
    print(f"  tokenizer  {tok.get('path')} ({tok.get('kind', 'odegpt')} {tok.get('model_type')}, "
          f"vocab {tok['vocab_size']}, eos {tok['eos_id']}, fingerprint {tok['fingerprint']})")
    print(f"  documents  {m.totals.get('documents')} (train {m.split_documents('train')}, "
          f"val {m.split_documents('val')})")
    print(f"  tokens     train {m.split_tokens('train')}, val {m.split_tokens('val')} ({m.dtype})")
    print(f"  shards     {len(m.shards)}")
    print(f"  skipped    {m.skipped}")
    print(f"  repaired   {m.repaired}")
    try:
        _check_tokenizer_record(m)
        verify_corpus(args.directory, m, checksum=not args.no_verify)
    except (ShardError, ValueError, OSError) as error:  # a finding, not a usage error: exit 1, as fsck reports damage
        print(f"odegpt inspect: {error}", file=sys.stderr)
        return 1
    files = sum(len(s.splits) for s in m.shards)
    print(f"  tokenizer  matches {tok.get('path')}" if Path(tok.get("path") or "").is_dir() else
          f"  tokenizer  {tok.get('path')} is not here: vocabulary and special ids not checked")
    print(f"  verified   {files} shard files: sizes, offsets{'' if args.no_verify else ', checksums and token ids'} OK")
    return 0
