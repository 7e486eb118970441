"""Self-speculative decoding: drafts at step size B, verification at a, output as if decoded at a alone."""
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from odegpt import OdeCache
from odegpt.decoding.speculative import DraftPolicy, _draft_with_model, _Sampler, _Solve, prompt_lookup, shared_steps
from tests.conftest import EXACT, FULLY_SHARED, PARTIALLY_SHARED, UNSHARED, damped, exact_model, left_padded


@pytest.fixture(params=["fully_shared", "partially_shared"])
def drafting_model(request):
    """A random model whose residual branches are scaled down, so that, as in a trained model, its solves at
    different step sizes mostly agree: drafts are both accepted and rejected (at full scale nearly all fail)."""
    return damped(exact_model(FULLY_SHARED if request.param == "fully_shared" else PARTIALLY_SHARED), 0.05)


@pytest.mark.parametrize("a, draft_step_size, k", [(1, 4, 2), (1, 2, 4), (0.5, 2, 3), (2, 4, 1), (1, 4, 6)])
def test_greedy_equals_plain_greedy(drafting_model, a, draft_step_size, k):
    prompt = torch.randint(1, 97, (1, 6))
    kwargs = dict(max_new_tokens=17, do_sample=False, step_size=a, pad_token_id=0)
    plain = drafting_model.generate(prompt, **kwargs)
    out = drafting_model.generate(prompt, draft_step_size=draft_step_size, draft_tokens=k,
                                  return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, plain)
    assert 0 < out.accepted_tokens < out.drafted_tokens  # both paths taken: kept drafts and rejected ones
    assert len(set(plain[0, 6:].tolist())) > 3  # not a degenerate repetition


@pytest.mark.parametrize("segments, solver, shared", [(FULLY_SHARED, "euler", 0), (PARTIALLY_SHARED, "euler", 1),
                                                      (PARTIALLY_SHARED, "heun", 1)])
def test_a_verification_that_reuses_the_drafts_work_equals_one_that_recomputes_everything(segments, solver, shared):
    model = damped(exact_model(segments, solver=solver), 0.05)
    assert shared_steps(model.plan(1.0), model.plan(2.0)) == shared  # the unshared first layer, if any
    tokens, mask = left_padded([torch.randint(1, 97, (n,)) for n in (7, 4)])
    draft, reusing, recomputing = _Solve(model, 2.0, shared), _Solve(model, 1.0, shared), _Solve(model, 1.0)
    for solve in (draft, reusing, recomputing):  # every committed token but the last, as a round starts
        solve.logits(tokens[:, :-1], mask, keep=1)
    mask_ahead = torch.cat([mask, mask.new_ones(2, 4)], dim=1)
    drafts, _, records = _draft_with_model(draft, tokens, 3, mask_ahead, _Sampler(SimpleNamespace(do_sample=False)),
                                           None, torch.ones(2, dtype=torch.bool))
    assert len(records) == 3  # the last committed token and the drafts but the last
    fed = torch.cat([tokens[:, -1:], drafts], dim=1)
    torch.testing.assert_close(reusing.logits_reusing(fed, mask_ahead, draft, records),
                               recomputing.logits(fed, mask_ahead), **EXACT)
    assert len(reusing.cache.layers) == len(recomputing.cache.layers)
    for reused, recomputed in zip(reusing.cache.layers, recomputing.cache.layers, strict=True):
        torch.testing.assert_close(reused.keys, recomputed.keys, **EXACT)
        torch.testing.assert_close(reused.values, recomputed.values, **EXACT)


def test_decoding_reuses_the_drafts_work_and_gives_the_tokens_it_gives_without_reuse():
    model = damped(exact_model(PARTIALLY_SHARED), 0.05)
    prompt = torch.randint(1, 97, (1, 6))
    kwargs = dict(max_new_tokens=17, do_sample=False, pad_token_id=0, draft_step_size=2, draft_tokens=3,
                  return_dict_in_generate=True)
    reused, recomputed = (model.generate(prompt, reuse_draft=reuse, **kwargs) for reuse in (True, False))
    assert torch.equal(reused.sequences, recomputed.sequences)
    assert torch.equal(reused.sequences, model.generate(prompt, max_new_tokens=17, do_sample=False, pad_token_id=0))
    # One unshared layer before the shared segments: one evaluation and one attention branch per drafted position.
    assert reused.reused_evaluations == reused.reused_attention == reused.drafted_tokens > 0
    assert recomputed.reused_evaluations == recomputed.reused_attention == 0


