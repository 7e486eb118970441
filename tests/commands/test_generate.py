"""`odegpt export` and `odegpt generate` on a model folder that carries a real tokenizer."""
import io
import json
import os
import subprocess
import sys

import pytest

from odegpt.commands.cli import main as odegpt_main


def generate(capsys, folder, *options) -> tuple[str, str]:
    """Run `odegpt generate` in-process; return (stdout, stderr)."""
    capsys.readouterr()
    assert odegpt_main(["generate", "--model", str(folder), *options]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_generate_from_native_and_unrolled_folders_agree(model_folder, tmp_path, capsys):
    assert (model_folder / "tokenizer.json").is_file() and (model_folder / "odegpt_tokenizer.json").is_file()
    common = ["--prompt", "def add(", "--max-new-tokens", "12"]
    native, summary = generate(capsys, model_folder, "--step-size", "2", *common)
    assert odegpt_main(["export", "--model", str(model_folder), "--output", str(tmp_path / "llama"),
                        "--format", "unrolled", "--step-size", "2"]) == 0
    assert (tmp_path / "llama" / "tokenizer.model").is_file()
    unrolled, _ = generate(capsys, tmp_path / "llama", *common)
    assert native.startswith("def add(") and len(native) > len("def add(\n")
    assert native == unrolled  # same weights, same step size, same greedy text; stdout holds only the text
    assert "12 tokens in" in summary and "step size 2, KV cache" in summary  # the summary goes to stderr


@pytest.mark.parametrize("option", ["--step-size", "--draft-step-size"])
def test_generate_refuses_a_step_size_for_an_unrolled_llama(model_folder, tmp_path, capsys, option):
    assert odegpt_main(["export", "--model", str(model_folder), "--output", str(tmp_path / "llama"),
                        "--format", "unrolled", "--step-size", "1"]) == 0
    capsys.readouterr()
    assert odegpt_main(["generate", "--model", str(tmp_path / "llama"), option, "2"]) == 2
    assert "baked in" in capsys.readouterr().err


def test_stream_prints_the_same_text(model_folder, capsys):
    common = ["--prompt", "class Point", "--max-new-tokens", "10"]
    plain, _ = generate(capsys, model_folder, *common)
    streamed, _ = generate(capsys, model_folder, *common, "--stream")
    assert streamed == plain


def test_prompt_file_is_one_left_padded_batch_equal_to_each_prompt_alone(model_folder, tmp_path, capsys):
    prompts = ["def add(a, b):", "x", "class Point:\n"[:-1] + " x: int"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out, summary = generate(capsys, model_folder, "--prompt-file", str(tmp_path / "prompts.txt"), "--json",
                            "--max-new-tokens", "9")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == prompts and {r["batch_size"] for r in records} == {3}
    assert len({r["prompt_tokens"] for r in records}) == 3  # different lengths: the batch really was padded
    assert "for 3 prompts" in summary
    for record in records:
        alone, _ = generate(capsys, model_folder, "--prompt", record["prompt"], "--json", "--max-new-tokens", "9")
        assert json.loads(alone)["completion"] == record["completion"], record["prompt"]


def test_json_record_has_what_a_script_needs(model_folder, capsys):
    out, _ = generate(capsys, model_folder, "--prompt", "def add(", "--json", "--max-new-tokens", "7",
                      "--step-size", "2")
    record = json.loads(out)
    assert record["prompt"] == "def add(" and record["step_size"] == 2.0
    assert record["completion_tokens"] <= 7 and record["prompt_tokens"] > 0
    assert record["finish_reason"] == ("length" if record["completion_tokens"] == 7 else "eos")
    assert record["seconds"] > 0 and record["tokens_per_second"] > 0 and record["acceptance_rate"] is None
    text, _ = generate(capsys, model_folder, "--prompt", "def add(", "--max-new-tokens", "7", "--step-size", "2")
    assert text == record["prompt"] + record["completion"] + "\n"


def test_prompt_dash_reads_stdin(model_folder, capsys, monkeypatch):
    expected, _ = generate(capsys, model_folder, "--prompt", "def add(", "--max-new-tokens", "6")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"def add(\n")))
    from_stdin, _ = generate(capsys, model_folder, "--prompt", "-", "--max-new-tokens", "6")
    assert from_stdin == expected


