"""The exit to the tail: a token the head stops inside the last shared segment still runs the unshared layers after
it; decoding, counting and calibrating it."""
import pytest
import torch

from odegpt import OdeGPTConfig
from odegpt.decoding.adaptive import AdaptiveDepth, adaptive_forward, last_shared_steps
from odegpt.evaluation.exit_calibration import CalibrationRequest, calibrate_model, scheduled_exit, solve_records
from tests.conftest import EXACT, FULLY_SHARED, PARTIALLY_SHARED, damped, exact_model, tiny_config

ONE_SIX_ONE = [{"depth": 1, "shared": False}, {"depth": 6, "shared": True}, {"depth": 1, "shared": False}]


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def test_the_last_shared_segment_is_found_in_the_plan_at_every_step_size():
    model = exact_model(PARTIALLY_SHARED)  # 1u, 3s, 2s, 1u
    assert last_shared_steps(model.config.segments, model.plan(1.0)) == range(4, 6)
    assert last_shared_steps(model.config.segments, model.plan(2.0)) == range(3, 4)  # 1 + 2 steps before it
    assert last_shared_steps(FULLY_SHARED, exact_model(FULLY_SHARED).plan(1.0)) is None
    with pytest.raises(ValueError, match="exit_to_tail needs unshared layers after the last shared segment"):
        OdeGPTConfig(**{**tiny_config(FULLY_SHARED).to_dict(), "exit_to_tail": True})


def test_an_exit_at_the_first_check_is_the_segment_cut_short_with_the_tail_run_with_and_without_the_cache():
    model = damped(exact_model(PARTIALLY_SHARED, exit_head=0, exit_to_tail=True), 0.5)
    prompt = torch.randint(1, 97, (2, 8))
    always = AdaptiveDepth(exit_learned=float("inf"), kv_fill="copy")  # every token exits after step 4 (of 4..5)
    out = adaptive_forward(model, prompt, always)
    states = model(prompt, use_cache=False, output_hidden_states=True).hidden_states
    plan = model.plan(1.0)
    cut = model.read_out(model.solve(states[5], plan, model.attention_inputs(states[0]), start=6))
    torch.testing.assert_close(out.logits, cut, **EXACT)
    assert not torch.allclose(out.logits, model.read_out(states[5]))  # not read out mid-solve
    assert bool((out.counts.executed_steps == 6).all())  # 5 steps, the segment's last skipped, then the tail
    assert bool((out.counts.readouts == 1).all()) and bool((out.counts.exit_scores == 1).all())
    # Cached decoding gives the tokens of the teacher-forced solve, token after token.
    tokens = model.generate(prompt, exit_learned=float("inf"), kv_fill="copy", max_new_tokens=6, do_sample=False,
                            pad_token_id=0)
    expected = prompt
    for _ in range(6):
        expected = torch.cat([expected, adaptive_forward(model, expected, always).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(tokens, expected)
    never = adaptive_forward(model, prompt, AdaptiveDepth(exit_learned=-float("inf"), kv_fill="copy"))
    torch.testing.assert_close(never.logits, model(prompt, use_cache=False).logits, **EXACT)
    assert bool((never.counts.executed_steps == 7).all())


def test_the_lazy_fill_and_routing_are_refused_for_a_head_fitted_for_the_tail():
    config = tiny_config(PARTIALLY_SHARED, exit_head=0, exit_to_tail=True)
    with pytest.raises(ValueError, match="kv_fill lazy cannot exit to the tail"):
        AdaptiveDepth(exit_learned=0.0, kv_fill="lazy").checked(config)
    with pytest.raises(ValueError, match="not for routing"):
        AdaptiveDepth(route_learned=0.0).checked(config)


def _batches(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (4, 17), generator=generator) for _ in range(count)]


def test_calibrating_for_the_tail_checks_inside_the_segment_and_counts_the_tail():
    model = damped(exact_model(ONE_SIX_ONE), 0.3)
    request = CalibrationRequest((0.2,), check_cost=0.0, exit_to="tail")
    records = calibrate_model(model, _batches(12, seed=1), request, lambda message: None)
    assert model.config.exit_to_tail and [r["rule"] for r in records] == ["exit"]  # no routing for this head
    record = records[0]
    assert record["exit_to"] == "tail" and record["check_times"] == [2, 3, 4, 5, 6]  # states inside the segment
    held_out = solve_records(model, _batches(12, seed=1)[6:])
    assert held_out.tail_steps == 1 and bool(torch.isinf(held_out.scores[:, [0, 1, 7, 8]]).all())
    changed, executed, _ = scheduled_exit(held_out, record["threshold"], record["check_times"])
    assert record["mean_steps"] == float(executed.mean()) < 8 and record["upper_bound"] <= 0.2
    assert record["first_exit_time"] == float(executed[executed < 8].min()) - 1  # the state, not the tail's end
    # An exit at state 3 executes 3 steps and the tail; its changed flag is the tail's read-out's.
    at_three = scheduled_exit(held_out, float("inf"), [3])
    assert bool((at_three[1] == 4).all())
    assert torch.equal(at_three[0], held_out.changed[:, 3])
    with pytest.raises(ValueError, match="--exit-to tail: this model's last segment is shared"):
        CalibrationRequest(exit_to="tail").checked(tiny_config(FULLY_SHARED))
