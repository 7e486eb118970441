"""The learned exit head: its target, decoding by it, calibrating its thresholds, and the calibrate command."""
from __future__ import annotations

import shutil

import pytest
import torch

from odegpt.commands.cli import main as odegpt_main
from odegpt.decoding.adaptive import AdaptiveDepth, adaptive_forward
from odegpt.evaluation.exit_calibration import (
    CalibrationRequest,
    SolveRecord,
    _binomial_cdf,
    calibrate_model,
    calibrate_thresholds,
    choose_check_times,
    scheduled_exit,
    solve_records,
)
from odegpt.training.exit_head import exit_target
from tests.conftest import EXACT, FULLY_SHARED, PARTIALLY_SHARED, UNSHARED, damped, exact_model, tiny_model

EVERY_STEP = range(1, 8)  # checks after every step but the last of the 8-step solves below


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def test_the_exit_target_is_zero_where_the_solve_has_converged():
    model = exact_model(UNSHARED)
    for block in model.model.blocks[1:]:  # every step after the first is the identity
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    tokens = torch.randint(1, 97, (2, 9))
    out = model(tokens, use_cache=False, output_hidden_states=True)
    targets = [exit_target(model.read_out(h), out.logits) for h in out.hidden_states]
    assert float(targets[0].max()) > 1e-3  # the embedding's read-out is not the end's
    assert all(float(target.abs().max()) < 1e-9 for target in targets[1:])  # nothing left to change


@pytest.mark.parametrize("segments", [FULLY_SHARED, PARTIALLY_SHARED], ids=["fully", "partially"])
def test_a_learned_rule_that_never_fires_is_the_fixed_solve_with_and_without_the_cache(segments):
    model = damped(exact_model(segments, exit_head=0), 0.3)
    prompt = torch.randint(1, 97, (2, 8))
    fixed = model(prompt, step_size=1.0, use_cache=False).logits
    never = AdaptiveDepth(exit_learned=-float("inf"), kv_fill="lazy")
    out = adaptive_forward(model, prompt, never)  # teacher-forced: no cache
    torch.testing.assert_close(out.logits, fixed, **EXACT)
    assert bool((out.counts.readouts == 1).all())  # the head scored the states; nothing was read out early
    assert bool((out.counts.exit_scores == model.config.solver_steps(1.0) - 1).all())
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = model.generate(prompt, **kwargs)
    for fill in ("lazy", "copy", "interpolate"):
        assert torch.equal(model.generate(prompt, exit_learned=-float("inf"), kv_fill=fill, **kwargs), plain)
    # Routing: +inf routes nobody (the swift solve), -inf everybody (the super solve).
    assert torch.equal(model.generate(prompt, route_learned=-float("inf"), **kwargs), plain)
    assert torch.equal(model.generate(prompt, route_learned=float("inf"), **kwargs),
                       model.generate(prompt, step_size=4.0, **kwargs))


def test_an_exit_head_changes_nothing_the_model_computes_and_is_required_by_the_learned_rules():
    with_head, without = tiny_model(FULLY_SHARED, exit_head=8), tiny_model(FULLY_SHARED)
    missing = with_head.load_state_dict(without.state_dict(), strict=False).missing_keys
    assert missing and all(name.startswith("exit_head.") for name in missing)  # the head is all that differs
    tokens = torch.randint(1, 97, (1, 6))
    assert torch.equal(with_head(tokens).logits, without(tokens).logits)
    with pytest.raises(ValueError, match="has no learned exit head"):
        without.generate(tokens, exit_learned=0.0, max_new_tokens=2, pad_token_id=0)


def _random_batches(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (8, 33), generator=generator) for _ in range(count)]


