"""``odegpt launch``: a thin wrapper that builds and runs the ``deepspeed`` launcher command.

It validates the config against the world size the command will create *before* any node starts,
writes the environment every rank needs to a DeepSpeed env file (exported by the multi-node
runners — pdsh, openmpi, slurm, ... — and inherited in ``--no-ssh`` mode), and runs
``launcher.train`` as a module on every node. ``--dry-run`` prints the command instead.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .config import ConfigError, load_config
from .leftovers import clear_stale_build_locks
from .run_folder import check_run_folder

# Variables every rank needs; copied from this environment when set (DS_ACCELERATOR is derived).
PROPAGATED_ENV = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                  "TOKENIZERS_PARALLELISM")


def free_port() -> int:
    """A TCP port free on this machine now, for a single-node rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LaunchSpec:
    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    resume: str = "auto"
    hostfile: str | None = None
    num_nodes: int | None = None
    num_gpus: int | None = None
    launcher: str = "pdsh"
    launcher_args: str | None = None
    no_ssh: bool = False
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int = 29500
    env: list[str] = field(default_factory=list)  # extra KEY=VALUE for every rank
    quiet: bool = False  # deepspeed launcher logs errors only


def read_hostfile(path: str) -> dict[str, int]:
    """``host slots=N`` lines (DeepSpeed's format) -> {host: slots}."""
    hosts: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or not slots:
            raise ValueError(f"{path}:{number}: expected 'hostname slots=N', got {line!r}")
        hosts[parts[0]] = int(slots[0].split("=", 1)[1])
    if not hosts:
        raise ValueError(f"hostfile {path} lists no hosts")
    return hosts


def world_size(spec: LaunchSpec) -> int | None:
    """Ranks the launcher will start, when it can be known here."""
    if spec.hostfile:
        hosts = list(read_hostfile(spec.hostfile).values())
        if spec.num_nodes:
            hosts = hosts[:spec.num_nodes]
        return sum(spec.num_gpus or slots for slots in hosts)
    if spec.num_gpus:
        return (spec.num_nodes or 1) * spec.num_gpus
    return None


def rank_environment(spec: LaunchSpec) -> dict[str, str]:
    env = {key: os.environ[key] for key in PROPAGATED_ENV if key in os.environ}
    try:
        # torch & co.: launcher.train imports this module before a rank's interruptible start-up
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        pass
    for assignment in spec.env:
        key, _, value = assignment.partition("=")
        env[key] = value
    return env


def build_command(spec: LaunchSpec) -> list[str]:
    """The exact ``deepspeed`` runner command (run with this Python, so the venv is the one in use)."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if spec.hostfile:
        cmd += ["--hostfile", spec.hostfile]
    if spec.num_nodes:
        cmd += ["--num_nodes", str(spec.num_nodes)]
    if spec.num_gpus:
        cmd += ["--num_gpus", str(spec.num_gpus)]
    if spec.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(spec.node_rank or 0)]
    elif spec.hostfile or (spec.num_nodes or 1) > 1:
        cmd += ["--launcher", spec.launcher]
        if spec.launcher_args:
            cmd += ["--launcher_args", spec.launcher_args]
    if spec.master_addr:
        cmd += ["--master_addr", spec.master_addr]
    if spec.quiet:
        cmd += ["--log_level", "error"]
    cmd += ["--master_port", str(spec.master_port), "--module", "launcher.train", "--config", *spec.configs]
    for assignment in spec.overrides:
        cmd += ["--set", assignment]
    cmd += ["--resume", spec.resume]
    return cmd


def _is_rank(cmdline: list[str]) -> bool:
    """A training rank runs ``python -m launcher.train`` (the launchers only mention the module)."""
    return any(a == "-m" and b == "launcher.train" for a, b in zip(cmdline, cmdline[1:]))


def run(spec: LaunchSpec, dry_run: bool = False) -> int:
    try:
        if spec.no_ssh and not spec.master_addr:
            raise ConfigError("--no-ssh needs --master-addr (the address of node rank 0)")
        config = load_config(spec.configs, spec.overrides, world_size=world_size(spec))
        check_run_folder(config.run.output_dir)  # before deepspeed_env is written into it
    except (ValueError, OSError) as error:  # ConfigError, NotARunFolderError, or a hostfile that cannot be read
        print(f"odegpt launch: config error: {error}", file=sys.stderr)
        return 2
    cmd = build_command(spec)
    env = rank_environment(spec)
    env_file = Path(config.run.output_dir).resolve() / "deepspeed_env"
    if dry_run:
        print("# environment for every rank (DS_ENV_FILE=" + str(env_file) + "):")
        for key, value in env.items():
            print(f"#   {key}={value}")
        print(shlex.join(cmd))
        return 0
    clear_stale_build_locks(lambda message: print(f"odegpt launch: {message}", file=sys.stderr, flush=True))
    created_output_dir = not env_file.parent.exists()
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    process_env = {**os.environ, **env, "DS_ENV_FILE": str(env_file)}
    # Make `launcher` importable on every rank even when run from elsewhere than the repo.
    repo_root = str(Path(__file__).resolve().parent.parent)
    process_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
    print("odegpt launch: " + shlex.join(cmd), file=sys.stderr, flush=True)
    # The launcher tree gets its own session, and SIGTERM/SIGINT (preemption, Ctrl-C) go straight to
    # the training ranks started here: each checkpoints and exits 0, so DeepSpeed's launcher, which
    # would kill them on a signal of its own, sees clean exits. Ranks on other nodes (pdsh etc.) are
    # reached through the runner, which passes signals on to its backend.
    process = subprocess.Popen(cmd, env=process_env, start_new_session=True)

    def forward(signum, frame):
        try:
            ranks = [child for child in psutil.Process(process.pid).children(recursive=True)
                     if _is_rank(child.cmdline())]
            for target in ranks or [psutil.Process(process.pid)]:
                target.send_signal(signum)
        except psutil.Error:
            pass

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if created_output_dir and [p.name for p in env_file.parent.iterdir()] == [env_file.name]:
            env_file.unlink()  # the job wrote nothing (stopped during start-up): leave no run folder behind
            env_file.parent.rmdir()
