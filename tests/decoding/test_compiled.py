"""The compiled decode path: static KV caches fed by one step per token (odegpt/decoding/compiled.py), exact to the
eager path with its dynamic caches."""
import pytest
import torch

from odegpt.decoding import compiled
from odegpt.decoding.speculative import StaticCaches, _Solve
from odegpt.model.cache import StaticOdeCache
from tests.conftest import EXACT, PARTIALLY_SHARED, damped, exact_model, left_padded


@pytest.fixture
def model():
    return damped(exact_model(PARTIALLY_SHARED), 0.05)


@pytest.fixture
def traced(monkeypatch):
    """DecodeStep captured by dynamo as one graph (fullgraph: a graph break fails) but run by the eager backend, not
    inductor: the same capture in seconds instead of a C++ build of a minute (``-m slow`` runs inductor)."""
    step = torch.compile(compiled._step, fullgraph=True, dynamic=False, backend="eager")
    monkeypatch.setitem(compiled._compiled, "cpu", step)
    torch._dynamo.reset()
    return step


def test_a_static_cache_gives_the_dynamic_caches_logits_across_rounds_and_crops(model):
    tokens, mask = left_padded([torch.randint(1, 97, (n,)) for n in (7, 4)])
    static, dynamic = _Solve(model, 1.0, static=StaticCaches(2, 16)), _Solve(model, 1.0)
    for feed, keep, crop in ((slice(0, 6), 1, None), (slice(6, 7), 0, None), (slice(7, 10), 0, 8), (slice(8, 9), 0, 9)):
        fed = tokens[:, feed] if feed.stop <= 7 else torch.randint(1, 97, (2, feed.stop - feed.start))
        full_mask = torch.cat([mask, mask.new_ones(2, 9)], dim=1)
        got = static.logits(fed, full_mask, keep)
        torch.testing.assert_close(got, dynamic.logits(fed, full_mask, keep), **EXACT)
        if crop is not None:  # a rejected draft: what lies beyond is masked until written again
            static.crop(crop)
            dynamic.crop(crop)
        assert len(static) == len(dynamic)


@pytest.mark.parametrize("draft", [{}, dict(draft_step_size=2, draft_tokens=3), dict(prompt_lookup_num_tokens=3),
                                   dict(draft_step_size=4, prompt_lookup_num_tokens=2)])
def test_static_caches_decode_the_eager_tokens_in_a_left_padded_batch(model, draft):
    tokens, mask = left_padded([torch.randint(1, 97, (n,)) for n in (7, 4)])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eager = model.generate(tokens, **kwargs)
    assert torch.equal(model.generate(tokens, cache_implementation="static", **draft, **kwargs), eager)


def test_the_compiled_step_decodes_the_eager_tokens(model, traced):
    prompt = torch.randint(1, 97, (1, 6))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    eager = model.generate(prompt, **kwargs)
    assert len(set(eager[0, 6:].tolist())) > 3  # not a degenerate repetition
    assert torch.equal(model.generate(prompt, compile=True, **kwargs), eager)
    out = model.generate(prompt, compile=True, draft_step_size=2, draft_tokens=3, return_dict_in_generate=True,
                         **kwargs)
    assert torch.equal(out.sequences, eager)
    assert 0 < out.accepted_tokens < out.drafted_tokens  # verification (several tokens) and drafts both compiled


def test_at_batch_1_only_matrices_mkl_multiplies_are_laid_out_column_major_and_no_value_changes(model, traced,
                                                                                                 tmp_path,
                                                                                                 monkeypatch):
    monkeypatch.setattr(compiled, "DECOMPOSED_MAX_SIDE", 96)  # the LM head (97 x 64) is MKL's, the MLP (96 x 64) not
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert {name for name, module in linears.items() if module.weight.shape[0] > 96} == {"lm_head"}
    up = linears["model.blocks.0.mlp.up_proj"]
    up.weight.data = up.weight.data.t().contiguous().t()  # as the layout of one row used to leave it
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    model.generate(torch.randint(1, 97, (1, 4)), compile=True, max_new_tokens=2, do_sample=False, pad_token_id=0)
    for name, module in linears.items():
        rows, columns = module.weight.shape
        assert module.weight.stride() == ((1, rows) if name == "lm_head" else (columns, 1)), name
    assert all(torch.equal(parameter, before[name]) for name, parameter in model.named_parameters())
    assert compiled.lay_out_for_rows(model) == 0  # laid out once
    model.generate(torch.randint(1, 97, (2, 4)), compile=True, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert all(module.weight.is_contiguous() for module in linears.values())
    model.save_pretrained(tmp_path)  # saves and reloads like any model
    reloaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(parameter, before[name]) for name, parameter in reloaded.named_parameters())


def test_a_static_cache_is_bound_to_its_solve_and_its_size():
    cache = StaticOdeCache(1, 4, num_key_value_heads=2, head_dim=8)
    cache.bind(1.0, 3)
    assert len(cache.key_buffers) == 3 and cache.key_buffers[0].shape == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="another solve"):
        cache.bind(2.0, 2)
    cache.advance(3)
    with pytest.raises(ValueError, match="4 positions"):
        cache.advance(2)
    with pytest.raises(ValueError, match="1 rows"):
        cache.check_room(2, 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(compile=True, use_cache=False), "static KV cache"),
    (dict(compile=True, reuse_draft=True, draft_step_size=2), "reuse_draft"),
    (dict(compile=True, exit_entropy=1.0), "plain and self-speculative"),
])
def test_settings_the_compiled_path_cannot_take_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(torch.randint(1, 97, (1, 4)), max_new_tokens=2, **kwargs)


@pytest.mark.slow
def test_the_inductor_compiled_step_decodes_the_eager_tokens_with_its_one_row_products_as_reductions(model):
    from torch._dynamo.utils import counters

    prompt = torch.randint(1, 97, (1, 6))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    counters.clear()
    assert torch.equal(model.generate(prompt, compile=True, **kwargs), model.generate(prompt, **kwargs))
    assert counters["inductor"]["decompose_mm"] > 0  # inductor's reductions, not MKL's one-thread products
    from torch._inductor.fx_passes import decompose_mem_bound_mm as passes

    # odegpt's bound held only while its own step compiled: torch's default for everything else in the process
    assert passes.cpu_max_other_dimension_decomposition == passes.CPU_MAX_OTHER_DIMENSION_DECOMPOSITION