def test_calibration_meets_its_tolerance_on_held_out_text():
    # A model whose solve converges at different times for different tokens: exits are possible and risky.
    model = damped(exact_model([{"depth": 8, "shared": True}], initializer_range=0.08), 0.4)
    tolerance = 0.05
    request = CalibrationRequest((tolerance,), exit_head=0, check_cost=0.0)  # free checks: one after every step
    records = calibrate_model(model, _random_batches(24, seed=1), request, lambda message: None)
    exit_record = next(r for r in records if r["rule"] == "exit")
    assert exit_record["upper_bound"] <= tolerance and exit_record["mean_steps"] < 8  # it exits early, within bound
    assert exit_record["check_times"] == list(range(1, 8))
    held_out = solve_records(model, _random_batches(24, seed=2))
    changed, steps, _ = scheduled_exit(held_out, exit_record["threshold"], EVERY_STEP)
    # The guarantee bounds the true rate: the held-out count must be one a rate of `tolerance` makes likely (a
    # one-sided binomial test at 1%), and tokens must exit early.
    failures, tokens = int(changed.sum()), len(changed)
    assert 1 - _binomial_cdf(failures - 1, tokens, tolerance) > 0.01, (failures, tokens)
    assert float(steps.mean()) < 8
    # Checks start at the earliest exit on the calibration text: there, every token exits exactly where it did.
    first = exit_record["first_exit_time"]
    assert 1 <= first < 8
    record = calibrate_thresholds(held_out, "exit", tolerance)
    changed, steps, _ = scheduled_exit(held_out, record["threshold"], EVERY_STEP)
    assert record["first_exit_time"] == float(steps[steps < 8].min())
    later = scheduled_exit(held_out, record["threshold"], range(int(record["first_exit_time"]), 8))
    assert torch.equal(later[1], steps) and torch.equal(later[0], changed)
    # ... and the decoder, checking from there on (lazy fill: every state is the full solve's), exits alike.
    tokens = _random_batches(24, seed=2)[0][:, :-1]  # the inputs of the first held-out batch
    decoded = adaptive_forward(model, tokens, AdaptiveDepth(exit_learned=record["threshold"], kv_fill="lazy",
                                                            min_time=record["first_exit_time"]))
    torch.testing.assert_close(decoded.counts.executed_steps.flatten(), steps[:tokens.numel()])
    # A tighter tolerance gives a more conservative threshold and more steps.
    tight = calibrate_thresholds(held_out, "exit", 0.01)
    assert tight["threshold"] <= exit_record["threshold"] or tight["mean_steps"] >= exit_record["mean_steps"] - 1e-9


def _exits_at_six() -> SolveRecord:
    """16 tokens of an 8-step solve: half score below 0 from state 6 on (their read-out is the end's from there),
    half never; nothing is below 0 before state 6."""
    scores = torch.ones(16, 9)
    scores[:8, 6:] = -1.0
    changed = torch.ones(16, 9, dtype=torch.bool)
    changed[:, 6:] = False
    return SolveRecord(scores, changed)


def test_check_times_are_where_exits_pay_for_their_checks():
    record = _exits_at_six()
    changed, executed, checks = scheduled_exit(record, 0.0, (2, 6, 7))
    assert executed.tolist() == [6.0] * 8 + [8.0] * 8 and checks.tolist() == [2.0] * 8 + [3.0] * 8
    assert not bool(changed.any())
    # A check costing a tenth of a step: only the one at 6 saves more than it costs (2 steps for half the tokens).
    assert choose_check_times(record, 0.0, check_cost=0.1) == (6,)
    assert choose_check_times(record, 0.0, check_cost=0.0) == tuple(range(1, 8))  # free checks all stay
    assert choose_check_times(record, 0.0, check_cost=5.0) == ()  # dearer than the steps they save: none
    # The threshold is then calibrated under the schedule, and the record says where and how often it checks.
    result = calibrate_thresholds(record, "exit", 0.3, check_times=(6,))
    assert result["check_times"] == [6] and result["mean_checks"] == 1.0 and result["mean_steps"] == 7.0


