"""How many threads a command's torch work runs on.

torch takes every core by default, and its OpenMP threads wait on each other at every operation: on a machine
that another job keeps busy, batch-1 decoding then collapses (measured on 2 cores beside a 2-rank training run:
26-78 tokens/s with torch's 2 threads against 594-1063 with one). So by default a command takes the cores the
1-minute load average leaves idle, at least one; ``--threads N`` (or ``OMP_NUM_THREADS``) decides otherwise.
"""
from __future__ import annotations

import os

import torch


def choose_threads(requested: int | None) -> tuple[int, str]:
    """``(threads, why)``, and torch set to use them. ``requested`` must be >= 1 when given."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        if requested > 4 * cores:
            raise ValueError(f"--threads {requested} is more than 4 threads per core of this machine's {cores}: "
                             f"torch would only wait on itself; use --threads {cores}")
        threads, why = requested, "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        load = os.getloadavg()[0]
        threads, why = max(1, cores - round(load)), f"{cores} cores, load average {load:.1f}"
    torch.set_num_threads(threads)
    return threads, why


def describe(threads: int, why: str) -> str:
    return f"{threads} thread{'s' if threads != 1 else ''} ({why})"
