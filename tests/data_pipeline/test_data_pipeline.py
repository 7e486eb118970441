"""data_pipeline: tokenizer, readers, prepare, shards, datasets, sampler, CLI (small and fast)."""
from __future__ import annotations

import gzip
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import cli
from data_pipeline.datasets import DistributedBatchSampler, TokenStream, blend_counts, build_datasets, cached_array
from data_pipeline.manifest import MANIFEST, Manifest
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.readers import decode, iter_documents, resolve_inputs
from data_pipeline.shards import ShardError, choose_dtype, verify_corpus
from data_pipeline.tokenizer import (
    EOS_ID,
    TokenizerInfo,
    load_sentencepiece,
    load_tokenizer,
    sample_sentences,
    train_tokenizer,
)
from odegpt.commands.cli import main as odegpt_main

STDLIB_FILES = 40
TRICKY = [
    "héllo wörld — ünïcödé 你好，世界 Привет مرحبا",
    "emoji 🤖🎉 and ZWJ 👨‍👩‍👧 family, flags 🇫🇷",
    "tabs\there\t\tand\t\t\tmore\t",
    "runs   of    spaces     here      ",
    "  leading spaces and trailing  ",
    "def f(x):\n    return {'a': [x ** 2, \"\\n\"]}  # comment\n\n\nclass A:\n\tpass\n",
    "literal specials </s> <s> <pad> <unk> <0x41> are plain text",
    "control \x00\x01\x7f and newline-only \n\n\n",
    "",
]


def _run_cli(*argv: str) -> int:
    """The `odegpt` command in-process: its exit code, its errors in one line on stderr."""
    return odegpt_main(list(argv))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and p.name.endswith((".bin", ".idx"))}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(["stdlib"], out, vocab_size=600, max_files=STDLIB_FILES, max_sentences=20000)
    return out


