"""``generate`` with odegpt's own decoders: self-speculative decoding and adaptive depth, layered above the model.

The model (odegpt/model) knows nothing of them; they use it through its decoder surface (``DecoderModel`` in
odegpt/decoding/surface.py). A native export copies this folder's files into its ``custom_generate/``: transformers
(4.57 on) loads ``custom_generate/generate.py`` with ``trust_remote_code=True`` and installs its ``generate`` as
``model.generate``, so the folder alone offers every decoder. odegpt's own loader
(``odegpt.folders.model_folder.load_model``) installs it the same way (:func:`with_decoders`).

Every check of generate's arguments is made by :func:`choose_decoder` from the model's config alone, so a caller
(``odegpt generate``) can refuse bad settings before it loads any weight, with the same messages.

This file is copied into exported model folders with its siblings, so it imports only torch, transformers
and them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace

# Every sibling is imported here: transformers 4.57 and 5.4 copy into their module cache only the files that
# custom_generate/generate.py itself imports, so a file only a sibling imports would be missing on those clients.
from .adaptive import AdaptiveDepth, adaptive_generate
from .compiled import DecodeStep  # noqa: F401
from .defaults import DEFAULT_DRAFT_TOKENS
from .speculative import check_speculative, self_speculative_generate
from .surface import DecoderModel  # noqa: F401

PLAIN, SPECULATIVE, ADAPTIVE = "plain", "self-speculative", "adaptive depth"


def generate(inputs=None, generation_config=None, *, model, draft_step_size: float | None = None,
             draft_tokens: int | str | None = None, draft_confidence: float | None = None,
             prompt_lookup_num_tokens: int | None = None,
             exit_entropy: float | None = None, route_energy: float | None = None, exit_learned: float | None = None,
             route_learned: float | None = None, kv_fill: str | None = None, swift_step_size: float | None = None,
             check_times: tuple[float, ...] | None = None, adaptive: AdaptiveDepth | None = None,
             compile: bool = False, **kwargs):
    """transformers' ``generate``; with ``draft_step_size=B`` it decodes self-speculatively: the same
    weights solved at ``B`` draft ``draft_tokens`` tokens (default ``"auto"``: a length adapted every round, none
    when drafts do not pay; speculative.DraftPolicy) that one forward at the target
    step size verifies (``draft_confidence=P``: a round stops drafting after a draft below probability
    ``P``). Greedy output is identical; sampled output follows the target's distribution.
    ``prompt_lookup_num_tokens=K`` drafts by prompt lookup (copies of what followed the sequence's last
    n-gram earlier on), alone or beside ``draft_step_size``, each round taking the source that pays best;
    an integer ``draft_tokens`` fixes the length;
    ``reuse_draft=True`` lets verification continue from the draft's shared work (same output).

    With ``exit_entropy=H`` each token stops integrating once its read-out's entropy is below ``H`` nats;
    with ``route_energy=E`` each token is solved at ``swift_step_size`` (default
    ``adaptive.DEFAULT_SWIFT_STEP_SIZE``) and re-solved at ``step_size`` where its energy exceeds ``E``;
    ``kv_fill`` (lazy, copy, interpolate) says what later tokens attend to at the steps a token skipped
    (see adaptive.py). ``exit_learned=S`` and ``route_learned=S`` use the model's learned exit head instead (its
    score: the predicted log KL of a state's read-out to the end of the solve; thresholds from ``odegpt calibrate``),
    ``check_times=(t, ...)`` the only solve times an exit is checked at (the calibration's ``check_times``).
    ``adaptive=AdaptiveDepth(...)`` gives every setting at once (read-out interval, minimum and maximum time, energy
    temperature).

    ``compile=True`` decodes through static KV caches with a compiled step per token (``compiled.DecodeStep``: one
    graph instead of a few hundred eager operators; plain and self-speculative decoding, same output);
    ``cache_implementation="static"`` the same step without compiling it."""
    args = () if inputs is None else (inputs,)
    if generation_config is not None:
        kwargs["generation_config"] = generation_config
    decoder, settings = choose_decoder(
        model.config, draft_step_size=draft_step_size, draft_tokens=draft_tokens, draft_confidence=draft_confidence,
        prompt_lookup_num_tokens=prompt_lookup_num_tokens, exit_entropy=exit_entropy, route_energy=route_energy,
        exit_learned=exit_learned, route_learned=route_learned, kv_fill=kv_fill, swift_step_size=swift_step_size,
        check_times=check_times, adaptive=adaptive, compile=compile, **kwargs)
    if decoder == ADAPTIVE:
        kwargs.pop("step_size", None)
        return adaptive_generate(model, *args, settings=settings, **kwargs)
    if decoder == SPECULATIVE:
        return self_speculative_generate(model, *args, **settings, compile=compile, **kwargs)
    if compile or static_cache(generation_config, kwargs):  # plain decoding through static caches: rounds of one step
        return self_speculative_generate(model, *args, compile=compile, **kwargs)
    return type(model).generate(model, *args, **kwargs)  # transformers' own, under any installed override


def static_cache(generation_config, kwargs: dict) -> bool:
    """Whether generate() was asked for transformers' static cache (``cache_implementation="static"``), which odegpt
    keeps as its own (one slot per block evaluation)."""
    given = kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
    return given == "static"


def choose_decoder(config, *, draft_step_size: float | None = None, draft_tokens: int | str | None = None,
                   draft_confidence: float | None = None, prompt_lookup_num_tokens: int | None = None,
                   exit_entropy: float | None = None, route_energy: float | None = None,
                   exit_learned: float | None = None, route_learned: float | None = None, kv_fill: str | None = None,
                   swift_step_size: float | None = None, check_times: tuple[float, ...] | None = None,
                   adaptive: AdaptiveDepth | None = None, names: dict[str, str] | None = None, compile: bool = False,
                   **kwargs):
    """``(decoder, settings)`` for :func:`generate`'s arguments: ``PLAIN`` (settings None), ``SPECULATIVE`` (the
    keywords of ``self_speculative_generate``) or ``ADAPTIVE`` (an ``AdaptiveDepth`` with its step size resolved);
    every argument checked against the model's ``config`` alone, a ValueError naming the bad one as ``names`` calls
    it (e.g. ``{"draft_tokens": "--draft-tokens"}``; ``"use_cache=False"`` names turning the cache off)."""
    name = functools.partial(_named, names or {})
    step_size = kwargs.get("step_size")
    if step_size is not None:
        config.solver_steps(step_size, name("step_size"))  # a finite real > 0 whose solve is not too long
    check_sampling(names=names, **{key: kwargs[key] for key in ("do_sample", "temperature", "top_k", "top_p",
                                                                "max_new_tokens") if kwargs.get(key) is not None})
    speculative = draft_step_size is not None or prompt_lookup_num_tokens is not None
    source = name("draft_step_size" if draft_step_size is not None else "prompt_lookup_num_tokens")
    thresholds = dict(exit_entropy=exit_entropy, route_energy=route_energy, exit_learned=exit_learned,
                      route_learned=route_learned)
    if adaptive is not None or any(value is not None for value in thresholds.values()):
        given = adaptive.rule if adaptive is not None else next(k for k, v in thresholds.items() if v is not None)
        chosen = name(given or "exit_entropy")
        if speculative:
            raise ValueError(f"{chosen} and {source} are separate decoders (adaptive depth, self-speculative "
                             f"decoding): give one")
        if kwargs.get("use_cache") is False:
            raise ValueError(f"{chosen} decodes with its own KV cache; drop {name('use_cache=False')}")
        if compile:
            raise ValueError(f"{name('compile')} applies to plain and self-speculative decoding, not to {chosen}")
        return ADAPTIVE, _adaptive_settings(config, thresholds, kv_fill, swift_step_size, check_times, adaptive,
                                            step_size, names)
    if kv_fill is not None or swift_step_size is not None or check_times is not None:
        raise ValueError("kv_fill, swift_step_size and check_times apply to adaptive depth: give exit_entropy, "
                         "route_energy, exit_learned or route_learned")
    if kwargs.get("draft_stop_score") is not None and draft_step_size is None:
        raise ValueError(f"{name('draft_stop_score')} applies to self-speculative decoding: give "
                         f"{name('draft_step_size')} too")
    if draft_confidence is not None and draft_step_size is None:
        raise ValueError(f"{name('draft_confidence')} applies to self-speculative decoding: give "
                         f"{name('draft_step_size')} too")
    if compile and kwargs.get("use_cache") is False:
        raise ValueError(f"{name('compile')} decodes through a static KV cache; drop {name('use_cache=False')}")
    if compile and kwargs.get("reuse_draft"):
        raise ValueError(f"{name('reuse_draft')} continues drafts in dynamic caches: drop it or {name('compile')}")
    if not speculative:
        if draft_tokens is not None:
            raise ValueError(f"{name('draft_tokens')} applies to self-speculative decoding: give "
                             f"{name('draft_step_size')} or {name('prompt_lookup_num_tokens')} too")
        return PLAIN, None
    if kwargs.get("use_cache") is False:
        raise ValueError(f"{source} needs the KV cache; drop {name('use_cache=False')}")
    if draft_tokens is None:
        draft_tokens = DEFAULT_DRAFT_TOKENS
    settings = dict(draft_step_size=draft_step_size, draft_tokens=draft_tokens, draft_confidence=draft_confidence,
                    prompt_lookup_num_tokens=prompt_lookup_num_tokens)
    check_speculative(config, **settings, step_size=step_size, names=names,
                      draft_stop_score=kwargs.get("draft_stop_score"))
    return SPECULATIVE, settings


def _named(names: dict[str, str], key: str) -> str:
    return names.get(key, key)


def _adaptive_settings(config, thresholds: dict, kv_fill, swift_step_size, check_times, adaptive, step_size,
                       names) -> AdaptiveDepth:
    if adaptive is not None:
        if any(value is not None for value in thresholds.values()) or kv_fill is not None or \
                swift_step_size is not None or check_times is not None:
            raise ValueError("give adaptive=AdaptiveDepth(...) or its keywords (exit_entropy, route_energy, "
                             "exit_learned, route_learned, kv_fill, swift_step_size, check_times), not both")
        if step_size is not None and adaptive.step_size not in (None, step_size):
            raise ValueError(f"step_size={step_size} and adaptive.step_size={adaptive.step_size} disagree")
        settings = adaptive if adaptive.step_size is not None else replace(adaptive, step_size=step_size)
    else:
        settings = AdaptiveDepth(**thresholds, kv_fill=kv_fill or "copy", step_size=step_size, check_times=check_times,
                                 **({} if swift_step_size is None else {"swift_step_size": swift_step_size}))
    return settings.checked(config, names)


def check_sampling(do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, max_new_tokens: int | None = None,
                   names: dict[str, str] | None = None) -> None:
    """The sampling settings every decoder takes, checked before any token is drawn (named as ``names`` says);
    a value given is checked even when decoding is greedy (it would be wrong the day sampling is turned on)."""
    name = functools.partial(_named, names or {})
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or max_new_tokens < 1):
        raise ValueError(f"{name('max_new_tokens')} must be at least 1, got {max_new_tokens}")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature:g}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"{name('top_k')} must be >= 0 (0 = no top-k filter), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:  # false for nan too
        raise ValueError(f"{name('top_p')} must be in (0, 1], got {top_p:g}")


def with_decoders(model):
    """``model`` with :func:`generate` as its ``model.generate``, as transformers installs a folder's
    ``custom_generate/generate.py``; returns the model."""
    model.generate = functools.partial(generate, model=model)
    return model
