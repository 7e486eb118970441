"""What a folder holds, read from its top-level entries: which command's output it is, if any.

odegpt's commands write four kinds of folder: a tokenizer (``odegpt tokenizer``), a corpus (``odegpt prepare``),
a training run (``odegpt train``) and a model folder (``odegpt convert``, ``import`` and ``export``, GGUF files
included). A command may write into a new or empty folder, may resume or replace an earlier output of its own
kind, and must touch nothing else: ``--overwrite`` replaces an earlier export, never a run with its checkpoints,
a corpus or a folder of the user's own files. :func:`folder_kind` says which kind a folder is and why (the
entry that shows it), so a refusal can name what it found.

Hidden entries are bookkeeping (writer locks, staged folders) and are ignored, except a corpus's ``.parts``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

EMPTY, MODEL, CORPUS, RUN, TOKENIZER, UNKNOWN = "empty", "model", "corpus", "run", "tokenizer", "unknown"
DESCRIPTIONS = {EMPTY: "an empty folder", MODEL: "a model folder", CORPUS: "a prepared corpus",
                RUN: "a training run", TOKENIZER: "a tokenizer", UNKNOWN: "a folder of files no odegpt command writes"}

# A tokenizer's files: odegpt's (SentencePiece and its Hugging Face twin) and any Hugging Face tokenizer's (its
# tokenizer.json, configs, the slow tokenizer's vocabulary files and chat template). Model folders carry them all.
TOKENIZER_ENTRIES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                     "odegpt_tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                     "chat_template.json", "vocab.txt", "spiece.model"}
# What a model folder holds besides its tokenizer (odegpt's exports and Hugging Face save_pretrained).
MODEL_ENTRIES = {"config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin",
                 "custom_generate", "adaptive_calibration.json", "exit_calibration.json", "README.md"}
MODEL_SUFFIXES = (".safetensors", ".gguf", ".py")
# What a run writes at the top of its folder (launcher.run_folder), and the keys of its config.json.
RUN_ENTRIES = {"config.json", "deepspeed_config.json", "deepspeed_env", "metrics.jsonl", "tensorboard", "checkpoints"}
RUN_CONFIG_KEYS = {"model", "train", "data", "run"}
# A prepared corpus (data_pipeline.manifest) and an array job's parts of one.
CORPUS_MARKERS = ("manifest.json", ".parts")
SHARD_FILE = re.compile(r"(train|val)-\d{5}\.(bin|idx)(\.tmp)?")
CORPUS_PART = re.compile(r"part-\d{5}-of-\d{5}")


@dataclass(frozen=True)
class FolderKind:
    """``kind`` (one of the constants above) and ``evidence``: the entry that shows it, for messages."""

    kind: str
    evidence: str = ""

    def describe(self) -> str:
        return DESCRIPTIONS[self.kind] + (f" ({self.evidence})" if self.evidence else "")


def visible_entries(folder: Path) -> list[Path]:
    """The folder's entries that are not bookkeeping (hidden names, but a corpus's ``.parts``), sorted."""
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith(".") or entry.name == ".parts")


def read_config(path: Path) -> dict | None:
    """``path`` as a JSON object, or None when it is missing, unreadable or not an object."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def folder_kind(folder: str | Path) -> FolderKind:
    """What ``folder`` holds (a folder that does not exist is empty); see the module docstring."""
    folder = Path(folder)
    entries = visible_entries(folder) if folder.is_dir() else []
    if not entries:
        return FolderKind(EMPTY)
    names = {entry.name for entry in entries}
    config = read_config(folder / "config.json") if "config.json" in names else None
    if config is not None and RUN_CONFIG_KEYS <= set(config):
        return FolderKind(RUN, "config.json of a training run")
    for marker in ("checkpoints", "metrics.jsonl"):
        if marker in names:
            return FolderKind(RUN, marker)
    for marker in CORPUS_MARKERS:
        if marker in names:
            return FolderKind(CORPUS, marker)
    parts = sorted(name for name in names if CORPUS_PART.fullmatch(name))
    if parts:
        return FolderKind(CORPUS, parts[0])
    others = sorted(name for name in names if not _is_model_entry(name))
    if config is not None and "model_type" in config:
        if others:
            return FolderKind(UNKNOWN, _listing(others) + f" beside a {config['model_type']!r} model")
        return FolderKind(MODEL, f"config.json of a {config['model_type']!r} model")
    if "config.json" not in names and names <= TOKENIZER_ENTRIES:
        return FolderKind(TOKENIZER, sorted(names)[0])
    if not others and any(name.endswith(".gguf") for name in names):
        return FolderKind(MODEL, next(name for name in sorted(names) if name.endswith(".gguf")))
    return FolderKind(UNKNOWN, _listing(others or sorted(names)))


def _is_model_entry(name: str) -> bool:
    return name in MODEL_ENTRIES or name in TOKENIZER_ENTRIES or name.endswith(MODEL_SUFFIXES)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