def test_a_draft_confidence_threshold_ends_rounds_early_and_keeps_the_output(drafting_model):
    prompt = torch.randint(1, 97, (1, 6))
    kwargs = dict(max_new_tokens=17, do_sample=False, step_size=1, pad_token_id=0, draft_step_size=4,
                  draft_tokens=6, return_dict_in_generate=True)
    plain = drafting_model.generate(prompt, max_new_tokens=17, do_sample=False, step_size=1, pad_token_id=0)
    off, never, always = (drafting_model.generate(prompt, draft_confidence=p, **kwargs) for p in (None, 0.0, 1.0))
    for out in (off, never, always):
        assert torch.equal(out.sequences, plain)
    assert never.drafted_tokens == off.drafted_tokens  # no draft is less likely than 0
    # Every draft is less likely than 1, so each round drafts one token (the last one none if only the target's
    # own token is left to generate): about as many drafts as verifications, and more rounds than without.
    assert always.target_forwards - 1 <= always.drafted_tokens <= always.target_forwards
    assert always.target_forwards > off.target_forwards


@pytest.mark.parametrize("a, draft_step_size, k", [(1, 4, 3), (0.5, 2, 2)])
def test_left_padded_batch_of_different_lengths_equals_plain_and_each_row_alone(drafting_model, a, draft_step_size,
                                                                                   k):
    rows = [torch.randint(1, 97, (n,)) for n in (7, 2, 5)]
    input_ids, attention_mask = left_padded(rows)
    kwargs = dict(max_new_tokens=12, do_sample=False, step_size=a, pad_token_id=0)
    plain = drafting_model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    speculative = drafting_model.generate(input_ids, attention_mask=attention_mask, draft_step_size=draft_step_size,
                                          draft_tokens=k, **kwargs)
    assert torch.equal(speculative, plain)
    for i, row in enumerate(rows):
        alone = drafting_model.generate(row[None], draft_step_size=draft_step_size, draft_tokens=k, **kwargs)
        assert torch.equal(speculative[i, input_ids.shape[1]:], alone[0, len(row):]), f"row {i}"


def test_end_of_sequence_stops_rows_as_plain_decoding_does(drafting_model):
    rows = [torch.randint(1, 97, (n,)) for n in (6, 3, 4)]
    input_ids, attention_mask = left_padded(rows)
    kwargs = dict(max_new_tokens=16, do_sample=False, step_size=1, pad_token_id=0)
    free = drafting_model.generate(input_ids, attention_mask=attention_mask, **kwargs)[:, input_ids.shape[1]:]
    eos = int(free[0, 4])  # a token row 0 emits mid-way: rows stop at different points (or never)
    plain = drafting_model.generate(input_ids, attention_mask=attention_mask, eos_token_id=eos, **kwargs)
    speculative = drafting_model.generate(input_ids, attention_mask=attention_mask, eos_token_id=eos,
                                        draft_step_size=4, draft_tokens=3, **kwargs)
    assert torch.equal(speculative, plain)
    assert (plain[0, input_ids.shape[1]:] == eos).any()


@pytest.mark.parametrize("segments, a, draft_step_size", [(UNSHARED, 1, 4), (FULLY_SHARED, 2, 2)])
def test_a_draft_that_is_the_target_is_always_accepted(segments, a, draft_step_size):
    # Unshared layers take step 1 whatever B is, and B == a is the target itself: every draft must pass.
    model = exact_model(segments)
    out = model.generate(torch.randint(1, 97, (1, 5)), max_new_tokens=11, do_sample=False, step_size=a,
                         draft_step_size=draft_step_size, draft_tokens=4, pad_token_id=0, return_dict_in_generate=True)
    assert out.acceptance_rate == 1.0 and out.target_forwards == 3  # 5 + 5 + 1 tokens


