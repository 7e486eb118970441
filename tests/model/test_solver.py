import math

import numpy as np
import pytest
import torch

from odegpt.model.accounting import model_cost
from odegpt.model.solver import plan_solve, segment_step_sizes
from odegpt.training.objective import StepSizeDistribution, StepSizeSampler, language_model_loss
from tests.conftest import EXACT, FULLY_SHARED, PARTIALLY_SHARED, exact_model, tiny_config, tiny_model


@pytest.mark.parametrize("depth, a, expected", [
    (12, 1, [1.0] * 12), (12, 2, [2.0] * 6), (12, 5, [5.0, 5.0, 2.0]), (3, 4, [3.0]),
    (2, 0.5, [0.5] * 4), (12, 0.3, None),
])
def test_segment_plan_takes_ceil_steps_that_sum_to_depth(depth, a, expected):
    steps = segment_step_sizes(depth, a)
    assert len(steps) == math.ceil(round(depth / a, 9))
    assert math.isclose(sum(steps), depth)
    assert all(0 < dt <= a + 1e-12 for dt in steps)
    if expected is not None:
        assert list(steps) == expected


def test_unshared_layers_always_take_step_one():
    plan = plan_solve(PARTIALLY_SHARED, 2.0)
    # unshared 1 layer, shared depth 3 at a=2 -> (2, 1), shared depth 2 -> (2,), unshared 1 layer
    assert [(s.block, s.dt) for s in plan] == [(0, 1.0), (1, 2.0), (1, 1.0), (2, 2.0), (3, 1.0)]


@pytest.mark.parametrize("a", [0.5, 1, 2, 3])
def test_model_runs_the_planned_number_of_steps(shared_model, a):
    calls = []
    for block in shared_model.model.blocks:
        block.self_attn.register_forward_hook(lambda *_: calls.append(1))
    shared_model(torch.randint(0, 97, (1, 5)), step_size=a, use_cache=False)
    assert len(calls) == len(plan_solve(shared_model.config.segments, a))


def test_step_one_reproduces_the_plain_stack():
    """A fully shared depth-4 model at a=1 IS an unshared model with 4 copies of its block."""
    shared = tiny_model(FULLY_SHARED)
    unshared = tiny_model([{"depth": 4, "shared": False}])
    block_state = shared.model.blocks[0].state_dict()
    for block in unshared.model.blocks:
        block.load_state_dict(block_state)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        unshared.state_dict()[name].copy_(shared.state_dict()[name])
    x = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(shared(x, step_size=1).logits, unshared(x).logits, rtol=0, atol=0)


def test_smaller_steps_converge():
    """Halving a repeatedly: the solve converges (successive differences shrink)."""
    model = tiny_model(FULLY_SHARED, initializer_range=0.05)
    x = torch.randint(0, 97, (1, 8))
    logits = [model(x, step_size=a, use_cache=False).logits for a in (1, 0.5, 0.25, 0.125)]
    diffs = [(logits[i] - logits[i + 1]).abs().max().item() for i in range(3)]
    assert diffs[2] < diffs[1] < diffs[0]


def test_gradients_reach_shared_weights(shared_model):
    shared_model.train()
    tokens = torch.randint(0, 97, (2, 9))
    language_model_loss(shared_model, tokens, step_size=2.0).backward()
    for name, parameter in shared_model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_labels_give_the_language_model_loss():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 9))
    loss = model(tokens, labels=tokens, step_size=2).loss
    torch.testing.assert_close(loss, language_model_loss(model, tokens, step_size=2))


def test_consistency_term_adds_kl_only_away_from_step_one():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 9))
    plain = language_model_loss(model, tokens, 2.0)
    with_kl = language_model_loss(model, tokens, 2.0, consistency_weight=1.0)
    assert with_kl > plain
    torch.testing.assert_close(language_model_loss(model, tokens, 1.0, consistency_weight=1.0),
                               language_model_loss(model, tokens, 1.0))


def test_sampler_is_a_pure_function_of_seed_and_step():
    distribution = StepSizeDistribution(choices=(1, 2, 4), weights=(2, 1, 1))
    rank0, rank1 = StepSizeSampler(distribution, seed=7), StepSizeSampler(distribution, seed=7)
    draws = [rank0.sample(step) for step in range(200)]
    # another rank, in any order, and a restart from the saved state, draw the same values
    assert [rank1.sample(step) for step in reversed(range(200))] == draws[::-1]
    restarted = StepSizeSampler.from_state_dict(rank0.state_dict())
    assert [restarted.sample(step) for step in range(100, 200)] == draws[100:]
    assert draws != [StepSizeSampler(distribution, seed=8).sample(step) for step in range(200)]
    counts = {a: draws.count(a) for a in (1.0, 2.0, 4.0)}
    assert set(draws) == {1.0, 2.0, 4.0} and counts[1.0] > counts[2.0] and counts[1.0] > counts[4.0]


