"""``generate`` with odegpt's own decoders: self-speculative decoding and adaptive depth, layered above the model.

The model (odegpt/model) knows nothing of them; they use it through its decoder surface (embed, attention_inputs,
plan, solve, keys_values, read_out, new_cache). A native export copies this folder's files into its
``custom_generate/``: transformers (4.57 on) loads ``custom_generate/generate.py`` with ``trust_remote_code=True``
and installs its ``generate`` as ``model.generate``, so the folder alone offers every decoder. odegpt's own
loader (``odegpt.folders.model_folder.load_model``) installs it the same way (:func:`with_decoders`).

This file is copied into exported model folders with its siblings, so it imports only torch, transformers
and them.
"""
from __future__ import annotations

import functools

from .adaptive import AdaptiveDepth, adaptive_generate
from .defaults import DEFAULT_DRAFT_TOKENS
from .speculative import self_speculative_generate


def generate(inputs=None, generation_config=None, *, model, draft_step_size: float | None = None,
             draft_tokens: int | str | None = None, draft_confidence: float | None = None,
             prompt_lookup_num_tokens: int | None = None,
             exit_entropy: float | None = None, route_energy: float | None = None, kv_fill: str | None = None,
             swift_step_size: float | None = None, adaptive: AdaptiveDepth | None = None, **kwargs):
    """transformers' ``generate``; with ``draft_step_size=B`` it decodes self-speculatively: the same
    weights solved at ``B`` draft ``draft_tokens`` tokens (default 4) that one forward at the target
    step size verifies (``draft_confidence=P``: a round stops drafting after a draft below probability
    ``P``). Greedy output is identical; sampled output follows the target's distribution.
    ``prompt_lookup_num_tokens=K`` drafts by prompt lookup (copies of what followed the sequence's last
    n-gram earlier on), alone or beside ``draft_step_size``, each round taking the source that pays best;
    ``draft_tokens="auto"`` adapts the draft length to the running acceptance (speculative.DraftPolicy);
    ``reuse_draft=True`` lets verification continue from the draft's shared work (same output).

    With ``exit_entropy=H`` each token stops integrating once its read-out's entropy is below ``H`` nats;
    with ``route_energy=E`` each token is solved at ``swift_step_size`` (default
    ``adaptive.DEFAULT_SWIFT_STEP_SIZE``) and re-solved at ``step_size`` where its energy exceeds ``E``;
    ``kv_fill`` (lazy, copy, interpolate) says what later tokens attend to at the steps a token skipped
    (see adaptive.py). ``adaptive=AdaptiveDepth(...)`` gives every setting at once (read-out interval,
    minimum and maximum time, energy temperature)."""
    args = () if inputs is None else (inputs,)
    if generation_config is not None:
        kwargs["generation_config"] = generation_config
    if draft_confidence is not None and draft_step_size is None:
        raise ValueError("draft_confidence applies to self-speculative decoding: give draft_step_size too")
    if adaptive is not None:
        if exit_entropy is not None or route_energy is not None or kv_fill is not None or swift_step_size is not None:
            raise ValueError("give adaptive=AdaptiveDepth(...) or its keywords (exit_entropy, route_energy, "
                             "kv_fill, swift_step_size), not both")
        if draft_step_size is not None or prompt_lookup_num_tokens is not None:
            raise ValueError("adaptive depth and self-speculative decoding (draft_step_size, "
                             "prompt_lookup_num_tokens) are separate decoders: give one")
        step_size = kwargs.pop("step_size", None)
        if step_size is not None and adaptive.step_size not in (None, step_size):
            raise ValueError(f"step_size={step_size} and adaptive.step_size={adaptive.step_size} disagree")
        if adaptive.step_size is None and step_size is not None:
            adaptive = AdaptiveDepth(**{**adaptive.__dict__, "step_size": step_size})
        return adaptive_generate(model, *args, settings=adaptive, **kwargs)
    if exit_entropy is not None or route_energy is not None:
        if draft_step_size is not None or prompt_lookup_num_tokens is not None:
            raise ValueError("adaptive depth (exit_entropy, route_energy) and self-speculative decoding "
                             "(draft_step_size, prompt_lookup_num_tokens) are separate decoders: give one")
        settings = dict(exit_entropy=exit_entropy, route_energy=route_energy, kv_fill=kv_fill or "copy",
                        step_size=kwargs.pop("step_size", None))
        if swift_step_size is not None:
            settings["swift_step_size"] = swift_step_size
        return adaptive_generate(model, *args, settings=AdaptiveDepth(**settings), **kwargs)
    if kv_fill is not None or swift_step_size is not None:
        raise ValueError("kv_fill and swift_step_size apply to adaptive depth: give exit_entropy or route_energy")
    if draft_step_size is None and prompt_lookup_num_tokens is None:
        if draft_tokens is not None:
            raise ValueError("draft_tokens applies to self-speculative decoding: give draft_step_size or "
                             "prompt_lookup_num_tokens too")
        return type(model).generate(model, *args, **kwargs)  # transformers' own, under any installed override
    if draft_tokens is None:  # prompt lookup alone drafts what it finds, up to its K; step-size drafts k tokens
        draft_tokens = DEFAULT_DRAFT_TOKENS if draft_step_size is not None else prompt_lookup_num_tokens
    return self_speculative_generate(model, *args, draft_step_size=draft_step_size, draft_tokens=draft_tokens,
                                     draft_confidence=draft_confidence,
                                     prompt_lookup_num_tokens=prompt_lookup_num_tokens, **kwargs)


def with_decoders(model):
    """``model`` with :func:`generate` as its ``model.generate``, as transformers installs a folder's
    ``custom_generate/generate.py``; returns the model."""
    model.generate = functools.partial(generate, model=model)
    return model