def test_the_decoder_checks_only_at_the_check_times():
    model = damped(exact_model([{"depth": 8, "shared": True}], exit_head=0), 0.3)
    prompt = torch.randint(1, 97, (2, 6))
    never = adaptive_forward(model, prompt, AdaptiveDepth(exit_learned=-float("inf"), kv_fill="lazy",
                                                          check_times=(3.0, 5.0)))
    assert bool((never.counts.exit_scores == 2).all()) and bool((never.counts.executed_steps == 8).all())
    always = adaptive_forward(model, prompt, AdaptiveDepth(exit_learned=float("inf"), kv_fill="lazy",
                                                           check_times=(3.0, 5.0)))
    assert bool((always.counts.executed_steps == 3).all()) and bool((always.counts.exit_scores == 1).all())
    none = adaptive_forward(model, prompt, AdaptiveDepth(exit_learned=float("inf"), kv_fill="lazy", check_times=()))
    fixed = model(prompt, step_size=1.0, use_cache=False).logits
    torch.testing.assert_close(none.logits, fixed, **EXACT)  # no check: the whole solve, whatever the threshold
    with pytest.raises(ValueError, match="check_times must be solve times > 0"):
        AdaptiveDepth(exit_learned=0.0, check_times=(0.0,)).checked(model.config)
    # generate() takes them as a keyword (what a client of the exported folder passes from exit_calibration.json)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    out = model.generate(prompt[:1], exit_learned=float("inf"), check_times=(5.0,), **kwargs)
    assert out.executed_steps_per_token == 5.0


def test_calibration_chooses_check_times_apart_from_the_tokens_that_bound_the_rate():
    model = damped(exact_model([{"depth": 8, "shared": True}], initializer_range=0.08), 0.4)
    batches = _random_batches(24, seed=1)
    request = CalibrationRequest((0.05,), exit_head=0, check_cost=0.1)
    exit_record = next(r for r in calibrate_model(model, batches, request, lambda message: None) if r["rule"] == "exit")
    times = exit_record["check_times"]
    assert 0 < len(times) < 7 and exit_record["check_cost"] == 0.1
    # The rate, bound and costs are those of the schedule on the held-out half (the fitted head is the model's now).
    changed, executed, checks = scheduled_exit(solve_records(model, batches[12:]), exit_record["threshold"], times)
    assert exit_record["changed_rate"] == float(changed.float().mean())
    assert exit_record["mean_steps"] == float(executed.mean()) < 8
    assert exit_record["mean_checks"] == float(checks.mean()) < 7
    assert exit_record["upper_bound"] <= 0.05


def test_free_checks_all_stay_without_a_pass_over_the_fit_text(monkeypatch):
    import odegpt.evaluation.exit_calibration as calibration

    passes = []
    monkeypatch.setattr(calibration, "solve_records",
                        lambda *args, **kwargs: passes.append(kwargs) or solve_records(*args, **kwargs))
    model = damped(exact_model([{"depth": 8, "shared": True}], initializer_range=0.08), 0.4)
    request = CalibrationRequest((0.05,), exit_head=0, check_cost=0.0)
    records = calibrate_model(model, _random_batches(8, seed=1), request, lambda message: None)
    assert next(r for r in records if r["rule"] == "exit")["check_times"] == list(range(1, 8))
    assert len(passes) == 1  # the held-out records only: with free checks there is nothing to choose
    passes.clear()
    calibrate_model(model, _random_batches(8, seed=1), CalibrationRequest((0.05,), check_cost=0.1), print)
    assert len(passes) == 2 and passes[1] == {"changes": False}