@pytest.fixture(scope="module")
def corpus(tok_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    prepare(PrepareConfig(["stdlib"], str(tok_dir), str(out), max_files=STDLIB_FILES, val_fraction=0.2,
                          shard_tokens=60_000, chunk_chars=20_000, progress=False))
    return out


# ---- tokenizer ---------------------------------------------------------------------------------
def test_tokenizer_dir_records_ids_and_hf_matches_sentencepiece(tok_dir):
    info = TokenizerInfo.load(tok_dir)
    assert (info.unk_id, info.bos_id, info.eos_id, info.pad_id) == (0, 1, 2, 3)
    assert info.vocab_size == 600
    sp, hf = load_sentencepiece(tok_dir), load_tokenizer(tok_dir)
    from transformers import PreTrainedTokenizerFast
    assert isinstance(hf, PreTrainedTokenizerFast)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert len(hf) == sp.get_piece_size() == 600
    texts = TRICKY + [d.text for d in iter_documents(resolve_inputs(["stdlib"], max_files=STDLIB_FILES))][::3]
    for text in texts:
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text[:60]
        assert sp.decode(ids) == text
        assert hf.decode(ids) == text
    assert 2 not in sp.encode("x </s> y")  # a literal "</s>" is text, never EOS


def test_unigram_tokenizer_round_trips(tmp_path):
    train_tokenizer(["stdlib"], tmp_path, vocab_size=500, model_type="unigram", max_files=15, max_sentences=5000)
    sp, hf = load_sentencepiece(tmp_path), load_tokenizer(tmp_path)
    assert TokenizerInfo.load(tmp_path).model_type == "unigram"
    for text in TRICKY:
        ids = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == sp.decode(ids) == text


def test_sentence_sample_is_bounded_and_seeded():
    docs = [f"line {i}\nother {i}\n\n" for i in range(5000)]
    a = sample_sentences(docs, max_sentences=100, seed=1)
    assert len(a) == 100 and a == sample_sentences(iter(docs), max_sentences=100, seed=1)
    assert a != sample_sentences(docs, max_sentences=100, seed=2)
    assert all(s.strip() for s in a)


# ---- readers and bad input ---------------------------------------------------------------------
def _write_formats(d: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = ["alpha document\nwith two lines", "beta\tdoc 🤖", "gamma", "delta ünï", "epsilon", "zeta",
             "eta", "theta", "iota", "kappa"]
    (d / "a.txt").write_text(texts[0])
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[1:3])) + "\n")
    (d / "c.json").write_text(json.dumps([{"text": texts[3]}]))
    with gzip.open(d / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": texts[4]}) + "\n")
    (d / "e.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps({"text": texts[5]}) + "\n").encode()))
    (d / "f.txt.gz").write_bytes(gzip.compress(texts[6].encode()))
    pq.write_table(pa.table({"text": texts[7:9]}), d / "g.parquet")
    import datasets
    datasets.Dataset.from_dict({"text": texts[9:]}).save_to_disk(str(d / "h_hf"))
    return texts


def test_every_input_format_round_trips_through_shards(tok_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = _write_formats(src)
    inputs = sorted(str(p) for p in src.iterdir())
    m = prepare(PrepareConfig(inputs, str(tok_dir), str(tmp_path / "out"), progress=False))
    assert m.totals["documents"] == len(texts) and m.dtype == "uint16"
    stream = TokenStream(tmp_path / "out")
    offsets = np.load(tmp_path / "out" / "train-00000.idx")
    sp = load_sentencepiece(tok_dir)
    decoded = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        ids = stream.read(int(a), int(b - a))
        assert ids[-1] == EOS_ID
        decoded.append(sp.decode(ids[:-1].tolist()))
    assert decoded == texts


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(FileNotFoundError, match=r"matched no files"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="x.csv"):
        resolve_inputs([str(tmp_path / "x.csv")])


def test_malformed_json_and_missing_field_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(iter_documents(resolve_inputs([str(tmp_path / "bad.jsonl")])))
    (tmp_path / "nokey.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nokey.jsonl:1.*'text'"):
        list(iter_documents(resolve_inputs([str(tmp_path / "nokey.jsonl")])))


def test_undecodable_bytes_are_replaced_and_empty_docs_skipped_and_counted(tok_dir, tmp_path):
    assert decode(b"ok \xff\xfe ok")[1] == 2
    assert decode("already \ufffd".encode())[1] == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "1.txt").write_bytes(b"latin-1 caf\xe9 and \xff")
    (src / "2.txt").write_bytes(b"")
    (src / "3.jsonl").write_text('{"text": ""}\n{"text": "   \\n"}\n{"text": "kept"}\n{"text": "lone \\ud800"}\n')
    m = prepare(PrepareConfig([str(src)], str(tok_dir), str(tmp_path / "out"), progress=False))
    assert m.skipped == {"empty_documents": 3, "undecodable_documents": 0, "undecodable_files": []}
    assert m.repaired == {"documents_with_undecodable_bytes": 2, "replaced_characters": 3}
    assert m.totals["documents"] == 3
    sp = load_sentencepiece(tok_dir)
    stream = TokenStream(tmp_path / "out")
    text = sp.decode([t for t in stream.read(0, len(stream)).tolist() if t != EOS_ID])
    assert "caf\ufffd and \ufffd" in text and "kept" in text and "lone \ufffd" in text


def test_vocabulary_too_large_for_dtype():
    assert choose_dtype(65536) == np.uint16 and choose_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="70000.*uint16"):
        choose_dtype(70000, "uint16")


# ---- prepare: determinism, resume, integrity ---------------------------------------------------
def test_shards_identical_for_any_worker_count(tok_dir, corpus, tmp_path):
    other = tmp_path / "w2"
    prepare(PrepareConfig(["stdlib"], str(tok_dir), str(other), max_files=STDLIB_FILES, val_fraction=0.2,
                          shard_tokens=60_000, chunk_chars=20_000, workers=2, progress=False))
    a, b = _files(corpus), _files(other)
    assert len([n for n in a if n.startswith("train")]) >= 6  # several shards, both splits
    assert a == b
    ma, mb = Manifest.load(corpus), Manifest.load(other)
    assert ma.shards == mb.shards and ma.totals["train_tokens"] == mb.totals["train_tokens"]
    assert ma.totals["val_documents"] > 0


def test_interrupted_prepare_resumes_reusing_finished_shards(tok_dir, corpus, tmp_path):
    out = tmp_path / "resumed"
    cfg = PrepareConfig(["stdlib"], str(tok_dir), str(out), max_files=STDLIB_FILES, val_fraction=0.2,
                        shard_tokens=60_000, chunk_chars=20_000, progress=False, stop_after_shards=2)
    with pytest.raises(InterruptedError):
        prepare(cfg)
    assert not (out / MANIFEST).exists()  # nothing looks finished
    (out / "train-00002.bin.tmp").write_bytes(b"half written")
    (out / "train-00005.bin").write_bytes(b"stray")  # a later shard without a completion record
    first = (out / "train-00000.bin").stat()
    cfg.stop_after_shards = None
    cfg.workers = 2
    prepare(cfg)
    assert (out / "train-00000.bin").stat().st_ino == first.st_ino  # reused, not rewritten
    assert (out / "train-00000.bin").stat().st_mtime_ns == first.st_mtime_ns
    assert _files(out) == _files(corpus)
    assert not list(out.glob("*.tmp"))
    # a complete corpus is returned as is; different settings into the same directory are refused
    assert prepare(cfg).shards == Manifest.load(corpus).shards
    cfg.val_fraction = 0.5
    with pytest.raises(ValueError, match="different inputs or settings"):
        prepare(cfg)


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("index_cache"))
    return dst


