import pytest
import torch

from odegpt import OdeCache
from odegpt.model.solver import plan_solve
from tests.conftest import EXACT, left_padded

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
    torch.testing.assert_close(rest, full[:, 6:], **EXACT)


def test_a_plain_dynamic_cache_is_refused(shared_model):
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="OdeCache"):
        shared_model(torch.randint(1, 97, (1, 4)), past_key_values=DynamicCache(), use_cache=True)


def test_the_cache_answers_to_both_of_transformers_names(shared_model):
    """transformers up to 5.23 passes the cache as past_key_values, 5.24 on as cache: both continue the prefix."""
    from odegpt.model.cache import CACHE_FIELD, output_cache

    tokens = torch.randint(1, 97, (1, 8))
    full = shared_model(tokens, step_size=2, use_cache=False).logits
    for name in ("cache", "past_key_values"):
        prefix = shared_model(tokens[:, :5], step_size=2, use_cache=True)
        cache = output_cache(prefix)
        assert isinstance(cache, OdeCache) and cache is prefix[CACHE_FIELD]
        rest = shared_model(tokens[:, 5:], step_size=2, **{name: cache})
        torch.testing.assert_close(rest.logits, full[:, 5:], **EXACT)
        assert output_cache(rest) is cache and cache.get_seq_length() == 8
    with pytest.raises(ValueError, match="not both"):
        shared_model(tokens, cache=OdeCache(), past_key_values=OdeCache())


def test_a_cache_under_a_name_the_model_does_not_know_is_an_error_naming_the_version(shared_model):
    """The next rename upstream must not decode every token without its past (wrong tokens, silently)."""
    import transformers

    with pytest.raises(TypeError, match=f"transformers {transformers.__version__} passed the KV cache as 'kv_cache'"):
        shared_model(torch.randint(1, 97, (1, 4)), kv_cache=OdeCache())
    with pytest.raises(TypeError, match="'kv_cache'"):
        shared_model.model(torch.randint(1, 97, (1, 4)), kv_cache=OdeCache())


def test_a_transformers_older_than_the_folders_support_is_refused_in_one_line():
    from odegpt.model.configuration_odegpt import OLDEST_TRANSFORMERS, check_transformers_version

    check_transformers_version(OLDEST_TRANSFORMERS)
    check_transformers_version("5.24.0")
    check_transformers_version("5.4.0")
    with pytest.raises(ImportError, match=r"needs transformers >= 4\.57, found 4\.56\.2") as error:
        check_transformers_version("4.56.2")
    assert "\n" not in str(error.value)
    with pytest.raises(ImportError, match=r"cannot run on transformers 5\.3\.0: it leaves a tied LM head"):
        check_transformers_version("5.3.0")
