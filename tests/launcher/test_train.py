"""Multi-process launcher tests: exact resume under ZeRO 1-3 on 2 ranks, conversion, preemption,
non-finite losses and a killed rank. Tiny model, a few steps, synthetic data (defined here)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launcher.launch import free_port

# Every test here starts DeepSpeed ranks in subprocesses: the slow half of the suite (`pytest -m "not slow"` skips it).
pytestmark = pytest.mark.slow

# Every process the tests start imports tests/rank_plugin/sitecustomize.py: synthetic data, fault injection.
RANK_PLUGIN = Path(__file__).resolve().parents[1] / "rank_plugin"
PYTHON = sys.executable
TIMEOUT = 300  # hang guard only


def _overrides(output_dir: Path, **extra) -> list[str]:
    values = {"data.corpora": "[synthetic]",  # tests/rank_plugin: synthetic tokens

              "data.tokenizer": "null", "run.output_dir": str(output_dir), "model.vocab_size": 64,
              "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_attention_heads": 2,
              "model.segments": "[{depth: 2, shared: true}]", "train.seq_len": 16, "train.micro_batch_size": 2,
              "train.global_batch_size": 4, "train.train_steps": 4, "train.warmup_steps": 1,
              "train.step_size_distribution": "{choices: [0.5, 1, 2]}", "train.reference_weight": 0, "eval.interval": 2,
              "eval.num_samples": 4,
              "eval.step_sizes": "[1, 2]", "checkpoint.interval": 2, "checkpoint.keep_last": 2,
              "logging.progress_bar": "false", "logging.interval": 1, **extra}
    return [f"--set={key}={value}" for key, value in values.items()]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(RANK_PLUGIN), "DS_ACCELERATOR": "cpu", **extra}


def _launch(output_dir: Path, ranks: int = 2, env: dict | None = None, **extra) -> subprocess.CompletedProcess:
    port = free_port()
    cmd = [PYTHON, "-m", "odegpt", "launch", "--num-gpus", str(ranks), "--master-port", str(port),
           "--config", "quickstart", *_overrides(output_dir, **extra)]
    result = subprocess.run(cmd, env=env or _env(), cwd=output_dir.parent, capture_output=True, text=True,
                            timeout=TIMEOUT)
    # DeepSpeed's CPU shared-memory all-reduce (66 MB of /dev/shm per rank, never removed) is not started.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "leaked /dev/shm buffers"
    return result


def _plain(output_dir: Path, env: dict | None = None, resume: str = "auto", **extra) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "launcher.train", "--config", "quickstart", *_overrides(output_dir, **extra),
           "--resume", resume]
    return subprocess.Popen(cmd, env=env or _env(), cwd=output_dir.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _train_metrics(output_dir: Path) -> dict[int, dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == "train"}


def _valid_metrics(output_dir: Path) -> dict[int, dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == "valid"}


def _check(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_is_bit_exact_and_converts(tmp_path, stage):
    """4 steps straight == 2 steps, new processes resume from the checkpoint, 2 more (fp32, 2 ranks). ZeRO-1 resumes
    through the same DeepSpeed optimizer as ZeRO-2 (stage_1_and_2), so it is not run again here."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _check(_launch(full, **{"deepspeed.zero_stage": stage}))
    checkpoints = full / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002", "step_00000004"]
    build = next(json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "build")
    held, total = build["parameters_held_per_rank"], build["parameters"]
    if stage == 3:  # created partitioned (zero.Init): each rank holds half, never the whole model
        assert build["zero_init"] and all(total / 2 <= n < total / 2 + 64 for n in held), build
    else:
        assert not build["zero_init"] and held == [total, total], build
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert list((full / "tensorboard").glob("events.out.tfevents.*"))

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoints / "step_00000002", resumed / "checkpoints" / "step_00000002")
    _check(_launch(resumed, **{"deepspeed.zero_stage": stage}))
    a, b = _train_metrics(full), _train_metrics(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "step_size", "lr", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    assert _valid_metrics(full)[4] == _valid_metrics(resumed)[4]

    # The converted model reproduces the run's final validation perplexity.
    import torch

    from launcher.convert import convert
    from odegpt import OdeGPTForCausalLM
    from odegpt.evaluation.perplexity import evaluate_perplexity

    folder = convert(checkpoints, tmp_path / "model")
    model = OdeGPTForCausalLM.from_pretrained(folder)
    from odegpt.evaluation.perplexity import evaluation_indices
    from tests.rank_plugin.synthetic_data import SYNTHETIC_VOCAB, SyntheticTokens

    valid = SyntheticTokens(64, 16, SYNTHETIC_VOCAB, 1234 + 1)
    # The run split the same 4 evenly spread samples over 2 ranks in micro-batches of 2.
    batch = torch.from_numpy(np.stack([valid[i] for i in evaluation_indices(64, 4)]))
    ppl = evaluate_perplexity(model, [batch], [1.0, 2.0])
    logged = _valid_metrics(full)[4]
    assert ppl[1.0] == pytest.approx(logged["ppl_a1"], rel=1e-5)
    assert ppl[2.0] == pytest.approx(logged["ppl_a2"], rel=1e-5)


def _wait_for_step(output_dir: Path, process: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()[1][-3000:]}")
        try:
            if max(_train_metrics(output_dir), default=0) >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError("training made no progress")


def test_plain_process_stage0_sigterm_saves_and_resumes(tmp_path):
    run = tmp_path / "run"
    process = _plain(run, **{"deepspeed.zero_stage": 0, "train.train_steps": 100000,
                             "checkpoint.interval": 0, "eval.interval": 0})
    _wait_for_step(run, process, 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    assert "stopping on SIGTERM" in stderr
    from launcher.checkpointing import latest_complete_tag, step_of

    tag = latest_complete_tag(run / "checkpoints")
    stopped_at = step_of(tag)
    assert stopped_at == max(_train_metrics(run))

    # Stage 0 converts through its own path.
    from launcher.convert import convert

    assert (convert(run / "checkpoints", tmp_path / "model") / "model.safetensors").is_file()

    # Resume continues from the saved step with a shorter horizon.
    process = _plain(run, **{"deepspeed.zero_stage": 0, "train.train_steps": stopped_at + 1,
                             "checkpoint.interval": 0, "eval.interval": 0})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / tag}" in stderr
    assert latest_complete_tag(run / "checkpoints") == f"step_{stopped_at + 1:08d}"


def test_stage0_bf16_converts_from_the_fp32_master_weights(tmp_path):
    import torch

    from launcher.convert import load_state_dict

    run = tmp_path / "run"
    process = _plain(run, **{"deepspeed.zero_stage": 0, "train.precision": "bf16", "train.train_steps": 3,
                             "checkpoint.interval": 0, "eval.interval": 0})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    state_dict, _ = load_state_dict(run / "checkpoints", "step_00000003")
    module = torch.load(run / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=True)["module"]
    assert set(state_dict) >= set(module)
    differs = False
    for name, weight in module.items():
        assert weight.dtype == torch.bfloat16 and state_dict[name].dtype == torch.float32
        torch.testing.assert_close(state_dict[name].bfloat16(), weight, rtol=0, atol=0)  # same weights ...
        differs |= bool((state_dict[name] != weight.float()).any())
    assert differs  # ... at fp32 precision, not the bf16 copy


def test_nonfinite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = _env(ODEGPT_FAULT_NONFINITE_STEPS="2,3,4")  # optimizer steps 3, 4, 5 (1-based)
    process = _plain(run, env=env, **{"train.train_steps": 10, "train.max_nonfinite_steps": 3})
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 3, stderr[-3000:]
    assert "loss was not finite for 3 optimizer steps in a row" in stderr
    from launcher.checkpointing import complete_tags

    assert complete_tags(run / "checkpoints") == ["step_00000002"]  # step 4 had a NaN loss: not saved


def test_rank_killed_during_a_save_fails_the_job_and_the_previous_checkpoint_resumes(tmp_path):
    run = tmp_path / "run"
    result = _launch(run, env=_env(ODEGPT_FAULT_KILL_IN_SAVE="1:4"))  # rank 1 dies while saving step 4
    assert result.returncode != 0  # the surviving rank does not hang: the launcher ends the job
    from launcher.checkpointing import complete_tags

    assert (run / "checkpoints" / "step_00000004").is_dir()  # half-written ...
    assert complete_tags(run / "checkpoints") == ["step_00000002"]  # ... and ignored
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"

    result = _launch(run)  # --resume auto
    _check(result)
    assert "resumed from" in result.stderr and "step_00000002" in result.stderr
    assert complete_tags(run / "checkpoints") == ["step_00000002", "step_00000004"]


def test_sigint_to_launch_checkpoints_every_rank_and_exits_zero(tmp_path):
    """Ctrl-C on `odegpt launch` (2 ranks, ZeRO-3, activation checkpointing): all ranks save, exit 0."""
    run = tmp_path / "run"
    cmd = [PYTHON, "-m", "odegpt", "launch", "--num-gpus", "2", "--master-port", str(free_port()), "--config",
           "quickstart", *_overrides(run, **{"deepspeed.zero_stage": 3, "train.activation_checkpointing": "true",
                                             "train.train_steps": 100000, "checkpoint.interval": 0,
                                             "eval.interval": 0})]
    process = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    _wait_for_step(run, process, 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    from launcher.checkpointing import latest_complete_tag, step_of

    tag = latest_complete_tag(run / "checkpoints")
    assert step_of(tag) == max(_train_metrics(run))
    assert sorted(p.name for p in (run / "checkpoints" / tag).glob("rng_state_rank*.pt")) == [
        "rng_state_rank00000.pt", "rng_state_rank00001.pt"]


def test_real_corpus_trains_converts_with_tokenizer_and_evaluates(tmp_path):
    """The data pipeline end to end: stdlib tokenizer + prepared shards -> 3 steps -> convert -> evaluate."""
    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.tokenizer import train_tokenizer

    tokenizer, corpus, run = tmp_path / "tokenizer", tmp_path / "corpus", tmp_path / "run"
    train_tokenizer(["stdlib"], tokenizer, vocab_size=400, max_files=20, max_sentences=5000)
    prepare(PrepareConfig(["stdlib"], str(tokenizer), str(corpus), max_files=20, val_fraction=0.2, progress=False))
    real_data = {"data.corpora": f"[{corpus}]",
                 "data.tokenizer": str(tokenizer), "model.vocab_size": 400, "train.train_steps": 3,
                 "eval.num_samples": 8, "checkpoint.interval": 0}
    process = _plain(run, **real_data)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]

    model_dir = tmp_path / "model"
    result = subprocess.run([PYTHON, "-m", "odegpt", "convert", "--checkpoint", str(run / "checkpoints"),
                             "--output", str(model_dir)], env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    _check(result)
    assert (model_dir / "tokenizer.json").is_file()  # the run's tokenizer travels with the model
    result = subprocess.run([PYTHON, "-m", "odegpt", "evaluate", "--model", str(model_dir), "--data", str(corpus),
                             "--step-sizes", "1,2", "--seq-len", "16", "--num-samples", "8", "--no-speed", "--json"],
                            env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    _check(result)
    table = {f"{row['step_size']:g}": row["perplexity"] for row in json.loads(result.stdout)["results"]}

    # The training run evaluated the same 8 evenly spread validation samples at its last step.
    logged = _valid_metrics(run)[3]
    assert table["1"] == pytest.approx(logged["ppl_a1"], rel=1e-5)
    assert table["2"] == pytest.approx(logged["ppl_a2"], rel=1e-5)


def test_a_second_run_into_a_training_run_folder_is_refused_while_the_first_trains(tmp_path):
    """Two train runs into one folder used to both exit 0, interleaving metrics and checkpoints."""
    run = tmp_path / "run"
    first = _plain(run, **{"train.train_steps": 100000, "checkpoint.interval": 0, "eval.interval": 0})
    try:
        _wait_for_step(run, first, 1)
        second = _plain(run, **{"train.train_steps": 3, "checkpoint.interval": 0, "eval.interval": 0})
        _, stderr = second.communicate(timeout=TIMEOUT)
        assert second.returncode == 2, stderr[-3000:]
        assert f"run folder {run} is being written by another process (host " in stderr
        assert f"pid {first.pid}" in stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=TIMEOUT)


def test_uptraining_starts_from_a_folder_and_trains_its_relaxation_at_its_own_learning_rate(tmp_path):
    import torch

    from odegpt import OdeGPTForCausalLM
    from odegpt.folders.export import save_native
    from odegpt.folders.model_folder import load_model
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config([{"depth": 2, "shared": True}], vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=2, relax_rank=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    start = OdeGPTForCausalLM(config)
    save_native(start, tmp_path / "start")
    run = tmp_path / "run"
    process = _plain(run, **{"train.init_from": str(tmp_path / "start"), "train.relax_lr_scale": 0.0,
                             "train.train_steps": 2, "checkpoint.interval": 2})
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr[-3000:]
    assert f"initialised from {tmp_path / 'start'}" in stdout + stderr, stderr[-3000:]
    from launcher.convert import convert

    trained = load_model(convert(run / "checkpoints", tmp_path / "trained"))
    assert trained.config.relax_rank == 2
    before, after = start.state_dict(), trained.state_dict()
    # lr scale 0: the relaxation is exactly where it started; everything else moved.
    assert all(torch.equal(before[name], after[name]) for name in before if ".relax_" in name)
    assert not torch.equal(before["model.blocks.0.mlp.up_proj.weight"], after["model.blocks.0.mlp.up_proj.weight"])


def _source_folder(tmp_path: Path) -> Path:
    """A tiny unshared source of the synthetic runs' shape (depth 2, vocabulary 64), saved as a native folder."""
    import torch

    from odegpt import OdeGPTForCausalLM
    from odegpt.folders.export import save_native
    from tests.conftest import tiny_config

    torch.manual_seed(3)
    config = tiny_config([{"depth": 2, "shared": False}], vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    return save_native(OdeGPTForCausalLM(config), tmp_path / "source")


def test_distillation_logs_each_term_resumes_exactly_and_under_zero3_holds_the_source_partitioned(tmp_path):
    """ZeRO-3, the teacher's hard case (partitioned, gathered layer by layer); ZeRO 0-2 hold it whole, as the
    stepwise test's run does."""
    source = _source_folder(tmp_path)
    distill = {"train.distill_from": str(source), "train.distill_trajectory_weight": 0.5,
               "train.distill_kl_weight": 1.0, "deepspeed.zero_stage": 3, "train.lm_weight": 0,
               "train.reference_weight": 0.5}  # pure distillation: the a=1 pass of a step at a != 1 distilled too
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _check(_launch(full, **distill))
    metrics = _train_metrics(full)
    assert all(set(record["terms"]) == {"kl", "trajectory", "reference_kl", "reference_trajectory"}
               for record in metrics.values())
    assert all(record["terms"]["kl"] > 0 for record in metrics.values())
    assert any(record["terms"]["reference_kl"] > 0 for record in metrics.values())  # the steps that drew a != 1
    # The terms add up to the loss (each is already weighted).
    assert all(abs(sum(r["terms"].values()) - r["loss"]) < 1e-6 * abs(r["loss"]) for r in metrics.values())
    teacher = next(json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["kind"] == "teacher")
    held, total = teacher["parameters_held_per_rank"], teacher["parameters"]
    assert all(n < total / 2 + 64 for n in held), teacher
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    _check(_launch(resumed, **distill))
    again = _train_metrics(resumed)
    for step in (3, 4):
        assert again[step]["loss"] == metrics[step]["loss"] and again[step]["terms"] == metrics[step]["terms"]


def test_stepwise_distillation_trains_the_trajectory_alone(tmp_path):
    source = _source_folder(tmp_path)
    run = tmp_path / "run"
    _check(_launch(run, ranks=1, **{"train.distill_from": str(source), "train.distill_trajectory_weight": 1.0,
                                     "train.distill_stepwise": "true", "train.distill_steps_per_sample": 1,
                                     "train.lm_weight": 0, "deepspeed.zero_stage": 0}))
    metrics = _train_metrics(run)
    assert all(set(r) >= {"loss", "step_size"} and "terms" not in r for r in metrics.values())  # one term: the loss
    assert metrics[4]["loss"] < metrics[1]["loss"]