def test_sampler_is_identical_in_another_process():
    import subprocess
    import sys

    code = ("from odegpt.training.objective import *; s = StepSizeSampler(StepSizeDistribution(low=0.5, high=4, "
            "log_uniform=True), seed=3); print(repr([s.sample(t) for t in range(5)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    sampler = StepSizeSampler(StepSizeDistribution(low=0.5, high=4, log_uniform=True), seed=3)
    draws = [sampler.sample(t) for t in range(5)]
    assert eval(out) == draws and all(0.5 <= a <= 4 for a in draws)


@pytest.mark.parametrize("spec, field", [
    ({}, "either"), ({"choices": []}, "empty"), ({"choices": [1, 0]}, "choices"),
    ({"choices": [1, 2], "weights": [1]}, "weights"), ({"low": 2, "high": 1}, "low"),
    ({"low": 1}, "high"), ({"mean": 1}, "unknown"),
])
def test_bad_step_size_distribution(spec, field):
    with pytest.raises(ValueError, match=field):
        StepSizeDistribution.from_dict(spec)


def test_fully_shared_model_has_one_over_depth_of_the_block_parameters():
    depth = 12
    shared = model_cost(tiny_config([{"depth": depth, "shared": True}]))
    unshared = model_cost(tiny_config([{"depth": depth, "shared": False}]))
    assert shared.block_parameters * depth == unshared.block_parameters
    assert shared.flops_per_token == unshared.flops_per_token  # sharing saves memory, not compute


@pytest.mark.parametrize("tie", [False, True])
def test_accounting_counts_the_real_parameters(tie):
    model = tiny_model(PARTIALLY_SHARED, tie_word_embeddings=tie)
    distinct = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert model_cost(model.config).parameters == sum(distinct.values())


def test_flops_and_kv_cache_fall_with_the_step_size():
    config = tiny_config([{"depth": 12, "shared": True}])
    costs = {a: model_cost(config, a, seq_len=64) for a in (1, 2, 4)}
    assert [costs[a].executed_steps for a in (1, 2, 4)] == [12, 6, 3]
    assert (costs[1].kv_cache_bytes_per_token == 2 * costs[2].kv_cache_bytes_per_token
            == 4 * costs[4].kv_cache_bytes_per_token)
    assert 1 < costs[1].flops_per_token / costs[2].flops_per_token < 2
    assert np.isclose(costs[1].training_flops_per_token, 3 * costs[1].flops_per_token)


@pytest.mark.parametrize("step_size", [1e-3, 1e-9, 1e-300])
def test_a_solve_over_the_step_limit_is_refused_before_planning(step_size):
    from odegpt.model.solver import SolveTooLongError, count_steps

    segments = [{"depth": 12, "shared": True}]
    with pytest.raises(SolveTooLongError, match=r"more than the maximum of 1,024"):
        plan_solve(segments, step_size)  # 1e-300 would need 1.2e301 steps: must not be materialised
    assert count_steps(segments, 0.5) == 24
    assert len(plan_solve(segments, 1e-3, max_steps=12_000)) == 12_000


def test_the_step_limit_is_a_config_field_and_guards_forward_and_cost(shared_model):
    from odegpt.model.accounting import model_cost
    from odegpt.model.solver import SolveTooLongError

    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(SolveTooLongError):
        shared_model(tokens, step_size=1e-4)
    with pytest.raises(SolveTooLongError):
        model_cost(shared_model.config, 1e-4)
    config = tiny_config(max_solver_steps=8)
    assert config.solver_steps(0.5) == 8
    with pytest.raises(SolveTooLongError, match="maximum of 8"):
        config.solver_steps(0.25)
    with pytest.raises(ValueError, match="max_solver_steps"):
        tiny_config(max_solver_steps=0)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_a_step_size_set_on_the_config_after_loading_is_still_validated(shared_model, bad):
    """`from_pretrained(dir, step_size=X)` (as lm-eval's model_args do) sets the attribute unchecked;
    the solver must refuse it rather than run a negative, empty or endless solve."""
    shared_model.config.step_size = bad
    with pytest.raises(ValueError, match="step_size must be"):
        shared_model(torch.tensor([[1, 2, 3]]))


# ---- Heun's method: two evaluations per step, through the one solve loop -------------------------------

def test_heun_step_is_the_trapezoid_of_the_blocks_increment():
    from odegpt.model.solver import euler_step, heun_step

    model = exact_model(FULLY_SHARED)
    block, h = model.model.blocks[0], torch.randn(2, 5, 64, dtype=torch.float64)
    cos, sin, mask = model.model.attention_inputs(h, None, None, 0)
    inputs = dict(cos=cos, sin=sin, mask=mask)
    dt = 0.7

    def g(x):  # the block's increment per unit time at step length dt
        return (euler_step(block, x, dt, **inputs) - x) / dt

    with torch.no_grad():
        expected = h + dt / 2 * (g(h) + g(h + dt * g(h)))
        torch.testing.assert_close(heun_step(block, h, dt, **inputs), expected, **EXACT)


def test_heun_is_closer_than_euler_to_a_fine_solve_at_every_step_size():
    """Measured: on a smooth model Heun's error at a is 1.8-7x below Euler's (the block's attention-then-MLP split
    leaves an O(dt) term in its increment, so the order is between one and two, not two)."""
    model = tiny_model([{"depth": 8, "shared": True}], initializer_range=0.02)
    x = torch.randint(1, 97, (2, 16))
    with torch.no_grad():
        fine = model.model(x, step_size=1 / 64, solver="heun").last_hidden_state
        for a in (4, 2, 1, 0.5):
            euler = (model.model(x, step_size=a).last_hidden_state - fine).norm()
            heun = (model.model(x, step_size=a, solver="heun").last_hidden_state - fine).norm()
            assert heun < euler / 1.5, (a, float(euler), float(heun))


@pytest.mark.parametrize("segments", [FULLY_SHARED, PARTIALLY_SHARED])
def test_heun_decodes_with_two_cache_slots_per_step_as_it_scores_without_cache(segments):
    from odegpt import OdeCache

    model = tiny_model(segments, solver="heun")
    prompt = torch.randint(1, 97, (2, 6))
    for a in (0.5, 2):
        kwargs = dict(max_new_tokens=8, do_sample=False, step_size=a, pad_token_id=0)
        cached = model.generate(prompt, use_cache=True, **kwargs)
        assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))
        euler = tiny_model(segments)  # the same weights (same seed), integrated by Euler
        assert not torch.equal(cached, euler.generate(prompt, **kwargs)), "the solver made no difference"
        out = model(prompt, step_size=a, use_cache=True)
        assert len(out.past_key_values.layers) == 2 * len(plan_solve(segments, a))
    cache = model(prompt, step_size=2, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="heun solver.*with euler"):
        model(prompt[:, -1:], past_key_values=cache, step_size=2, solver="euler")
    assert isinstance(cache, OdeCache)