def test_truncated_or_corrupted_shard_is_an_error_naming_it(corpus, tmp_path, capsys):
    assert _run_cli("inspect", str(corpus)) == 0
    assert "verified" in capsys.readouterr().out
    bad = _copy(corpus, tmp_path / "trunc")
    path = bad / "train-00001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    assert _run_cli("inspect", str(bad)) == 1
    assert "train-00001.bin" in capsys.readouterr().err
    with pytest.raises(ShardError, match="train-00001.bin.*truncated"):
        build_datasets([str(bad)], None, 32, 0, 10)
    bad = _copy(corpus, tmp_path / "flip")
    path = bad / "val-00000.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="val-00000.bin.*checksum"):
        verify_corpus(bad)
    with pytest.raises(ShardError, match="val-00000.bin"):
        build_datasets([str(bad)], None, 32, 0, 10)
    assert _run_cli("inspect", str(bad)) == 1


def test_manifest_tokenizer_mismatch_names_both(corpus, tmp_path):
    other = tmp_path / "tok2"
    train_tokenizer(["stdlib"], other, vocab_size=400, max_files=10, max_sentences=3000)
    fp = Manifest.load(corpus).tokenizer["fingerprint"]
    with pytest.raises(ValueError, match=f"{corpus}.*{fp}.*{other}"):
        build_datasets([str(corpus)], None, 32, 0, 10, tokenizer_dir=str(other))


# ---- datasets ----------------------------------------------------------------------------------
def test_packed_samples_cover_each_epoch_once(corpus, tok_dir):
    seq = 64
    stream = TokenStream(corpus)
    per_epoch = stream.samples_per_epoch(seq)
    train, _ = build_datasets([str(corpus)], None, seq, seed=3, num_train_samples=2 * per_epoch + 7,
                              tokenizer_dir=str(tok_dir))
    assert len(train) == 2 * per_epoch + 7
    ids = [train.locate(i)[1] for i in range(len(train))]
    assert sorted(ids[:per_epoch]) == list(range(per_epoch))
    assert sorted(ids[per_epoch:2 * per_epoch]) == list(range(per_epoch))
    assert ids[:per_epoch] != ids[per_epoch:2 * per_epoch]  # reshuffled each epoch
    assert ids[:per_epoch] != list(range(per_epoch))
    for i in (0, 1, len(train) - 1):
        x = train[i]
        assert x.dtype == np.int64 and x.shape == (seq + 1,)
        assert np.array_equal(x, stream.read(ids[i] * seq, seq + 1))
    again, _ = build_datasets([str(corpus)], None, seq, seed=3, num_train_samples=2 * per_epoch + 7)
    assert all(np.array_equal(again[i], train[i]) for i in range(0, len(train), 13))
    other, _ = build_datasets([str(corpus)], None, seq, seed=4, num_train_samples=2 * per_epoch + 7)
    assert [other.locate(i)[1] for i in range(50)] != ids[:50]


