"""The trainer's set-up and its bad inputs: one definition of the model settings, step sizes refused
before any work, YAML errors, damaged and crafted checkpoints (convert and resume), a resume with
another model, corpora the model cannot read, huge documents, Llama folders into native exports,
and the GPU smoke script. Few processes are started; most checks run in this one."""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher.config import ConfigError, load_config
from tests.launcher.test_train import TIMEOUT, _env, _launch, _overrides, _plain, _train_metrics

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


class Payload:
    """A pickle that creates a file when unpickled: what a crafted checkpoint would carry."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _craft(path: Path, victim: Path) -> None:
    import torch

    torch.save({"torch": Payload(victim)}, path)


def _reseal(tag_dir: Path) -> None:
    """Rewrite the COMPLETE marker's file sizes, as an attacker who edits a checkpoint would."""
    marker = json.loads((tag_dir / "COMPLETE").read_text())
    marker["files"] = {p.name: p.stat().st_size for p in tag_dir.iterdir() if p.is_file() and p.name != "COMPLETE"}
    (tag_dir / "COMPLETE").write_text(json.dumps(marker))


def _odegpt(*argv, capsys) -> tuple[int, str]:
    """Run ``odegpt ARGV`` in this process; (exit code, stderr). Stdout is kept in ``_odegpt.out``."""
    from odegpt.commands.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    _odegpt.out = captured.out
    return code, captured.err


# ---- one definition per setting, limits checked at validation --------------------------------------

def test_model_section_is_odegpt_configs_signature():
    from launcher.config import model_section
    from odegpt import OdeGPTConfig

    signature = {name: p.default for name, p in inspect.signature(OdeGPTConfig.__init__).parameters.items()
                 if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and name != "self"}
    section = dataclasses.asdict(model_section()())
    assert section == signature  # same names, same defaults: declared once, in OdeGPTConfig
    config = load_config(["quickstart"], ["model.max_solver_steps=64", "model.rope_theta=5e5"])
    assert config.model_config().max_solver_steps == 64 and config.model_config().rope_theta == 5e5
    with pytest.raises(ConfigError, match="model.solverr"):
        load_config(["quickstart"], ["model.solverr=euler"])


@pytest.mark.parametrize("overrides, key", [
    (["train.step_size_distribution={choices: [1, 1e-3]}"], "train.step_size_distribution.choices"),
    (["train.step_size_distribution={low: 1e-4, high: 2}"], "train.step_size_distribution.low"),
    (["eval.step_sizes=[1, 0.001]"], "eval.step_sizes[1]"),
    (["model.max_solver_steps=4", "train.step_size_distribution={choices: [0.5]}", "eval.step_sizes=[1]"],
     "train.step_size_distribution.choices"),
])
def test_step_sizes_beyond_the_solver_limit_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(["quickstart"], overrides)
    assert str(error.value).startswith(f"{key}: step size")
    assert "solver steps" in str(error.value) and "max_solver_steps" in str(error.value)


