"""A model folder as odegpt's commands read it: data, never code.

A Hugging Face folder may carry Python files and name them in ``config.json`` (``auto_map``); transformers'
``Auto`` classes then offer to run them, and ask on stdin when ``trust_remote_code`` is unset. A folder a
user downloaded, or was sent, must not get to run code through ``odegpt generate``. So every command
loads a folder here:

- the model type is read from ``config.json`` as JSON; a native odegpt folder (``odegpt``) and a Llama
  (``llama``: an unrolled export, or a Llama to import) are accepted, any other type is a one-line error;
- configuration, weights and tokenizer are built by odegpt's own classes and transformers' Llama classes,
  with ``trust_remote_code=False``: the folder's ``.py`` files never run and nothing is asked;
- every weight the model has must be in the folder, and nothing else: a missing tensor would otherwise be
  initialised at random and give plausible, wrong numbers (a Llama config over odegpt weights, say);
- weights holding NaN or infinity are refused, naming the tensor;
- what a folder may ask for is bounded before anything is built (solver steps, layers, parameters that fit
  in memory), and an odegpt ``config.json`` must say its ``segments`` (the default depth would load other
  weights' shape silently);
- a tokenizer that carries odegpt's record (``odegpt_tokenizer.json``) must match it (a swapped or truncated
  ``tokenizer.model``).

Failures are :class:`odegpt.errors.InputError` (one line, no traceback).
"""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
from safetensors import SafetensorError
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as transformers_logging

from odegpt.decoding.generate import with_decoders
from odegpt.errors import InputError
from odegpt.model.accounting import llama_parameter_count, model_cost
from odegpt.model.configuration_odegpt import OdeGPTConfig
from odegpt.model.modeling_odegpt import OdeGPTForCausalLM
from odegpt.model.solver import solver_method

from .integrity import check_finite_weights

# model_type in config.json -> the classes that read it. Nothing else is loaded.
MODEL_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "odegpt": (OdeGPTConfig, OdeGPTForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}


def _config_json(folder: str | Path) -> dict:
    """``folder/config.json`` as data (never through transformers), or a one-line error."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise InputError(f"{folder} is not a model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, RecursionError) as error:  # RecursionError: JSON nested too deep to parse
        raise InputError(f"{config_file} is not valid JSON: {str(error)[:200]}") from None
    return config if isinstance(config, dict) else {}


def model_type_of(folder: str | Path, config: dict | None = None) -> str:
    """``odegpt`` or ``llama``, read from ``folder/config.json`` as data; anything else is a one-line error."""
    model_type = (_config_json(folder) if config is None else config).get("model_type")
    if model_type not in MODEL_CLASSES:
        raise InputError(f"{folder} holds a {model_type!r} model; odegpt reads only odegpt folders and Llama "
                           f"folders (such as an unrolled export), and never runs a folder's own code")
    return model_type


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No "Loading weights" or "Writing model shards" bar and no load report from transformers: a load or save that
    succeeds says nothing, one that fails is reported by odegpt, in one line. Whatever the libraries still print
    goes to stderr, never into a command's ``--json`` output; and a save does not import DeepSpeed to check
    whether the model is wrapped in its engine (accelerate's check; an exported model never is), which would
    print DeepSpeed's accelerator warning and cost a second."""
    verbosity, bar = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(sys.stderr), _without_deepspeed_probe():
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bar:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def _without_deepspeed_probe() -> Iterator[None]:
    other = sys.modules.get("accelerate.utils.other")  # imported by transformers when accelerate is installed
    if other is None or not hasattr(other, "is_deepspeed_available") or "deepspeed" in sys.modules:
        yield
        return
    probe = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = probe


# The most a folder may ask for: beyond these a load would hang or exhaust memory rather than fail.
MAX_FOLDER_SOLVER_STEPS = 1 << 16
MAX_FOLDER_LAYERS = 1 << 14