def test_top_p_reaches_the_sampler(model_folder, capsys):
    # top-p so small that only the likeliest token survives: sampling then equals greedy decoding
    greedy, _ = generate(capsys, model_folder, "--prompt", "def add(", "--max-new-tokens", "10")
    for extra in ([], ["--draft-step-size", "4"]):
        nucleus, _ = generate(capsys, model_folder, "--prompt", "def add(", "--max-new-tokens", "10",
                              "--temperature", "1.5", "--top-k", "0", "--top-p", "1e-6", *extra)
        assert nucleus == greedy
    sampled, _ = generate(capsys, model_folder, "--prompt", "def add(", "--max-new-tokens", "10",
                          "--temperature", "1.5", "--top-k", "0")
    assert sampled != greedy


def test_draft_step_size_keeps_the_greedy_text_and_reports_acceptance(model_folder, capsys):
    common = ["--prompt", "def add(a, b):", "--max-new-tokens", "16", "--step-size", "1"]
    plain, _ = generate(capsys, model_folder, *common)
    speculative, summary = generate(capsys, model_folder, *common, "--draft-step-size", "4", "--draft-tokens", "3")
    assert speculative == plain
    assert "self-speculative: drafts at step size 4, 3 per verification" in summary and "% accepted" in summary
    out, _ = generate(capsys, model_folder, *common, "--draft-step-size", "4", "--draft-tokens", "3", "--json")
    assert 0 <= json.loads(out)["acceptance_rate"] <= 1
    confident, summary = generate(capsys, model_folder, *common, "--draft-step-size", "4", "--draft-confidence", "0.5")
    assert confident == plain and "up to an adaptive number (none after one below p=0.5) per verification" in summary


