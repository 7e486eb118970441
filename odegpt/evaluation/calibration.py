"""Calibrate the energy-routing threshold to a compute budget, and keep it beside the model.

``--target-compute F`` asks for ``F`` times the forward FLOPs of the super solve (at the super step
size ``a``) per token. Routing a fraction ``r`` of tokens costs the swift solve plus ``r`` super solves
(odegpt/model/accounting.py counts both, read-outs included), so ``F`` fixes ``r``; the threshold is the
energy that ``r`` of the calibration tokens exceed. Key/value fills are not part of the budget: they
are reported separately (a few projections per token for copy and interpolate; for lazy, the
deferred super solves of earlier tokens).

The thresholds live in ``adaptive_calibration.json`` in the model folder, one entry per setting
(target, step sizes, energy temperature, context length), so a model folder carries its own.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

from odegpt.decoding.adaptive import AdaptiveDepth, energy
from odegpt.model.accounting import adaptive_flops_per_token, model_cost

from .perplexity import IGNORE_INDEX, Batch

CALIBRATION_FILE = "adaptive_calibration.json"


def check_target_compute(target: object, name: str = "target_compute") -> float:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"{name} must be a fraction of the super solve's FLOPs in (0, 1], got {target!r}")
    return float(target)


def routed_fraction_for(config, settings: AdaptiveDepth, target: float, seq_len: int) -> float:
    """The fraction of tokens to re-solve so the mean FLOPs per token are ``target`` x the super solve's."""
    super_cost = model_cost(config, settings.step_size, seq_len=seq_len)
    swift_cost = model_cost(config, settings.swift_step_size, seq_len=seq_len)
    # Each routed token adds the super solve's steps and one more read-out on top of the swift solve.
    extra = adaptive_flops_per_token(config, super_cost.executed_steps, 1, seq_len=seq_len)
    fraction = (target * super_cost.flops_per_token - swift_cost.flops_per_token) / extra
    if fraction < 0:
        raise ValueError(f"target compute {target:g} is below the swift solve's own cost "
                         f"({swift_cost.flops_per_token / super_cost.flops_per_token:.3f} of the super solve at "
                         f"step size {settings.step_size:g}): raise it or use a larger swift step size")
    return min(fraction, 1.0)


@torch.no_grad()
def swift_energies(model, batches: Iterable[Batch], settings: AdaptiveDepth) -> torch.Tensor:
    """The swift solve's energy of every scored token of ``batches`` (1-D, float32)."""
    energies = []
    for batch in batches:
        inputs, targets = (batch[:, :-1], batch[:, 1:]) if isinstance(batch, torch.Tensor) else batch
        logits = model(input_ids=inputs, step_size=settings.swift_step_size, use_cache=False).logits
        energies.append(energy(logits, settings.energy_temperature)[targets != IGNORE_INDEX])
    return torch.cat(energies)


def calibrate_energy(model, batches: Iterable[Batch], settings: AdaptiveDepth, target: float, seq_len: int) -> dict:
    """The routing threshold that spends ``target`` x the super solve's FLOPs on ``batches``, as a record
    for :func:`save_calibration` (``route_energy`` is the threshold)."""
    target = check_target_compute(target)
    settings = AdaptiveDepth(**{**settings.__dict__, "route_energy": 0.0}).checked(model.config)
    fraction = routed_fraction_for(model.config, settings, target, seq_len)
    energies = swift_energies(model, batches, settings).sort(descending=True).values
    if len(energies) == 0:
        raise ValueError("no scored tokens to calibrate on")
    routed = round(fraction * len(energies))
    # Tokens with energy above the threshold are routed: the `routed`-th highest energy is the first one kept.
    threshold = float(energies[routed]) if routed < len(energies) else -math.inf
    return dict(target_compute=target, route_energy=threshold, routed_fraction=routed / len(energies),
                step_size=settings.step_size, swift_step_size=settings.swift_step_size,
                energy_temperature=settings.energy_temperature, seq_len=seq_len, num_tokens=len(energies))


def _matches(record: dict, target: float, settings: AdaptiveDepth, seq_len: int | None) -> bool:
    return (math.isclose(record["target_compute"], target) and record["step_size"] == settings.step_size
            and record["swift_step_size"] == settings.swift_step_size
            and seq_len in (None, record["seq_len"]) and record["energy_temperature"] == settings.energy_temperature)


def load_calibration(model_dir: str | Path, target: float, settings: AdaptiveDepth, seq_len: int | None = None
                     ) -> dict | None:
    """The saved record for these settings (any context length if ``seq_len`` is None: the longest), or None."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    records = [r for r in json.loads(path.read_text()).get("route_energy", [])
               if _matches(r, target, settings, seq_len)]
    return max(records, key=lambda r: r["seq_len"], default=None)


def save_calibration(model_dir: str | Path, record: dict, data: list[str]) -> Path:
    """Add (or replace) ``record`` in the model folder's calibration file; return its path."""
    path = Path(model_dir) / CALIBRATION_FILE
    document = json.loads(path.read_text()) if path.is_file() else {"route_energy": []}
    settings = AdaptiveDepth(route_energy=0.0, step_size=record["step_size"],
                             swift_step_size=record["swift_step_size"],
                             energy_temperature=record["energy_temperature"])
    document["route_energy"] = [r for r in document["route_energy"]
                                if not _matches(r, record["target_compute"], settings, record["seq_len"])]
    document["route_energy"].append({**record, "data": data})
    path.write_text(json.dumps(document, indent=2, allow_nan=True) + "\n")
    return path


def calibrated_route_energy(model_dir: str | Path, target: object, settings: AdaptiveDepth,
                            option: str = "--target-compute") -> AdaptiveDepth:
    """``settings`` routing at the threshold the folder's calibration saved for ``target`` x the super solve's
    FLOPs, or a ValueError saying how to calibrate it."""
    target = check_target_compute(target, option)
    record = load_calibration(model_dir, target, settings)
    if record is None:
        raise ValueError(f"{option} {target:g}: {model_dir} holds no calibration for it at step size "
                         f"{settings.step_size:g} with swift step size {settings.swift_step_size:g}; run `odegpt "
                         f"evaluate --model {model_dir} --data VALIDATION --target-compute {target:g}` first, or "
                         f"give --route-energy")
    return replace(settings, route_energy=record["route_energy"])
