"""Interoperability: exports every Llama client reads the same way (transformers 4.x and 5.x), DeepSpeed
configs users extend, DeepSpeed universal checkpoints. transformers 4.x is not installed here, so what it
reads is checked as JSON; what 5.x reads is checked by loading."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.tokenizer import PORTABLE_TOKENIZER_CLASS, load_sentencepiece, train_tokenizer
from odegpt.folders.export import save_native, save_unrolled
from tests.conftest import PARTIALLY_SHARED, tiny_model

TEXTS = ["def f(x):\n\treturn x  # tabs, spaces", "a literal </s> and <s> are text", "ünïcödé 12345"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(["stdlib"], directory, vocab_size=400, max_files=10, max_sentences=3000)
    return directory


def _ids(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return [tokenizer(text)["input_ids"] for text in TEXTS]


# ---- tokenizer_config.json names a class transformers 4.x has -------------------------------------

def test_tokenizer_config_names_a_class_transformers_4_has(tokenizer_dir):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS == "PreTrainedTokenizerFast"
    sp = load_sentencepiece(tokenizer_dir)
    assert _ids(tokenizer_dir) == [sp.encode(text) for text in TEXTS]


def test_exports_give_old_tokenizers_a_portable_class_with_the_same_ids(tokenizer_dir, tmp_path):
    """A tokenizer written before the fix (TokenizersBackend) is repaired in every folder an export writes."""
    old = tmp_path / "old_tok"
    old.mkdir()
    for file in tokenizer_dir.iterdir():
        (old / file.name).write_bytes(file.read_bytes())
    config = json.loads((old / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    model = tiny_model(PARTIALLY_SHARED, vocab_size=400)
    save_native(model, tmp_path / "native", tokenizer_dir=old)
    save_unrolled(model, tmp_path / "unrolled", step_size=2, tokenizer_dir=old)
    expected = _ids(old)
    for folder in (tmp_path / "native", tmp_path / "unrolled"):
        assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == \
            "PreTrainedTokenizerFast", folder
        assert _ids(folder) == expected, folder


# ---- config.json carries the fields transformers 4.x reads ----------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unrolled_config_has_what_transformers_4_reads(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    model = tiny_model(PARTIALLY_SHARED, rope_theta=500000.0).to(dtype)
    save_unrolled(model, tmp_path, step_size=2)
    config = json.loads((tmp_path / "config.json").read_text())
    # transformers 4.57 LlamaConfig: rope_theta=10000.0 and rope_scaling=None unless given; dtype from torch_dtype
    # before 4.56; 5.x keeps theta in rope_parameters.
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 500000.0
    assert config["rope_parameters"]["rope_type"] == "default" and config["rope_scaling"] is None
    assert config["torch_dtype"] == config["dtype"] == str(dtype).removeprefix("torch.")
    llama = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert llama.config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    x = torch.randint(0, 97, (1, 9))
    reference = model.float()(x, step_size=2).logits
    assert (llama(x).logits - reference).abs().max() <= 1e-4 * (1 if dtype == torch.float32 else 1e3)


def test_native_config_has_what_transformers_4_reads(tmp_path):
    save_native(tiny_model(PARTIALLY_SHARED, rope_theta=500000.0), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["torch_dtype"] == config["dtype"] == "float32"


# ---- a DeepSpeed config users extend -----------------------------------------------------------------

def test_user_deepspeed_config_is_merged_with_our_keys_winning_and_said(tmp_path):
    from launcher.config import ConfigError, build_config, load_config
    from launcher.train import build_parser

    ds_file = tmp_path / "ds_config.json"
    ds_file.write_text(json.dumps({"wall_clock_breakdown": True, "zero_optimization": {
        "stage": 3, "zero_hpz_partition_size": 1}, "comms_logger": {"enabled": True}}))
    args = build_parser().parse_args(["--config", "quickstart", "--deepspeed-config", str(ds_file), "--set",
                                      "deepspeed.extra={flops_profiler: {enabled: true}, comms_logger: "
                                      "{enabled: false}, gradient_clipping: 5.0}"])
    config = load_config(args.config, args.overrides)
    assert config.deepspeed.config_file == str(ds_file)
    notes: list[str] = []
    ds = config.to_deepspeed_config(1, note=notes.append)
    assert ds["wall_clock_breakdown"] is True and ds["flops_profiler"] == {"enabled": True}
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 1  # passed through
    assert ds["comms_logger"] == {"enabled": False}  # deepspeed.extra over the file
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == config.train.grad_clip  # ours win
    assert len(notes) == 2, notes
    assert f"zero_optimization.stage=3 from deepspeed.config_file {ds_file}" in notes[0]
    assert "deepspeed.zero_stage" in notes[0]
    assert "gradient_clipping=5.0 from deepspeed.extra" in notes[1] and "train.grad_clip" in notes[1]

    bad = [(["deepspeed.extra={zero_optimization: {stage3_prefetch_bucket_sizee: 1}}"],
            "DeepSpeed rejects the config merged from deepspeed.extra: DeepSpeedZeroConfig: "
            "stage3_prefetch_bucket_sizee: Extra inputs are not permitted"),
           ([f"deepspeed.config_file={tmp_path / 'missing.json'}"], "missing.json: cannot be read"),
           (["deepspeed.extra=[1]"], "deepspeed.extra must be dict"),
           (["deepspeed.extra={fp16: {enabled: true}}", "train.precision=bf16"], "needs train.precision: fp32")]
    (tmp_path / "broken.json").write_text('{"wall_clock_breakdown": tru}')
    bad.append(([f"deepspeed.config_file={tmp_path / 'broken.json'}"], "broken.json: not valid JSON"))
    for overrides, message in bad:
        with pytest.raises(ConfigError) as error:
            load_config(["quickstart"], overrides).to_deepspeed_config(1)
        assert message in str(error.value) and "\n" not in str(error.value), (overrides, str(error.value))
    assert build_config({}).user_deepspeed_config() == {}


# ---- DeepSpeed universal checkpoints: change the number of ranks between runs ------------------------

@pytest.mark.slow
def test_universal_checkpoint_resumes_on_another_world_size_and_user_deepspeed_config_reaches_the_engine(tmp_path):
    """2 ranks -> ds_to_universal (no --inject_missing_state) -> 1 rank -> ds_to_universal -> 2 ranks: the
    loss continues as in one uninterrupted 2-rank run. The first run also carries a user DeepSpeed config."""
    import subprocess

    from launcher.launch import free_port
    from tests.launcher.test_train import PYTHON, TIMEOUT, _check, _env, _overrides, _train_metrics

    def launch(output_dir: Path, ranks: int, *args: str, **extra) -> subprocess.CompletedProcess:
        # One learning-rate schedule for every run, whatever its train.train_steps.
        extra = {"train.decay_steps": 5, **extra}
        port = free_port()
        cmd = [PYTHON, "-m", "odegpt", "launch", "--num-gpus", str(ranks), "--master-port", str(port),
               "--config", "quickstart", *_overrides(output_dir, **extra), *args]
        result = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "leaked /dev/shm buffers"
        return result

    def to_universal(tag_dir: Path, output: Path) -> Path:
        result = subprocess.run([PYTHON, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                                 "--output_folder", str(output), "--num_extract_workers", "1",
                                 "--num_merge_workers", "1"], env=_env(), capture_output=True, text=True,
                                timeout=TIMEOUT)
        _check(result)
        return output

    ds_file = tmp_path / "ds_config.json"
    ds_file.write_text(json.dumps({"wall_clock_breakdown": True, "flops_profiler": {"enabled": True,
                                                                                    "profile_step": 1000}}))
    straight, one, two = tmp_path / "straight", tmp_path / "one_rank", tmp_path / "two_ranks"
    result = launch(straight, 2, "--deepspeed-config", str(ds_file), **{"train.train_steps": 6,
                                                                          "checkpoint.keep_last": 3})
    _check(result)
    engine = next(r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "engine")
    assert engine["wall_clock_breakdown"] is True and engine["flops_profiler"] is True, engine
    assert engine["load_universal_checkpoint"] is False and engine["zero_stage"] == 2

    universal = to_universal(straight / "checkpoints" / "step_00000002", tmp_path / "universal" / "step_00000002")
    _check(result := launch(one, 1, "--resume", str(universal), **{"train.train_steps": 4}))
    assert "DeepSpeed universal checkpoint, saved on 2 rank(s), now 1" in result.stderr + result.stdout
    universal = to_universal(one / "checkpoints" / "step_00000004", tmp_path / "universal" / "step_00000004")
    _check(result := launch(two, 2, "--resume", str(universal), **{"train.train_steps": 6}))
    assert "saved on 1 rank(s), now 2" in result.stderr + result.stdout

    reference, after_one, after_two = _train_metrics(straight), _train_metrics(one), _train_metrics(two)
    assert sorted(after_one) == [3, 4] and sorted(after_two) == [5, 6]
    engine = next(r for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "engine")
    assert engine["load_universal_checkpoint"] is True
    for step, record in {**after_one, **after_two}.items():
        assert record["step_size"] == reference[step]["step_size"] and record["lr"] == reference[step]["lr"]
        assert record["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), (step, record, reference[step])
        assert record["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-4), step


def test_native_tokenizer_loads_with_trust_remote_code_unset_and_stdin_closed(tokenizer_dir, tmp_path):
    """What a script does (no odegpt import, so transformers does not know the model type): the tokenizer
    loads with the same ids and does not wait for an answer. Under transformers 5 the question is still
    printed (it reads the model config first; see docs/exports.md), under 4.x it is not asked."""
    import subprocess
    import sys

    save_native(tiny_model(PARTIALLY_SHARED, vocab_size=400), tmp_path / "native", tokenizer_dir=tokenizer_dir)
    script = ("import json, sys\nfrom transformers import AutoTokenizer\n"
              f"tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / 'native')!r})\n"
              f"print('ids:', json.dumps([tokenizer(text)['input_ids'] for text in {TEXTS!r}]))\n"
              "assert 'odegpt' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    # transformers 5 prints its question, unanswered (no newline after "[y/N] "), on stdout too.
    assert json.loads(result.stdout.split("ids:")[-1]) == _ids(tokenizer_dir)
