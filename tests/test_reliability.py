"""Hostile input that used to hang, lose data or give wrong numbers with exit 0 (issue 11): stale extension
build locks, signals during start-up, export onto its own input, non-finite
weights, binary files named .txt, and the small ones (truncated tokenizer records, a tampered manifest)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_launcher_train import PYTHON, TIMEOUT, _env, _overrides

# ---- 1. stale torch-extension build locks, signals during start-up ----------------------------------------

def test_a_stale_build_lock_is_removed_and_a_held_one_reported(tmp_path):
    from launcher.leftovers import clear_stale_build_locks

    (tmp_path / "deepspeed_shm_comm").mkdir()
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    (tmp_path / "other_op").mkdir()
    held = tmp_path / "other_op" / "lock"
    fd = os.open(held, os.O_CREAT | os.O_EXCL)  # what torch's FileBaton does while it builds
    try:
        said: list[str] = []
        locks = clear_stale_build_locks(said.append, roots=[tmp_path])
    finally:
        os.close(fd)
    assert {lock.path for lock in locks} == {stale, held}
    assert not stale.exists() and held.exists()
    assert len(said) == 2, said
    assert any(f"removed a stale torch-extension build lock {stale} (age 60 min" in line for line in said), said
    assert any(f"{held}" in line and f"held by pid {os.getpid()}" in line and f"rm {held}" in line
               for line in said), said


def test_train_removes_a_stale_build_lock_before_starting(tmp_path):
    """The hang: a build lock left by a killed build made every later start wait forever, silently."""
    lock = tmp_path / "torch_extensions" / "fused_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 600, time.time() - 600))  # left by a build killed 10 minutes ago
    cmd = [PYTHON, "-m", "launcher.train", "--config", "quickstart",
           *_overrides(tmp_path / "run", **{"train.train_steps": 1, "eval.interval": 0, "checkpoint.interval": 0})]
    result = subprocess.run(cmd, env=_env(TORCH_EXTENSIONS_DIR=str(lock.parent.parent)), cwd=tmp_path,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"removed a stale torch-extension build lock {lock} (age 10 min" in result.stderr
    assert not lock.exists()


def test_sigterm_during_start_up_exits_143_and_leaves_nothing(tmp_path):
    output_dir = tmp_path / "run"
    cmd = [PYTHON, "-m", "launcher.train", "--config", "quickstart",
           *_overrides(output_dir, **{"train.train_steps": 50, "model.hidden_size": 256,
                                      "model.intermediate_size": 512})]
    process = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + TIMEOUT
    while not (output_dir / "config.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)  # the run's config is written; its model and engine are being built
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM during start-up" in stderr and "Traceback" not in stderr
    assert not output_dir.exists(), sorted(output_dir.rglob("*"))


# ---- 2, 3. export: step sizes refused before any weight is read; never onto its own input ------------------

from odegpt.cli import main as odegpt_main  # noqa: E402
from tests.test_model_generate_cli import model_folder  # noqa: E402,F401  (a fixture: tiny model + tokenizer)


def _odegpt(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = odegpt_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_export_refuses_a_too_small_step_size_before_reading_any_weight(model_folder, tmp_path, capsys,
                                                                        monkeypatch):
    from odegpt import OdeGPTForCausalLM

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the step size was checked")

    monkeypatch.setattr(OdeGPTForCausalLM, "from_pretrained", no_weights)
    code, err = _odegpt(capsys, "export", "--model", model_folder, "--output", tmp_path / "out", "--step-size", "1e-6")
    assert code == 2 and err.count("\n") == 1 and "--step-size: step size 1e-06 needs" in err, err
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites_its_input_nor_a_folder_without_overwrite(model_folder, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(model_folder, model)
    weights = (model / "model.safetensors").read_bytes()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    cases = [(model, "is the --model folder"), (model / "sub", "is inside --model"),
             (tmp_path, "holds the --model folder"), (kept, "exists and is not empty")]
    for output, message in cases:
        code, err = _odegpt(capsys, "export", "--model", model, "--output", output, "--dtype", "bfloat16")
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert (model / "model.safetensors").read_bytes() == weights and not (model / "sub").exists()
    assert (kept / "notes.txt").read_text() == "mine"

    code, err = _odegpt(capsys, "export", "--model", model, "--output", kept, "--dtype", "bfloat16", "--overwrite")
    assert code == 0, err
    assert not (kept / "notes.txt").exists() and (kept / "model.safetensors").is_file()
    assert len((kept / "model.safetensors").read_bytes()) < len(weights)  # bf16 now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "m"]  # no staging folder left behind


# ---- 5. non-finite weights: refused on load, naming the tensor ------------------------------------------

def _overwrite_tensor_bytes(folder: Path, name: str) -> None:
    """What a damaged copy does: the tensor's bytes become 0xff (NaN in float32); the file still loads."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_size = struct.unpack("<Q", data[:8])[0]
    start, end = json.loads(data[8:8 + header_size])[name]["data_offsets"]
    data[8 + header_size + start:8 + header_size + end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))


