"""Lossless self-speculative decoding: one set of weights drafts at a large step size and verifies at the target one.

A shared-weight odegpt model solved at step size ``B`` (``ceil(D / B)`` steps) is a cheap draft model
for the same weights solved at the target step size ``a``. Each round drafts ``k`` tokens at ``B``, one
at a time, then runs the target solve once over the last committed token and the ``k`` drafts, keeps
the longest prefix of drafts the target accepts, and appends one token of the target's own (standard
speculative decoding, Leviathan et al. 2023 and Chen et al. 2023; drafting with the model itself as
LayerSkip does with early exits and Huginn-0125 with fewer recurrent steps). Each solve keeps its own
KV cache (an ``OdeCache`` bound to its step size); the positions of rejected drafts are cropped from both.

- Greedy: a draft is accepted where it equals the target's argmax, so the output is token for token
  the target's greedy output.
- Sampling: a draft ``x ~ q`` is accepted with probability ``min(1, p(x) / q(x))``; the first rejected
  one is replaced by a sample of ``norm(max(p - q, 0))``, and when all ``k`` are accepted a bonus token
  is drawn from ``p``. Every emitted token is then distributed exactly as the target's ``p``.
  Temperature, top-k and top-p shape ``p`` and ``q`` alike (transformers' own logits warpers).

A batch advances by the shortest accepted prefix among its unfinished rows: left-padded rows then stay
one rectangle, both caches keep one length, and every kept token is still the target's (a row that
accepted more drafts simply drafts them again). At batch size 1 this is plain speculative decoding.

This file is copied into exported model folders (``custom_generate/``), so it imports only torch and
transformers; it reaches the model through its decoder surface (``model.new_cache()`` for a cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.utils import ModelOutput

from .defaults import DEFAULT_DRAFT_TOKENS

# generate() settings this loop does not implement, each with the value that means "off": anything else
# is refused rather than silently ignored.
_UNSUPPORTED_UNLESS = dict(
    num_beams=1, num_return_sequences=1, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0, min_length=0, min_new_tokens=0, min_p=None, top_h=None, typical_p=1.0,
    epsilon_cutoff=0.0, eta_cutoff=0.0, bad_words_ids=None, sequence_bias=None, suppress_tokens=None,
    begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None, guidance_scale=1.0,
    stop_strings=None, max_time=None, exponential_decay_length_penalty=None, watermarking_config=None,
    output_scores=False, output_logits=False, output_attentions=False, output_hidden_states=False,
)


@dataclass
class SelfSpeculativeOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)``: the sequences and how the drafts fared."""

    sequences: torch.LongTensor | None = None
    drafted_tokens: int | None = None  # draft tokens proposed, summed over rounds
    accepted_tokens: int | None = None  # of those, kept
    target_forwards: int | None = None  # verification passes at the target step size (one per round)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else float("nan")


class _Solve:
    """The model solved at one step size, with its own KV cache."""

    def __init__(self, model, step_size: float) -> None:
        self.model, self.step_size, self.cache = model, step_size, model.new_cache()

    def __len__(self) -> int:
        return self.cache.get_seq_length()

    def logits(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, keep: int = 0) -> torch.Tensor:
        """Feed ``tokens`` after the cached ones; float logits of the last ``keep`` positions (0: all)."""
        if attention_mask is not None:
            attention_mask = attention_mask[:, : len(self) + tokens.shape[1]]
        out = self.model(input_ids=tokens, attention_mask=attention_mask, past_key_values=self.cache,
                         use_cache=True, step_size=self.step_size, logits_to_keep=keep)
        return out.logits.float()

    def crop(self, length: int) -> None:
        self.cache.crop_to(min(length, len(self)))


