"""`odegpt evaluate` as a report: raw text with a sliding window, results.json/md/png, one-line errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.tokenizer import train_tokenizer
from odegpt import OdeGPTForCausalLM
from odegpt.commands.cli import main as odegpt_main
from odegpt.evaluation.perplexity import nll_sums, sliding_windows, window_batches
from odegpt.folders.export import save_native
from tests.conftest import PARTIALLY_SHARED, tiny_config, tiny_model

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 1\n" * 30
SOURCES = {
    "alpha.py": "import os\n\n\ndef walk(top):\n    for root, dirs, files in os.walk(top):\n        yield root\n" * 6,
    "beta.py": "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
               "        self.items.append(x)\n" * 5,
    "gamma.py": "x = [i * i for i in range(10)]\nprint(sum(x))\n" * 12,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A partially shared model folder with its tokenizer, and a directory of .py sources."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "corpus.txt").write_text(TEXT + "".join(SOURCES.values()))
    info = train_tokenizer([str(root / "corpus.txt")], root / "tokenizer", vocab_size=300)
    torch.manual_seed(0)
    model = OdeGPTForCausalLM(tiny_config(PARTIALLY_SHARED, vocab_size=info.vocab_size, pad_token_id=info.pad_id,
                                          eos_token_id=info.eos_id, bos_token_id=info.bos_id))
    save_native(model, root / "model", tokenizer_dir=root / "tokenizer")
    (root / "src").mkdir()
    for name, text in SOURCES.items():
        (root / "src" / name).write_text(text)
    return root


def _evaluate(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert odegpt_main(["evaluate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_report_files_hold_the_numbers_evaluate_json_prints(folder, tmp_path, capsys):
    common = ["--model", str(folder / "model"), "--data", str(folder / "src" / "*.py"), "--seq-len", "32",
              "--step-sizes", "2,0.75,4"]
    printed = _evaluate(capsys, *common, "--rounds", "1", "--decode-tokens", "3", "--output", str(tmp_path / "r"))
    written = json.loads((tmp_path / "r" / "results.json").read_text())
    assert written == printed
    assert [row["step_size"] for row in printed["results"]] == [2.0, 0.75, 4.0]  # the order given
    assert [row["solver_steps"] for row in printed["results"]] == [5, 9, 4]  # 1 + ceil(3/a) + ceil(2/a) + 1
    assert printed["decode"]["batch_size"] == 1
    for row in printed["results"]:
        assert row["perplexity"] == pytest.approx(math.exp(row["nll"]))
        assert row["decode_tokens_per_s"] > 0
        assert row["decode_speedup"] > 0  # over a=1, measured although not requested
        assert row["num_tokens"] == printed["num_tokens"]

    # The Markdown table has one row per step size with the same numbers; the plot is a real PNG.
    table = [line for line in (tmp_path / "r" / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 3
    for line, row in zip(table[2:], printed["results"]):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == f"{row['step_size']:g}" and cells[1] == str(row["solver_steps"])
        assert cells[3] == f"{row['perplexity']:.3f}"
        assert cells[4] == f"{row['decode_tokens_per_s']:.1f}" and cells[5] == f"{row['decode_speedup']:.2f}x"
    assert (tmp_path / "r" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run without speed measurement: the same perplexities, null speed fields.
    quality = _evaluate(capsys, *common, "--no-speed")
    for row, again in zip(printed["results"], quality["results"]):
        assert again["perplexity"] == pytest.approx(row["perplexity"], rel=1e-6)
        assert again["decode_tokens_per_s"] is None and again["decode_speedup"] is None
    assert quality["decode"] is None


def test_raw_text_files_directories_and_globs_agree(folder, capsys):
    from transformers import AutoTokenizer

    common = ["--model", str(folder / "model"), "--seq-len", "24", "--step-sizes", "1,2", "--no-speed"]
    files = [str(folder / "src" / name) for name in sorted(SOURCES)]
    by_files = _evaluate(capsys, *common, "--data", *files)
    by_glob = _evaluate(capsys, *common, "--data", str(folder / "src" / "*.py"))
    by_directory = _evaluate(capsys, *common, "--data", str(folder / "src"))
    for other in (by_glob, by_directory):
        assert [row["perplexity"] for row in other["results"]] == pytest.approx(
            [row["perplexity"] for row in by_files["results"]], rel=1e-6)
    # Every token of every document is scored once, plus the EOS that closes it.
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    expected = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in SOURCES.values())
    assert by_files["num_tokens"] == by_glob["num_tokens"] == expected


def test_sliding_window_perplexity_equals_one_window_when_the_document_fits():
    model = tiny_model(PARTIALLY_SHARED)
    document = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1))
    assert sliding_windows(40, 64, 16) == sliding_windows(40, 64, 64) == [sliding_windows(40, 64, 64)[0]]
    with torch.no_grad():
        logits = model(input_ids=document[None, :-1], step_size=2.0).logits[0]
    expected = F.cross_entropy(logits, document[1:], reduction="sum").item()
    for stride in (16, 64):
        total, count = nll_sums(model, window_batches([document], 64, stride, batch_size=4), [2.0])[2.0]
        assert count == 39 and total == pytest.approx(expected, rel=1e-5)


def _reference_nll(model, document: torch.Tensor, seq_len: int, stride: int, step_size: float) -> float:
    """Token by token, each with exactly the context the guide's sliding window gives it: the window
    starting at the largest multiple of ``stride`` that still reaches the token within seq_len inputs."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(document)):
            begin = stride * max(0, math.ceil((t - seq_len) / stride))
            logits = model(input_ids=document[None, begin:t], step_size=step_size).logits[0, -1]
            total += F.cross_entropy(logits, document[t]).item()
    return total


