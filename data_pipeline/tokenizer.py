"""Tokenizer folders: odegpt's own (SentencePiece and its Hugging Face twin) or any Hugging Face fast tokenizer.

A tokenizer folder is one of two kinds (`tokenizer_kind`):

* ``odegpt``: written by ``odegpt tokenizer``, recorded in ``odegpt_tokenizer.json``;
* ``huggingface``: any Hugging Face fast tokenizer saved with ``save_pretrained`` (a ``tokenizer.json``: byte-level
  BPE, SentencePiece-based, WordPiece, ...), such as the one ``odegpt import`` copies into a model folder.

`TokenizerInfo.load` describes either (vocabulary size, special ids, the end-of-document token every document
ends with, fingerprint), and `tokenizer_fingerprint` identifies either: the SentencePiece model's bytes for
odegpt's (unchanged, so existing corpora and checkpoints stay valid), the files that define the encoding,
canonicalised, for a Hugging Face tokenizer.

`train_tokenizer` streams documents from any input `readers` understands, keeps a bounded,
seeded reservoir sample of lines (memory does not grow with the corpus), trains a SentencePiece
BPE or unigram model with byte fallback, and writes one directory holding:

* ``tokenizer.model``            the SentencePiece model (what `prepare` tokenizes with);
* ``tokenizer.json`` + config    the same model as a Hugging Face fast tokenizer, so
                                 ``AutoTokenizer.from_pretrained(dir)`` works;
* ``odegpt_tokenizer.json``      `TokenizerInfo`: fixed special ids, vocab size, fingerprint.

Text is never normalised (identity rule, no dummy prefix, whitespace kept), so tabs, runs of
spaces, code and any unicode round-trip exactly; unseen characters fall back to byte tokens.
The fingerprint (blake2b of the ``.model`` bytes) is what manifests record and what
`datasets.build_datasets` checks against the model being trained.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .files import write_atomic, write_json_atomic
from .folder_kinds import EMPTY, TOKENIZER, folder_kind

MODEL_FILE = "tokenizer.model"
INFO_FILE = "odegpt_tokenizer.json"
HF_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_FILE = "special_tokens_map.json"
ODEGPT, HUGGINGFACE = "odegpt", "huggingface"
# transformers 5 saves a fast tokenizer as "TokenizersBackend", a class transformers 4 lacks ("Tokenizer class
# TokenizersBackend does not exist"); "PreTrainedTokenizerFast" names the same tokenizer in both (5 aliases it).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"

# Fixed ids: every odegpt tokenizer has the same layout, so configs never need to guess.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"


@dataclass
class TokenizerInfo:
    """What a tokenizer folder says about itself: recorded in ``odegpt_tokenizer.json`` for odegpt's, read from the
    tokenizer itself for a Hugging Face one (``kind``). A special id is None when the tokenizer has no such token;
    every tokenizer has an end-of-document token (``eos_id``), which ``prepare`` appends to every document."""

    vocab_size: int
    model_type: str
    fingerprint: str
    unk_id: int | None = UNK_ID
    bos_id: int | None = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int | None = PAD_ID
    sampled_sentences: int = 0
    kind: str = field(default=ODEGPT, compare=False)  # not in odegpt_tokenizer.json: the folder says it

    def save(self, directory: str | os.PathLike) -> None:
        record = asdict(self)
        del record["kind"]
        write_json_atomic(Path(directory, INFO_FILE), record)

    def special_ids(self) -> dict[str, int | None]:
        """The ids a manifest records, by name (``eos_id``, ...)."""
        return {"eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TokenizerInfo:
        """The folder's tokenizer, of either kind; a ValueError or FileNotFoundError in one line naming the fix."""
        if tokenizer_kind(directory) == HUGGINGFACE:
            return _huggingface_info(directory)
        path = Path(directory, INFO_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not an odegpt tokenizer directory (no {INFO_FILE}); "
                                    f"create one with `odegpt tokenizer`")
        try:
            return cls(**json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): truncated or edited; copy it again from "
                             f"the tokenizer directory, or retrain with `odegpt tokenizer`") from None
        except TypeError as error:  # missing or unknown fields
            raise ValueError(f"{path} is not an odegpt tokenizer record ({error})") from None