def test_accept_resample_math_gives_the_target_distribution():
    """One draft position, fixed target p and draft q (temperature and top-k shaping both): the emitted token
    (the draft if accepted with min(1, p/q), else a sample of norm(max(p - q, 0))) is distributed as p."""
    torch.manual_seed(0)
    vocab, rows = 6, 200_000
    target_logits = torch.tensor([2.0, 1.5, 0.2, -1.0, 0.7, -3.0])
    draft_logits = torch.tensor([0.1, 2.5, 1.9, -0.5, -2.0, 0.3])
    sampler = _Sampler(type("Config", (), dict(do_sample=True, temperature=0.7, top_k=4, top_p=1.0))())
    p, q = sampler.probs(target_logits[None])[0], sampler.probs(draft_logits[None])[0]
    assert (p - q).abs().sum() > 0.5  # far apart, so accepting every draft or never resampling would show
    drafts = torch.multinomial(q.expand(rows, vocab), 1)
    logits = torch.stack([target_logits, target_logits]).expand(rows, 2, vocab)  # after the draft: unused
    accepted, token = sampler.verify(drafts, q.expand(rows, 1, vocab), logits, torch.arange(rows))
    assert accepted == 0  # some row rejected, so every row emits its position-0 token
    frequencies = torch.bincount(token, minlength=vocab).float() / rows
    assert (frequencies - p).abs().max() < 0.005, (frequencies, p)  # 5 standard deviations at most
    assert frequencies[p == 0].sum() == 0


@pytest.mark.parametrize("drafts", [dict(draft_confidence=None), dict(draft_confidence=0.6),
                                    dict(draft_confidence=None, prompt_lookup_num_tokens=2)],
                         ids=["steps", "steps-confident", "steps+lookup"])
def test_sampled_tokens_follow_the_target_distribution(drafts):
    """The first three tokens of many seeded runs at batch 1 (so drafts are accepted, resampled and given a
    bonus) match the exact joint distribution of plain sampling at a, computed from the target's logits."""
    model = exact_model(FULLY_SHARED, initializer_range=0.05)  # milder logits: drafts often accepted
    prompt = torch.randint(1, 97, (1, 4))
    settings = dict(do_sample=True, temperature=1.5, top_k=2, pad_token_id=0)
    sampler = _Sampler(type("Config", (), dict(do_sample=True, temperature=1.5, top_k=2, top_p=1.0))())

    @torch.no_grad()
    def next_probs(tokens):
        return sampler.probs(model(tokens, step_size=1).logits[:, -1].float())[0]

    exact = {}
    first = next_probs(prompt)
    for x1 in first.nonzero().flatten().tolist():
        second = next_probs(torch.cat([prompt, torch.tensor([[x1]])], 1))
        for x2 in second.nonzero().flatten().tolist():
            third = next_probs(torch.cat([prompt, torch.tensor([[x1, x2]])], 1))
            for x3 in third.nonzero().flatten().tolist():
                exact[(x1, x2, x3)] = float(first[x1] * second[x2] * third[x3])
    runs, counts, accepted, drafted = 500, {}, 0, 0
    for seed in range(runs):
        torch.manual_seed(seed)
        out = model.generate(prompt, max_new_tokens=3, step_size=1, draft_step_size=4, draft_tokens=2,
                             return_dict_in_generate=True, **settings, **drafts)
        key = tuple(out.sequences[0, 4:].tolist())
        counts[key] = counts.get(key, 0) + 1
        accepted, drafted = accepted + out.accepted_tokens, drafted + out.drafted_tokens
    assert 0.1 < accepted / drafted < 0.9  # both acceptances and rejections were exercised
    assert set(counts) <= set(exact)
    # Pearson's chi-square over the 8 cells (7 degrees of freedom): 29.9 is its 1e-4 quantile.
    chi_square = sum((counts.get(key, 0) - runs * prob) ** 2 / (runs * prob) for key, prob in exact.items())
    assert chi_square < 29.9, (chi_square, counts, exact)


def test_cropping_a_rejected_continuation_equals_recomputation(shared_model):
    tokens = torch.randint(1, 97, (2, 9))
    rejected = torch.randint(1, 97, (2, 3))
    for a in (1, 4):  # a target and a draft cache, each bound to its own step size
        cache = OdeCache()
        shared_model(tokens[:, :6], past_key_values=cache, step_size=a)
        shared_model(rejected, past_key_values=cache, step_size=a)  # drafts that will be rejected
        cache.crop_to(6)
        assert cache.get_seq_length() == 6 and cache.step_size == a
        assert all(layer.keys.shape[-2] == 6 and layer.values.shape[-2] == 6 for layer in cache.layers)
        continued = shared_model(tokens[:, 6:], past_key_values=cache, step_size=a).logits
        recomputed = shared_model(tokens, step_size=a, use_cache=False).logits[:, 6:]
        torch.testing.assert_close(continued, recomputed, **EXACT)
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop_to(cache.get_seq_length() + 1)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1))

    def end(self):
        self.chunks.append(None)


