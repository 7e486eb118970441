"""Start-up that used to hang or leave things behind: stale extension build locks, signals during start-up."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.launcher.test_train import PYTHON, TIMEOUT, _env, _overrides

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


