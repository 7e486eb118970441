"""Benchmark of the data pipeline, in one run (a few minutes on 2 cores).

Measures, on the running interpreter's standard-library corpus (``--input stdlib``):

1. `prepare` throughput (input MB/s, tokens/s) at 1 and 2 workers, against a baseline of
   ``datasets.Dataset.map`` with the Hugging Face fast tokenizer built from the same
   SentencePiece model at the same ``num_proc`` (each worker one core: the Rust tokenizer's
   own thread pool is disabled, as `prepare` workers use one thread each);
2. peak RSS (main process + workers) while preparing the stdlib corpus and an input 20x larger;
3. time to build the sample index of a synthetic 10^9-token corpus (sparse shards), single
   corpus and a two-corpus blend, plus the time to checksum it and random-access sample reads.

    .venv/bin/python benchmarks/bench_data_pipeline.py [--workdir DIR] [--vocab-size 16000]
"""
from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

PREPARE_SNIPPET = """
import sys, json
from data_pipeline.prepare import PrepareConfig, prepare
m = prepare(PrepareConfig(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], workers=int(sys.argv[4]), progress=False))
print(json.dumps({"seconds": m.totals["seconds"], "tokens": m.totals["train_tokens"], "bytes": m.inputs["bytes"],
                  "documents": m.totals["documents"]}))
"""