def test_yaml_syntax_errors_are_one_line_for_every_command(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [128\ntrain:\n  lr: 1\n")
    for argv in (["train", "--config", bad], ["plan", "--config", bad],
                 ["launch", "--config", bad, "--num-gpus", "1", "--dry-run"],
                 ["train", "--config", "quickstart", "--set", "train.step_size_distribution={choices: [1"]):
        code, err = _odegpt(*argv, capsys=capsys)
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "is not valid YAML" in lines[0] and "line" in lines[0], err
    assert str(bad) in _odegpt("plan", "--config", bad, capsys=capsys)[1]


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  hidden_size: 64  # caf\xe9\n".encode("latin-1"))
    for argv in (["train", "--config", bad], ["plan", "--config", bad]):
        code, err = _odegpt(*argv, capsys=capsys)
        assert code == 2 and f"config file {bad} is not UTF-8 text (byte 0xe9 at offset 31)" in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_generated_deepspeed_config_on_gpus_and_compile_limits():
    gpu = load_config(["model/125m-shared", "train/pretrain"]).to_deepspeed_config(8, "cuda")
    assert gpu["bf16"]["enabled"] and gpu["optimizer"]["params"]["torch_adam"]
    assert gpu["optimizer"]["params"]["fused"] is True  # torch's fused AdamW: no extension to build
    offload = load_config(["model/125m-shared", "train/pretrain", "deepspeed/zero3-offload"]).to_deepspeed_config(
        8, "cuda")
    assert offload["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's CPU Adam for offloaded states
    assert "fused" not in load_config(["quickstart"]).to_deepspeed_config(1, "cpu")["optimizer"]["params"]
    with pytest.raises(ConfigError, match="train.compile needs deepspeed.zero_stage <= 2"):
        load_config(["quickstart"], ["train.compile=true", "deepspeed.zero_stage=3"])


def test_peak_flops_come_from_the_device_name():
    from odegpt.model.accounting import peak_tflops

    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("NVIDIA GH200 480GB") == 989 and peak_tflops("NVIDIA L40S") == 362
    assert peak_tflops("NVIDIA L4") == 121 and peak_tflops("a CPU") is None


def test_13b_shapes_plan_with_zero_init_and_launch(capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from launcher.plan import make_plan

    for preset in ("model/13b-unshared", "model/13b-shared"):
        configs = [preset, "train/pretrain", "deepspeed/zero3"]
        code, _ = _odegpt("plan", "--config", *configs, "--num-nodes", "4", "--num-gpus", "8", "--gpu", "H100",
                          capsys=capsys)
        assert code == 0
        plan = make_plan(load_config(configs, world_size=32), 4, 8, 989, 0.4)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(plan.parameters, plan.largest_layer_parameters, 8, 4,
                                                            cpu_offload=False, zero_init=True)
        assert plan.model_states_bytes["zero3"] == gpu and plan.build_cpu_bytes["zero_init"] == cpu
        assert f"zero.Init): {gpu / 2 ** 30:.2f} GiB per GPU, {cpu / 2 ** 30:.1f} GiB CPU per node" in _odegpt.out
        assert "989 TFLOP/s" in _odegpt.out  # the H100's peak, from the one table
        code, _ = _odegpt("launch", "--config", *configs, "--num-nodes", "4", "--num-gpus", "8", "--dry-run",
                          capsys=capsys)
        assert code == 0 and "--module launcher.train" in _odegpt.out
    unshared = make_plan(load_config(["model/13b-unshared", "train/pretrain", "deepspeed/zero3"], world_size=32),
                         4, 8, 989, 0.4)
    assert 12e9 < unshared.parameters < 14e9
    assert unshared.build_cpu_bytes["no_zero_init"] > 30 * unshared.build_cpu_bytes["zero_init"]


# ---- checkpoints: damaged, crafted, another model ----------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run (one process, ZeRO-1: DeepSpeed's optimizer files need its allowlisted types)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    process = _plain(run, **{"deepspeed.zero_stage": 1, "train.train_steps": 2, "checkpoint.interval": 1,
                             "eval.interval": 0, "eval.num_samples": 4})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_safe_loading_refuses_a_crafted_pickle_even_when_asked_not_to(tmp_path):
    import torch

    from launcher.checkpointing import safe_loading

    victim = tmp_path / "pwned"
    _craft(tmp_path / "crafted.pt", victim)
    with safe_loading(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "crafted.pt", weights_only=False)  # what DeepSpeed's own loaders pass
    assert not victim.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored afterwards


def test_convert_names_the_damaged_file_and_never_unpickles_code(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    step2, step1 = run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000001"
    optim = step2 / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    code, err = _odegpt("convert", "--checkpoint", run / "checkpoints", "--output", tmp_path / "m", capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"checkpoint {step2}: {optim.name} is 1000 bytes" in err and "truncated" in err

    (step1 / "mp_rank_00_model_states.pt").unlink()
    code, err = _odegpt("convert", "--checkpoint", step1, "--output", tmp_path / "m", capsys=capsys)
    assert code == 2 and f"checkpoint {step1}: mp_rank_00_model_states.pt is missing" in err

    garbage = tmp_path / "garbage" / "step_00000003"
    garbage.mkdir(parents=True)
    (garbage / "COMPLETE").write_text("3\n")  # an old-style marker: no file list to check sizes against
    (garbage / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    code, err = _odegpt("convert", "--checkpoint", garbage.parent, "--output", tmp_path / "m", capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "mp_rank_00_model_states.pt cannot be read" in err

    victim = tmp_path / "pwned"
    fresh = _copy(trained, tmp_path / "crafted")
    model_states = fresh / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    _craft(model_states, victim)
    _reseal(model_states.parent)
    code, err = _odegpt("convert", "--checkpoint", fresh / "checkpoints", "--output", tmp_path / "m", capsys=capsys)
    assert code == 2 and "mp_rank_00_model_states.pt cannot be read" in err and "Weights only load failed" in err
    assert not victim.exists() and not (tmp_path / "m").exists()


def test_convert_checks_the_rng_files_too_and_never_unpickles_them(trained, tmp_path, capsys):
    run, victim = _copy(trained, tmp_path), tmp_path / "pwned"
    rng = run / "checkpoints" / "step_00000002" / "rng_state_rank00000.pt"
    _craft(rng, victim)
    _reseal(rng.parent)
    code, err = _odegpt("convert", "--checkpoint", run / "checkpoints", "--output", tmp_path / "m", capsys=capsys)
    assert code == 2 and "rng_state_rank00000.pt cannot be read" in err and err.count("\n") == 1, err
    assert not victim.exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("key, value", [("consumed_samples", -16), ("consumed_samples", 10**30), ("step", 1.5),
                                        ("step", "two"), ("config", None)])
def test_an_edited_state_file_is_named_in_one_line(trained, tmp_path, capsys, key, value):
    run = _copy(trained, tmp_path)
    state_file = run / "checkpoints" / "step_00000002" / "odegpt_state.json"
    state = json.loads(state_file.read_text())
    state[key] = value
    state_file.write_text(json.dumps(state))
    _reseal(state_file.parent)
    code, err = _odegpt("convert", "--checkpoint", state_file.parent, "--output", tmp_path / "m", capsys=capsys)
    assert code == 2 and "odegpt_state.json" in err and err.count("\n") == 1, err
    assert (f"{key} must be a whole number >= 0, got {value!r}" if key != "config" else "has no run config") in err


def test_resuming_a_zero_checkpoint_on_another_world_size_says_how(trained):
    from launcher.checkpointing import CheckpointError, check_world_size, latest_complete_tag, verify

    checkpoints = trained / "checkpoints"
    checkpoint = verify(checkpoints, latest_complete_tag(checkpoints))
    check_world_size(checkpoint, 1)  # saved on 1 rank
    with pytest.raises(CheckpointError) as error:
        check_world_size(checkpoint, 2)
    universal = trained / "universal" / checkpoint.tag
    assert str(error.value) == (
        f"checkpoint {checkpoint.path} was saved on 1 rank(s) with ZeRO-1, whose optimizer state is partitioned per "
        f"rank, and this run has 2: resume on 1 rank(s), or convert it once with `python -m "
        f"deepspeed.checkpoint.ds_to_universal --input_folder {checkpoint.path} --output_folder {universal}` and "
        f"resume from that with `--resume {universal}` (any number of ranks)")


def test_a_resume_with_other_step_size_draws_says_so(trained, tmp_path):
    """The sampler state saved with each checkpoint is read back: draws that change on resume are said."""
    run = _copy(trained, tmp_path)
    process = _plain(run, **{"deepspeed.zero_stage": 1, "train.train_steps": 3, "checkpoint.interval": 1,
                             "eval.interval": 0, "eval.num_samples": 4,
                             "train.step_size_distribution": "{choices: [2.0]}"})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    assert "the step-size draws change at step 2: the checkpoint drew from {'seed': 1234, 'distribution': " \
           "{'choices': [0.5, 1.0, 2.0], 'log_uniform': False}}, this run draws from {'seed': 1234, 'distribution': " \
           "{'choices': [2.0], 'log_uniform': False}}" in stderr, stderr[-2000:]
    assert {r["step_size"] for r in _train_metrics(run).values() if r["step"] == 3} == {2.0}


def test_convert_never_writes_over_the_run_its_checkpoints_or_another_folder(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    checkpoints, run_config = run / "checkpoints", (run / "config.json").read_bytes()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text("{}")
    cases = [(run, f"holds the checkpoints folder {checkpoints}"), (checkpoints, "is the checkpoints folder"),
             (checkpoints / "step_00000002", "is inside checkpoints"), (corpus, "exists and is not a model folder")]
    for output, message in cases:
        for overwrite in ([], ["--overwrite"]):  # --overwrite replaces only an earlier model folder
            code, err = _odegpt("convert", "--checkpoint", checkpoints, "--output", output, *overwrite, capsys=capsys)
            assert code == 2 and message in err and err.count("\n") == 1, (output, err)
    assert (run / "config.json").read_bytes() == run_config and os.listdir(corpus) == ["manifest.json"]
    # A model folder inside the run (the quickstart's layout), replaced only when asked.
    code, err = _odegpt("convert", "--checkpoint", checkpoints, "--output", run / "model", capsys=capsys)
    assert code == 0 and (run / "model" / "model.safetensors").is_file(), err
    code, err = _odegpt("convert", "--checkpoint", checkpoints, "--output", run / "model", capsys=capsys)
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    code, err = _odegpt("convert", "--checkpoint", checkpoints, "--output", run / "model", "--overwrite",
                        capsys=capsys)
    assert code == 0 and (run / "model" / "config.json").is_file() and (run / "config.json").read_bytes() == run_config


def test_training_refuses_to_write_into_a_folder_that_is_not_a_run(trained, tmp_path):
    from launcher.run_folder import NotARunFolderError, check_run_folder

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "odegpt", "hidden_size": 64}))
    (model / "model.safetensors").write_bytes(b"weights")
    bare_model_config = tmp_path / "bare"
    bare_model_config.mkdir()
    (bare_model_config / "config.json").write_text(json.dumps({"model_type": "llama"}))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text("{}")
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("mine")
    (tmp_path / "file").write_text("x")
    cases = [("", "run.output_dir is empty, which would train into the current folder"),
             (model, "holds model.safetensors: it is a model folder"),
             (bare_model_config, "holds a 'llama' model's config.json, which training would replace"),
             (corpus, "holds manifest.json: it is a prepared corpus"),
             (project, "is not a training run's folder (it holds README.md)"),
             (tmp_path / "file", "is a file, not a folder")]
    for folder, message in cases:
        with pytest.raises(NotARunFolderError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_run_folder(folder)
    for fine in (tmp_path / "new", trained, tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        check_run_folder(fine)  # a new folder, a run's own (with its checkpoints), an empty one

    # The real command, on one rank: refused before anything is written.
    before = sorted(os.listdir(model)), (model / "config.json").read_bytes()
    process = _plain(model, **{"train.train_steps": 1})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 2, stderr[-3000:]
    assert f"run.output_dir {model} holds model.safetensors" in stderr
    assert (sorted(os.listdir(model)), (model / "config.json").read_bytes()) == before
    result = subprocess.run([PYTHON, "-m", "odegpt", "launch", "--num-gpus", "2", "--config", "quickstart",
                             "--dry-run", *_overrides(model)], env=_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 2 and "holds model.safetensors" in result.stderr
    assert (sorted(os.listdir(model)), (model / "config.json").read_bytes()) == before  # no deepspeed_env either


def test_resume_falls_back_past_a_damaged_checkpoint_and_refuses_another_model(trained, tmp_path):
    run = _copy(trained, tmp_path)
    newest, previous = run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000001"
    victim = tmp_path / "pwned"
    _craft(newest / "rng_state_rank00000.pt", victim)
    _reseal(newest)

    # Another model shape: refused before anything is written, naming the field.
    config_before = (run / "config.json").read_bytes()
    process = _plain(run, **{"deepspeed.zero_stage": 1, "train.train_steps": 3, "model.hidden_size": 64,
                             "eval.interval": 0, "eval.num_samples": 4, "checkpoint.interval": 0})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 2, stderr[-3000:]
    assert "model.hidden_size (checkpoint 32, now 64)" in stderr and "Traceback" not in stderr
    assert (run / "config.json").read_bytes() == config_before

    # --resume auto passes over the damaged newest checkpoint (its crafted pickle never runs), says so,
    # and continues from the previous one; metrics come every logging.interval steps and at the last.
    process = _plain(run, **{"deepspeed.zero_stage": 1, "train.train_steps": 4, "logging.interval": 2,
                             "eval.interval": 0, "eval.num_samples": 4, "checkpoint.interval": 0})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    assert f"checkpoint {newest}: rng_state_rank00000.pt cannot be read" in stderr
    assert f"resuming from the previous complete checkpoint, {previous}" in stderr
    assert f"resumed from {previous}: step 1" in stderr
    assert not victim.exists()
    assert [s for s in _train_metrics(run) if s > 2] == [4]  # step 3 is not a logging step

    # A damaged checkpoint named explicitly is an error, not a silent fallback.
    process = _plain(run, **{"deepspeed.zero_stage": 1, "train.train_steps": 5}, resume=str(newest))
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 2 and f"checkpoint {newest}: rng_state_rank00000.pt" in stderr.strip().splitlines()[-1]


# ---- corpora the model cannot read ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    train_tokenizer(["stdlib"], root / "tokenizer", vocab_size=400, max_files=20, max_sentences=5000)
    prepare(PrepareConfig(["stdlib"], str(root / "tokenizer"), str(root / "corpus"), max_files=20, val_fraction=0.2,
                          progress=False))
    return root / "tokenizer", root / "corpus"


@pytest.fixture(scope="module")
def other_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """Another tokenizer (another vocabulary size, so another fingerprint) and a corpus prepared with it."""
    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("other_corpus")
    train_tokenizer(["stdlib"], root / "tokenizer", vocab_size=380, max_files=20, max_sentences=5000)
    prepare(PrepareConfig(["stdlib"], str(root / "tokenizer"), str(root / "corpus"), max_files=20, val_fraction=0.2,
                          progress=False))
    return root / "tokenizer", root / "corpus"


def test_a_resume_with_another_tokenizer_is_refused_naming_both(corpus, other_corpus, tmp_path):
    """It used to resume at the saved step, exit 0 and rewrite config.json: the embedding rows then meant other
    tokens. The checkpoint now records its run's tokenizer (fingerprint), and a resume compares."""
    from data_pipeline.tokenizer import tokenizer_fingerprint

    (tokenizer, data), (other_tokenizer, other_data) = corpus, other_corpus
    run = tmp_path / "run"
    first = {"data.corpora": f"[{data}]", "data.tokenizer": str(tokenizer), "model.vocab_size": 400,
             "train.train_steps": 1, "checkpoint.interval": 1, "eval.interval": 0}
    _, stderr = (process := _plain(run, **first)).communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    checkpoint = run / "checkpoints" / "step_00000001"
    config_before = (run / "config.json").read_bytes()

    for changed, now in [({"data.tokenizer": str(other_tokenizer)}, other_tokenizer),
                         ({"data.tokenizer": "null"}, other_tokenizer)]:  # the corpus's recorded tokenizer
        _, stderr = (process := _plain(run, **{**first, "data.corpora": f"[{other_data}]", **changed,
                                               "train.train_steps": 2})).communicate(timeout=TIMEOUT)
        assert process.returncode == 2, stderr[-3000:]
        line = next(line for line in stderr.splitlines() if "another tokenizer" in line)
        assert line.startswith(f"odegpt train: config error: cannot resume {checkpoint} with another tokenizer: the "
                               f"checkpoint's run used {tokenizer} (fingerprint "), line
        assert f"this run uses {now} (fingerprint {tokenizer_fingerprint(other_tokenizer)[:12]}...)" in line
        assert "Traceback" not in stderr and (run / "config.json").read_bytes() == config_before
    state = json.loads((checkpoint / "odegpt_state.json").read_text())
    assert state["tokenizer"] == {"path": str(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}


def test_resume_tokenizer_records_old_and_new(corpus, other_corpus):
    from launcher.data import check_resumed_tokenizer

    (tokenizer, _), (other_tokenizer, _) = corpus, other_corpus
    record = {"path": str(tokenizer), "fingerprint": "a" * 32}
    check_resumed_tokenizer(None, record, "ckpt")  # a checkpoint from before the tokenizer was recorded
    check_resumed_tokenizer(record, None, "ckpt")  # data that records no tokenizer
    check_resumed_tokenizer(record, {**record, "path": "moved/elsewhere"}, "ckpt")  # the same tokenizer, moved
    with pytest.raises(ConfigError, match="cannot resume ckpt with another tokenizer"):
        check_resumed_tokenizer(record, {"path": str(other_tokenizer), "fingerprint": "b" * 32}, "ckpt")


def _model_folder(path: Path, tokenizer: Path | None) -> Path:
    """A model of the shape the launcher tests train (vocabulary 400), saved with ``tokenizer``."""
    from odegpt import OdeGPTConfig, OdeGPTForCausalLM
    from odegpt.folders.export import save_native

    config = OdeGPTConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=True,
                          segments=[{"depth": 2, "shared": True}])
    save_native(OdeGPTForCausalLM(config), path, tokenizer_dir=tokenizer)
    return path


def test_init_from_a_model_of_another_tokenizer_is_refused_naming_both(corpus, other_corpus, tmp_path):
    from data_pipeline.tokenizer import tokenizer_fingerprint

    (tokenizer, data), (other_tokenizer, _) = corpus, other_corpus
    other, run = _model_folder(tmp_path / "other", other_tokenizer), tmp_path / "run"
    _, stderr = (process := _plain(run, **{"data.corpora": f"[{data}]", "data.tokenizer": str(tokenizer),
                                           "model.vocab_size": 400, "train.init_from": str(other),
                                           "train.train_steps": 1})).communicate(timeout=TIMEOUT)
    assert process.returncode == 2, stderr[-3000:]  # the trainer checks it before writing anything
    line = next((line for line in stderr.splitlines() if "another tokenizer" in line), stderr[-3000:])
    assert line == (f"odegpt train: config error: train.init_from {other} was trained with another tokenizer: {other} "
                    f"(fingerprint {tokenizer_fingerprint(other_tokenizer)[:12]}...), but this run's token ids come "
                    f"from {tokenizer} (fingerprint {tokenizer_fingerprint(tokenizer)[:12]}...); train with the "
                    f"folder's tokenizer (and corpora prepared with it)")
    assert "Traceback" not in stderr and not (run / "config.json").exists()

    from launcher.data import check_init_from_tokenizer, run_tokenizer

    real = [f"data.corpora=[{data}]", f"data.tokenizer={tokenizer}", "train.seq_len=64"]
    for folder in (_model_folder(tmp_path / "same", tokenizer), _model_folder(tmp_path / "none", None)):
        config = load_config([], [*real, f"train.init_from={folder}"])  # the same tokenizer, or none to compare
        check_init_from_tokenizer(config, run_tokenizer(config))


def test_token_ids_beyond_the_model_vocabulary_are_refused_before_the_first_step(corpus, tmp_path):
    from launcher.data import check_corpora

    tokenizer, data = corpus
    real = [f"data.corpora=[{data}]"]
    config = load_config(["quickstart"], [*real, "data.tokenizer=null", "model.vocab_size=300"])
    with pytest.raises(ConfigError) as error:
        check_corpora(config)
    assert f"data.corpora[0] ({data}) holds token ids up to 399" in str(error.value)
    assert "set model.vocab_size >= 400" in str(error.value)
    check_corpora(load_config(["quickstart"], [*real, f"data.tokenizer={tokenizer}", "model.vocab_size=400"]))
    with pytest.raises(ConfigError, match=r"data.corpora\[0\]: .* is not a prepared corpus"):
        check_corpora(load_config(["quickstart"], ["data.corpora=[nowhere]", "data.tokenizer=null"]))


def test_a_bad_shard_is_reported_once_by_two_ranks(corpus, tmp_path):
    tokenizer, data = corpus
    damaged = tmp_path / "corpus"
    shutil.copytree(data, damaged, ignore=shutil.ignore_patterns("index_cache"))
    shard = damaged / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    result = _launch(tmp_path / "run", **{"data.corpora": f"[{damaged}]", "data.tokenizer": str(tokenizer),
                                          "model.vocab_size": 400})
    assert result.returncode != 0
    assert result.stderr.count("does not match manifest") == 1, result.stderr[-3000:]
    assert f"odegpt train: shard {shard} checksum" in result.stderr and "Traceback" not in result.stderr


def test_a_huge_document_is_tokenized_in_segments_with_the_same_tokens(corpus, tmp_path, monkeypatch):
    import sentencepiece as spm

    from data_pipeline import prepare as prepare_module
    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.readers import stdlib_files

    tokenizer, _ = corpus
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    code = "".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[:20])
    for size in (1000, 5000):
        pieces = list(prepare_module.segments(code, size))
        assert "".join(pieces) == code and max(map(len, pieces)) <= size
        assert [t for piece in pieces for t in sp.encode(piece)] == sp.encode(code)  # cut at line breaks

    line = " ".join(f"word{i % 97}   x{i}" for i in range(20000))  # one long line, runs of spaces
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "one-line.txt").write_text(line)
    monkeypatch.setattr(prepare_module, "SEGMENT_CHARS", 4096)
    manifest = prepare(PrepareConfig([str(tmp_path / "inputs")], str(tokenizer), str(tmp_path / "out"),
                                     progress=False))
    tokens = np.fromfile(tmp_path / "out" / "train-00000.bin", dtype=manifest.dtype)
    assert len(line) > 30 * 4096
    assert tokens.tolist() == sp.encode(line) + [2]  # one document, one EOS


# ---- exports -------------------------------------------------------------------------------------------

# ---- GPU readiness ----------------------------------------------------------------------------------

def test_gpu_smoke_script_plans_every_gpu_count_and_fails_without_a_gpu(tmp_path):
    script = REPO / "scripts" / "gpu_smoke.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PYTHON": PYTHON}
    dry = subprocess.run([str(script), "--cpu", "--gpus", "1 2", "--output", str(tmp_path), "--dry-run"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    launches = [line for line in dry.stdout.splitlines() if " launch " in line]
    assert [line.split("--num-gpus ")[1].split()[0] for line in launches] == ["1", "2"]
    assert all("train.global_batch_size=" in line for line in launches) and "launcher.metrics" in dry.stdout
    assert not any(tmp_path.iterdir())  # a dry run runs nothing
    import torch

    if not torch.cuda.is_available():
        real = subprocess.run([str(script), "--output", str(tmp_path)], env=env, capture_output=True, text=True,
                              timeout=60)
        assert real.returncode == 2 and "no CUDA GPU visible" in real.stderr


def test_metrics_summary_reads_throughput_and_fails_on_a_bad_run(tmp_path, capsys):
    from launcher.metrics import main, summarize

    good, bad = tmp_path / "good", tmp_path / "bad"
    for run, last_loss in ((good, 2.5), (bad, float("nan"))):
        run.mkdir()
        rows = [{"kind": "build", "step": 0}] + [
            {"kind": "train", "step": s, "loss": 3.0 if s < 50 else last_loss, "tokens_per_s": 1000.0 * s,
             "mfu": 0.1, "peak_memory_gib_per_rank": [1.5, 1.25]} for s in (10, 20, 30, 40, 50)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(good)
    # the first 20% of steps left out and summary["loss"] == 2.5
    assert summary["tokens_per_s"] == 35000.0 and summary["ranks"] == 2
    assert main([str(good)]) == 0 and main([str(good), str(bad)]) == 1
    assert "last loss is nan" in capsys.readouterr().err


def test_zero0_logs_the_gradient_norm_the_other_stages_log(trained, tmp_path):
    """ZeRO-0 used to log grad_norm NaN at every step: DeepSpeed computes none there."""
    import math

    run = tmp_path / "run"
    process = _plain(run, **{"deepspeed.zero_stage": 0, "train.train_steps": 2, "checkpoint.interval": 1,
                             "eval.interval": 0, "eval.num_samples": 4})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    zero0, zero1 = _train_metrics(run), _train_metrics(trained)  # the same run at ZeRO-1
    for step in (1, 2):
        assert math.isfinite(zero0[step]["grad_norm"]), zero0[step]
        assert zero0[step]["grad_norm"] == pytest.approx(zero1[step]["grad_norm"], rel=1e-5), step


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
    run = tmp_path / "run"
    process = _plain(run, env=_env(ODEGPT_FAULT_DISK_FULL_IN_SAVE="0:4"), **{
        "deepspeed.zero_stage": 1, "train.train_steps": 4, "checkpoint.interval": 2, "eval.interval": 0,
        "eval.num_samples": 4})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0
    checkpoints = run / "checkpoints"
    line = next(line for line in stderr.splitlines() if "saving checkpoint step 4" in line)
    assert "file write failed" in line and f"newest complete: {checkpoints / 'step_00000002'}" in line, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002"]  # the partial one removed
    from launcher.checkpointing import verify

    assert verify(checkpoints, "step_00000002").state["step"] == 2


def test_data_cache_dir_keeps_a_corpus_folder_untouched(corpus, tmp_path, capsys):
    """A read-only corpus needs its index cache elsewhere: data.cache_dir (and evaluate --cache-dir) puts it there."""
    from launcher.data import build_datasets

    tokenizer, data = corpus
    copy = tmp_path / "corpus"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns("index_cache"))
    before = sorted(p.name for p in copy.rglob("*"))
    config = load_config(["quickstart"], [f"data.corpora=[{copy}]", f"data.tokenizer={tokenizer}",
                                          f"data.cache_dir={tmp_path / 'cache'}", "train.train_steps=4"])
    train, valid = build_datasets(config)
    assert len(train) == 4 * config.train.global_batch_size and len(valid) > 0
    assert sorted(p.name for p in copy.rglob("*")) == before  # nothing written into the corpus
    assert list((tmp_path / "cache").rglob("shuffle-*.npy")) and list((tmp_path / "cache").rglob("verified-*"))
