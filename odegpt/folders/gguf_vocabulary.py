"""The vocabulary of a GGUF export (``odegpt export --format gguf``), written so that llama.cpp tokenizes a text
exactly as the model folder's tokenizer does, or refused in one line saying why it cannot be.

- odegpt's SentencePiece tokenizer: llama.cpp's ``llama`` tokenizer model (pieces, scores, types), with no BOS and
  no dummy space prefix, which is what odegpt's tokenizer does.
- A Hugging Face byte-level BPE tokenizer: llama.cpp's ``gpt2`` tokenizer model (the byte-level tokens, their
  merges, control and user-defined added tokens, as llama.cpp's own ``convert_hf_to_gguf.py`` writes them) with a
  ``tokenizer.ggml.pre`` naming llama.cpp's pre-tokenizer for the same split of the text. llama.cpp knows a fixed
  set of pre-tokenizers, each a list of regular expressions; a tokenizer is written only when its ``tokenizer.json``
  is one of them exactly (`PRE_TOKENIZERS`: GPT-2's, SmolLM's, Llama 3's, Qwen2's), with no normalizer (llama.cpp
  applies none) and added tokens llama.cpp matches as transformers does. Anything else (another pre-tokenizer, a
  normalizer such as Qwen2's NFC, WordPiece, SentencePiece-based BPE) is refused in one line, naming what differs:
  llama.cpp would tokenize some texts otherwise, and the model would read other tokens than it was trained on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# llama.cpp's pre-tokenizers that a Hugging Face tokenizer.json can say exactly: (the pre_tokenizer, canonical),
# its name in tokenizer.ggml.pre, and the BPE's ignore_merges llama.cpp applies with it.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_BYTE_LEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS = [
    ("gpt-2", [_BYTE_LEVEL], False),
    ("smollm", [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL], False),
    ("llama-bpe", [_split(LLAMA3_REGEX), _BYTE_LEVEL_NO_REGEX], True),
    ("qwen2", [_split(QWEN2_REGEX), _BYTE_LEVEL_NO_REGEX], False),
]
# What of a pre-tokenizer's fields changes the split (ByteLevel's trim_offsets only moves offsets).
_SPLIT_FIELDS = ("type", "add_prefix_space", "use_regex", "individual_digits", "pattern", "behavior", "invert")


@dataclass
class GGUFVocabulary:
    """What ``save_gguf`` writes under ``tokenizer.ggml.*``."""

    model: str                      # llama.cpp's tokenizer model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str                        # its pre-tokenizer
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.model == "llama":  # SentencePiece's own normalisation, which odegpt's tokenizers turn off
            writer.add_add_space_prefix(False)
            writer.add_remove_extra_whitespaces(False)


def gguf_vocabulary(tokenizer_dir: str | Path, vocab_size: int) -> GGUFVocabulary:
    """The GGUF vocabulary of the tokenizer in ``tokenizer_dir`` for a model of ``vocab_size`` rows (rows beyond the
    tokenizer's ids are unused); a ValueError in one line when llama.cpp cannot tokenize as it does."""
    from data_pipeline.tokenizer import HUGGINGFACE, tokenizer_kind

    if tokenizer_kind(tokenizer_dir) == HUGGINGFACE:
        return _byte_level_bpe(tokenizer_dir, vocab_size)
    return _sentencepiece(tokenizer_dir, vocab_size)


def _sentencepiece(tokenizer_dir: str | Path, vocab_size: int) -> GGUFVocabulary:
    """odegpt's SentencePiece tokenizer as llama.cpp's "llama" tokenizer reads it: pieces, scores, types."""
    import gguf

    from data_pipeline.tokenizer import TokenizerInfo, load_sentencepiece

    processor, info = load_sentencepiece(tokenizer_dir), TokenizerInfo.load(tokenizer_dir)
    pieces = processor.get_piece_size()
    if pieces > vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has {pieces} pieces, more than the model's vocab_size "
                         f"{vocab_size}")
    tokens, scores, types = [], [], []
    for index in range(vocab_size):
        if index >= pieces:
            tokens.append(f"[PAD{index}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(processor.id_to_piece(index))
        scores.append(processor.get_score(index))
        types.append(gguf.TokenType.UNKNOWN if processor.is_unknown(index) else gguf.TokenType.CONTROL
                     if processor.is_control(index) else gguf.TokenType.UNUSED if processor.is_unused(index)
                     else gguf.TokenType.BYTE if processor.is_byte(index) else gguf.TokenType.NORMAL)
    special = {kind: getattr(info, f"{kind}_id") for kind in ("bos", "eos", "unk", "pad")}
    return GGUFVocabulary("llama", "default", tokens, types, scores=scores,
                          special_ids={k: v for k, v in special.items() if v is not None and v >= 0})


def _refuse(tokenizer_dir: str | Path, what: str) -> ValueError:
    return ValueError(f"the GGUF export cannot write the tokenizer of {tokenizer_dir} for llama.cpp exactly: {what}; "
                      f"export --format unrolled and convert that folder with llama.cpp's convert_hf_to_gguf.py")


def _llama_cpp_pre(tokenizer_dir: str | Path, document: dict) -> tuple[str, bool]:
    """``(tokenizer.ggml.pre, ignore_merges)`` of the llama.cpp pre-tokenizer that splits text as ``document`` (a
    tokenizer.json) does, or a ValueError saying what llama.cpp would do otherwise."""
    model = document.get("model") or {}
    if model.get("type") != "BPE" or (document.get("decoder") or {}).get("type") != "ByteLevel":
        raise _refuse(tokenizer_dir, f"it is a {model.get('type')} tokenizer, not byte-level BPE (the GGUF export "
                                     f"writes odegpt's SentencePiece tokenizers and byte-level BPE ones)")
    if document.get("normalizer") is not None:
        raise _refuse(tokenizer_dir, f"it normalizes text ({document['normalizer'].get('type')}), which llama.cpp "
                                     f"does not")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("dropout"):
        raise _refuse(tokenizer_dir, "its BPE has byte fallback, subword affixes or dropout")
    pre = document.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    split = [{key: step.get(key) for key in _SPLIT_FIELDS if key in step} for step in steps or []]
    for name, expected, ignore_merges in PRE_TOKENIZERS:
        if split == expected:
            if bool(model.get("ignore_merges", False)) != ignore_merges:
                raise _refuse(tokenizer_dir, f"its BPE has ignore_merges {bool(model.get('ignore_merges'))}, llama.cpp "
                                             f"uses {ignore_merges} with the {name!r} pre-tokenizer")
            return name, ignore_merges
    raise _refuse(tokenizer_dir, f"its pre-tokenizer ({json.dumps(pre)[:160]}) is none of those llama.cpp knows "
                                 f"exactly ({', '.join(name for name, _, _ in PRE_TOKENIZERS)})")


def _merges(document: dict) -> list[str]:
    """tokenizer.json's merges as llama.cpp reads them, "left right" (tokenizers writes strings or pairs)."""
    merges = []
    for merge in document["model"].get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in part for part in pair):
            raise ValueError(f"merge {merge!r} has a space in a part: llama.cpp reads 'left right'")
        merges.append(" ".join(pair))
    return merges