def tokenizer_kind(directory: str | os.PathLike) -> str:
    """``odegpt`` (``odegpt_tokenizer.json``, or a bare SentencePiece ``tokenizer.model``) or ``huggingface`` (a
    ``tokenizer.json`` without odegpt's record); a folder with neither is a FileNotFoundError naming the fix."""
    folder = Path(directory)
    if (folder / INFO_FILE).is_file():
        return ODEGPT
    if (folder / HF_FILE).is_file():
        return HUGGINGFACE
    if (folder / MODEL_FILE).is_file():
        return ODEGPT
    raise FileNotFoundError(f"{directory} holds no tokenizer: neither odegpt's ({INFO_FILE}, from `odegpt tokenizer`) "
                            f"nor a Hugging Face fast tokenizer ({HF_FILE}, from save_pretrained)")


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a tokenizer of either kind."""
    try:
        tokenizer_kind(directory)
    except FileNotFoundError:
        return False
    return True


def fingerprint_file(path: str | os.PathLike) -> str:
    """blake2b-128 of a file's bytes: identifies a tokenizer model exactly."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(directory: str | os.PathLike) -> str:
    """Fingerprint of the tokenizer in `directory`, of either kind (recomputed from its files, not trusted)."""
    if tokenizer_kind(directory) == HUGGINGFACE:
        return _huggingface_fingerprint(directory)
    model = Path(directory, MODEL_FILE)
    if not model.is_file():
        raise FileNotFoundError(f"tokenizer directory {directory} has no {MODEL_FILE}")
    return fingerprint_file(model)


# ---- Hugging Face tokenizers -------------------------------------------------------------------------------------

# What in tokenizer_config.json changes the ids of a text or the special ids (not the class that reads it, which
# odegpt rewrites for older clients, nor the chat template or the maximum length).
ENCODING_CONFIG_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "added_tokens_decoder",
                        "additional_special_tokens", "bos_token", "do_lower_case", "eos_token",
                        "extra_special_tokens", "legacy", "pad_token", "split_special_tokens", "unk_token")
# What in tokenizer.json does not: how a batch is padded or cut, which prepare turns off.
_NOT_ENCODING = ("padding", "truncation", "version")


def _json_of(path: Path):
    """The JSON document in ``path``, or a ValueError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"{path} is not a readable JSON file ({reason}): truncated or edited; copy the tokenizer "
                         f"files again") from None


def _huggingface_fingerprint(directory: str | os.PathLike) -> str:
    """blake2b-128 of the files that define a Hugging Face tokenizer's encoding, canonicalised (parsed and written
    with sorted keys): ``tokenizer.json`` without its padding and truncation, the encoding keys of
    ``tokenizer_config.json`` and ``special_tokens_map.json``. Reformatting a file, or another tokenizer class
    name, leaves it as it is; another vocabulary, merge, pre-tokenizer or special token changes it."""
    folder = Path(directory)
    tokenizer = _json_of(folder / HF_FILE)
    if not isinstance(tokenizer, dict):
        raise ValueError(f"{folder / HF_FILE} is not a tokenizer (not a JSON object)")
    definition = {HF_FILE: {key: value for key, value in tokenizer.items() if key not in _NOT_ENCODING}}
    if (folder / HF_CONFIG_FILE).is_file():
        config = _json_of(folder / HF_CONFIG_FILE)
        config = config if isinstance(config, dict) else {}
        definition[HF_CONFIG_FILE] = {key: config[key] for key in ENCODING_CONFIG_KEYS if key in config}
    if (folder / HF_SPECIAL_FILE).is_file():
        definition[HF_SPECIAL_FILE] = _json_of(folder / HF_SPECIAL_FILE)
    text = json.dumps(definition, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def check_tokenizer_files(directory: str | os.PathLike) -> None:
    """The JSON files of a tokenizer folder parse and hold objects; a ValueError naming the file that does not."""
    for name in (HF_FILE, HF_CONFIG_FILE, HF_SPECIAL_FILE, INFO_FILE):
        path = Path(directory) / name
        if path.is_file() and not isinstance(_json_of(path), dict):
            raise ValueError(f"{path} is not a tokenizer file (not a JSON object): copy the tokenizer files again")


def load_huggingface(directory: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(directory)`` without running the folder's code, or a ValueError in one line
    naming the folder (a tokenizer.json or tokenizer_config.json that does not parse, an unknown class, ...)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    check_tokenizer_files(directory)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # a model folder's config.json of a type transformers does not know
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as error:  # transformers and tokenizers raise many kinds on a bad file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"cannot load the tokenizer of {directory}: {reason}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)


def _huggingface_info(directory: str | os.PathLike) -> TokenizerInfo:
    """A Hugging Face tokenizer's `TokenizerInfo`: ``len(tokenizer)`` (added tokens included) as its vocabulary
    size, its special ids; refused in one line when it has no end-of-document token."""
    tokenizer = load_huggingface(directory)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {directory} has no end-of-document token (eos_token), which odegpt puts after "
                         f"every document; set one of its tokens as eos_token in {Path(directory, HF_CONFIG_FILE)} "
                         f"(e.g. tokenizer.eos_token = '</s>'; tokenizer.save_pretrained(DIR))")
    ids = tokenizer.get_vocab().values()
    model = _json_of(Path(directory, HF_FILE)).get("model") or {}
    return TokenizerInfo(vocab_size=max(len(tokenizer), max(ids, default=-1) + 1),
                         model_type=str(model.get("type", "unknown")).lower(),
                         fingerprint=_huggingface_fingerprint(directory), unk_id=tokenizer.unk_token_id,
                         bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                         kind=HUGGINGFACE)


def sample_sentences(documents: Iterable[str], max_sentences: int, seed: int = 0,
                     max_chars: int = 4096) -> list[str]:
    """Seeded reservoir sample of at most `max_sentences` non-empty lines (Algorithm R).

    Memory is bounded by ``max_sentences * max_chars`` whatever the corpus size; longer lines
    are cut (SentencePiece would drop them anyway).
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for doc in documents:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            line = line[:max_chars]
            if len(reservoir) < max_sentences:
                reservoir.append(line)
            else:
                j = rng.randrange(seen + 1)
                if j < max_sentences:
                    reservoir[j] = line
            seen += 1
    return reservoir