def test_calibrate_writes_the_head_and_thresholds_that_generate_and_evaluate_use(model_folder, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    (tmp_path / "text.txt").write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 80)
    code = odegpt_main(["calibrate", "--model", str(folder), "--data", str(tmp_path / "text.txt"), "--tolerance",
                        "0.05,0.2", "--seq-len", "32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fitted the exit head (linear)" in out and " exit at tolerance 0.05:" in out and "route at tolerance" in out
    assert "checks per token, checks at t=" in out and "a check costs" in out  # where decoding checks, and why
    assert (folder / "exit_calibration.json").is_file()
    capsys.readouterr()
    assert odegpt_main(["generate", "--model", str(folder), "--prompt", "def add(", "--max-new-tokens", "8",
                        "--exit", "learned", "--exit-tolerance", "0.05"]) == 0
    assert "adaptive depth: learned exit (tolerance 0.05, score < " in (err := capsys.readouterr().err)
    assert ", checks at t=" in err  # the calibrated check times
    assert odegpt_main(["generate", "--model", str(folder), "--prompt", "x", "--exit", "learned",
                        "--exit-tolerance", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "holds no calibrated exit threshold" in err and "odegpt calibrate" in err and err.count("\n") == 1
    code = odegpt_main(["evaluate", "--model", str(folder), "--data", str(tmp_path / "text.txt"), "--seq-len", "32",
                        "--step-sizes", "1", "--no-speed", "--exit", "learned", "--exit-tolerance", "0.05",
                        "--truncate", "2", "--json"])
    assert code == 0
    import json

    document = json.loads(capsys.readouterr().out)
    methods = {row["method"] for row in document["adaptive"]}
    assert methods == {"learned exit", "truncation"}
    # The report's table shows the head's checks per token (few FLOPs, but a few operators each at batch 1).
    from odegpt.evaluation.report import adaptive_table

    learned = next(row for row in document["adaptive"] if row["method"] == "learned exit")
    row = next(line for line in adaptive_table(document).splitlines() if line.startswith(f"| {learned['label']} |"))
    assert row.split("|")[5].strip() == f"{learned['exit_scores']:.2f}"
    assert "| head checks/token |" in adaptive_table(document)
    # --exit-to tail fits the head again for the exit to the tail; the thresholds of the old head are dropped.
    assert odegpt_main(["calibrate", "--model", str(folder), "--data", str(tmp_path / "text.txt"), "--tolerance",
                        "0.2", "--seq-len", "32", "--exit-to", "tail"]) == 0
    assert "fitted the exit head" in capsys.readouterr().out
    records = json.loads((folder / "exit_calibration.json").read_text())["records"]
    assert [(r["rule"], r["tolerance"], r["exit_to"]) for r in records] == [("exit", 0.2, "tail")]
    assert json.loads((folder / "config.json").read_text())["exit_to_tail"] is True
    assert odegpt_main(["generate", "--model", str(folder), "--prompt", "def add(", "--max-new-tokens", "4",
                        "--exit", "learned", "--exit-tolerance", "0.2", "--kv-fill", "lazy"]) == 2
    assert "lazy cannot exit to the tail" in capsys.readouterr().err


def test_the_exit_head_trains_beside_the_model_without_changing_it():
    from odegpt.training.objective import objective_terms

    model = tiny_model(PARTIALLY_SHARED, exit_head=4).train()
    tokens = torch.randint(1, 97, (2, 10))
    with torch.enable_grad():
        terms = objective_terms(model, tokens, 2.0, lm_weight=0.0, exit_head_weight=1.0, exit_head_positions=8)
        assert set(terms) == {"exit"} and terms["exit"].item() > 0
        terms["exit"].backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(name.startswith("exit_head.") for name in trained), trained


def test_a_draft_stopped_by_the_exit_head_keeps_the_output():
    model = damped(exact_model(PARTIALLY_SHARED, exit_head=0), 0.05)
    prompt = torch.randint(1, 97, (1, 6))
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, draft_step_size=4, draft_tokens=4,
                  return_dict_in_generate=True)
    plain = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    never, always = (model.generate(prompt, draft_stop_score=score, **kwargs)
                     for score in (float("inf"), -float("inf")))
    free = model.generate(prompt, **kwargs)
    assert torch.equal(never.sequences, plain) and torch.equal(always.sequences, plain)
    assert never.drafted_tokens == free.drafted_tokens  # no state scores above +inf
    assert always.drafted_tokens <= always.target_forwards  # every round stops after its first draft
    with pytest.raises(ValueError, match="give draft_step_size too"):
        model.generate(prompt, draft_stop_score=0.0, max_new_tokens=2, pad_token_id=0)


def test_calibrate_refuses_a_check_cost_that_is_not_a_number_of_steps(model_folder, capsys):
    for bad in ("-1", "inf", "nan"):
        code = odegpt_main(["calibrate", "--model", str(model_folder), "--data", str(model_folder),
                            "--check-cost", bad])
        err = capsys.readouterr().err
        assert code == 2 and "--check-cost must be a finite number of solver steps >= 0" in err, err
        assert err.count("\n") == 1  # one line, before anything is read or written
