"""How much any per-token depth rule could gain on a model, and why: the analysis behind the adaptive report.

Four questions, each answered from per-token quantities of teacher-forced solves (every token's state
at every step is computed, as the ``lazy`` fill would):

- **Is a step size more than a step count?** With pre-norm blocks and a final norm, the Euler solve
  from a small embedding is nearly homogeneous: ``k`` steps at step size ``a`` reach about ``a`` times
  the state of ``k`` steps at ``a = 1``, and the norms remove the scale. Where that holds, a fixed
  step size reads out the same states as a truncated solve, and every per-token rule picks among them.
- **Exit headroom**: at equal mean executed steps, the perplexity of exiting each token at the first
  step whose score is below a threshold, for the entropy of the read-out (the issue's rule), a linear
  probe of the state (ridge regression of log KL(p_end || p_t) on the normalised state, fitted on the
  calibration half; a dot product per check, no read-out), the true KL to the end of the solve (a
  label-free oracle: it costs the full solve, so it bounds what any label-free rule can reach) and
  the labels (an upper bound, not a method), against the truncated solve.
- **Routing headroom** (swift a=4 -> super a=1, exact super logits for routed tokens): energy (E-LANG),
  the same kind of probe on the swift state, the KL oracle and the label oracle.
- **Exit to the tail**: on a model whose last shared segment is followed by unshared layers (a retrofit that keeps
  its source's last layers), reading out mid-solve skips those layers too. Cutting only the shared segment short
  and still running the tail is another exit: the same segment cut after ``k`` of its steps for every token (exact)
  against the truncated solve at the same executed steps, and per token by a probe of the state at the cut and by
  the KL oracle (each token's tail then attends over the others' states cut at the same ``k``, as a fill would
  approximate them).

``benchmarks/adaptive_report.py`` runs these on prepared corpora; on its own, on raw text (a model whose corpus has
no validation split, e.g. the SmolLM2 retrofit of ``benchmarks/retrofit_real.py``):

    python benchmarks/adaptive_headroom.py --model MODEL --text held-out.txt --output runs/headroom
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from odegpt.decoding.adaptive import energy, entropy, last_shared_steps
from odegpt.evaluation.perplexity import perplexity
from odegpt.model.accounting import adaptive_flops_per_token, model_cost
from odegpt.model.solver import plan_solve

EXIT_BUDGETS = (0.25, 0.375, 0.5, 0.625, 0.75)  # mean executed steps, as fractions of the a=1 solve's (> 1 step)
ROUTED_FRACTIONS = (0.1, 0.25, 0.5)
RIDGE = 1.0


def _perplexity(nll: torch.Tensor) -> float:
    return perplexity(float(nll.sum()), nll.numel())


def _state_features(h: torch.Tensor) -> torch.Tensor:
    """What a probe sees of states ``h`` (..., hidden): the direction (RMS-normalised, as the read-out's
    norm sees it), its log norm and a bias."""
    norm = h.norm(dim=-1, keepdim=True)
    return torch.cat([h / norm * h.shape[-1] ** 0.5, norm.log(), torch.ones_like(norm)], dim=-1)


def fit_probe(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Ridge regression weights of ``target`` (n,) on ``features`` (n, f)."""
    gram = features.T @ features + RIDGE * torch.eye(features.shape[1], dtype=features.dtype)
    return torch.linalg.solve(gram, features.T @ target)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.float(), b.float()]))[0, 1])