def run_with_peak_rss(cmd: list[str]) -> tuple[str, float, float]:
    """Run `cmd`; return (stdout, wall seconds, peak RSS in MB of the process tree, sampled)."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
                peak = max(peak, rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed with {proc.returncode}")
    return out, time.time() - start, peak


def prepare_run(inputs: list[str], tok: Path, out: Path, workers: int) -> dict:
    stdout, wall, peak = run_with_peak_rss(
        [sys.executable, "-c", PREPARE_SNIPPET, json.dumps(inputs), str(tok), str(out), str(workers)])
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(wall=wall, peak_rss_mb=peak)
    return result


def baseline_datasets_map(tok: Path, workers: int, texts: list[str]) -> dict:
    """Tokenize the same documents with datasets.map + the HF fast tokenizer (EOS appended)."""
    import datasets

    from data_pipeline.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    hf = load_tokenizer(tok)
    eos = hf.eos_token_id

    def encode(batch):
        return {"ids": [ids + [eos] for ids in hf(batch["text"], add_special_tokens=False)["input_ids"]]}

    with tempfile.TemporaryDirectory() as cache:
        start = time.time()
        ds = datasets.Dataset.from_dict({"text": texts})
        ds = ds.map(encode, batched=True, batch_size=256, num_proc=workers if workers > 1 else None,
                    remove_columns=["text"], cache_file_name=os.path.join(cache, "map.arrow"))
        seconds = time.time() - start
        tokens = sum(len(x) for x in ds.data.column("ids").to_pylist()) if len(ds) < 10**6 else -1
    return {"seconds": seconds, "tokens": tokens}


def synthetic_corpus(directory: Path, num_tokens: int, shards: int, tag: str) -> None:
    """A prepared-corpus directory of `num_tokens` zero tokens in sparse files (no disk use)."""
    from data_pipeline.manifest import FORMAT_VERSION, Manifest, ShardFile, ShardRecord
    from data_pipeline.shards import file_checksum

    directory.mkdir(parents=True, exist_ok=True)
    per = num_tokens // shards
    records = []
    checksum = None
    for i in range(shards):
        tokens = per if i < shards - 1 else num_tokens - per * (shards - 1)
        path = directory / f"train-{i:05d}.bin"
        with open(path, "wb") as f:
            f.truncate(tokens * 2)
        offsets = np.arange(0, tokens + 1, 1 << 20, dtype=np.int64)
        if offsets[-1] != tokens:
            offsets = np.append(offsets, tokens)
        with open(directory / f"train-{i:05d}.idx", "wb") as f:
            np.save(f, offsets)
        if checksum is None or tokens != per:
            checksum = file_checksum(path)
        records.append(ShardRecord(i, i, i + 1, {"train": ShardFile(tokens, len(offsets) - 1, checksum,
                                                                    file_checksum(directory / f"train-{i:05d}.idx"))}))
    Manifest(FORMAT_VERSION, f"synthetic-{tag}", {"fingerprint": "synthetic", "vocab_size": 32000, "eos_id": 2},
             "uint16", records, totals={"documents": 0}).save(directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--scale", type=int, default=20, help="size of the large input, in stdlib corpora")
    args = parser.parse_args()

    from data_pipeline.readers import iter_documents, resolve_inputs
    from data_pipeline.tokenizer import train_tokenizer

    tmp = tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, workdir {work}")

    # -- tokenizer -----------------------------------------------------------------------------
    tok = work / "tok"
    start = time.time()
    info = train_tokenizer(["stdlib"], tok, vocab_size=args.vocab_size, max_sentences=300_000)
    print(f"\n[tokenizer] bpe vocab {info.vocab_size} on {info.sampled_sentences} sampled stdlib lines: "
          f"{time.time() - start:.1f}s")

    # -- prepare vs datasets.map ---------------------------------------------------------------
    texts = [d.text for d in iter_documents(resolve_inputs(["stdlib"])) if d.text.strip()]
    mb = sum(s.size() for s in resolve_inputs(["stdlib"])) / 1e6
    print(f"\n[prepare] stdlib corpus: {len(texts)} documents, {mb:.1f} MB")
    print(f"{'workers':>7} | {'prepare s':>9} | {'MB/s':>6} | {'Mtok/s':>6} | {'peak RSS':>8} | "
          f"{'datasets.map s':>14} | {'Mtok/s':>6} | {'speedup':>7}")
    for workers in (1, 2):
        ours = prepare_run(["stdlib"], tok, work / f"stdlib-w{workers}", workers)
        base = baseline_datasets_map(tok, workers, texts)
        assert base["tokens"] == ours["tokens"], (base["tokens"], ours["tokens"])
        print(f"{workers:>7} | {ours['seconds']:>9.2f} | {ours['bytes'] / 1e6 / ours['seconds']:>6.2f} | "
              f"{ours['tokens'] / 1e6 / ours['seconds']:>6.2f} | {ours['peak_rss_mb']:>6.0f}MB | "
              f"{base['seconds']:>14.2f} | {base['tokens'] / 1e6 / base['seconds']:>6.2f} | "
              f"{base['seconds'] / ours['seconds']:>6.2f}x")
    same = all((work / "stdlib-w1" / f.name).read_bytes() == f.read_bytes()
               for f in sorted((work / "stdlib-w2").glob("*.bin")))
    print(f"shards byte-identical at 1 and 2 workers: {same}; token counts equal to the baseline's: True")
    del texts

    # -- memory on a 20x input -----------------------------------------------------------------
    big = prepare_run(["stdlib"] * args.scale, tok, work / "big", 2)
    print(f"\n[memory] {args.scale}x stdlib ({big['bytes'] / 1e6:.0f} MB, {big['tokens'] / 1e6:.0f}M tokens), "
          f"2 workers: peak RSS {big['peak_rss_mb']:.0f} MB (1x: see table), "
          f"{big['bytes'] / 1e6 / big['seconds']:.2f} MB/s, {big['tokens'] / 1e6 / big['seconds']:.2f} Mtok/s")
    import shutil
    shutil.rmtree(work / "big")

    # -- sample index of 10^9 tokens -----------------------------------------------------------
    from data_pipeline.datasets import build_datasets
    from data_pipeline.shards import verify_corpus

    n_tokens = 10**9
    a, b = work / "synthA", work / "synthB"
    synthetic_corpus(a, n_tokens, 8, "a")
    synthetic_corpus(b, n_tokens, 8, "b")
    print(f"\n[index] synthetic corpus of {n_tokens:.0e} uint16 tokens in 8 shards")
    for seq_len, epochs in ((2048, 1), (2048, 3), (512, 1)):
        samples = (n_tokens - 1) // seq_len * epochs
        start = time.time()
        train, _ = build_datasets([str(a)], None, seq_len, seed=0, num_train_samples=samples,
                                  num_valid_samples=0, verify_checksums=False)
        built = time.time() - start
        start = time.time()
        build_datasets([str(a)], None, seq_len, seed=0, num_train_samples=samples, num_valid_samples=0,
                       verify_checksums=False)
        cached = time.time() - start
        print(f"  seq_len {seq_len}, {epochs} epoch(s), {samples} samples: build {built:.2f}s, "
              f"load cached {cached * 1000:.1f}ms")
    samples = 10**6
    start = time.time()
    train, _ = build_datasets([str(a), str(b)], [0.7, 0.3], 2048, seed=0, num_train_samples=samples,
                              num_valid_samples=0, verify_checksums=False)
    print(f"  blend of two 1e9-token corpora (0.7/0.3), {samples} samples of 2048: build {time.time() - start:.2f}s")
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(train), 20000)
    start = time.time()
    for i in idx:
        train[int(i)]
    print(f"  random sample reads: {len(idx) / (time.time() - start):.0f} samples/s (1 process)")
    start = time.time()
    verify_corpus(a)
    print(f"  checksum verification of the 2 GB corpus (once per node): {time.time() - start:.2f}s")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
