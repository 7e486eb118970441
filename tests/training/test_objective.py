"""The objective's options: an a=1 curriculum before the draws, the a=1 reference loss, their cost."""
import pytest
import torch
import torch.nn.functional as F

from launcher.config import ConfigError, load_config
from odegpt.model.accounting import model_cost
from odegpt.training.objective import (
    StepSizeDistribution,
    StepSizeSampler,
    language_model_loss,
    objective_flops_per_token,
)
from tests.conftest import tiny_config, tiny_model


def test_curriculum_trains_at_one_then_draws_as_without_it():
    plain = StepSizeSampler(StepSizeDistribution(choices=(0.5, 2.0, 4.0)), seed=5)
    curriculum = StepSizeSampler(StepSizeDistribution(choices=(0.5, 2.0, 4.0), curriculum_steps=30), seed=5)
    assert [curriculum.sample(step) for step in range(30)] == [1.0] * 30
    assert [curriculum.sample(step) for step in range(30, 90)] == [plain.sample(step) for step in range(30, 90)]
    restarted = StepSizeSampler.from_state_dict(curriculum.state_dict())
    assert [restarted.sample(step) for step in range(25, 35)] == [curriculum.sample(step) for step in range(25, 35)]
    assert "curriculum_steps" not in plain.state_dict()["distribution"]  # old checkpoints' state unchanged


@pytest.mark.parametrize("value", [-1, 2.5, True, "10"])
def test_bad_curriculum_steps(value):
    with pytest.raises(ValueError, match="curriculum_steps"):
        StepSizeDistribution.from_dict({"choices": [1, 2], "curriculum_steps": value})


@pytest.mark.parametrize("override, key", [
    ("train.step_size_distribution={choices: [1, 2], curriculum_steps: -5}",
     "train.step_size_distribution.*curriculum_steps"),
    ("train.reference_weight=-0.5", "train.reference_weight"),
    ("train.solvers={rk9: 1}", "train.solvers: solver must be one of euler"),
    ("train.solvers={euler: -1}", "train.solvers: solver weights must be non-negative"),
    ("train.solvers=[euler]", "train.solvers must be dict"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(["quickstart"], [override])


def _cross_entropy(model, tokens, a):
    return model(tokens, labels=tokens, step_size=a).loss


def test_reference_loss_adds_the_step_one_loss_away_from_one():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 9))
    expected = _cross_entropy(model, tokens, 2.0) + 0.5 * _cross_entropy(model, tokens, 1.0)
    torch.testing.assert_close(language_model_loss(model, tokens, 2.0, reference_weight=0.5), expected)
    torch.testing.assert_close(language_model_loss(model, tokens, 1.0, reference_weight=0.5),
                               _cross_entropy(model, tokens, 1.0))


def _gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _expected_loss(model, tokens, a, consistency_weight, reference_weight):
    """CE(p_a) + w CE(p_1) + c KL(sg(p_1) || p_a), written out."""
    logits_a = model(tokens[:, :-1], step_size=a).logits.flatten(0, 1)
    logits_1 = model(tokens[:, :-1], step_size=1.0).logits.flatten(0, 1)
    targets = tokens[:, 1:].flatten()
    kl = F.kl_div(logits_a.log_softmax(-1), logits_1.detach().log_softmax(-1), log_target=True,
                  reduction="batchmean")
    return F.cross_entropy(logits_a, targets) + reference_weight * F.cross_entropy(logits_1, targets) \
        + consistency_weight * kl


@pytest.mark.parametrize("consistency_weight, reference_weight", [(0.3, 0.7), (0.3, 0.0), (0.0, 0.7)])
def test_gradients_train_the_fine_solve_only_through_the_reference_loss(consistency_weight, reference_weight):
    """The consistency term pulls p_a towards a detached p_1; only the reference loss trains p_1."""
    model = tiny_model().train()
    tokens = torch.randint(0, 97, (2, 9))
    got = _gradients(model, language_model_loss(model, tokens, 4.0, consistency_weight, reference_weight))
    expected = _gradients(model, _expected_loss(model, tokens, 4.0, consistency_weight, reference_weight))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_objective_flops_count_the_extra_step_one_pass():
    config = tiny_config()
    fine, coarse = (model_cost(config, step_size=a, seq_len=64) for a in (1.0, 4.0))
    assert objective_flops_per_token(config, 4.0, 64) == coarse.training_flops_per_token
    assert objective_flops_per_token(config, 4.0, 64, consistency_weight=1.0) == \
        coarse.training_flops_per_token + fine.flops_per_token
    assert objective_flops_per_token(config, 4.0, 64, reference_weight=1.0, consistency_weight=1.0) == \
        coarse.training_flops_per_token + fine.training_flops_per_token
    assert objective_flops_per_token(config, 1.0, 64, reference_weight=1.0, consistency_weight=1.0) == \
        fine.training_flops_per_token


def test_solver_draws_are_a_pure_function_of_seed_and_step_and_leave_step_sizes_alone():
    from odegpt.training.objective import SolverSampler

    sampler = SolverSampler({"euler": 1.0}, seed=3)
    assert {sampler.sample(t) for t in range(20)} == {"euler"}
    mixed = SolverSampler(dict.fromkeys(_registered_solvers(), 1.0), seed=3)
    draws = [mixed.sample(t) for t in range(200)]
    assert draws == [SolverSampler(dict.fromkeys(_registered_solvers(), 1.0), seed=3).sample(t) for t in range(200)]
    assert set(draws) == set(_registered_solvers())  # every method is drawn
    step_sizes = StepSizeSampler(StepSizeDistribution.from_dict({"choices": [1, 2, 4]}), seed=3)
    assert [step_sizes.sample(t) for t in range(50)] == \
        [StepSizeSampler(StepSizeDistribution.from_dict({"choices": [1, 2, 4]}), seed=3).sample(t) for t in range(50)]


def _registered_solvers() -> list[str]:
    from odegpt.model.solver import METHODS

    return list(METHODS)


def test_the_loss_and_its_flops_follow_the_drawn_solver():
    from odegpt.model.solver import METHODS
    from odegpt.training.objective import objective_flops_per_token

    model, tokens = tiny_model(), torch.randint(1, 97, (2, 9))
    config = model.config
    for name, method in METHODS.items():
        expected = F.cross_entropy(model(tokens[:, :-1], step_size=2, solver=name).logits.flatten(0, 1),
                                   tokens[:, 1:].flatten())
        torch.testing.assert_close(language_model_loss(model, tokens, 2.0, solver=name), expected)
        assert objective_flops_per_token(config, 2.0, 8, solver=name) == pytest.approx(
            3 * (model_cost(config, 2.0, 8, solver=name).flops_per_token))
        assert model_cost(config, 2.0, 8, solver=name).block_evaluations == 2 * method.evaluations
