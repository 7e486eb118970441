"""Distillation from a source model: the KL and trajectory terms, stepwise training, and their checks."""
from __future__ import annotations

import copy

import pytest
import torch

from odegpt.training.distillation import (
    Distillation,
    matched_steps,
    relative_error,
    stepwise_trajectory_loss,
    teacher_view,
)
from odegpt.training.objective import objective_terms
from tests.conftest import FULLY_SHARED, UNSHARED, damped, tiny_model


def test_the_source_distilled_into_itself_has_no_distillation_loss_and_the_gradient_reaches_only_the_student():
    source = damped(tiny_model(UNSHARED, seed=1), 0.3)
    source.requires_grad_(False)
    student = copy.deepcopy(source).train()
    student.requires_grad_(True)
    tokens = torch.randint(1, 97, (2, 12))
    settings = Distillation(kl_weight=1.0, trajectory_weight=1.0)
    terms = objective_terms(student, tokens, 1.0, distill=settings, teacher=source)
    assert set(terms) == {"ce", "kl", "trajectory"}
    assert terms["kl"].item() < 1e-6 and terms["trajectory"].item() < 1e-10
    # A shared student is not the source: both terms are positive, and their gradient reaches it alone.
    shared = tiny_model(FULLY_SHARED, seed=2).train()
    terms = objective_terms(shared, tokens, 2.0, distill=settings, teacher=source, lm_weight=0.0)
    assert set(terms) == {"kl", "trajectory"} and terms["kl"].item() > 1e-3 and terms["trajectory"].item() > 1e-3
    sum(terms.values()).backward()
    assert all(p.grad is None for p in source.parameters())
    assert shared.model.blocks[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_with_lm_weight_0_the_a1_reference_pass_is_distilled_too_not_trained_on_the_tokens():
    source = damped(tiny_model(UNSHARED, seed=1), 0.3)
    source.requires_grad_(False)
    student = tiny_model(FULLY_SHARED, seed=2).train()
    tokens = torch.randint(1, 97, (2, 12))
    settings = Distillation(kl_weight=1.0, trajectory_weight=0.5)
    terms = objective_terms(student, tokens, 2.0, reference_weight=0.7, distill=settings, teacher=source,
                            lm_weight=0.0)
    assert set(terms) == {"kl", "trajectory", "reference_kl", "reference_trajectory"}
    fine = objective_terms(student, tokens, 1.0, distill=settings, teacher=source, lm_weight=0.0)
    assert terms["reference_kl"].item() == pytest.approx(0.7 * fine["kl"].item(), rel=1e-5)
    assert terms["reference_trajectory"].item() == pytest.approx(0.7 * fine["trajectory"].item(), rel=1e-5)
    # With the LM loss on, the a=1 pass also has its CE (scaled like the drawn solve's).
    mixed = objective_terms(student, tokens, 2.0, reference_weight=0.7, distill=settings, teacher=source,
                            lm_weight=0.5)
    assert set(mixed) == {"ce", "reference", "kl", "trajectory", "reference_kl", "reference_trajectory"}
    assert mixed["reference"].item() == pytest.approx(0.7 * 0.5 / 1.0 * objective_terms(student, tokens, 1.0)["ce"]
                                                      .item(), rel=1e-5)


def test_the_trajectory_is_compared_at_the_source_layers_times_only():
    model = tiny_model(FULLY_SHARED)  # depth 4
    assert matched_steps(model.plan(1.0), 4) == [0, 1, 2, 3]  # after layers 1, 2, 3, 4
    assert matched_steps(model.plan(2.0), 4) == [0, 1]  # after layers 2 and 4
    assert matched_steps(model.plan(0.5), 4) == [1, 3, 5, 7]  # the half steps end between layers: not compared
    assert matched_steps(model.plan(3.0), 4) == [0, 1]  # times 3 and 4
    target = torch.randn(2, 3, 8)
    assert float(relative_error(target, target)) == 0 and float(relative_error(2 * target, target)) == pytest.approx(1)


def test_stepwise_steps_train_from_the_sources_states_independently():
    source = damped(tiny_model(UNSHARED, seed=1), 0.3)
    tokens = torch.randint(1, 97, (2, 12))
    view = teacher_view(source, tokens, states=True)
    assert len(view.states) == 5  # times 0..4
    same = copy.deepcopy(source)
    assert float(stepwise_trajectory_loss(same, tokens, same.plan(1.0), view.states)) < 1e-10
    shared = tiny_model(FULLY_SHARED, seed=2).train()
    loss = stepwise_trajectory_loss(shared, tokens, shared.plan(1.0), view.states)
    loss.backward()
    assert float(loss) > 1e-3 and shared.model.blocks[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # Each step starts from the source's state, so a step's error does not depend on the steps before it:
    # one step alone gives that step's error.
    errors = [float(stepwise_trajectory_loss(shared, tokens, shared.plan(1.0), view.states, steps_per_sample=1,
                                             generator=torch.Generator().manual_seed(seed))) for seed in range(40)]
    distinct = sorted({round(e, 6) for e in errors})
    assert len(distinct) == 4 and sum(distinct) / 4 == pytest.approx(float(loss), rel=1e-5)
    # At a = 0.5 two half steps go from one layer time to the next, from the source's state at the first.
    half = stepwise_trajectory_loss(shared, tokens, shared.plan(0.5), view.states)
    assert float(half) > 1e-3 and half.requires_grad


@pytest.mark.parametrize("settings, message", [
    (dict(kl_weight=-1.0), "kl_weight must be a finite number >= 0"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(stepwise=True), "give it a trajectory weight > 0"),
    (dict(trajectory_weight=1.0, steps_per_sample=-2), "steps_per_sample must be an integer >= 0"),
])
def test_bad_distillation_settings_name_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        Distillation(**settings)