def test_validation_split(corpus, tmp_path, tok_dir):
    _, valid = build_datasets([str(corpus)], None, 64, seed=0, num_train_samples=10)
    val = TokenStream(corpus, "val")
    assert len(valid) == val.samples_per_epoch(64) > 0
    assert np.array_equal(valid[1], val.read(64, 65))
    _, valid = build_datasets([str(corpus)], None, 64, seed=0, num_train_samples=10, num_valid_samples=5)
    assert len(valid) == 5
    no_val = tmp_path / "noval"
    prepare(PrepareConfig(["stdlib"], str(tok_dir), str(no_val), max_files=5, progress=False))
    with pytest.raises(ValueError, match="noval.*--val-fraction"):
        build_datasets([str(no_val)], None, 64, seed=0, num_train_samples=10)
    _, empty = build_datasets([str(no_val)], None, 64, seed=0, num_train_samples=10, num_valid_samples=0)
    assert len(empty) == 0


def test_blending_has_exact_proportions(corpus, tok_dir, tmp_path):
    second = tmp_path / "second"
    prepare(PrepareConfig(["stdlib"], str(tok_dir), str(second), max_files=8, progress=False))
    weights = [0.7, 0.3]
    n = 5000
    train, _ = build_datasets([str(corpus), str(second)], weights, 32, seed=1, num_train_samples=n,
                              num_valid_samples=0)
    corpus_of = np.array([train.locate(i)[0] for i in range(n)])
    assert (corpus_of == 1).sum() == 1500
    prefix = np.cumsum(corpus_of == 1)
    assert np.abs(prefix - 0.3 * np.arange(1, n + 1)).max() <= 1.0  # every prefix holds its share
    assert np.array_equal(blend_counts(np.array([1 / 3, 1 / 3, 1 / 3]), 100), [34, 33, 33])
    only_first, _ = build_datasets([str(corpus), str(second)], [1, 0], 32, seed=1, num_train_samples=50,
                                   num_valid_samples=0)
    assert {only_first.locate(i)[0] for i in range(50)} == {0}
    s2 = TokenStream(second)
    i = int(np.flatnonzero(corpus_of == 1)[0])
    assert np.array_equal(train[i], s2.read(train.locate(i)[1] * 32, 33))


def _all_batches(total, consumed, mb, dp):
    return [list(DistributedBatchSampler(total, consumed, mb, r, dp)) for r in range(dp)]