def step_size_homogeneity(model, config, batches, step_sizes) -> list[dict]:
    """For each step size a > 1 of a one-segment shared model: the cosine between the final state of the
    a-solve and the a=1 state after as many steps, their norm ratio, and both perplexities."""
    if len(config.segments) != 1 or not config.segments[0]["shared"]:
        return []
    step_sizes = [a for a in step_sizes if a > 1]
    measured = {a: dict(cosine=[], norm_ratio=[], nll=[], nll_cut=[]) for a in step_sizes}
    for batch in batches:
        inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
        fine = model.model(inputs, step_size=1.0, use_cache=False, output_hidden_states=True).hidden_states
        for a in step_sizes:
            final = model.model(inputs, step_size=a, use_cache=False, output_hidden_states=True).hidden_states[-1]
            cut = fine[config.solver_steps(a)]
            measured[a]["cosine"].append(F.cosine_similarity(final, cut, dim=-1).flatten())
            measured[a]["norm_ratio"].append((final.norm(dim=-1) / cut.norm(dim=-1)).flatten())
            for states, key in ((final, "nll"), (cut, "nll_cut")):
                logits = model.read_out(states).float().flatten(0, 1)
                measured[a][key].append(F.cross_entropy(logits, targets, reduction="none"))
    rows = []
    for a, values in measured.items():
        values = {key: torch.cat(parts) for key, parts in values.items()}
        rows.append(dict(step_size=a, steps=config.solver_steps(a), cosine=float(values["cosine"].mean()),
                         norm_ratio=float(values["norm_ratio"].mean()), perplexity=_perplexity(values["nll"]),
                         truncated_perplexity=_perplexity(values["nll_cut"])))
    return rows


@torch.no_grad()
def _exit_quantities(model, batches) -> dict[str, torch.Tensor]:
    """Per token and step t of the a=1 solve (n, T): NLL, entropy and KL(p_end || p_t) of the read-out at
    t, and the probe features of the state at t (n, T, f)."""
    out = {name: [] for name in ("nll", "entropy", "kl", "features")}
    for batch in batches:
        inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
        states = model.model(inputs, step_size=1.0, use_cache=False, output_hidden_states=True).hidden_states[1:]
        log_probs = [model.read_out(h).float().flatten(0, 1).log_softmax(-1) for h in states]
        end = log_probs[-1]
        out["nll"].append(torch.stack([-lp.gather(1, targets[:, None])[:, 0] for lp in log_probs], 1))
        out["entropy"].append(torch.stack([entropy(lp) for lp in log_probs], 1))
        out["kl"].append(torch.stack([(end.exp() * (end - lp)).sum(-1) for lp in log_probs], 1))
        out["features"].append(torch.stack([_state_features(h.float().flatten(0, 1)) for h in states], 1))
    return {name: torch.cat(values) for name, values in out.items()}


def _exit_at_budget(scores: torch.Tensor, nll: torch.Tensor, mean_steps: float) -> float:
    """Perplexity when each token exits after the first step t < T whose score is below a threshold (else
    at T), the threshold bisected so that the mean executed steps are ``mean_steps``."""
    steps = scores.shape[1]
    low, high = float(scores.min()) - 1, float(scores.max()) + 1
    exit_step = None
    for _ in range(60):
        threshold = (low + high) / 2
        fires = scores[:, :-1] < threshold
        exit_step = torch.where(fires.any(1), fires.float().argmax(1), steps - 1)
        if float(exit_step.float().mean()) + 1 > mean_steps:
            low = threshold
        else:
            high = threshold
    return _perplexity(nll.gather(1, exit_step[:, None]))


def exit_headroom(model, config, calibration, held_out) -> dict:
    """Perplexity at equal mean executed steps of the a=1 solve for each exit rule (module docstring)."""
    fit, test = _exit_quantities(model, calibration), _exit_quantities(model, held_out)
    steps = test["nll"].shape[1]
    probe = torch.stack([test["features"][:, t]
                         @ fit_probe(fit["features"][:, t], fit["kl"][:, t].clamp(min=1e-6).log())
                         for t in range(steps - 1)] + [torch.zeros(len(test["nll"]))], 1)
    correlations = [_correlation(probe[:, t], test["kl"][:, t].clamp(min=1e-6).log()) for t in range(steps - 1)]
    rules = {"entropy": test["entropy"], "probe": probe, "KL oracle": test["kl"],
             "label oracle": test["nll"] - test["nll"][:, -1:]}
    cut_nll = test["nll"].mean(0).tolist()  # mean NLL of the solve truncated after each step
    rows = []
    for mean_steps in sorted({fraction * steps for fraction in EXIT_BUDGETS if fraction * steps > 1}):
        below, share = int(math.floor(mean_steps)), mean_steps - math.floor(mean_steps)
        mixed = cut_nll[below - 1] if share == 0 else (1 - share) * cut_nll[below - 1] + share * cut_nll[below]
        row = dict(mean_steps=mean_steps, truncated=math.exp(cut_nll[below - 1]), truncated_mix=math.exp(mixed))
        row.update({name: _exit_at_budget(scores, test["nll"], mean_steps) for name, scores in rules.items()})
        rows.append(row)
    return dict(steps=steps, probe_correlations=correlations,
                entropy_correlations=[_correlation(test["entropy"][:, t], test["kl"][:, t].clamp(min=1e-6).log())
                                      for t in range(steps - 1)], rows=rows)


