"""Numbered stages of a long job made of `odegpt` commands (the quickstart, the ablation): a header per
stage with the elapsed time, each command echoed before it runs, its own progress bars below."""
from __future__ import annotations

import os
import shlex
import subprocess
import time


class Stages:
    def __init__(self, job: str, total: int, show_load: bool = False) -> None:
        self.job, self.total, self.show_load = job, total, show_load
        self.index, self.start = 0, time.perf_counter()

    def begin(self, title: str) -> None:
        self.index += 1
        elapsed = f"t+{time.perf_counter() - self.start:.0f}s"
        if self.show_load:  # speeds in a stage's output mean little on a loaded machine
            elapsed += f", load {os.getloadavg()[0]:.1f}"
        print(f"\n=== [{self.index}/{self.total}] {title}  ({elapsed})", flush=True)

    def run(self, cmd: list[str], capture: bool = False, env: dict | None = None) -> str:
        """Run ``cmd`` (its stdout returned when ``capture``); a failure ends the job naming the command."""
        print("$ " + shlex.join(cmd), flush=True)
        result = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE if capture else None)
        if result.returncode != 0:
            raise SystemExit(f"{self.job}: command failed with exit code {result.returncode}: {shlex.join(cmd)}")
        return result.stdout or ""