def test_a_streamer_sees_the_prompt_then_every_token_once():
    model = exact_model(PARTIALLY_SHARED)
    prompt, streamer = torch.randint(1, 97, (1, 5)), Collect()
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, draft_step_size=4, draft_tokens=3,
                         pad_token_id=0, streamer=streamer)
    assert streamer.chunks[-1] is None and torch.equal(streamer.chunks[0], prompt[0])
    assert torch.equal(torch.cat(streamer.chunks[1:-1]), out[0, 5:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2), "num_beams=2"),
    (dict(repetition_penalty=1.3), "repetition_penalty"),
    (dict(use_cache=False), "needs the KV cache"),
    (dict(draft_tokens=0), "draft_tokens must be an integer >= 1"),
    (dict(draft_step_size=0.0), "must be a real number > 0"),
    (dict(draft_step_size=1e-6), "solver steps"),
    (dict(draft_step_size=None, draft_tokens=3), "give draft_step_size or prompt_lookup_num_tokens too"),
    (dict(draft_confidence=1.5), "draft_confidence must be a probability in"),
    (dict(draft_step_size=None, draft_confidence=0.3), "draft_confidence applies to self-speculative"),
])
def test_unsupported_settings_are_refused(kwargs, message):
    model = exact_model(FULLY_SHARED)
    settings = dict(max_new_tokens=4, pad_token_id=0, draft_step_size=4) | kwargs
    with pytest.raises(ValueError, match=message):
        model.generate(torch.randint(1, 97, (1, 4)), **settings)


def repetitive_prompt(length: int = 5, seed: int = 0) -> torch.Tensor:
    """A prompt that repeats itself, so prompt lookup finds continuations to copy (right and wrong ones)."""
    torch.manual_seed(seed)
    base = torch.randint(1, 97, (length,))
    return torch.cat([base, base, base[:3]])


def test_prompt_lookup_copies_what_followed_the_latest_match_of_the_last_ngram():
    tokens = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6]])
    assert prompt_lookup(tokens, 3).tolist() == [[1, 2, 5]]  # "5 6" last seen before "1 2 5"
    assert prompt_lookup(torch.tensor([[3, 4, 9, 4]]), 2).tolist() == [[9, 4]]  # no bigram: the unigram "4"
    assert prompt_lookup(torch.tensor([[1, 2, 3]]), 4).shape == (1, 0)  # nothing repeats
    batch = prompt_lookup(torch.tensor([[7, 1, 9, 7], [1, 2, 3, 4]]), 2)  # row 2 has no match: padded, own last
    assert batch.tolist() == [[1, 9], [4, 4]]


@pytest.mark.parametrize("segments", [FULLY_SHARED, PARTIALLY_SHARED], ids=["fully", "partially"])
@pytest.mark.parametrize("drafts", [dict(prompt_lookup_num_tokens=4),
                                    dict(prompt_lookup_num_tokens=3, draft_step_size=4),
                                    dict(prompt_lookup_num_tokens=3, draft_step_size=2, draft_tokens="auto"),
                                    dict(draft_step_size=4, draft_tokens="auto")],
                         ids=["lookup", "lookup+steps", "lookup+steps-auto", "steps-auto"])
def test_prompt_lookup_and_adaptive_drafts_give_the_plain_greedy_tokens_in_a_left_padded_batch(segments, drafts):
    model = damped(exact_model(segments), 0.05)
    rows = [repetitive_prompt(5, seed=1), repetitive_prompt(3, seed=2)[:7]]
    input_ids, attention_mask = left_padded(rows)
    kwargs = dict(max_new_tokens=20, do_sample=False, step_size=1, pad_token_id=0, attention_mask=attention_mask)
    plain = model.generate(input_ids, **kwargs)
    out = model.generate(input_ids, return_dict_in_generate=True, **kwargs, **drafts)
    assert torch.equal(out.sequences, plain)
    if "prompt_lookup_num_tokens" in drafts:
        assert out.sources["prompt_lookup"]["drafted"] > 0
    for index, row in enumerate(rows):  # and each row alone decodes what it decodes in the batch
        alone = model.generate(row[None], **{**kwargs, "attention_mask": None}, **drafts)
        assert torch.equal(alone[0, len(row):], plain[index, input_ids.shape[1]:])