@torch.no_grad()
def _routing_quantities(model, batches, swift: float, super_: float) -> dict[str, torch.Tensor]:
    out = {name: [] for name in ("nll_swift", "nll_super", "energy", "kl", "features")}
    for batch in batches:
        inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
        log_probs = {}
        for a in (swift, super_):
            result = model(inputs, step_size=a, use_cache=False, output_hidden_states=True)
            logits = result.logits.float().flatten(0, 1)
            log_probs[a] = logits.log_softmax(-1)
            out["nll_swift" if a == swift else "nll_super"].append(F.cross_entropy(logits, targets, reduction="none"))
            if a == swift:
                out["energy"].append(energy(logits))
                out["features"].append(_state_features(result.hidden_states[-1].float().flatten(0, 1)))
        out["kl"].append((log_probs[super_].exp() * (log_probs[super_] - log_probs[swift])).sum(-1))
    return {name: torch.cat(values) for name, values in out.items()}


def routing_headroom(model, config, calibration, held_out, seq_len: int, swift: float = 4.0) -> dict:
    """Perplexity of exact routing swift -> a=1 of a fraction of the held-out tokens chosen by each rule."""
    fit, test = _routing_quantities(model, calibration, swift, 1.0), _routing_quantities(model, held_out, swift, 1.0)
    probe = test["features"] @ fit_probe(fit["features"], fit["kl"].clamp(min=1e-6).log())
    rules = {"energy": test["energy"], "probe": probe, "KL oracle": test["kl"],
             "label oracle": test["nll_swift"] - test["nll_super"]}
    swift_steps, super_steps = config.solver_steps(swift), config.solver_steps(1.0)
    super_flops = model_cost(config, 1.0, seq_len=seq_len).flops_per_token
    rows = []
    for fraction in ROUTED_FRACTIONS:
        count = int(fraction * len(probe))
        flops = adaptive_flops_per_token(config, swift_steps + super_steps * fraction, 1 + fraction, seq_len=seq_len)
        row = dict(routed_fraction=fraction, flops_vs_a1=flops / super_flops)
        for name, scores in rules.items():
            routed = torch.zeros_like(probe, dtype=torch.bool)
            routed[scores.argsort(descending=True)[:count]] = True
            row[name] = _perplexity(torch.where(routed, test["nll_super"], test["nll_swift"]))
        rows.append(row)
    log_kl = test["kl"].clamp(min=1e-6).log()
    return dict(swift_step_size=swift, energy_correlation=_correlation(test["energy"], log_kl),
                probe_correlation=_correlation(probe, log_kl), rows=rows)


def tail_segment(config) -> tuple[range, range] | None:
    """The a=1 steps of the last shared segment and of the unshared segments after it (the tail), as the decoder's
    exit to the tail finds them; None when the model ends in a shared segment or has none."""
    plan = plan_solve(config.segments, 1.0)
    segment = last_shared_steps(config.segments, plan)
    return None if segment is None else (segment, range(segment.stop, len(plan)))


