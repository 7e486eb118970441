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
transformers; it reaches the model through its decoder surface (``surface.DecoderModel``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.utils import ModelOutput

from .compiled import DecodeStep, compile_unavailable
from .defaults import DEFAULT_DRAFT_TOKENS, DEFAULT_LOOKUP_NGRAM, DEFAULT_MAX_DRAFT_TOKENS
from .surface import DecoderModel

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
    # Per draft source ("step_size": the model at draft_step_size, "prompt_lookup": n-grams of the sequence):
    # {source: {"rounds", "drafted", "accepted"}}; rounds without drafts count under "none".
    sources: dict | None = None
    # Verification's work taken from the drafts instead of recomputed (reuse_draft), in token-steps: whole block
    # evaluations of the steps both solves share, and first attention branches of the step after them.
    reused_evaluations: int | None = None
    reused_attention: int | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else float("nan")


def shared_steps(plan, other) -> int | None:
    """How many leading steps two plans of one model have in common (the unshared layers before the first shared
    segment, and any equal steps after them); the step after those is taken by both from the same state, so its
    first attention branch, keys and values are common too. None when one plan is the other's beginning."""
    common, shortest = 0, min(len(plan), len(other))
    while common < shortest and (plan[common].block, plan[common].dt) == (other[common].block, other[common].dt):
        common += 1
    return None if common == shortest else common


@dataclass(frozen=True)
class StaticCaches:
    """Decode through static KV caches of ``rows`` x ``length`` positions, each solve fed by one
    ``compiled.DecodeStep``, compiled with ``compile`` (else the same step, eagerly)."""

    rows: int
    length: int
    compile: bool = False


class _Solve:
    """The model solved at one step size, with its own KV cache. ``shared``: how many leading steps this solve has
    in common with the other one (:func:`shared_steps`) when their common work is reused, else None. ``static``: its
    cache is static and a ``DecodeStep`` feeds it (never with ``shared``)."""

    def __init__(self, model: DecoderModel, step_size: float, shared: int | None = None,
                 static: StaticCaches | None = None) -> None:
        self.model, self.step_size = model, step_size
        self.plan = model.plan(step_size)
        self.shared = shared
        self.cache = model.new_cache() if static is None else model.new_cache(static.rows, static.length)
        self.step = None if static is None else DecodeStep(model, self.plan, self.cache, static.compile)

    def __len__(self) -> int:
        return self.cache.get_seq_length()

    def _begin(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, past: int):
        """States at time 0 of ``tokens`` after ``past`` cached positions, and their attention inputs."""
        self.cache.bind(self.step_size, self.plan.num_slots, self.plan.method.name)
        h = self.model.embed(tokens)
        if attention_mask is not None:
            attention_mask = attention_mask[:, : past + tokens.shape[1]]
        return h, self.model.attention_inputs(h, attention_mask, past)

    def _to_shared(self, h: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared steps, then the first attention branch of the step after them: (state before it, branch)."""
        h = self.model.solve(h, self.plan, inputs, self.cache, stop=self.shared)
        return h, self.model.first_attention(h, self.plan, self.shared, inputs, self.cache)

    def recorded_logits(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None):
        """Float logits of the last of ``tokens`` fed after the cached ones, and what a solve sharing this one's
        first steps can reuse of that position: (state after the shared steps, first attention branch after them)."""
        h, inputs = self._begin(tokens, attention_mask, len(self))
        h, attention = self._to_shared(h, inputs)
        record = h[:, -1:], attention[:, -1:]
        h = self.model.solve(h, self.plan, inputs, self.cache, start=self.shared, first_attention=attention)
        return self.model.read_out(h[:, -1:]).float(), record

    def logits_reusing(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, draft: _Solve,
                       records: list) -> torch.Tensor:
        """Float logits of all ``tokens`` fed after the cached ones, where the draft solve fed all but the last of
        them and kept ``records`` (:meth:`recorded_logits`): its keys and values of the shared steps' cache slots
        and of the first slot after them are copied, its states and first attention branches continue from there,
        and only the last token is solved through the shared steps here."""
        past, reused = len(self), len(records)
        for slot in range(self.shared * self.plan.method.evaluations + 1):
            layer = draft.cache.layers[slot]
            self.cache.update(layer.keys[:, :, past: past + reused], layer.values[:, :, past: past + reused], slot)
        last, last_inputs = self._begin(tokens[:, -1:], attention_mask, past + reused)
        last, last_attention = self._to_shared(last, last_inputs)
        h = torch.cat([*(state for state, _ in records), last], dim=1)
        attention = torch.cat([*(branch for _, branch in records), last_attention], dim=1)
        mask = None if attention_mask is None else attention_mask[:, : past + tokens.shape[1]]
        inputs = self.model.attention_inputs(h, mask, past)
        h = self.model.solve(h, self.plan, inputs, self.cache, start=self.shared, first_attention=attention)
        return self.model.read_out(h).float()

    def logits(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, keep: int = 0) -> torch.Tensor:
        """Feed ``tokens`` after the cached ones; float logits of the last ``keep`` positions (0: all). The solve is
        called directly, as :meth:`recorded_logits` and :meth:`logits_reusing` call it, so a comparison of the
        two costs only what they compute."""
        return self.logits_and_states(tokens, attention_mask, keep)[0]

    def logits_and_states(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None, keep: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`logits`, and the final states of those positions (what the learned exit head scores)."""
        if self.step is not None:
            mask = None if attention_mask is None else attention_mask[:, : len(self) + tokens.shape[1]]
            return self.step(tokens, mask, keep)
        h, inputs = self._begin(tokens, attention_mask, len(self))
        h = self.model.solve(h, self.plan, inputs, self.cache)
        h = h[:, -keep:] if keep else h
        return self.model.read_out(h).float(), h

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


def prompt_lookup(tokens: torch.Tensor, num_tokens: int, max_ngram: int = DEFAULT_LOOKUP_NGRAM) -> torch.Tensor:
    """Draft tokens copied from the sequence itself (prompt-lookup decoding, as transformers'
    ``prompt_lookup_num_tokens``): per row, the (up to) ``num_tokens`` tokens that followed the latest earlier
    occurrence of the row's last ``n`` tokens with that many after it (else the one with the most), for the
    longest ``n <= max_ngram`` that occurs. Returns
    (batch, k) with ``k`` the longest proposal (0 when no row has one); shorter rows are padded with their
    own last token (a draft like any other: verification keeps it only where the target agrees)."""
    proposals = []
    for row in tokens:
        proposal = row[:0]
        for n in range(min(max_ngram, len(row) - 1), 0, -1):
            windows = row.unfold(0, n, 1)[:-1]  # every n-gram that ends before the last token
            starts = (windows == row[-n:]).all(-1).nonzero().flatten()
            for start in reversed(starts.tolist()):  # the latest occurrence with the longest continuation
                continuation = row[start + n: start + n + num_tokens]
                if len(continuation) > len(proposal):
                    proposal = continuation
                if len(proposal) == num_tokens:
                    break
            if len(proposal):
                break
        proposals.append(proposal)
    k = max(len(p) for p in proposals)
    drafts = tokens[:, -1:].repeat(1, k)
    for i, proposal in enumerate(proposals):
        drafts[i, : len(proposal)] = proposal
    return drafts


class DraftPolicy:
    """Chooses each round's draft source and length from the running acceptance and the measured costs.

    Costs are in units of a plain decoding step (one target forward of one token, ``unit`` seconds, measured). A
    source ``s`` has a per-token acceptance ``alpha_s`` (an exponential average of what its rounds showed) and a
    cost per drafted token ``c_s`` (measured: the seconds of its draft forwards per token over ``unit``; before any
    measurement, ``prior_costs``: the step-size draft's block evaluations over the target's, prompt lookup 0), and
    verifying ``k`` drafts costs ``v_k`` units, measured for each ``k`` (a verification is one forward over
    ``k + 1`` tokens: nearly a plain step on a GPU at batch 1, but on a CPU the jump from a matrix-vector to a
    matrix-matrix product makes even ``k = 1`` cost 1.5-1.6 units, SmolLM2-135M at 1 thread); an unmeasured length is
    interpolated between the measured ones, beyond them ``BETA`` per extra draft (``1 + BETA k`` before any). The
    first round is a plain step, which measures the unit; in a batch a source's lengths grow from 1 by doubling
    while its rounds pay (:meth:`longest_probe`), and its first round's acceptance replaces the prior (one row's
    guess: a batch keeps only what every row accepts). Under the geometric model a round of ``k`` drafts yields
    ``(1 - alpha^(k+1)) / (1 - alpha)`` tokens for ``v_k + k c_s`` units. With ``adaptive`` the round takes the
    source and length with the most tokens per unit, and no drafts at all (a plain step, worth exactly 1) when
    nothing beats that: drafts that do not pay stop, and an unused source's acceptance drifts back towards its
    prior, so it is probed again now and then. A probe that does not pay halves its source's drift (down to
    ``DRIFT / MAX_BACKOFF``) and one that pays restores it: on text a source cannot draft, the probes grow rarer (their
    count logarithmic in the tokens decoded, their cost with it), and they come back as soon as one pays. Without
    ``adaptive``, the length is the source's maximum (``max_tokens``) and only the source is chosen."""

    PRIOR, MEMORY, DRIFT, BETA, MAX_BACKOFF = 0.6, 0.7, 0.05, 0.1, 16

    def __init__(self, prior_costs: dict[str, float], max_tokens: dict[str, int], adaptive: bool, batch: int = 1
                 ) -> None:
        self.costs, self.max_tokens, self.adaptive, self.batch = dict(prior_costs), max_tokens, adaptive, batch
        self.alpha = {source: self.PRIOR for source in prior_costs}
        self.drift = {source: self.DRIFT for source in prior_costs}
        self.longest_paid = {source: 0 for source in prior_costs}  # the longest of the source's rounds that paid
        self.probed: set[str] = set()  # the sources that drafted at least once
        self.verification: dict[int, float] = {}  # measured units of verifying k drafts
        self.unit: float | None = None

    @staticmethod
    def expected_tokens(alpha: float, k: int) -> float:
        return k + 1.0 if alpha >= 0.999 else (1 - alpha ** (k + 1)) / (1 - alpha)

    def verification_cost(self, k: int) -> float:
        """Units of a verification of ``k`` drafts: measured, or interpolated between the measured lengths (and a plain
        step, 1 unit at 0 drafts), beyond the longest one ``BETA`` per extra draft."""
        points = sorted({0: 1.0, **self.verification}.items())
        for (j0, v0), (j1, v1) in zip(points, points[1:]):
            if j0 <= k <= j1:
                return v0 + (v1 - v0) * (k - j0) / (j1 - j0)
        last, cost = points[-1]
        return cost + self.BETA * (k - last)

    def round_cost(self, source: str, k: int) -> float:
        return self.verification_cost(k) + k * self.costs[source]

    def value(self, source: str, k: int) -> float:
        """Expected tokens per plain-step unit of a round of ``k`` drafts from ``source``."""
        return self.expected_tokens(self.alpha[source], k) / self.round_cost(source, k)

    def choose(self, available: list[str], limit: int) -> tuple[str | None, int]:
        """(source, k) for a round that may draft at most ``limit`` tokens from ``available`` sources."""
        def lengths(source: str):
            most = min(self.max_tokens[source], limit)
            return range(1, most + 1) if self.adaptive else [most]

        options = [(self.value(s, k), s, k) for s in available for k in lengths(s) if k >= 1]
        if not options or (self.adaptive and self.unit is None):  # the first round: a plain step measures the unit
            return None, 0
        value, source, k = max(options)
        if self.adaptive and value <= 1.0:
            for s in available:  # a plain step; let the estimates drift back so the sources are retried
                self.alpha[s] += self.drift[s] * (self.PRIOR - self.alpha[s])
            return None, 0
        return source, min(k, self.longest_probe(source)) if self.adaptive else k

    def longest_probe(self, source: str) -> int:
        """The longest draft ``source`` may propose. One row: its longest. Rows that share a round (a batch) keep only
        the drafts every row accepts, so a probe fails far more often than one row's acceptance says, and verifies
        ``batch x (k + 1)`` positions: there the length starts at 1 and doubles while the source's rounds pay (twice
        its longest round that paid), so that the probes that fail are the cheap ones."""
        return self.max_tokens[source] if self.batch == 1 else max(1, 2 * self.longest_paid[source])

    def update(self, source: str, drafted: int, accepted: int) -> None:
        """A round of ``drafted`` drafts from ``source`` kept ``accepted`` (then stopped at a rejection, if any)."""
        if drafted:
            observed = accepted / (accepted + (1 if accepted < drafted else 0))
            first_in_batch = self.batch > 1 and source not in self.probed  # the prior is one row's, not a batch's
            self.alpha[source] = observed if first_in_batch else self._mean(self.alpha[source], observed)
            self.probed.add(source)
            paid = accepted + 1 > self.round_cost(source, drafted)  # tokens against plain-step units
            self.drift[source] = self.DRIFT if paid else max(self.drift[source] / 2, self.DRIFT / self.MAX_BACKOFF)
            if paid:
                self.longest_paid[source] = max(self.longest_paid[source], drafted)

    def measured_verification(self, drafted: int, seconds: float) -> None:
        """A target forward over ``drafted`` drafts and one committed token took ``seconds``."""
        if drafted == 0:
            self.unit = seconds if self.unit is None else self._mean(self.unit, seconds)
            return
        if self.unit is None:  # a fixed draft length drafts from the first round: the prior says what a unit is
            self.unit = seconds / self.verification_cost(drafted)
        observed = max(1.0, seconds / self.unit)
        known = self.verification.get(drafted)
        self.verification[drafted] = observed if known is None else self._mean(known, observed)

    def measured_draft(self, source: str, tokens: int, seconds: float) -> None:
        """``source`` drafted ``tokens`` tokens in ``seconds`` (catching up on committed tokens excluded)."""
        if tokens and self.unit:
            self.costs[source] = self._mean(self.costs[source], seconds / tokens / self.unit)

    def _mean(self, old: float, new: float) -> float:
        return self.MEMORY * old + (1 - self.MEMORY) * new


class _Stopwatch:
    """Seconds of work on ``device``, waiting for a GPU's queue first so that a time is the work's, not its launch's."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


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


def check_speculative(model_config, draft_step_size: float | None = None,
                      draft_tokens: int | str = DEFAULT_DRAFT_TOKENS, draft_confidence: float | None = None,
                      prompt_lookup_num_tokens: int | None = None,
                      max_matching_ngram_size: int = DEFAULT_LOOKUP_NGRAM, step_size: float | None = None,
                      names: dict[str, str] | None = None, draft_stop_score: float | None = None) -> None:
    """The settings of self-speculative decoding, checked against the model's config alone (no weights); a
    ValueError names the bad one as ``names`` calls it (default: its keyword)."""
    def name(key: str) -> str:
        return (names or {}).get(key, key)

    model_config.solver_steps(step_size, name("step_size"))  # finite, > 0, not too long (None: the config's)
    if draft_step_size is None and prompt_lookup_num_tokens is None:
        raise ValueError(f"self-speculative decoding needs a draft source: {name('draft_step_size')} and/or "
                         f"{name('prompt_lookup_num_tokens')}")
    if draft_step_size is not None:
        model_config.solver_steps(draft_step_size, name("draft_step_size"))
    for key, value in (("prompt_lookup_num_tokens", prompt_lookup_num_tokens),
                       ("max_matching_ngram_size", max_matching_ngram_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name(key)} must be an integer >= 1, got {value!r}")
    if draft_tokens != "auto" and (isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int)
                                   or draft_tokens < 1):
        raise ValueError(f"{name('draft_tokens')} must be an integer >= 1 or 'auto', got {draft_tokens!r}")
    if draft_confidence is not None and not 0 <= draft_confidence <= 1:  # false for nan too
        raise ValueError(f"{name('draft_confidence')} must be a probability in [0, 1], got {draft_confidence!r}")
    if draft_stop_score is not None:
        if draft_step_size is None:
            raise ValueError(f"{name('draft_stop_score')} stops step-size drafts: give {name('draft_step_size')} too")
        if getattr(model_config, "exit_head", None) is None:
            raise ValueError(f"{name('draft_stop_score')}: this model has no learned exit head (config.exit_head is "
                             f"null); fit one with `odegpt calibrate`")


def check_static(model, compile: bool, reuse_draft: bool = False, names: dict[str, str] | None = None) -> None:
    """Static caches and compiled steps (``compile``), checked: a ValueError naming what is in the way."""
    def name(key: str) -> str:
        return (names or {}).get(key, key)

    what = name("compile") if compile else name("cache_implementation='static'")
    if reuse_draft:
        raise ValueError(f"{name('reuse_draft')} continues drafts in dynamic caches: drop it or {what}")
    if model.rotary_scales_with_length:
        raise ValueError(f"{what}: this model's rotary frequencies change with each call's length (an imported "
                         f"dynamic or LongRoPE scaling), which a static cache cannot hold; decode without it")
    unavailable = compile_unavailable(model.device) if compile else None
    if unavailable is not None:
        raise ValueError(f"{what}: {unavailable}")


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
    model: DecoderModel,
    inputs: torch.LongTensor | None = None,
    generation_config=None,
    *,
    input_ids: torch.LongTensor | None = None,
    draft_step_size: float | None = None,
    draft_tokens: int | str = DEFAULT_DRAFT_TOKENS,
    draft_confidence: float | None = None,
    draft_stop_score: float | None = None,
    prompt_lookup_num_tokens: int | None = None,
    max_matching_ngram_size: int = DEFAULT_LOOKUP_NGRAM,
    step_size: float | None = None,
    reuse_draft: bool = False,
    attention_mask: torch.Tensor | None = None,
    streamer=None,
    compile: bool = False,
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

    ``draft_stop_score=S`` ends it after the first draft whose final state the learned exit head scores above ``S``
    (its predicted distance to the end of the step-size-1 solve: a draft the target is unlikely to keep); the
    calibrated routing threshold of the draft step size is such a score (``odegpt calibrate``).

    ``prompt_lookup_num_tokens=K`` drafts up to ``K`` tokens by prompt lookup (:func:`prompt_lookup`,
    n-grams up to ``max_matching_ngram_size``), alone or beside the step-size drafts; each round then
    drafts from the source whose recent acceptance per unit of measured cost is best (:class:`DraftPolicy`).
    ``draft_tokens="auto"`` (the default of ``odegpt generate``) adapts the draft length (up to
    ``DEFAULT_MAX_DRAFT_TOKENS``, or ``K``) to the running acceptance and the measured costs, and drafts nothing
    when no draft pays, probing again now and then: decoding is then about as fast as plain decoding, never much
    slower. An integer fixes the length. Either way the output is the target's: greedy identical, sampled exactly
    (a lookup draft is a draft with probability 1).

    ``reuse_draft=True``: verification continues from what the step-size draft computed. Both solves take the
    same first steps (the unshared layers before the first shared segment) and then the first step of their own
    length from the same state, whose attention branch (not its MLP, which reads the state after a step of that
    length) is common too; the drafted tokens' states, attention branches and keys and values there are taken,
    not recomputed. The output is the same either way. Off by default: it saves 6-14% of verification's block
    evaluations, but costs a separate pass of the last draft through the shared part and more, smaller calls,
    and at batch 1 on a CPU, where a forward's cost is its calls rather than its arithmetic, it was not faster
    (0.78x-1.09x; docs/self-speculative.md). Never used with rotary scalings that change with a call's length.

    ``compile=True`` (or transformers' ``cache_implementation="static"``, the same without compiling) decodes through
    static KV caches, every solve's steps fed by a ``compiled.DecodeStep``: one graph per token at batch 1 instead of
    a few hundred eager operators. Output as without. Without any draft source, every round is one plain step: that
    is plain decoding, compiled (``generate.generate(compile=True)`` decodes so).
    """
    input_ids = inputs if inputs is not None else input_ids
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    _check_supported(config, model_kwargs)
    target_step = model.config.step_size if step_size is None else step_size
    static = compile or config.cache_implementation == "static"
    if draft_step_size is not None or prompt_lookup_num_tokens is not None or not static:
        check_speculative(model.config, draft_step_size, draft_tokens, draft_confidence, prompt_lookup_num_tokens,
                          max_matching_ngram_size, target_step, draft_stop_score=draft_stop_score)
    if static:
        check_static(model, compile, reuse_draft)
    if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("self-speculative decoding needs input_ids of shape (batch, prompt length >= 1)")
    rounds = _Rounds(model, config, input_ids, attention_mask, target_step, draft_step_size, draft_tokens,
                     _DraftStop(draft_confidence, draft_stop_score), prompt_lookup_num_tokens, max_matching_ngram_size,
                     reuse_draft, streamer, static, compile)
    rounds.run()
    if config.return_dict_in_generate:
        return rounds.output()
    return rounds.tokens


class _Rounds:
    """The state of one self-speculative generation: the committed tokens, both solves with their caches, the draft
    policy and what the rounds counted. :meth:`run` decodes round after round: draft, verify, commit."""

    def __init__(self, model, config, input_ids, attention_mask, target_step, draft_step_size, draft_tokens,
                 draft_stop: _DraftStop, lookup_tokens, max_ngram, reuse_draft, streamer, static: bool = False,
                 compile: bool = False) -> None:
        self.model, self.streamer, self.draft_stop, self.max_ngram = model, streamer, draft_stop, max_ngram
        self.prompt_len = input_ids.shape[1]
        self.max_new, self.eos, self.pad, self.mask = decoding_limits(config, input_ids, attention_mask)
        self.sampler, self.tokens = _Sampler(config), input_ids
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.clock = _Stopwatch(input_ids.device)
        self.shared = None
        if reuse_draft and draft_step_size is not None and not model.rotary_scales_with_length:  # a draft's keys differ
            self.shared = shared_steps(model.plan(target_step), model.plan(draft_step_size))
        # A static cache holds every position a round may feed: the prompt and the new tokens but the last.
        caches = StaticCaches(input_ids.shape[0], self.prompt_len + self.max_new, compile) if static else None
        self.target = _Solve(model, target_step, self.shared, caches)
        self.draft = None if draft_step_size is None else _Solve(model, draft_step_size, self.shared, caches)
        self.policy = _policy(model, target_step, draft_step_size, draft_tokens, lookup_tokens, input_ids.shape[0])
        self.sources = {name: {"rounds": 0, "drafted": 0, "accepted": 0} for name in [*self.policy.costs, "none"]}
        self.drafted = self.accepted = self.rounds = self.reused_evaluations = self.reused_attention = 0

    def run(self) -> None:
        if self.streamer is not None:
            self.streamer.put(self.tokens.cpu())
        # The target's cache holds every committed token but the last, which each round feeds. The draft's catches up
        # in the first round that drafts with the model: a policy that never drafts never pays for the prompt twice.
        if self.prompt_len > 1:
            self.target.logits(self.tokens[:, :-1], self.mask, keep=1)
        while self.tokens.shape[1] - self.prompt_len < self.max_new and bool(self.unfinished.any()):
            self.round()
        if self.streamer is not None:
            self.streamer.end()

    def round(self) -> None:
        """Draft (by prompt lookup, at the draft step size, or not at all), verify every draft in one forward at
        the target step size, keep the agreed prefix and the target's next token."""
        committed = self.tokens.shape[1]
        limit = self.max_new - (committed - self.prompt_len) - 1
        source, drafts, draft_probs, records, mask_ahead = self._drafts(limit)
        k = drafts.shape[1]
        fed = torch.cat([self.tokens[:, len(self.target):], drafts], dim=1)
        began = self.clock()
        if records:
            target_logits = self.target.logits_reusing(fed, mask_ahead, self.draft, records)
            self.reused_evaluations += len(records) * self.shared * self.target.plan.method.evaluations
            self.reused_attention += len(records)
        else:
            target_logits = self.target.logits(fed, mask_ahead)
        m, next_token = self.sampler.verify(drafts, draft_probs, target_logits, self.unfinished.nonzero().squeeze(-1))
        if fed.shape[1] == k + 1:  # no catching up on committed tokens: a round's own cost
            self.policy.measured_verification(k, self.clock() - began)
        self.target.crop(committed + m)
        if self.draft is not None:
            self.draft.crop(committed + m)
        self.drafted, self.accepted, self.rounds = self.drafted + k, self.accepted + m, self.rounds + 1
        used = source if k else "none"
        for key, value in (("rounds", 1), ("drafted", k), ("accepted", m)):
            self.sources[used][key] += value
        if k:
            self.policy.update(source, k, m)
        self._commit(torch.cat([drafts[:, :m], next_token[:, None]], dim=1))

    def _drafts(self, limit: int):
        """(source, drafts (batch, k), their distributions when sampling, what verification reuses, the mask
        ahead) of this round."""
        tokens, batch = self.tokens, self.tokens.shape[0]
        source, k = self.policy.choose(list(self.policy.costs), limit)
        drafts, draft_probs, records = tokens.new_empty(batch, 0), None, None
        if source == "prompt_lookup":
            began = self.clock()
            drafts = prompt_lookup(tokens, k, self.max_ngram)
            self.policy.measured_draft(source, drafts.shape[1], self.clock() - began)
            if drafts.shape[1] == 0 and self.draft is not None:  # nothing to copy: draft with the model instead
                source, k = self.policy.choose(["step_size"], limit)
            elif self.sampler.do_sample and drafts.shape[1]:  # a copied draft has probability 1 under its source
                draft_probs = torch.nn.functional.one_hot(drafts, self.model.config.vocab_size).float()
        width = max(k, drafts.shape[1]) + 1
        mask_ahead = None if self.mask is None else torch.cat([self.mask, self.mask.new_ones(batch, width)], 1)
        if source == "step_size":
            drafts, draft_probs, records = _draft_with_model(self.draft, tokens, k, mask_ahead, self.sampler,
                                                             self.draft_stop, self.unfinished, self.clock,
                                                             self.policy)
        return source, drafts, draft_probs, records, mask_ahead

    def _commit(self, new: torch.Tensor) -> None:
        """Append ``new`` tokens, stopping rows at their end-of-sequence token (what a finished row "generates" is
        padding) and the whole batch where its last row ended, as plain decoding does."""
        if self.eos is not None:
            is_eos = torch.isin(new, self.eos) & self.unfinished[:, None]
            after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
            new = new.masked_fill(after_eos | ~self.unfinished[:, None], self.pad)
            self.unfinished &= ~is_eos.any(-1)
            if not bool(self.unfinished.any()):
                new = new[:, : int(is_eos.long().argmax(-1).max()) + 1]
        self.tokens = torch.cat([self.tokens, new], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.tokens.shape[0], new.shape[1])], dim=1)
        if self.streamer is not None:
            self.streamer.put(new.cpu())

    def output(self) -> SelfSpeculativeOutput:
        return SelfSpeculativeOutput(sequences=self.tokens, drafted_tokens=self.drafted, accepted_tokens=self.accepted,
                                     target_forwards=self.rounds, sources=self.sources,
                                     reused_evaluations=self.reused_evaluations,
                                     reused_attention=self.reused_attention)