class _Sampler:
    """Turns logits into tokens and, when sampling, into the probabilities the acceptance test compares."""

    def __init__(self, config) -> None:
        self.do_sample = bool(config.do_sample)
        self.warpers = []
        if self.do_sample:  # the order of transformers' own sampling: temperature, top-k, top-p
            if config.temperature is not None and config.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                self.warpers.append(TopKLogitsWarper(top_k=config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=config.top_p))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        scores = logits.reshape(-1, logits.shape[-1])
        for warp in self.warpers:  # these warpers read only the scores, never the token ids
            scores = warp(None, scores)
        return scores.softmax(-1).view(logits.shape)

    def draw(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per row from (batch, vocab) logits, and its distribution when sampling."""
        if not self.do_sample:
            return logits.argmax(-1), None
        probs = self.probs(logits)
        return torch.multinomial(probs, 1).squeeze(-1), probs

    def verify(self, drafts: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
               rows: torch.Tensor) -> tuple[int, torch.Tensor]:
        """How many drafts the batch keeps (``m``, the least over ``rows``) and the token after them.

        ``drafts`` (batch, k), ``draft_probs`` (batch, k, vocab) or None when greedy, ``target_logits``
        (batch, k + 1, vocab): the target's prediction after the committed tokens and after each draft.
        """
        k = drafts.shape[1]
        if not self.do_sample:
            target_tokens = target_logits.argmax(-1)
            accepted = (drafts == target_tokens[:, :k]).cumprod(-1).sum(-1)
            m = int(accepted[rows].min())
            return m, target_tokens[:, m]
        p = self.probs(target_logits)
        if k == 0:
            return 0, torch.multinomial(p[:, 0], 1).squeeze(-1)
        p_draft, q_draft = (probs[:, :k].gather(-1, drafts[..., None]).squeeze(-1) for probs in (p, draft_probs))
        accepted = (torch.rand_like(q_draft) * q_draft < p_draft).cumprod(-1).sum(-1)  # u < p/q, q > 0
        m = int(accepted[rows].min())
        # After m kept drafts a row emits its own draft m if it accepted it too; otherwise a sample of
        # norm(max(p - q, 0)), which for m == k (no draft left, q taken as 0) is the bonus sample from p.
        q_m = draft_probs[:, m] if m < k else torch.zeros_like(p[:, m])
        residual = (p[:, m] - q_m).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, m])  # p == q: never used
        resampled = torch.multinomial(residual, 1).squeeze(-1)
        if m == k:
            return m, resampled
        return m, torch.where(accepted > m, drafts[:, m], resampled)


def decoding_limits(config, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """(new tokens to generate, EOS ids as a tensor or None, the pad id, the attention mask or None when
    nothing is padded: plain causal attention, the fastest path) from a generation config."""
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
    eos = config.eos_token_id
    eos = None if eos is None else torch.tensor(eos if isinstance(eos, list) else [eos], device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (None if eos is None else int(eos[0]))
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    return max_new, eos, pad, attention_mask


def _check_supported(config, model_kwargs: dict) -> None:
    for name, off in _UNSUPPORTED_UNLESS.items():
        value = getattr(config, name, off)
        if value is not None and value != off:
            raise ValueError(f"self-speculative decoding does not support {name}={value!r}; "
                             f"leave it at {off!r} or decode without draft_step_size")
    if config.use_cache is False:
        raise ValueError("self-speculative decoding needs the KV cache (use_cache=False was given)")
    unknown = set(model_kwargs) - {"use_cache"}
    if unknown:
        raise ValueError(f"self-speculative decoding does not take {', '.join(sorted(unknown))}")


@torch.no_grad()
def self_speculative_generate(
    model,
    inputs: torch.LongTensor | None = None,
    generation_config=None,
    *,
    input_ids: torch.LongTensor | None = None,
    draft_step_size: float,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    draft_confidence: float | None = None,
    step_size: float | None = None,
    attention_mask: torch.Tensor | None = None,
    streamer=None,
    **kwargs,
) -> torch.LongTensor | SelfSpeculativeOutput:
    """``model.generate`` with drafts from the same weights at ``draft_step_size``; see the module docstring.

    Takes transformers' generation settings (``max_new_tokens``, ``do_sample``, ``temperature``,
    ``top_k``, ``top_p``, ``eos_token_id``, ``pad_token_id``, ``return_dict_in_generate``, a
    ``generation_config``) and a left-padded batch with its ``attention_mask``.

    ``draft_confidence=P`` ends a round's drafting early, after the first draft whose own probability
    is below ``P`` in some unfinished row (a draft the target is unlikely to keep; what transformers'
    assisted generation calls ``assistant_confidence_threshold``). It decides from the drafts alone, so
    the output is unchanged; it only saves the draft forwards a rejection would waste.
    """
    input_ids = inputs if inputs is not None else input_ids
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    _check_supported(config, model_kwargs)
    target_step = model.config.step_size if step_size is None else step_size
    model.config.solver_steps(target_step)  # refuses a step size that is not a finite real > 0, or too small
    model.config.solver_steps(draft_step_size)
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
    if draft_confidence is not None and not 0 <= draft_confidence <= 1:
        raise ValueError(f"draft_confidence must be a probability in [0, 1], got {draft_confidence!r}")
    if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("self-speculative decoding needs input_ids of shape (batch, prompt length >= 1)")

    batch, prompt_len = input_ids.shape
    max_new, eos, pad, attention_mask = decoding_limits(config, input_ids, attention_mask)
    sampler = _Sampler(config)
    target, draft = _Solve(model, target_step), _Solve(model, draft_step_size)

    tokens, mask = input_ids, attention_mask
    unfinished = torch.ones(batch, dtype=torch.bool, device=tokens.device)
    drafted = accepted = rounds = 0
    if streamer is not None:
        streamer.put(tokens.cpu())
    if prompt_len > 1:  # both caches hold every committed token but the last, which each round feeds
        target.logits(tokens[:, :-1], mask, keep=1)
        draft.logits(tokens[:, :-1], mask, keep=1)

    while tokens.shape[1] - prompt_len < max_new and bool(unfinished.any()):
        committed = tokens.shape[1]
        k = min(draft_tokens, max_new - (committed - prompt_len) - 1)
        mask_ahead = None if mask is None else torch.cat([mask, mask.new_ones(batch, k + 1)], dim=1)

        # 1. Draft up to k tokens at the draft step size, one at a time.
        drafts = tokens.new_empty(batch, k)
        draft_probs = [] if sampler.do_sample else None
        feed = tokens[:, len(draft):]
        for j in range(k):
            logits = draft.logits(feed, mask_ahead, keep=1)[:, -1]
            drafts[:, j], probs = sampler.draw(logits)
            if draft_probs is not None:
                draft_probs.append(probs)
            feed = drafts[:, j : j + 1]
            if draft_confidence is not None and j + 1 < k:
                own = (probs if probs is not None else logits.softmax(-1)).gather(-1, feed).squeeze(-1)
                if bool((own[unfinished] < draft_confidence).any()):
                    drafts = drafts[:, : j + 1]
                    break
        k = drafts.shape[1]
        draft_probs = torch.stack(draft_probs, dim=1) if draft_probs else None

        # 2. Verify all of them in one forward at the target step size; keep the agreed prefix.
        target_logits = target.logits(torch.cat([tokens[:, len(target):], drafts], dim=1), mask_ahead)
        m, next_token = sampler.verify(drafts, draft_probs, target_logits, unfinished.nonzero().squeeze(-1))
        new = torch.cat([drafts[:, :m], next_token[:, None]], dim=1)
        target.crop(committed + m)
        draft.crop(committed + m)
        drafted, accepted, rounds = drafted + k, accepted + m, rounds + 1

        # 3. Stop rows at their end-of-sequence token; what a finished row "generates" is padding.
        if eos is not None:
            is_eos = torch.isin(new, eos) & unfinished[:, None]
            after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
            new = new.masked_fill(after_eos | ~unfinished[:, None], pad)
            unfinished &= ~is_eos.any(-1)
            if not bool(unfinished.any()):  # end where the last row ended, as plain decoding does
                new = new[:, : int(is_eos.long().argmax(-1).max()) + 1]
        tokens = torch.cat([tokens, new], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, new.shape[1])], dim=1)
        if streamer is not None:
            streamer.put(new.cpu())

    if streamer is not None:
        streamer.end()
    if config.return_dict_in_generate:
        return SelfSpeculativeOutput(sequences=tokens, drafted_tokens=drafted, accepted_tokens=accepted,
                                     target_forwards=rounds)
    return tokens