@torch.no_grad()
def _tail_quantities(model, batches, segment: range, tail: range) -> dict[str, torch.Tensor]:
    """Per token: for each cut k = 1..len(segment) of the last shared segment (n, K), the NLL and KL(p_end || p) of
    the read-out after the tail run from the cut state and the probe features of that state (n, K, f); and the NLL
    of the read-out of the a=1 solve truncated after each step (n, T)."""
    out = {name: [] for name in ("nll", "kl", "features", "truncated_nll")}
    plan = model.plan(1.0)
    for batch in batches:
        inputs, targets = batch[:, :-1], batch[:, 1:].flatten()
        inputs_of_attention = model.attention_inputs(model.embed(inputs))
        states = model.model(inputs, step_size=1.0, use_cache=False, output_hidden_states=True).hidden_states[1:]
        cuts = states[segment.start:segment.stop]  # the state after each step of the segment
        log_probs = [model.read_out(model.solve(h, plan, inputs_of_attention, start=tail.start)).float()
                     .flatten(0, 1).log_softmax(-1) for h in cuts]
        end = log_probs[-1]
        out["nll"].append(torch.stack([-lp.gather(1, targets[:, None])[:, 0] for lp in log_probs], 1))
        out["kl"].append(torch.stack([(end.exp() * (end - lp)).sum(-1) for lp in log_probs], 1))
        out["features"].append(torch.stack([_state_features(h.float().flatten(0, 1)) for h in cuts], 1))
        out["truncated_nll"].append(torch.stack([F.cross_entropy(model.read_out(h).float().flatten(0, 1), targets,
                                                                 reduction="none") for h in states], 1))
    return {name: torch.cat(values) for name, values in out.items()}


def tail_headroom(model, config, calibration, held_out) -> dict | None:
    """The exit to the tail (module docstring): perplexity at equal executed steps of the a=1 solve for the
    truncated solve, the last shared segment cut alike for every token with the tail run, and cut per token by the
    probe and by the KL oracle; None for a model without a tail."""
    found = tail_segment(config)
    if found is None:
        return None
    segment, tail = found
    fit, test = (_tail_quantities(model, calibration, segment, tail),
                 _tail_quantities(model, held_out, segment, tail))
    cuts = len(segment)
    probe = torch.stack([test["features"][:, k]
                         @ fit_probe(fit["features"][:, k], fit["kl"][:, k].clamp(min=1e-6).log())
                         for k in range(cuts - 1)] + [torch.zeros(len(test["nll"]))], 1)
    rules = {"probe": probe, "KL oracle": test["kl"]}
    truncated = test["truncated_nll"].mean(0).tolist()  # after step 1, 2, ..., T
    rows = []
    for kept in range(1, cuts):
        steps = segment.start + kept + len(tail)
        row = dict(mean_steps=steps, truncated=math.exp(truncated[steps - 1]),
                   tail_cut=_perplexity(test["nll"][:, kept - 1]))
        row.update({name: _exit_at_budget(scores, test["nll"], kept) for name, scores in rules.items()})
        rows.append(row)
    return dict(steps=len(truncated), segment=[segment.start, segment.stop], tail=len(tail),
                full=math.exp(truncated[-1]), rows=rows)