def _policy(model, target_step: float, draft_step_size: float | None, draft_tokens: int | str,
            lookup_tokens: int | None, batch: int = 1) -> DraftPolicy:
    """The draft policy of a generation: its sources, their prior costs and longest drafts."""
    adaptive, costs = draft_tokens == "auto", {}
    if draft_step_size is not None:  # block evaluations per drafted token, over the target's per verification
        costs["step_size"] = len(model.plan(draft_step_size)) / len(model.plan(target_step))
    if lookup_tokens is not None:
        costs["prompt_lookup"] = 0.0
    max_tokens = {"step_size": DEFAULT_MAX_DRAFT_TOKENS if adaptive else draft_tokens}
    if lookup_tokens is not None:  # a lookup drafts at most K, and at most draft_tokens when fixed
        max_tokens["prompt_lookup"] = lookup_tokens if adaptive else min(lookup_tokens, draft_tokens)
    return DraftPolicy(costs, max_tokens, adaptive, batch)


@dataclass(frozen=True)
class _DraftStop:
    """When a round stops drafting before its length: after a draft whose own probability is below ``confidence``,
    or whose final state the learned exit head scores above ``score``, in some unfinished row."""

    confidence: float | None = None
    score: float | None = None

    def now(self, model, draft: _Solve, logits, probs, state, drafted: torch.Tensor, unfinished) -> bool:
        if self.confidence is not None:
            own = (probs if probs is not None else logits.softmax(-1)).gather(-1, drafted).squeeze(-1)
            if bool((own[unfinished] < self.confidence).any()):
                return True
        if self.score is not None:
            score = model.exit_score(state[:, -1], draft.plan[-1].end)
            return bool((score[unfinished] > self.score).any())
        return False