def check_bounds(folder: str | Path, config: PretrainedConfig) -> None:
    """Refuse a configuration whose model could not be built or solved in reasonable time and memory."""
    if config.model_type == "odegpt":
        if config.max_solver_steps > MAX_FOLDER_SOLVER_STEPS:
            raise InputError(f"{folder}/config.json asks for max_solver_steps {config.max_solver_steps:,}; odegpt "
                               f"loads at most {MAX_FOLDER_SOLVER_STEPS:,} (a longer solve would run for hours)")
        parameters = model_cost(config, config.step_size, seq_len=1).parameters
    else:
        if config.num_hidden_layers > MAX_FOLDER_LAYERS:
            raise InputError(f"{folder}/config.json asks for {config.num_hidden_layers:,} layers; odegpt loads at "
                               f"most {MAX_FOLDER_LAYERS:,}")
        parameters = llama_parameter_count(config.to_dict())
    needed, available = 4 * parameters, psutil.virtual_memory().total
    if needed > available:
        raise InputError(f"{folder}/config.json describes a model of {parameters:,} parameters ({needed / 2**30:.1f} "
                           f"GiB in float32), more than this machine's {available / 2**30:.1f} GiB of memory")


def check_tokenizer_record(folder: str | Path) -> None:
    """A folder's ``tokenizer.model`` must be the one its ``odegpt_tokenizer.json`` records (same fingerprint)."""
    from data_pipeline.tokenizer import MODEL_FILE, TokenizerInfo, tokenizer_fingerprint

    if not (Path(folder) / "odegpt_tokenizer.json").is_file() or not (Path(folder) / MODEL_FILE).is_file():
        return
    try:
        recorded = TokenizerInfo.load(folder).fingerprint
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _one_line("tokenizer record", folder, error) from None
    if tokenizer_fingerprint(folder) != recorded:
        raise InputError(f"{folder}/{MODEL_FILE} is not the tokenizer its odegpt_tokenizer.json records (fingerprint "
                           f"{tokenizer_fingerprint(folder)[:12]}..., recorded {recorded[:12]}...): swapped or "
                           f"damaged; copy the tokenizer the model was trained with into the folder")


def _one_line(what: str, folder: str | Path, error: BaseException) -> InputError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return InputError(f"cannot load the {what} of {folder}: {reason}")


def load_config(folder: str | Path, expect: str | None = None, solver: str | None = None) -> PretrainedConfig:
    """The configuration of ``folder`` (no weights read); ``expect="odegpt"`` refuses a Llama folder; ``solver``
    (``--solver``) replaces a native model's solver method for this run."""
    fields = _config_json(folder)
    model_type = model_type_of(folder, fields)
    if expect is not None and model_type != expect:
        raise InputError(f"--model: {folder} holds a {model_type!r} model; this needs a native odegpt folder "
                           f"(odegpt convert, or odegpt export without --unroll)")
    if solver is not None and model_type != "odegpt":
        raise InputError(f"--solver applies to native odegpt models; {folder} is {model_type!r} (an unrolled "
                           f"export has its solver baked in)")
    config_class, _ = MODEL_CLASSES[model_type]
    for field in REQUIRED_FIELDS[model_type]:
        if field not in fields:
            raise InputError(f"{folder}/config.json has no {field}, which fixes the shape of the model's weights "
                               f"(a default would give them another shape)")
    if model_type == "odegpt" and "segments" not in fields:
        raise InputError(f"{folder}/config.json has no segments: an odegpt model's depth and sharing are not "
                           f"optional (the default would give these weights another model's shape)")
    try:
        config = config_class.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise _one_line("configuration", folder, error) from None
    check_bounds(folder, config)
    if solver is not None:
        try:
            config.solver = solver_method(solver).name
        except ValueError as error:
            raise InputError(f"--solver: {error}") from None
    return config