def _write_canonical_model(trained: str | os.PathLike, target: Path) -> None:
    """Write SentencePiece's model without what depends on where and how it was trained rather than on its inputs
    and settings: the temporary path it was written under (``trainer_spec.model_prefix``) and the thread count.
    Two trainings on the same inputs with the same settings then write the same bytes, hence the same fingerprint
    (a corpus prepared with one is accepted with the other)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(trained).read_bytes())
    proto.trainer_spec.model_prefix = "tokenizer"
    proto.trainer_spec.num_threads = 1
    write_atomic(target, proto.SerializeToString())


@contextlib.contextmanager
def _elapsed_bar(description: str, enabled: bool) -> Iterator[None]:
    """A progress line that counts the seconds of a step with no progress of its own to report (SentencePiece's
    training, which releases the GIL, so a thread can keep the line moving)."""
    from tqdm import tqdm

    bar = tqdm(desc=description, bar_format="{desc}: {elapsed}", disable=not enabled, leave=False)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()


def train_tokenizer(inputs: list[str], output: str | os.PathLike, vocab_size: int,
                    model_type: str = "bpe", max_sentences: int = 2_000_000, seed: int = 0,
                    text_key: str = "text", num_threads: int | None = None,
                    character_coverage: float = 0.9995, max_files: int | None = None,
                    progress: bool = False) -> TokenizerInfo:
    """Train a SentencePiece model on `inputs` and write a complete tokenizer directory; ``progress`` shows a
    bar over the input files read, then the seconds SentencePiece has been training."""
    import sentencepiece as spm
    from tqdm import tqdm

    from .readers import iter_documents, resolve_inputs

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    found = folder_kind(output)
    if found.kind not in (EMPTY, TOKENIZER):
        raise ValueError(f"--output {output} is {found.describe()}: a tokenizer is written only into a new or empty "
                         f"folder, or over a tokenizer; choose another --output")
    sources = resolve_inputs(inputs, max_files=max_files)
    documents = iter_documents(tqdm(sources, desc="tokenizer: read", unit="file", disable=not progress,
                                    leave=False), text_key=text_key)
    sentences = sample_sentences((doc.text for doc in documents), max_sentences=max_sentences, seed=seed)
    if not sentences:
        raise ValueError(f"no text found in {inputs} to train a tokenizer on")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output, prefix=".train-") as tmp, \
            _elapsed_bar(f"tokenizer: training SentencePiece {model_type} on {len(sentences):,} lines", progress):
        prefix = os.path.join(tmp, "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=16384,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            hard_vocab_limit=False,
            num_threads=num_threads or min(os.cpu_count() or 1, 8),
            minloglevel=2,
        )
        _write_canonical_model(prefix + ".model", output / MODEL_FILE)
    sp = spm.SentencePieceProcessor(model_file=str(output / MODEL_FILE))
    info = TokenizerInfo(vocab_size=sp.get_piece_size(), model_type=model_type,
                         fingerprint=fingerprint_file(output / MODEL_FILE),
                         sampled_sentences=len(sentences))
    write_hf_tokenizer(output)
    info.save(output)
    return info


def write_hf_tokenizer(directory: str | os.PathLike) -> None:
    """Convert ``directory/tokenizer.model`` into Hugging Face fast tokenizer files beside it.

    Uses transformers' own SentencePiece converter (`SpmConverter.build_tokenizer_from_spm_proto`),
    which maps BPE merges / unigram scores, byte fallback and the "▁" space marker. Special tokens
    are split like plain text (``split_special_tokens``), as SentencePiece does: a literal "</s>"
    in a document is text, never an EOS.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter, generate_merges

    model = str(Path(directory, MODEL_FILE))
    proto = SentencePieceExtractor(model).proto
    # SentencePiece never matches control, unknown or byte pieces ("</s>", "<0x41>") against
    # text; keep the HF model from doing so: no BPE merges build them, and unigram scores
    # make them unreachable whenever any normal segmentation exists.
    not_text = {p.piece for p in proto.pieces if p.type in (2, 3, 6)}
    if proto.trainer_spec.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        merges = generate_merges(vocab, None, skip_tokens=not_text)
        backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, merges)
    else:
        vocab = [(p.piece, -1e9 if p.piece in not_text else p.score) for p in proto.pieces]
        backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    backend.encode_special_tokens = True
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        split_special_tokens=True, add_bos_token=False, add_eos_token=False,
        clean_up_tokenization_spaces=False, model_max_length=1 << 30,
    )
    hf.save_pretrained(str(directory))
    make_tokenizer_config_portable(directory, odegpt=True)


