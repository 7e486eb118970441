"""What ``odegpt evaluate`` reports of a model folder: perplexity at each step size (and for each adaptive-depth
setting), the FLOPs each costs, and measured decode speed, as one JSON-able document (odegpt.evaluation.report
prints and plots it).

:class:`EvaluationRequest` holds everything asked for and checks it against the model's config before any weight
is read (:meth:`EvaluationRequest.checked`); :func:`evaluate_model` does the work.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from odegpt.decoding.adaptive import AdaptiveDepth
from odegpt.errors import InputError
from odegpt.folders.model_folder import load_model
from odegpt.folders.output_folder import check_writable
from odegpt.model.accounting import adaptive_flops_per_token, model_cost

from .calibration import calibrate_energy, check_target_compute, load_calibration, save_calibration
from .data import EvaluationData, evaluation_batches, is_prepared, prepared_batches
from .exit_calibration import calibrated_exit, calibrated_threshold
from .perplexity import COUNTED, adaptive_nll_sums, nll_sums, perplexity
from .throughput import Variant, measure_interleaved, random_prompt

SPEED_PROMPT_TOKENS = 32  # decode speed is measured after a prompt of this many (random) tokens
# The settings as the command line names them, for messages.
FLAGS = {"exit_entropy": "--exit-entropy", "route_energy": "--route-energy", "kv_fill": "--kv-fill",
         "step_size": "--step-size", "swift_step_size": "--swift-step-size", "check_every": "--check-every",
         "min_time": "--min-time", "target_compute": "--target-compute"}


@dataclass
class AdaptiveRows:
    """The adaptive-depth rows asked for: every value of each list is a row, for every KV fill."""

    exit_entropy: list[float] = field(default_factory=list)
    route_energy: list[float] = field(default_factory=list)
    target_compute: list[float] = field(default_factory=list)
    kv_fill: list[str] = field(default_factory=lambda: ["copy"])
    step_size: float | None = None
    swift_step_size: float | None = None
    check_every: int = 1
    min_time: float = 0.0
    exit: str | None = None  # "learned": a row per exit tolerance, at the folder's calibrated threshold
    route: str | None = None  # "learned": likewise for routing
    exit_tolerance: list[float] = field(default_factory=lambda: [0.02])
    truncate: list[float] = field(default_factory=list)  # read every token out after this solver time: the baseline

    def rows(self, config, model_dir: str | Path = "") -> list[dict]:
        """``[{"settings": AdaptiveDepth, "target_compute": F | None, "label": str | None}]``, each checked against
        ``config`` (calibrated thresholds of learned rules read from ``model_dir``)."""
        common = dict(step_size=self.step_size, check_every=self.check_every, min_time=self.min_time,
                      **({} if self.swift_step_size is None else {"swift_step_size": self.swift_step_size}))
        rows = [dict(settings=AdaptiveDepth(exit_entropy=math.inf, kv_fill="lazy", step_size=self.step_size,
                                            min_time=time), target_compute=None, label=f"truncated at t={time:g}",
                     method="truncation") for time in self.truncate]
        swift = self.swift_step_size or AdaptiveDepth.swift_step_size
        for fill in self.kv_fill:
            rows += [dict(settings=calibrated_exit(model_dir, tolerance, AdaptiveDepth(kv_fill=fill, **common)),
                          target_compute=None,
                          label=f"learned exit (tolerance {tolerance:g})", method="learned exit")
                     for tolerance in (self.exit_tolerance if self.exit == "learned" else [])]
            rows += [dict(settings=AdaptiveDepth(route_learned=calibrated_threshold(model_dir, "route", tolerance,
                                                                                    swift),
                                                 kv_fill=fill, **common), target_compute=None,
                          label=f"learned routing (tolerance {tolerance:g})", method="learned routing")
                     for tolerance in (self.exit_tolerance if self.route == "learned" else [])]
            rows += [dict(settings=AdaptiveDepth(exit_entropy=h, kv_fill=fill, **common), target_compute=None)
                     for h in self.exit_entropy]
            rows += [dict(settings=AdaptiveDepth(route_energy=e, kv_fill=fill, **common), target_compute=None)
                     for e in self.route_energy]
            rows += [dict(settings=AdaptiveDepth(route_energy=0.0, kv_fill=fill, **common),
                          target_compute=check_target_compute(target, "--target-compute"))
                     for target in self.target_compute]
        return [dict(row, settings=row["settings"].checked(config, FLAGS)) for row in rows]


@dataclass
class EvaluationRequest:
    """Everything ``odegpt evaluate`` was asked; see its ``--help``."""

    model: str
    data: list[str]
    step_sizes: list[float]
    seq_len: int | None = None
    stride: int | None = None
    batch_size: int = 8
    num_samples: int | None = None
    text_key: str = "text"
    cache_dir: str | None = None
    dtype: str = "float32"
    speed: bool = True
    decode_tokens: int = 64
    rounds: int = 3
    adaptive: AdaptiveRows = field(default_factory=AdaptiveRows)
    calibration_data: list[str] | None = None
    output: str | None = None

    def checked(self, config) -> tuple[EvaluationRequest, list[dict]]:
        """This request with its window length resolved, and its adaptive rows; a ValueError names the flag."""
        for a in self.step_sizes:
            config.solver_steps(a, "--step-sizes")
        seq_len = self.seq_len if self.seq_len is not None else min(512, config.max_position_embeddings)
        if not 0 < seq_len <= config.max_position_embeddings:
            raise InputError(f"--seq-len must be in 1..{config.max_position_embeddings} (the model's positions), "
                             f"got {seq_len}")
        if self.stride is not None and not 0 < self.stride <= seq_len:
            raise InputError(f"--stride must be in 1..seq_len ({seq_len}), got {self.stride}")
        for name in ("batch_size", "num_samples", "decode_tokens", "rounds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.dtype not in ("float32", "bfloat16"):
            raise InputError(f"--dtype {self.dtype}: evaluate computes in float32 or bfloat16")
        if self.output:
            check_writable(Path(self.output))
        if self.calibration_data and not self.adaptive.target_compute:
            raise InputError("--calibration-data applies to --target-compute")
        for corpus in self.calibration_data or []:
            if not is_prepared(corpus):
                raise InputError(f"--calibration-data: {corpus} is not a prepared corpus (no manifest.json)")
        return replace(self, seq_len=seq_len), self.adaptive.rows(config, self.model)

    def batches(self, vocab_size: int | None) -> list:
        return evaluation_batches(self.data, self.model, self.cut, vocab_size)

    @property
    def cut(self) -> EvaluationData:
        return EvaluationData(seq_len=self.seq_len, stride=self.stride, batch_size=self.batch_size,
                              num_samples=self.num_samples, text_key=self.text_key, cache_dir=self.cache_dir)


def evaluate_model(request: EvaluationRequest, config, model, rows: list[dict], batches: list, threads: int) -> dict:
    """The report document of a checked ``request`` on ``model``, scored on ``batches`` (:meth:`batches`, made
    before the model is loaded so that bad data is refused first); progress on stderr."""
    progress = tqdm(batches, desc=f"perplexity at {len(request.step_sizes)} step sizes", unit="batch",
                    file=sys.stderr)
    sums = nll_sums(model, progress, request.step_sizes)
    speeds, decode = decode_speeds(request, config, model) if request.speed else ({}, None)
    results = []
    for a in request.step_sizes:
        nll_sum, count = sums[a]
        speed = speeds.get(a)
        results.append({
            "step_size": a, "solver_steps": config.solver_steps(a),
            "flops_per_token": model_cost(config, a, seq_len=request.seq_len).flops_per_token,
            "nll": nll_sum / count, "num_tokens": count, "perplexity": perplexity(nll_sum, count),
            "decode_tokens_per_s": speed, "decode_speedup": None if speed is None else speed / speeds[1.0],
        })
    document = {"model": request.model, "data": list(request.data), "seq_len": request.seq_len,
                "stride": request.stride or request.seq_len, "num_tokens": next(iter(sums.values()))[1],
                "dtype": request.dtype, "solver": config.solver, "threads": threads, "decode": decode,
                "results": results}
    adaptive = [adaptive_result(request, config, model, row, batches) for row in rows]
    if adaptive:
        document["adaptive"] = adaptive
    return document


def decode_speeds(request: EvaluationRequest, config, model) -> tuple[dict[float, float], dict]:
    """Greedy decode tokens/s at batch 1 at each step size (a=1 always, the reference), interleaved rounds."""
    prompt_tokens = min(SPEED_PROMPT_TOKENS, config.max_position_embeddings // 2)
    new_tokens = max(1, min(request.decode_tokens, config.max_position_embeddings - prompt_tokens - 1))
    speed_sizes = list(dict.fromkeys([1.0, *request.step_sizes]))
    variants = {a: Variant(model, {"step_size": a}) for a in speed_sizes}
    prompt = random_prompt(config.vocab_size, 1, prompt_tokens)
    with tqdm(total=request.rounds * len(variants), desc="decode speed", unit="run", file=sys.stderr) as bar:
        measured = measure_interleaved(variants, {"batch 1": prompt}, new_tokens, request.rounds, bar.update)
    decode = {"batch_size": 1, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": request.rounds}
    return {a: measured[a, "batch 1"].decode_tokens_per_s for a in speed_sizes}, decode


def adaptive_result(request: EvaluationRequest, config, model, row: dict, batches: list) -> dict:
    """One adaptive row's perplexity and what its solve executed per token, as FLOPs too; a ``--target-compute``
    row first reads its threshold from the folder, or calibrates it and saves it there."""
    settings = row["settings"]
    if row["target_compute"] is not None:
        settings = replace(settings, route_energy=calibrated(request, config, model, row, batches)["route_energy"])
    label = row.get("label") or (
        f"exit entropy < {settings.exit_entropy:g}" if not settings.routing else
        f"route energy > {settings.route_energy:.4g}" + (
            f" (target {row['target_compute']:g})" if row["target_compute"] is not None else ""))
    progress = tqdm(batches, desc=f"{label}, {settings.kv_fill}", unit="batch", file=sys.stderr, leave=False)
    score = adaptive_nll_sums(model, progress, settings)
    per = {name: score.per_token(name) for name in COUNTED}
    return {
        "method": row.get("method") or ("energy routing" if settings.routing else "early exit"), "label": label,
        "exit_entropy": settings.exit_entropy, "route_energy": settings.route_energy,
        "exit_learned": settings.exit_learned, "route_learned": settings.route_learned,
        "target_compute": row["target_compute"], "kv_fill": settings.kv_fill, "step_size": settings.step_size,
        "swift_step_size": settings.swift_step_size if settings.routing else None, **per,
        "schedule_flops_per_token": adaptive_flops_per_token(config, per["executed_steps"], per["readouts"],
                                                             seq_len=request.seq_len, exit_scores=per["exit_scores"]),
        "flops_per_token": adaptive_flops_per_token(config, **per, seq_len=request.seq_len),
        "nll": score.nll_sum / score.num_tokens, "num_tokens": score.num_tokens,
        "perplexity": perplexity(score.nll_sum, score.num_tokens),
    }


def calibrated(request: EvaluationRequest, config, model, row: dict, batches: list) -> dict:
    """The folder's calibration record for a ``--target-compute`` row, calibrated now (on ``--calibration-data``,
    else the evaluation data) and saved in the folder if it holds none."""
    settings, target = row["settings"], row["target_compute"]
    record = load_calibration(request.model, target, settings, request.seq_len)
    if record is not None:
        return record
    on = prepared_batches(request.calibration_data, request.model, request.cut, config.vocab_size) \
        if request.calibration_data else batches
    try:
        record = calibrate_energy(model, on, settings, target, request.seq_len)
    except ValueError as error:
        raise InputError(f"--target-compute: {error}") from None
    path = save_calibration(request.model, record, list(request.calibration_data or request.data))
    print(f"calibrated --target-compute {target:g}: route energy > {record['route_energy']:.4g} "
          f"({record['routed_fraction']:.1%} of {record['num_tokens']:,} tokens), saved in {path}", file=sys.stderr)
    return record


def load_for_evaluation(path: str, config, dtype: str):
    """The model of a native folder (its config already checked) in ``dtype``, in eval mode."""
    return load_model(path, config).to(getattr(torch, dtype)).eval()
