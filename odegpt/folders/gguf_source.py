"""A GGUF file as a source for ``odegpt import``: read by transformers' GGUF loader, which dequantizes every tensor
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``, and ``AutoTokenizer`` the same way for the
tokenizer, which the import saves into the model folder as a Hugging Face tokenizer).

Before anything is dequantized the file's own metadata is read with the ``gguf`` package's reader: its architecture
must be one odegpt imports, and its tensors, in float32, must fit in this machine's memory (as the folder loaders
bound what a ``config.json`` asks for, ``odegpt.folders.model_folder.check_bounds``). Every failure is a ValueError
in one line naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import psutil
import torch

GGUF_SUFFIX = ".gguf"
# GGUF architectures (general.architecture) whose transformers model odegpt imports (odegpt.folders.importing).
IMPORTABLE_ARCHITECTURES = ("llama", "mistral", "qwen2")
# What transformers 5 writes into a saved tokenizer_config.json from the arguments of the load it came from.
_LOADING_ARGUMENTS = ("is_local", "local_files_only", "gguf_file")


def is_gguf(path: str | Path) -> bool:
    """Whether ``--model`` names a GGUF file (by its suffix) rather than a folder."""
    return Path(path).suffix.lower() == GGUF_SUFFIX and not Path(path).is_dir()


def _one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def check_gguf(path: str | Path) -> int:
    """The number of parameters the GGUF file at ``path`` holds, read from its metadata; a ValueError when it is not
    a readable GGUF file, not an architecture odegpt imports, or larger in float32 than this machine's memory."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        reader = gguf.GGUFReader(str(path))
        architecture = reader.fields["general.architecture"].contents()
        parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    except (KeyError, ValueError, OSError, IndexError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a readable GGUF file ({_one_line(error)})") from None
    if architecture not in IMPORTABLE_ARCHITECTURES:
        raise ValueError(f"{path} holds a {architecture!r} model (general.architecture); odegpt imports "
                         f"{', '.join(IMPORTABLE_ARCHITECTURES)}")
    needed, available = 4 * parameters, psutil.virtual_memory().total
    if needed > available:
        raise ValueError(f"{path} holds {parameters:,} parameters ({needed / 2**30:.1f} GiB once dequantized to "
                         f"float32), more than this machine's {available / 2**30:.1f} GiB of memory")
    return parameters


def load_gguf_source(path: str | Path):
    """The model in the GGUF file at ``path``, dequantized to float32 by transformers, in eval mode: checked from
    the file's metadata first (`check_gguf`), then from the configuration transformers reads from it
    (``check_importable``), then its weights finite."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .importing import check_importable
    from .integrity import check_finite_weights
    from .model_folder import quiet_transformers

    path = Path(path)
    check_gguf(path)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read the configuration of {path}: {_one_line(error)}") from None
    check_importable(config.to_dict(), str(path))
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                         dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"cannot load the model of {path}: {_one_line(error)}") from None
    check_finite_weights(model.named_parameters(), str(path))
    return model.eval()


def save_gguf_tokenizer(path: str | Path, output_dir: str | Path) -> Path:
    """Save the tokenizer of the GGUF file at ``path`` into ``output_dir`` as a Hugging Face fast tokenizer (what
    ``odegpt prepare --tokenizer``, ``evaluate`` and ``generate`` read), its config readable by every client."""
    from transformers import AutoTokenizer

    from data_pipeline.files import write_json_atomic
    from data_pipeline.tokenizer import make_tokenizer_config_portable

    from .model_folder import quiet_transformers

    path = Path(path)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as error:  # transformers' GGUF tokenizer conversion raises many kinds on a bad vocabulary
        raise ValueError(f"cannot read the tokenizer of {path}: {_one_line(error)}") from None
    output_dir = Path(output_dir)
    with quiet_transformers():
        tokenizer.save_pretrained(str(output_dir))
    config_file = output_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in _LOADING_ARGUMENTS:  # how this load was asked for, not what the tokenizer is
        config.pop(key, None)
    write_json_atomic(config_file, config)
    make_tokenizer_config_portable(output_dir, odegpt=False)
    return output_dir