def test_heun_drafts_and_verifies_self_speculatively_with_the_plain_greedy_output():
    model = tiny_model(PARTIALLY_SHARED, solver="heun")
    prompt = torch.randint(1, 97, (1, 7))
    kwargs = dict(max_new_tokens=10, do_sample=False, step_size=1, pad_token_id=0)
    out = model.generate(prompt, draft_step_size=4, draft_tokens=3, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, model.generate(prompt, **kwargs)) and out.drafted_tokens > 0


def test_heun_costs_two_evaluations_per_step_and_refuses_to_unroll_with_its_reason():
    from odegpt.folders.export import unroll_to_llama

    config = tiny_config(PARTIALLY_SHARED)
    euler, heun = model_cost(config, 2.0, 64), model_cost(config, 2.0, 64, solver="heun")
    assert heun.executed_steps == euler.executed_steps and heun.block_evaluations == 2 * euler.block_evaluations
    assert heun.kv_cache_bytes_per_token == 2 * euler.kv_cache_bytes_per_token
    readout = 2 * config.vocab_size * config.hidden_size
    assert heun.flops_per_token - readout == pytest.approx(2 * (euler.flops_per_token - readout))
    with pytest.raises(ValueError, match="the heun solver cannot be unrolled to Llama layers: a Heun step is"):
        unroll_to_llama(tiny_model(PARTIALLY_SHARED, solver="heun"), 2.0)
    with pytest.raises(ValueError, match="solver must be one of euler, heun, got 'rk4'"):
        tiny_config(PARTIALLY_SHARED, solver="rk4")