def make_tokenizer_config_portable(directory: str | os.PathLike, odegpt: bool | None = None) -> None:
    """Make ``directory/tokenizer_config.json`` say the same tokenizer to every client:

    - the tokenizer class, so transformers 4.x and 5.x both load it (and 4.x, knowing the class, never needs
      the model's config or its custom code to pick one);
    - for odegpt's tokenizers (``odegpt``; default: the folder holds odegpt's record),
      ``add_bos_token``/``add_eos_token``/``add_prefix_space`` false, which is what the tokenizer does: llama.cpp's
      converter reads these, and without them adds a BOS and a dummy space prefix to every text prompt. A Hugging
      Face tokenizer keeps its own: they are part of how it encodes.

    A config that is not a JSON object is a ValueError naming the file."""
    path = Path(directory, HF_CONFIG_FILE)
    if not path.is_file():
        return
    config = _json_of(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a tokenizer config (not a JSON object): copy the tokenizer files again")
    odegpt = (Path(directory) / INFO_FILE).is_file() if odegpt is None else odegpt
    portable = dict(config)
    if portable.get("tokenizer_class") in (None, "TokenizersBackend"):
        portable["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    for key in ("add_bos_token", "add_eos_token", "add_prefix_space") if odegpt else ():
        portable.setdefault(key, False)
    if portable != config:
        write_json_atomic(path, portable)


def load_tokenizer(directory: str | os.PathLike):
    """The Hugging Face fast tokenizer of a tokenizer folder of either kind, never running the folder's code.

    For odegpt's it encodes and decodes exactly like ``tokenizer.model``, with fixed special ids unk=0, bos=1,
    eos=2, pad=3; see `TokenizerInfo.load(directory)` for the vocabulary size, the special ids and the
    fingerprint of either kind. `prepare` appends EOS after every document.
    """
    if not Path(directory, HF_FILE).is_file():
        raise FileNotFoundError(f"{directory} has no {HF_FILE}: not a tokenizer folder (create one with `odegpt "
                                f"tokenizer`, or save a Hugging Face fast tokenizer there with save_pretrained)")
    return load_huggingface(directory)


def load_sentencepiece(directory: str | os.PathLike):
    """The `sentencepiece.SentencePieceProcessor` of a tokenizer directory (fast batch encoding)."""
    import sentencepiece as spm

    model = Path(directory, MODEL_FILE)
    if not model.is_file():
        raise FileNotFoundError(f"tokenizer directory {directory} has no {MODEL_FILE}; "
                                f"create it with `odegpt tokenizer`")
    return spm.SentencePieceProcessor(model_file=str(model))