def test_nonfinite_weights_are_refused_by_every_command_that_loads_them(model_folder, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(model_folder, damaged)
    _overwrite_tensor_bytes(damaged, "model.norm.weight")
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    commands = [["generate", "--model", damaged, "--max-new-tokens", "3"],
                ["evaluate", "--model", damaged, "--data", tmp_path / "text.txt", "--step-sizes", "1",
                 "--seq-len", "16"],
                ["export", "--model", damaged, "--output", tmp_path / "out"]]
    for argv in commands:
        code, err = _odegpt(capsys, *argv)
        assert code == 2 and "Traceback" not in err, (argv, err)
        err = err.strip().splitlines()[-1]  # after transformers' loading bar, one line
        assert f"odegpt {argv[0]}: {damaged} has non-finite weights (NaN or infinity): model.norm.weight (64 of 64)" in err, err
    assert not (tmp_path / "out").exists()


# ---- 6, 7. a binary file named .txt; a truncated tokenizer record; an edited manifest -----------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    (root / "corpus.txt").write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40)
    train_tokenizer([str(root / "corpus.txt")], root / "tokenizer", vocab_size=300)
    return root / "tokenizer"


def _prepare(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = odegpt_main(["prepare", *map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_binary_file_named_txt_is_skipped_named_and_counted(tokenizer_dir, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "code.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    (inputs / "latin1.txt").write_bytes("the caf\xe9 on the corner opens at nine every morning\n".encode("latin-1") * 20)
    (inputs / "blob.txt").write_bytes(os.urandom(100_000))
    code, out, err = _prepare(capsys, "--input", inputs, "--tokenizer", tokenizer_dir, "--output", tmp_path / "c")
    assert code == 0, err
    assert f"skipped a document of {inputs / 'blob.txt'}" in err and "not UTF-8 text" in err
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["skipped"]["undecodable_documents"] == 1
    assert manifest["skipped"]["undecodable_files"] == [str(inputs / "blob.txt")]
    assert manifest["totals"]["documents"] == 2  # the Latin-1 text (a few bad bytes) is kept, repaired
    assert manifest["repaired"]["documents_with_undecodable_bytes"] == 1
    assert "1 not text (binary)" in out


def test_a_truncated_tokenizer_record_and_an_edited_manifest_are_named(tokenizer_dir, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    code, _, err = _prepare(capsys, "--input", tmp_path / "text.txt", "--tokenizer", tokenizer_dir,
                            "--output", tmp_path / "c")
    assert code == 0, err
    manifest_file = tmp_path / "c" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["tokenizer"]["vocab_size"] = 100
    manifest_file.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert odegpt_main(["inspect", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "does not match its tokenizer" in err and "vocab_size 100 (tokenizer: 300)" in err, err

    truncated = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, truncated)
    record = truncated / "odegpt_tokenizer.json"
    record.write_text(record.read_text()[:40])
    code, _, err = _prepare(capsys, "--input", tmp_path / "text.txt", "--tokenizer", truncated,
                            "--output", tmp_path / "d")
    assert code == 1 and f"{record} is not valid JSON" in err and err.count("\n") == 1, err


def test_convert_refuses_a_checkpoint_with_nonfinite_weights(tmp_path, capsys, monkeypatch):
    """Consolidated weights are checked before the model folder is written (the checkpoint itself verified)."""
    import torch

    from launcher import checkpointing, convert

    checkpoint = checkpointing.Checkpoint(tmp_path / "checkpoints", "step_00000002", {"config": {}})
    weights = {"model.embed_tokens.weight": torch.zeros(4, 2),
               "model.norm.weight": torch.tensor([1.0, float("inf")])}
    monkeypatch.setattr(convert, "_locate", lambda path: checkpoint)
    monkeypatch.setattr(convert, "_load_weights", lambda located: weights)
    code, err = _odegpt(capsys, "convert", "--checkpoint", tmp_path / "checkpoints", "--output", tmp_path / "model")
    assert code == 2 and err.count("\n") == 1, err
    assert f"checkpoint {checkpoint.path} has non-finite weights (NaN or infinity): model.norm.weight (1 of 2)" in err
    assert not (tmp_path / "model").exists()
