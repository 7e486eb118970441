import pytest
import torch

from odegpt import OdeCache
from odegpt.solver import plan_solve
from tests.conftest import left_padded

STEP_SIZES = [0.5, 1, 2, 3, 4]


@pytest.mark.parametrize("a", STEP_SIZES)
def test_greedy_with_cache_equals_without(shared_model, a):
    prompt = torch.randint(1, 97, (2, 6))
    kwargs = dict(max_new_tokens=12, do_sample=False, step_size=a, pad_token_id=0)
    with_cache = shared_model.generate(prompt, use_cache=True, **kwargs)
    without = shared_model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[:, 6:].flatten().tolist())) > 2  # not a degenerate repetition


@pytest.mark.parametrize("a", [0.5, 2, 3])
def test_cache_holds_one_slot_per_executed_step(shared_model, a):
    out = shared_model(torch.randint(1, 97, (1, 5)), step_size=a, use_cache=True)
    assert isinstance(out.past_key_values, OdeCache)
    assert len(out.past_key_values.layers) == len(plan_solve(shared_model.config.segments, a))
    assert out.past_key_values.get_seq_length() == 5


@pytest.mark.parametrize("a", [1, 2.5])
def test_left_padded_batch_equals_each_row_alone(shared_model, a):
    rows = [torch.randint(1, 97, (n,)) for n in (7, 3, 5)]
    input_ids, attention_mask = left_padded(rows)
    width = input_ids.shape[1]
    kwargs = dict(max_new_tokens=10, do_sample=False, step_size=a, pad_token_id=0)
    batched = shared_model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    for i, row in enumerate(rows):
        alone = shared_model.generate(row[None], **kwargs)
        assert torch.equal(batched[i, width:], alone[0, len(row):]), f"row {i}"


def test_cache_built_at_one_step_size_refuses_another(shared_model):
    prompt = torch.randint(1, 97, (1, 5))
    cache = shared_model(prompt, step_size=2, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="step_size=2.0.*step_size=1.0"):
        shared_model(prompt[:, -1:], past_key_values=cache, step_size=1, use_cache=True)


def test_cache_continues_a_prefix_exactly(shared_model):
    tokens = torch.randint(1, 97, (2, 10))
    full = shared_model(tokens, step_size=0.5, use_cache=False).logits
    cache = shared_model(tokens[:, :6], step_size=0.5).past_key_values
    rest = shared_model(tokens[:, 6:], past_key_values=cache, step_size=0.5).logits  # several new tokens at once
    torch.testing.assert_close(rest, full[:, 6:], rtol=1e-5, atol=1e-5)


def test_a_plain_dynamic_cache_is_refused(shared_model):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="OdeCache"):
        shared_model(torch.randint(1, 97, (1, 4)), past_key_values=DynamicCache(), use_cache=True)