def test_by_default_drafting_stops_for_a_model_that_accepts_nothing():
    model = exact_model(FULLY_SHARED)  # full-scale random weights: solves at 1 and 4 disagree almost always
    prompt = torch.randint(1, 97, (1, 6))
    kwargs = dict(max_new_tokens=40, do_sample=False, step_size=1, pad_token_id=0, return_dict_in_generate=True,
                  draft_step_size=4)
    plain = model.generate(prompt, max_new_tokens=40, do_sample=False, step_size=1, pad_token_id=0)
    fixed = model.generate(prompt, draft_tokens=4, **kwargs)
    default = model.generate(prompt, **kwargs)  # draft_tokens="auto"
    assert torch.equal(fixed.sequences, plain) and torch.equal(default.sequences, plain)
    assert fixed.accepted_tokens / fixed.drafted_tokens < 0.2  # the premise: drafts are wasted
    assert default.drafted_tokens < fixed.drafted_tokens / 4
    assert default.sources["none"]["rounds"] > 3 * default.sources["step_size"]["rounds"]  # mostly plain steps


def test_the_draft_policy_weighs_acceptance_against_the_measured_costs():
    def policy_after(draft_seconds: float, verify_seconds: float) -> DraftPolicy:
        """A step-size source that keeps 2 of every 4 drafts, with a plain step measured at 10 ms."""
        policy = DraftPolicy({"step_size": 0.25}, {"step_size": 8}, adaptive=True)
        for _ in range(20):
            policy.measured_verification(0, 0.010)
            policy.measured_verification(4, verify_seconds)
            policy.measured_draft("step_size", 4, draft_seconds)
            policy.update("step_size", 4, 2)
        return policy

    fresh = DraftPolicy({"step_size": 0.25}, {"step_size": 8}, adaptive=True)
    assert fresh.choose(["step_size"], 8) == (None, 0)  # the first round is a plain step: it measures the unit
    fresh.measured_verification(0, 0.010)
    assert fresh.choose(["step_size"], 8)[0] == "step_size"  # then, before any other measurement, the prior pays
    assert policy_after(draft_seconds=0.004, verify_seconds=0.012).choose(["step_size"], 8)[0] == "step_size"
    assert policy_after(draft_seconds=0.040, verify_seconds=0.012).choose(["step_size"], 8) == (None, 0)  # drafts slow
    assert policy_after(draft_seconds=0.004, verify_seconds=0.050).choose(["step_size"], 8) == (None, 0)  # verifying
    # Prompt lookup costs nothing to draft, but its rejected drafts still cost their verification: it stops too,
    # and is probed again after a while of plain steps, less and less often while probes keep failing, and as often
    # as before once one pays.
    lookup = DraftPolicy({"prompt_lookup": 0.0}, {"prompt_lookup": 4}, adaptive=True)
    lookup.measured_verification(0, 0.010)

    def probes(rounds: int, accepted: int) -> list[int]:
        drafted_at = []
        for index in range(rounds):
            source, k = lookup.choose(["prompt_lookup"], 8)
            if source is not None:
                drafted_at.append(index)
                lookup.measured_verification(k, 0.010 * (1 + 0.3 * k))
                lookup.update(source, k, min(accepted, k))
        return drafted_at

    rejected = probes(400, accepted=0)
    gaps = [b - a for a, b in zip(rejected, rejected[1:])]
    assert rejected[0] == 0 and 4 <= len(rejected) <= 12, rejected  # stops, probes again, rarer and rarer
    assert gaps[-1] > 4 * gaps[0] and gaps == sorted(gaps), gaps
    paying = probes(400, accepted=4)  # the text turns repetitive: the next probe pays, and drafting resumes
    assert len(paying) > 300 and paying[-1] - paying[0] == len(paying) - 1, paying[:5]
    # A CPU's verification: one draft costs 1.6 plain steps (a matrix-matrix product instead of matrix-vector), four
    # cost 2. Measured per length, it stops short drafts that the linear prior (1 + 0.1 k) would have taken.
    jump = DraftPolicy({"prompt_lookup": 0.0}, {"prompt_lookup": 4}, adaptive=True)
    jump.measured_verification(0, 0.010)
    jump.measured_verification(1, 0.016)
    jump.measured_verification(4, 0.020)
    assert jump.verification_cost(1) == pytest.approx(1.6)
    assert jump.verification_cost(2) == pytest.approx(1.6 + 0.4 / 3)  # interpolated
    jump.alpha["prompt_lookup"] = 0.4
    assert jump.choose(["prompt_lookup"], 8) == (None, 0)  # 1.4 tokens for 1.6 units, 1.56 for 1.73, ...
    jump.alpha["prompt_lookup"] = 0.8
    assert jump.choose(["prompt_lookup"], 8) == ("prompt_lookup", 4)  # 3.36 tokens for 2.0 units
    fixed = DraftPolicy({"step_size": 0.25}, {"step_size": 3}, adaptive=False)
    fixed.measured_verification(0, 0.010)
    fixed.measured_draft("step_size", 4, 0.400)
    assert fixed.choose(["step_size"], 8) == ("step_size", 3)  # a fixed length always drafts it