def test_rank_sharding_has_no_overlap_or_gaps():
    total, mb, dp = 1003, 4, 3
    per_rank = _all_batches(total, 0, mb, dp)
    assert all(len(b) == len(per_rank[0]) == total // (mb * dp) for b in per_rank)
    seen = [i for step in zip(*per_rank) for batch in step for i in batch]
    assert seen == list(range(len(seen))) and len(seen) == total - total % (mb * dp)


def test_resume_from_consumed_samples_is_exact(corpus):
    train, _ = build_datasets([str(corpus)], None, 32, seed=7, num_train_samples=600, num_valid_samples=0)
    mb, dp = 2, 2

    def stream(consumed):
        return [train[i].tolist() for step in zip(*_all_batches(len(train), consumed, mb, dp))
                for batch in step for i in batch]

    full = stream(0)
    consumed = 10 * mb * dp  # checkpoint after 10 global steps
    fresh, _ = build_datasets([str(corpus)], None, 32, seed=7, num_train_samples=600, num_valid_samples=0)
    train = fresh
    assert stream(consumed) == full[consumed:]


def _build_logged(args):
    path, log = args

    def build(tmp):
        with open(log, "a") as f:
            f.write("built\n")
        np.save(tmp, np.arange(1000))

    return int(np.asarray(cached_array(Path(path), build)).sum())


def test_index_cache_built_once_under_lock(tmp_path):
    path, log = tmp_path / "cache" / "idx.npy", tmp_path / "log"
    with mp.get_context("spawn").Pool(3) as pool:
        sums = pool.map(_build_logged, [(str(path), str(log))] * 6)
    assert sums == [sum(range(1000))] * 6
    assert log.read_text() == "built\n"
    arr = cached_array(path, lambda tmp: pytest.fail("rebuilt"))
    assert isinstance(arr, np.memmap)
    assert not list(path.parent.glob("*.tmp*"))


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_end_to_end_on_stdlib(tmp_path, capsys):
    tok, out = tmp_path / "tok", tmp_path / "data"
    assert _run_cli("tokenizer", "--input", "stdlib", "--max-files", "10", "--vocab-size", "400",
                    "--output", str(tok)) == 0
    assert _run_cli("prepare", "--input", "stdlib", "--max-files", "10", "--tokenizer", str(tok),
                    "--output", str(out), "--workers", "2", "--val-fraction", "0.1", "--no-progress") == 0
    assert _run_cli("inspect", str(out)) == 0
    printed = capsys.readouterr().out
    assert "vocab 400" in printed and "prepared" in printed and "verified" in printed
    assert _run_cli("prepare", "--input", str(tmp_path / "missing*.txt"), "--tokenizer", str(tok),
                    "--output", str(tmp_path / "x")) == 1
    assert "missing*.txt" in capsys.readouterr().err
    assert _run_cli("inspect", str(tmp_path / "nothing")) == 1


# ---- array jobs: parts prepared by separate tasks, merged into one corpus -----------------------------------

def _documents(corpus_dir: Path, split: str) -> list[list[int]]:
    """Every document of a split, in corpus order, as token lists (read through the shards' offsets)."""
    manifest = Manifest.load(corpus_dir)
    documents = []
    for shard in manifest.shards:
        if split not in shard.splits:
            continue
        name = f"{split}-{shard.index:05d}"
        tokens = np.fromfile(shard.folder(corpus_dir) / f"{name}.bin", dtype=manifest.dtype)
        offsets = np.load(shard.folder(corpus_dir) / f"{name}.idx")
        documents += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return documents


def _array_job(tok_dir: Path, output: Path, num_tasks: int, workers: list[int]) -> Manifest:
    for index in range(num_tasks):
        prepare(PrepareConfig(["stdlib"], str(tok_dir), str(output), max_files=STDLIB_FILES, val_fraction=0.2,
                              shard_tokens=60_000, chunk_chars=20_000, progress=False, num_tasks=num_tasks,
                              task_index=index, workers=workers[index % len(workers)]))
    assert _run_cli("prepare", "--merge", "--output", str(output)) == 0
    return Manifest.load(output)


@pytest.mark.parametrize("num_tasks, workers", [(1, [2]), (2, [1, 2]), (3, [2, 1])])
def test_an_array_job_merges_into_the_one_node_corpus(tok_dir, corpus, tmp_path, num_tasks, workers):
    merged = _array_job(tok_dir, tmp_path / "merged", num_tasks, workers)
    one_node = Manifest.load(corpus)
    for split in ("train", "val"):
        assert _documents(tmp_path / "merged", split) == _documents(corpus, split), split  # same docs, order, split
        assert merged.totals[f"{split}_tokens"] == one_node.totals[f"{split}_tokens"]
        assert merged.totals[f"{split}_documents"] == one_node.totals[f"{split}_documents"]
    assert merged.totals["documents"] == one_node.totals["documents"] and merged.inputs["parts"] == num_tasks
    assert {s.directory for s in merged.shards} == {f"part-{i:05d}-of-{num_tasks:05d}" for i in range(num_tasks)}
    verify_corpus(tmp_path / "merged")
    # It trains like any other corpus: the one-node token streams (the shuffle is seeded by the corpus's own key,
    # so its order differs), and the same samples again when the datasets are rebuilt, as on a resume.
    for split in ("train", "val"):
        merged_stream, stream = TokenStream(tmp_path / "merged", split), TokenStream(corpus, split)
        assert np.array_equal(merged_stream.read(0, len(merged_stream)), stream.read(0, len(stream)))
    built = [build_datasets([str(tmp_path / "merged")], None, 64, seed=0, num_train_samples=50, num_valid_samples=8,
                            tokenizer_dir=str(tok_dir)) for _ in range(2)]
    assert all(np.array_equal(built[0][0][i], built[1][0][i]) for i in range(50))


def test_array_job_parts_that_do_not_fit_are_refused_in_one_line(tok_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from data_pipeline.prepare import merge_parts

    job = tmp_path / "job"
    for index in (0, 2):
        prepare(PrepareConfig(["stdlib"], str(tok_dir), str(job), max_files=STDLIB_FILES, val_fraction=0.2,
                              progress=False, num_tasks=3, task_index=index))
    with pytest.raises(ValueError, match=r"part-00001-of-00003 is missing: task 1 of 3 has not run"):
        merge_parts(job)
    (job / "part-00001-of-00003").mkdir()
    with pytest.raises(ValueError, match=r"part-00001-of-00003 is unfinished \(no manifest.json\): rerun task 1"):
        merge_parts(job)
    shutil.rmtree(job / "part-00001-of-00003")
    prepare(PrepareConfig(["stdlib"], str(tok_dir), str(tmp_path / "other"), max_files=STDLIB_FILES,
                          val_fraction=0.5, progress=False, num_tasks=3, task_index=1))  # other settings
    shutil.copytree(tmp_path / "other" / "part-00001-of-00003", job / "part-00001-of-00003")
    with pytest.raises(ValueError, match="part-00001-of-00003 was prepared from other inputs or settings"):
        merge_parts(job)
    shutil.rmtree(job / "part-00001-of-00003")
    shutil.copytree(job / "part-00002-of-00003", job / "part-00001-of-00003")  # a duplicated task
    with pytest.raises(ValueError, match="holds task 2 of 3, not what its name says"):
        merge_parts(job)
    (job / "part-00000-of-00002").mkdir()
    with pytest.raises(ValueError, match="holds parts of array jobs of 2 and 3 tasks: one job's parts only"):
        merge_parts(job)
    assert not (job / MANIFEST).exists()
    capsys.readouterr()
    assert _run_cli("prepare", "--merge", "--output", str(job)) == 2  # bad input: 2, as every command
    assert capsys.readouterr().err.count("\n") == 1


def test_array_task_defaults_come_from_slurm():
    assert cli.array_task(None, None, {}) == (None, 0)
    slurm = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert cli.array_task(None, None, slurm) == (4, 2)
    assert cli.array_task(3, 1, slurm) == (3, 1)


@pytest.mark.parametrize("flags, message", [
    (["--max-files", "-1"], "--max-files must be >= 1"), (["--max-files", "0"], "--max-files must be >= 1"),
    (["--shard-tokens", "0"], "--shard-tokens must be >= 1"), (["--shard-tokens", "-1"], "--shard-tokens must be >= 1"),
    (["--seed", "99999999999999999999"], "--seed must be an integer in [0, 2**63)"),
])
def test_prepare_refuses_values_it_used_to_accept(tok_dir, tmp_path, capsys, flags, message):
    """--max-files -1 silently dropped the last file; --shard-tokens 0 and a seed past 64 bits were taken."""
    assert _run_cli("prepare", "--input", "stdlib", "--tokenizer", str(tok_dir), "--output", str(tmp_path / "c"),
                    "--no-progress", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c" / MANIFEST).exists()


def test_two_trainings_on_the_same_inputs_write_the_same_tokenizer(tmp_path):
    """The model once recorded the temporary path it was trained under, so the fingerprints differed and a
    corpus prepared with one tokenizer was refused with the other."""
    first = train_tokenizer(["stdlib"], tmp_path / "a", vocab_size=400, max_files=10, max_sentences=3000)
    second = train_tokenizer(["stdlib"], tmp_path / "nested" / "b", vocab_size=400, max_files=10, max_sentences=3000,
                             num_threads=1)
    assert ((tmp_path / "a" / "tokenizer.model").read_bytes()
            == (tmp_path / "nested" / "b" / "tokenizer.model").read_bytes())
    assert first.fingerprint == second.fingerprint
    assert load_sentencepiece(tmp_path / "a").encode("def f(x):\n\treturn x") == \
        load_sentencepiece(tmp_path / "nested" / "b").encode("def f(x):\n\treturn x")


def test_a_second_writer_of_a_corpus_is_refused_naming_the_holder_and_the_lock_goes_with_it(tok_dir, tmp_path):
    """Two prepares into one output used to race (a .tmp rename failed, a stray .tmp stayed)."""
    import subprocess
    import sys

    from data_pipeline.writer_lock import FolderInUseError

    out = tmp_path / "corpus"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom data_pipeline.writer_lock import hold_writer_lock\n"
                               "hold_writer_lock(sys.argv[1], 'corpus')\nprint('held', flush=True)\ntime.sleep(120)",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = PrepareConfig(["stdlib"], str(tok_dir), str(out), max_files=5, progress=False)
        with pytest.raises(FolderInUseError, match=rf"corpus {out} is being written by another process "
                                                   rf"\(host .*, pid {holder.pid}, command "):
            prepare(config)
        assert not list(out.glob("*.bin")) and not (out / MANIFEST).exists()
    finally:
        holder.kill()
        holder.wait()
    assert prepare(config).totals["documents"] > 0  # a killed holder leaves no stale lock
