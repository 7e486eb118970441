"""The quickstart twice, small: every artifact and metric the same (same input, same result).

Two runs of ``python -m launcher.quickstart`` into two folders, on the first 200 standard-library files and a few
training steps on 2 CPU ranks, must write the same tokenizer, shards, losses, validation perplexities, converted
weights, evaluation and sample; only what records a path or a time may differ."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.launcher.test_train import PYTHON, TIMEOUT, _env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# What a record may carry that depends on the machine's speed or the run's folder, not on its inputs.
TIMINGS = {"seconds", "tokens_per_s", "mfu", "peak_memory_gib", "peak_memory_gib_per_rank", "peak_memory_gib_before",
           "peak_memory_gib_after", "samples_per_s", "path", "elapsed", "training_seconds"}


def _quickstart(output: Path) -> str:
    result = subprocess.run(
        [PYTHON, "-m", "launcher.quickstart", "--output-dir", str(output), "--max-files", "200",
         "--set", "train.train_steps=6", "--set", "train.warmup_steps=1", "--set", "eval.interval=3",
         "--set", "checkpoint.interval=3", "--set", "eval.num_samples=8"],
        cwd=REPO, env={**_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=3 * TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob(pattern)) if p.is_file()}


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def _summary(stdout: str, output: Path) -> list[str]:
    """The quickstart's printed results: perplexities, the sample and the summary, without timings or its folder."""
    keep = stdout[stdout.index("perplexity"):].replace(str(output), "OUTPUT")
    return [line for line in keep.splitlines() if not line.startswith(("$ ", "===", "odegpt launch:", "wrote "))
            and "done in" not in line and "(t+" not in line and "tokens/s" not in line]


def test_two_quickstarts_write_the_same_artifacts_and_metrics(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    printed = [_quickstart(first), _quickstart(second)]
    for pattern in ("tokenizer/*", "data/*.bin", "data/*.idx", "model/*.safetensors", "export/native/*.safetensors",
                    "export/unrolled-a2/*.safetensors"):
        a, b = _files(first, pattern), _files(second, pattern)
        assert a and a == b, f"{pattern}: {sorted(k for k in a if a.get(k) != b.get(k))}"
    manifests = [json.loads((run / "data" / "manifest.json").read_text()) for run in (first, second)]
    for manifest in manifests:  # the tokenizer's folder and the time taken are the only differences
        manifest["tokenizer"].pop("path")
        manifest["totals"].pop("seconds")
    assert manifests[0] == manifests[1]
    records = [_records(first), _records(second)]
    assert any(r["kind"] == "valid" for r in records[0]) and records[0] == records[1]
    summaries = [_summary(out, run) for out, run in zip(printed, (first, second))]
    assert any("perplexity" in line for line in summaries[0]) and summaries[0] == summaries[1]
