"""Prompts as ``odegpt generate`` reads them: ``--prompt TEXT`` (``-``: stdin) or ``--prompt-file`` (one per line),
checked before any weight is read."""
from __future__ import annotations

import sys
from pathlib import Path


def read_prompts(prompt: str | None, prompt_file: str | None, default: str) -> list[str]:
    """The prompts to generate from: one, or one per line of ``prompt_file``; empty ones are refused."""
    if prompt_file is not None:
        source = "stdin" if prompt_file == "-" else prompt_file
        try:
            text = _utf8(sys.stdin.buffer.read(), "--prompt-file -") if prompt_file == "-" else \
                Path(prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read --prompt-file {source}: {error}") from None
        prompts = text.splitlines()
        if not prompts:
            raise ValueError(f"--prompt-file {source} holds no prompts")
        for number, line in enumerate(prompts, start=1):
            if not line:
                raise ValueError(f"--prompt-file {source}: line {number} is empty (one prompt per line)")
        return prompts
    if prompt == "-":
        prompt = _utf8(sys.stdin.buffer.read(), "--prompt -").removesuffix("\n")
        if not prompt:
            raise ValueError("--prompt -: stdin gave an empty prompt")
        return [prompt]
    prompt = default if prompt is None else prompt
    if not prompt:
        raise ValueError("--prompt is empty: give some text to continue")
    return [prompt]


def _utf8(raw: bytes, option: str) -> str:
    """``raw`` (stdin's bytes) as UTF-8 text, or a one-line error naming ``option`` and the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{option}: stdin is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                         f"{error.start})") from None


def check_prompt_lengths(prompts: list[str], prompt_ids: list[list[int]], max_new_tokens: int,
                         context: int | None) -> None:
    """Every prompt encodes to some tokens, and the longest plus ``max_new_tokens`` fits the model's ``context``."""
    for prompt, ids in zip(prompts, prompt_ids):
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    if context is None:
        return
    longest = max(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    length, which = len(prompt_ids[longest]), "" if len(prompts) == 1 else f" (prompt {longest + 1})"
    if length >= context:
        raise ValueError(f"the prompt{which} is {length} tokens, the model's context is {context} "
                         f"(max_position_embeddings): shorten it")
    if length + max_new_tokens > context:
        raise ValueError(f"the prompt{which} is {length} tokens and --max-new-tokens {max_new_tokens} would end at "
                         f"position {length + max_new_tokens}, beyond the model's context of {context} "
                         f"(max_position_embeddings); use --max-new-tokens {context - length} or less")