def _draft_with_model(draft: _Solve, tokens, k: int, mask_ahead, sampler: _Sampler, stop: _DraftStop | None,
                      unfinished, clock: _Stopwatch | None = None, policy: DraftPolicy | None = None):
    """Up to ``k`` drafts from the model at the draft step size, one at a time (fed the committed tokens its cache
    lacks first), their distributions when sampling, and, when verification reuses the draft's work, what it
    reuses of each position the draft fed after the committed ones (the last committed token and the drafts but
    the last; see :meth:`_Solve.recorded_logits`), else None. ``stop`` may end the round early (:class:`_DraftStop`).
    The forwards after the first (which also catches up on committed tokens) are timed with ``clock`` for
    ``policy``, when given."""
    batch = tokens.shape[0]
    stop = stop or _DraftStop()
    drafts = tokens.new_empty(batch, k)
    draft_probs = [] if sampler.do_sample else None
    records = [] if draft.shared is not None else None
    feed = tokens[:, len(draft):]
    began, state = None, None
    for j in range(k):
        if j == 1 and policy is not None:
            began = clock()
        if records is None:
            logits, state = draft.logits_and_states(feed, mask_ahead, keep=1)
            logits = logits[:, -1]
        else:
            logits, record = draft.recorded_logits(feed, mask_ahead)
            logits = logits[:, -1]
            records.append(record)
        drafts[:, j], probs = sampler.draw(logits)
        if draft_probs is not None:
            draft_probs.append(probs)
        feed = drafts[:, j : j + 1]
        if j + 1 < k and (stop.confidence is not None or (stop.score is not None and state is not None)) and \
                stop.now(draft.model, draft, logits, probs, state, feed, unfinished):
            drafts = drafts[:, : j + 1]
            break
    if began is not None:
        policy.measured_draft("step_size", drafts.shape[1] - 1, clock() - began)
    return drafts, torch.stack(draft_probs, dim=1) if draft_probs else None, records