def test_in_a_batch_the_first_probe_drafts_one_token_and_lengths_double_while_drafts_pay():
    def lengths(batch: int, accepted) -> list[int]:
        policy = DraftPolicy({"prompt_lookup": 0.0}, {"prompt_lookup": 8}, adaptive=True, batch=batch)
        policy.measured_verification(0, 0.010)
        found = []
        for _ in range(5):
            source, k = policy.choose(["prompt_lookup"], 16)
            found.append(k)
            if source is not None:
                policy.measured_verification(k, 0.010 * (1.3 + 0.1 * k))  # a CPU's: a gemm, not a gemv
                policy.update(source, k, accepted(k))
        return found

    assert lengths(8, accepted=lambda k: k) == [1, 2, 4, 8, 8]
    failing = lengths(8, accepted=lambda k: 0)
    assert failing[0] == 1 and max(failing) == 1 and failing[-1] == 0, failing  # probes that fail stay short, stop
    assert lengths(1, accepted=lambda k: k)[0] > 1  # one row: the best length at once (a longer probe tells more)


def test_in_a_batch_a_failed_first_probe_outweighs_the_prior_so_failing_probes_stay_rare():
    def probes(batch: int) -> int:
        policy = DraftPolicy({"prompt_lookup": 0.0}, {"prompt_lookup": 4}, adaptive=True, batch=batch)
        policy.measured_verification(0, 0.010)
        count = 0
        for _ in range(32):  # 32 new tokens: what benchmarks/generation_real.py decodes
            source, k = policy.choose(["prompt_lookup"], 16)
            if source is not None:
                count += 1
                policy.measured_verification(k, 0.010 * (1.3 + 0.1 * k))
                policy.update(source, k, 0)
        return count

    assert probes(8) == 1  # a batch's failed probe says more than the prior (the mean probed again at once)
    assert probes(1) >= 2  # one row: the prior keeps its weight


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be an integer >= 1"),
    (dict(prompt_lookup_num_tokens=2, max_matching_ngram_size=0), "max_matching_ngram_size must be an integer"),
    (dict(draft_step_size=4, draft_tokens="sometimes"), "draft_tokens must be an integer >= 1 or 'auto'"),
    (dict(prompt_lookup_num_tokens=2, exit_entropy=1.0), "separate decoders"),
])
def test_bad_draft_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        exact_model(FULLY_SHARED).generate(torch.randint(1, 97, (1, 4)), max_new_tokens=3, pad_token_id=0, **kwargs)


def test_prompt_lookup_keeps_the_continuation_a_model_repeats():
    model = damped(exact_model(PARTIALLY_SHARED), 0.05)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy writes token 0 forever, so earlier text predicts later
    prompt = repetitive_prompt(4)
    kwargs = dict(max_new_tokens=24, do_sample=False, step_size=1, pad_token_id=0)
    plain = model.generate(prompt[None], **kwargs)
    out = model.generate(prompt[None], prompt_lookup_num_tokens=4, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, plain)
    lookup = out.sources["prompt_lookup"]
    assert lookup["accepted"] >= lookup["drafted"] / 2 and out.target_forwards < 24 / 2  # 2+ tokens per forward