def test_long_document_scores_each_token_once_with_its_window_context():
    model = tiny_model(PARTIALLY_SHARED)
    length, seq_len = 150, 32
    document = torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(2))
    results = {}
    for stride in (8, 32):
        windows = sliding_windows(length, seq_len, stride)
        scored = [t for w in windows for t in range(w.score_from, w.end)]
        assert scored == list(range(1, length))  # each token but the first, exactly once
        assert all(w.end - w.begin - 1 <= seq_len for w in windows)
        assert all(w.score_from - w.begin >= seq_len - stride + 1 for w in windows[1:])
        batches = window_batches([document, document[:50]], seq_len, stride, batch_size=3)
        total, count = nll_sums(model, batches, [1.0])[1.0]
        assert count == (length - 1) + 49
        single = nll_sums(model, window_batches([document], seq_len, stride, batch_size=3), [1.0])[1.0][0]
        assert single == pytest.approx(_reference_nll(model, document, seq_len, stride, 1.0), rel=1e-5)
        results[stride] = single
    # More context per token gives another (not wildly other) total than disjoint windows.
    assert results[8] != pytest.approx(results[32], rel=1e-6)
    assert results[8] == pytest.approx(results[32], rel=0.2)


@pytest.mark.parametrize("args, message", [
    (["--data", "{root}/no-such-file.txt"], "does not exist"),
    (["--data", "{root}/src/*.nothing"], "matched no files"),
    (["--step-sizes", "0"], "must be a real number > 0"),
    (["--step-sizes", "1,-2"], "must be a real number > 0"),
    (["--step-sizes", "nan"], "must be a real number > 0"),
    (["--step-sizes", "inf"], "must be finite"),
    (["--step-sizes", "fast"], "'fast' is not a number"),
    (["--step-sizes", "0.001"], "more than the maximum of 1,024"),
    (["--stride", "0"], "--stride must be in 1..seq_len (32)"),
    (["--stride", "33"], "--stride must be in 1..seq_len (32)"),
    (["--seq-len", "1000"], "--seq-len must be in 1..128"),
])
def test_bad_inputs_are_one_line_errors(folder, capsys, args, message):
    args = [arg.replace("{root}", str(folder)) for arg in args]
    defaults = {"--data": str(folder / "src" / "alpha.py"), "--seq-len": "32"}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    capsys.readouterr()
    assert odegpt_main(["evaluate", "--model", str(folder / "model"), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("odegpt evaluate: ")
    assert message in captured.err


def test_prepared_corpus_and_raw_text_mix_in_one_report(folder, tmp_path, capsys):
    from data_pipeline.prepare import PrepareConfig, prepare

    corpus = tmp_path / "corpus"
    prepare(PrepareConfig([str(folder / "corpus.txt"), str(folder / "src")], str(folder / "tokenizer"), str(corpus),
                          val_fraction=0.9, progress=False))
    common = ["--model", str(folder / "model"), "--seq-len", "16", "--step-sizes", "1,4", "--no-speed"]
    prepared = _evaluate(capsys, *common, "--data", str(corpus), "--num-samples", "4")
    assert prepared["num_tokens"] == 4 * 16 and prepared["stride"] == 16
    raw = _evaluate(capsys, *common, "--data", str(folder / "src" / "beta.py"))
    both = _evaluate(capsys, *common, "--data", str(corpus), str(folder / "src" / "beta.py"), "--num-samples", "4")
    assert both["num_tokens"] == prepared["num_tokens"] + raw["num_tokens"]
    for mixed, one, other in zip(both["results"], prepared["results"], raw["results"]):
        assert mixed["nll"] * mixed["num_tokens"] == pytest.approx(
            one["nll"] * one["num_tokens"] + other["nll"] * other["num_tokens"], rel=1e-6)
    # A stride means nothing for prepared samples: refused rather than silently ignored.
    assert odegpt_main(["evaluate", *common, "--data", str(corpus), "--stride", "8"]) == 2
    assert "--stride applies to raw text" in capsys.readouterr().err