# The config.json fields that fix the shape of a model's weights; each class has a default for them, which would
# build a model of another shape and fail on its weights with a message about sizes.
REQUIRED_FIELDS = {"odegpt": ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"),
                   "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                             "num_hidden_layers")}


def _unreadable_weight_file(folder: str | Path) -> str:
    """Which of ``folder``'s safetensors files cannot be read, and why (asked once a load failed on one)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except SafetensorError as error:
            return f"{path.name} is not a readable safetensors file ({error})"
    return "a weight file is not a readable safetensors file"


def load_model(folder: str | Path, config: PretrainedConfig | None = None) -> PreTrainedModel:
    """The model of ``folder`` in eval mode, its weights as stored and checked finite; an odegpt model with its
    decoders as ``model.generate`` (``odegpt.decoding``), as transformers gives a native folder's."""
    config = load_config(folder) if config is None else config
    _, model_class = MODEL_CLASSES[config.model_type]
    try:
        with quiet_transformers():  # tensors of another shape are reported (below), not an error in transformers
            model, loading = model_class.from_pretrained(folder, config=config, trust_remote_code=False,
                                                         ignore_mismatched_sizes=True, output_loading_info=True)
    except SafetensorError:
        raise InputError(f"cannot load the model of {folder}: {_unreadable_weight_file(folder)}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise _one_line("model", folder, error) from None
    mismatched = sorted(loading.get("mismatched_keys") or [], key=str)  # (name, stored shape, model's shape)
    if mismatched:
        name, stored, expected = mismatched[0]
        raise InputError(f"cannot load the model of {folder}: {name} has shape {list(stored)}, the model's is "
                           f"{list(expected)} (config.json and the weights disagree)")
    for kind in ("missing_keys", "unexpected_keys"):
        if loading.get(kind):
            names = sorted(map(str, loading[kind]))
            raise InputError(f"cannot load the model of {folder}: {len(names)} {kind.replace('_', ' ')} for a "
                               f"{config.model_type!r} model, e.g. {', '.join(names[:3])}; the weights do not "
                               f"belong to this config.json")
    try:
        check_finite_weights(model.named_parameters(), folder)  # as stored, before any cast
    except ValueError as error:  # names the folder and the tensor already
        raise InputError(str(error)) from None
    if config.model_type == OdeGPTConfig.model_type:
        with_decoders(model)
    return model.eval()


def load_tokenizer(folder: str | Path, vocab_size: int | None = None, padding_side: str | None = None):
    """The Hugging Face tokenizer saved in ``folder`` (never the folder's own tokenizer code), checked against
    odegpt's record of it when the folder has one, and against the model's ``vocab_size`` when given: a larger
    tokenizer's ids would index past the embedding. With ``padding_side`` it pads on that side, with its EOS
    token when it has no padding token of its own."""
    from data_pipeline.tokenizer import check_tokenizer_files

    check_tokenizer_record(folder)
    try:
        check_tokenizer_files(folder)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as error:  # transformers and tokenizers raise many kinds on a bad file
        raise _one_line("tokenizer", folder, error) from None
    check_vocabulary(len(tokenizer), vocab_size, f"the tokenizer of {folder}")
    if padding_side is not None:
        tokenizer.padding_side = padding_side
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizer_folder(folder: str | Path, vocab_size: int | None = None) -> None:
    """Before any work: the tokenizer ``folder`` holds, when it holds one (odegpt's or a Hugging Face one), loads as
    :func:`load_tokenizer` loads it (its files parse, odegpt's record matches it, it fits ``vocab_size``); a one-line
    InputError otherwise."""
    from data_pipeline.folder_kinds import TOKENIZER_ENTRIES
    from data_pipeline.tokenizer import has_tokenizer

    if has_tokenizer(folder) or any((Path(folder) / name).is_file() for name in TOKENIZER_ENTRIES):
        load_tokenizer(folder, vocab_size)  # a tokenizer file alone (a config without its tokenizer) is one too


WEIGHT_FILES = ("*.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def check_model_folder(folder: str | Path) -> None:
    """A model folder holds config.json with a model_type, weights and a tokenizer; say what is missing, and where
    the model of a training run is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    has_weights = any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES)
    if not model_type or not has_weights:
        missing = "config.json with a model_type" if not model_type else "weights (*.safetensors)"
        hint = ""
        if (folder / "model" / "config.json").is_file():
            hint = f"; did you mean {folder / 'model'}?"
        elif (folder / "checkpoints").is_dir():
            hint = (f"; it looks like a training run: write its model with "
                    f"`odegpt convert --checkpoint {folder / 'checkpoints'} --output {folder / 'model'}`")
        raise InputError(f"{folder} is not a model folder (no {missing}){hint}")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise InputError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model): copy the tokenizer "
                         f"files of the corpus it was trained on into it")


def check_vocabulary(tokens: int, vocab_size: int | None, what: str) -> None:
    """Refuse token ids the model has no embedding for: ``what`` has ``tokens`` ids, the model ``vocab_size``."""
    if vocab_size is not None and tokens > vocab_size:
        raise InputError(f"{what} has {tokens:,} tokens, more than the model's vocabulary of {vocab_size:,} "
                           f"(config.json vocab_size): it is not the tokenizer the model was trained with")
