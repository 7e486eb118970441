"""What a training run may write into: a new folder, an empty one, or a run's own.

A run writes ``config.json``, ``deepspeed_config.json``, ``deepspeed_env``, ``metrics.jsonl``, ``tensorboard/``
and ``checkpoints/`` at the top of ``run.output_dir``. Pointed at a model folder, that replaces the model's
``config.json``; at a corpus or a tokenizer, it mixes a run into them; at ``""``, it trains into the current
folder. So a folder that is something else is refused before anything is written, as ``odegpt export``
refuses to write over its input. A folder qualifies when it is new or empty, or when its top-level files are
the run's own (a config.json that is a run's). It may hold other folders (the quickstart keeps its
tokenizer, corpus and exports beside the run) and hidden files.
"""
from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.folder_kinds import RUN_CONFIG_KEYS, RUN_ENTRIES

# Top-level files that say a folder is a model, a corpus or a tokenizer: what a run must never write into.
FOREIGN_MARKERS = {
    "manifest.json": "a prepared corpus",
    "tokenizer.model": "a tokenizer or a model folder",
    "tokenizer.json": "a tokenizer or a model folder",
    "odegpt_tokenizer.json": "a tokenizer",
    "model.safetensors": "a model folder",
    "model.safetensors.index.json": "a model folder",
}


class NotARunFolderError(ValueError):
    """``run.output_dir`` names a folder a run must not write into."""


def check_run_folder(output_dir: str | Path) -> None:
    """Raise :class:`NotARunFolderError`, naming the folder and what it is, unless a run may write into it."""
    if str(output_dir).strip() == "":
        raise NotARunFolderError("run.output_dir is empty, which would train into the current folder: name a folder "
                                 "for the run, e.g. --set run.output_dir=runs/my-run")
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise NotARunFolderError(f"run.output_dir {folder} is a file, not a folder")
    if not folder.is_dir():
        return
    for name, kind in FOREIGN_MARKERS.items():
        if (folder / name).exists():
            raise NotARunFolderError(f"run.output_dir {folder} holds {name}: it is {kind}, not a training run, and "
                                     f"training would write over it; choose another run.output_dir")
    config_file = folder / "config.json"
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError, RecursionError):
            config = None
        if not isinstance(config, dict) or not RUN_CONFIG_KEYS <= set(config):
            what = f"a {config['model_type']!r} model's" if isinstance(config, dict) and "model_type" in config \
                else "a config.json that is not a run's"
            raise NotARunFolderError(f"run.output_dir {folder} holds {what} config.json, which training would "
                                     f"replace; choose another run.output_dir")
    others = sorted(entry.name for entry in folder.iterdir()
                    if entry.is_file() and entry.name not in RUN_ENTRIES and not entry.name.startswith("."))
    if others:
        raise NotARunFolderError(f"run.output_dir {folder} is not a training run's folder (it holds "
                                 f"{', '.join(others[:3])}{' ...' if len(others) > 3 else ''}); choose a new or empty "
                                 f"folder, or a run's own")