@pytest.mark.parametrize("options, message", [
    (["--step-size", "0"], "--step-size must be a real number > 0, got 0.0"),
    (["--step-size", "-1"], "--step-size must be a real number > 0, got -1.0"),
    (["--step-size", "nan"], "--step-size must be a real number > 0, got nan"),
    (["--step-size", "inf"], "--step-size must be finite, got inf"),
    (["--step-size", "1e-6"], "--step-size: step size 1e-06 needs"),
    (["--draft-step-size=-inf"], "--draft-step-size must be a real number > 0"),
    (["--draft-step-size", "1e-9"], "--draft-step-size: step size 1e-09 needs"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x = 1\n" * 200], "the model's context is 128 (max_position_embeddings)"),
    (["--max-new-tokens", "200"], "beyond the model's context of 128 (max_position_embeddings); use --max-new-tokens"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-k", "-5"], "--top-k must be >= 0"),
    # the library's words
    (["--draft-step-size", "4", "--draft-tokens", "0"], "--draft-tokens must be an integer >= 1"),
    (["--draft-step-size", "4", "--no-cache"], "--draft-step-size needs the KV cache"),
    (["--draft-step-size", "4", "--draft-confidence", "nan"], "--draft-confidence must be a probability in [0, 1]"),
    (["--draft-confidence", "0.3"], "--draft-confidence applies to self-speculative decoding"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "cannot read --prompt-file /nonexistent/prompts.txt"),
])
def test_bad_input_is_one_line_and_exit_2(model_folder, capsys, options, message):
    capsys.readouterr()
    assert odegpt_main(["generate", "--model", str(model_folder), *options]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("odegpt generate: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err, captured.err


def test_bad_prompt_sources_are_refused(model_folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "gap.txt").write_text("def f(\n\nclass A\n")
    (tmp_path / "empty.txt").write_text("")
    cases = [(["--prompt-file", str(tmp_path / "gap.txt")], "line 2 is empty"),
             (["--prompt-file", str(tmp_path / "empty.txt")], "holds no prompts"),
             (["--prompt", "-"], "stdin gave an empty prompt")]
    for options, message in cases:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n")))
        capsys.readouterr()
        assert odegpt_main(["generate", "--model", str(model_folder), *options]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_folders_that_are_not_models_are_named(model_folder, tmp_path, capsys):
    run = tmp_path / "run"  # what a training run folder holds: its run config and checkpoints, no model
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"hidden_size": 64}, "train": {}}))
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((model_folder / name).read_bytes())
    damaged = tmp_path / "damaged"  # a model folder whose config.json holds an impossible value
    damaged.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (damaged / name).write_bytes((model_folder / name).read_bytes())
    config = json.loads((model_folder / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps(config | {"hidden_size": -3}))
    cases = [(run, f"{run} is not a model folder (no config.json with a model_type); it looks like a training run: "
                   f"write its model with `odegpt convert --checkpoint {run / 'checkpoints'}"),
             (tmp_path / "missing", "is not a folder"),
             (no_tokenizer, "has no tokenizer (tokenizer.json or tokenizer.model)"),
             (damaged, f"cannot load the configuration of {damaged}: hidden_size must be a positive integer, got -3")]
    for folder, message in cases:
        capsys.readouterr()
        assert odegpt_main(["generate", "--model", str(folder)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_step_size_needing_millions_of_steps_is_refused_at_once_by_the_command(model_folder):
    # The real command in a subprocess: exit code 2 and one line, no traceback and no hang.
    result = subprocess.run([sys.executable, "-m", "odegpt", "generate", "--model", str(model_folder),
                             "--step-size", "1e-6"], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "odegpt generate: --step-size: step size 1e-06 needs 5,000,002 solver steps (trained depth 7), more than "
        "the maximum of 1,024; use a step size >= 0.00684 or raise max_solver_steps"], result.stderr


def test_prompt_lookup_and_an_adaptive_draft_length_keep_the_greedy_text_and_say_where_drafts_came_from(
        model_folder, capsys, tmp_path):
    common = ["--prompt", "def add(a, b):\n    return a + b\n\ndef add(a, b):", "--max-new-tokens", "16"]
    plain, _ = generate(capsys, model_folder, *common)
    lookup, summary = generate(capsys, model_folder, *common, "--prompt-lookup", "3")
    assert lookup == plain and "drafts by prompt lookup (up to 3), an adaptive number per verification" in summary
    both, summary = generate(capsys, model_folder, *common, "--prompt-lookup", "3", "--draft-step-size", "4",
                             "--draft-tokens", "auto")
    assert both == plain and "at step size 4 and by prompt lookup (up to 3), an adaptive number per" in summary
    out, _ = generate(capsys, model_folder, *common, "--prompt-lookup", "2", "--json")
    assert set(json.loads(out)["draft_sources"]) >= {"prompt_lookup", "none"}
    # A plain Llama folder gets transformers' own prompt lookup: the same text.
    assert odegpt_main(["export", "--model", str(model_folder), "--output", str(tmp_path / "llama"),
                        "--format", "unrolled"]) == 0
    llama, _ = generate(capsys, tmp_path / "llama", *common, "--prompt-lookup", "3")
    assert llama == plain


@pytest.mark.parametrize("options, message", [
    (["--prompt-lookup", "0"], "--prompt-lookup must be an integer >= 1"),  # the library's words
    (["--draft-step-size", "4", "--draft-tokens", "sometimes"], "must be an integer >= 1 or 'auto'"),
    (["--prompt-lookup", "2", "--exit-entropy", "1"], "--exit-entropy and --prompt-lookup are separate decoders"),
])
def test_bad_draft_options_are_one_line_errors(model_folder, capsys, options, message):
    capsys.readouterr()  # an argument argparse cannot parse ("sometimes") is one line and exit 2 too
    assert odegpt_main(["generate", "--model", str(model_folder), "--prompt", "x", *options]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_the_thread_count_leaves_busy_cores_alone_and_is_printed(model_folder, capsys, monkeypatch):
    import odegpt.commands.threads as threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.2, 3.0, 2.0))  # 3 of 4 cores busy
    assert threads.choose_threads(None) == (1, "4 cores, load average 3.2")
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.choose_threads(None)[0] == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads(None) == (2, "OMP_NUM_THREADS")
    _, summary = generate(capsys, model_folder, "--prompt", "x", "--max-new-tokens", "2", "--threads", "1")
    assert "; 1 thread (--threads))" in summary
    assert odegpt_main(["generate", "--model", str(model_folder), "--prompt", "x", "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_compile_decodes_the_same_text_through_static_caches(model_folder, tmp_path, capsys, monkeypatch):
    from odegpt.decoding import compiled

    calls = []

    def step(*args, **kwargs):  # the static path, uncompiled (compiling is tests/decoding's), counted
        calls.append(1)
        return compiled._step(*args, **kwargs)

    monkeypatch.setitem(compiled._compiled, "cpu", step)
    (tmp_path / "prompts.txt").write_text("def add(a, b):\nx\n")
    common = ["--prompt-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "9"]
    eager, _ = generate(capsys, model_folder, *common)
    assert generate(capsys, model_folder, *common, "--compile")[0] == eager
    assert len(calls) >= 8  # one compiled step per decoded token
    assert generate(capsys, model_folder, *common, "--compile", "--prompt-lookup", "3")[0] == eager