def markdown(report: dict) -> list[str]:
    """The three analyses of one model as markdown sections."""
    model, data = report["model"], report.get("data", "stdlib held out")
    lines = []
    if report.get("homogeneity"):
        lines += [f"### Is a step size more than a step count? `{model}`, {data}", "",
                  "k steps at step size a against the a=1 solve cut after the same k steps.", "",
                  "| a | steps k | cosine of the states | norm ratio | perplexity at a | perplexity, a=1 cut at k |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in report["homogeneity"]:
            lines.append(f"| {r['step_size']:g} | {r['steps']} | {r['cosine']:.4f} | {r['norm_ratio']:.2f} "
                         f"| {r['perplexity']:.3f} | {r['truncated_perplexity']:.3f} |")
        lines.append("")
    exits = report["exit_headroom"]
    rules = ("entropy", "probe", "KL oracle", "label oracle")
    lines += [f"### Exit headroom, `{model}`, {data} (a=1 solve of {exits['steps']} steps; read-out "
              f"costs not counted)", "",
              "correlation with log KL(p_end || p_t) at t = 1, 2, ...: probe "
              + ", ".join(f"{c:.2f}" for c in exits["probe_correlations"]) + "; entropy "
              + ", ".join(f"{c:.2f}" for c in exits["entropy_correlations"]), "",
              "| mean steps | truncated (floor) | truncated (mix of two depths) | "
              + " | ".join(f"exit by {r}" for r in rules) + " | best label-free rule vs the floor | vs the mix |",
              "|" + " ---: |" * (len(rules) + 5)]
    for r in exits["rows"]:
        best = min(r["entropy"], r["probe"])
        lines.append(f"| {r['mean_steps']:g} | {r['truncated']:.3f} | {r['truncated_mix']:.3f} | "
                     + " | ".join(f"{r[name]:.3f}" for name in rules)
                     + f" | {1 - best / r['truncated']:+.1%} | {1 - best / r['truncated_mix']:+.1%} |")
    routing = report["routing_headroom"]
    lines += ["", f"### Routing headroom a={routing['swift_step_size']:g} -> a=1, `{model}`, {data}", "",
              f"correlation with log KL(p_super || p_swift): energy {routing['energy_correlation']:.3f}, probe "
              f"{routing['probe_correlation']:.3f}", "",
              "| routed fraction | FLOPs vs a=1 | " + " | ".join(f"by {r}" for r in ("energy",) + rules[1:]) + " |",
              "|" + " ---: |" * (len(rules) + 2)]
    for r in routing["rows"]:
        lines.append(f"| {r['routed_fraction']:g} | {r['flops_vs_a1']:.2f} | "
                     + " | ".join(f"{r[name]:.3f}" for name in ("energy",) + rules[1:]) + " |")
    tail = report.get("tail_headroom")
    if tail:
        rules = ("probe", "KL oracle")
        lines += ["", f"### Exit to the tail, `{model}`, {data} (a=1 solve of {tail['steps']} steps, perplexity "
                  f"{tail['full']:.3f}; the shared segment of steps {tail['segment'][0] + 1}-{tail['segment'][1]} cut "
                  f"short, then the {tail['tail']} unshared step(s) after it)", "",
                  "| executed steps | truncated solve | segment cut, tail run | "
                  + " | ".join(f"cut per token by {r}" for r in rules) + " | cut vs truncated | probe vs cut |",
                  "|" + " ---: |" * (len(rules) + 5)]
        for r in tail["rows"]:
            lines.append(f"| {r['mean_steps']:g} | {r['truncated']:.3f} | {r['tail_cut']:.3f} | "
                         + " | ".join(f"{r[name]:.3f}" for name in rules)
                         + f" | {r['tail_cut'] / r['truncated'] - 1:+.1%} | {r['probe'] / r['tail_cut'] - 1:+.1%} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="native odegpt model folder (its tokenizer reads --text)")
    parser.add_argument("--text", nargs="+", required=True, help="held-out raw text: the first half of its windows "
                                                               "fits the probes, the second half scores")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=24, help="full windows of --seq-len tokens (default: 24)")
    parser.add_argument("--output", required=True, help="writes OUTPUT.json and OUTPUT.md")
    args = parser.parse_args(argv)
    from odegpt.evaluation.data import EvaluationData, raw_text_batches, raw_text_sources
    from odegpt.folders.model_folder import load_model

    torch.set_grad_enabled(False)
    model = load_model(args.model).eval()
    pairs = raw_text_batches(raw_text_sources(args.text, args.model), args.model,
                             EvaluationData(seq_len=args.seq_len, batch_size=1))
    # One window per batch (the read-outs of every state of a window are held at once); only fully scored ones.
    batches = [torch.cat([inputs, targets[:, -1:]], 1) for inputs, targets in pairs
               if inputs.shape[1] == args.seq_len and bool((targets >= 0).all())][:args.windows]
    half = len(batches) // 2
    report = dict(model=args.model, data=f"{', '.join(args.text)} held out",
                  exit_headroom=exit_headroom(model, model.config, batches[:half], batches[half:]),
                  routing_headroom=routing_headroom(model, model.config, batches[:half], batches[half:], args.seq_len),
                  tail_headroom=tail_headroom(model, model.config, batches[:half], batches[half:]))
    Path(args.output + ".json").write_text(json.dumps(report, indent=2) + "\n")
    Path(args.output + ".md").write_text("\n".join(markdown(report)))
    print("\n".join(markdown(report)))


if __name__ == "__main__":
    main()
