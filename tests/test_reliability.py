"""Hostile input that used to hang, lose data or give wrong numbers with exit 0 (issue 11): stale extension
build locks and leaked shared memory, signals during start-up, export onto its own input, non-finite
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

from launcher.launch import free_port
from tests.test_launcher_train import PYTHON, TIMEOUT, _env, _overrides

BUILT_SHM_OP = Path.home() / ".cache" / "torch_extensions" / "py311_cpu" / "deepspeed_shm_comm"


# ---- 1. stale torch-extension build locks, signals during start-up, leaked /dev/shm buffers ------------

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


def test_launch_removes_a_stale_build_lock_and_leaves_no_shared_memory(tmp_path):
    """The hang: a build lock left by a killed rank made every later launch wait forever, silently. And every
    CPU launch left a 66 MB /dev/shm buffer per rank behind."""
    extensions = tmp_path / "torch_extensions"
    if BUILT_SHM_OP.is_dir():  # reuse this machine's build: a fresh one compiles for a minute
        shutil.copytree(BUILT_SHM_OP, extensions / BUILT_SHM_OP.name, ignore=shutil.ignore_patterns("lock"))
    lock = extensions / BUILT_SHM_OP.name / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    port = free_port()
    output_dir = tmp_path / "run"
    cmd = [PYTHON, "-m", "odegpt", "launch", "--num-gpus", "2", "--master-port", str(port), "--config",
           "quickstart", *_overrides(output_dir, **{"train.train_steps": 1, "eval.interval": 0,
                                                    "checkpoint.interval": 0})]
    try:
        result = subprocess.run(cmd, env=_env(TORCH_EXTENSIONS_DIR=str(extensions)), cwd=tmp_path,
                                capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        for path in leaked:
            path.unlink()
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"removed a stale torch-extension build lock {lock}" in result.stderr
    assert not lock.exists()
    assert leaked == []


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