def _adds_special_tokens(tokenizer_dir: str | Path, tokenizer) -> tuple[bool, bool]:
    """Whether encoding a text adds a BOS before it and an EOS after it (what llama.cpp's add_bos/add_eos say);
    any other template is refused."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    marked = tokenizer("x", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for add_bos in (False, True):
        for add_eos in (False, True):
            if marked == [bos] * add_bos + plain + [eos] * add_eos:
                return add_bos, add_eos
    raise _refuse(tokenizer_dir, f"encoding a text adds other tokens than a BOS before it and an EOS after it "
                                 f"({marked} for {plain})")


def _byte_level_bpe(tokenizer_dir: str | Path, vocab_size: int) -> GGUFVocabulary:
    """A Hugging Face byte-level BPE tokenizer as llama.cpp's "gpt2" tokenizer reads it."""
    import gguf

    from data_pipeline.tokenizer import HF_FILE, load_huggingface

    document = json.loads(Path(tokenizer_dir, HF_FILE).read_text(encoding="utf-8"))
    pre, _ = _llama_cpp_pre(tokenizer_dir, document)
    tokenizer = load_huggingface(tokenizer_dir)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir} has ids up to {max(vocab.values())}, beyond the model's "
                         f"vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder
    for token in added.values():
        if token.lstrip or token.rstrip or token.single_word or token.normalized:
            raise _refuse(tokenizer_dir, f"its added token {token.content!r} strips or matches whitespace, or is "
                                         f"normalized, which llama.cpp's added tokens are not")
    by_id = {index: token for token, index in vocab.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    try:
        merges = _merges(document)
    except ValueError as error:
        raise _refuse(tokenizer_dir, str(error)) from None
    add_bos, add_eos = _adds_special_tokens(tokenizer_dir, tokenizer)
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    return GGUFVocabulary("gpt2", pre, tokens, types, merges=merges, add_bos=add_bos, add_eos=add_eos,
                          special_ids={kind: value for kind, value in special.items() if value is not None})
