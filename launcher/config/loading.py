"""Reading a run config: YAML files composed in order, ``--set`` overrides, typing by pydantic.

A run is built from YAML files (each may list ``defaults:`` — other files, relative to itself, merged first),
merged left to right, then ``--set section.key=value`` overrides (values parsed as YAML). The tree is then
typed against the schema (:mod:`.schema`) by pydantic, strictly except for the spellings YAML users write (an
integral float for an int, ``"3e-4"`` for a float), and validated (:mod:`.validation`). Every mistake is a
:class:`ConfigError` of one line naming the file or the key.

Inputs are bounded (:mod:`.limits`): a file's size, the nodes its YAML aliases expand to, and the copying its
``defaults:`` cause; each file is read once per composition however often it is listed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, one_line, shown
from .limits import MAX_CONFIG_NODES, MAX_MERGED_NODES, read_limited
from .schema import RunConfig, model_section
from .trees import merge, tree_size
from .validation import RESUMABLE_MODEL_FIELDS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

# Keys renamed since configs were first written: named in the error instead of "unknown key".
RENAMED = {"train": {"step_size": "step_size_distribution"}}


# ---- the command line ---------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser, default: list[str] | None = None,
                         configs: bool = True) -> None:
    """``--config A B ...`` (required unless there is a ``default``; left out with ``configs=False``) and
    repeatable ``--set KEY=VALUE``: how every command that runs or plans a run takes its config."""
    if configs:
        parser.add_argument("--config", nargs="+", required=default is None, default=default, metavar="YAML",
                            help="config files merged in order: paths, or names under configs/ (e.g. quickstart, "
                                 "or model/125m-shared train/pretrain deepspeed/zero2)"
                                 + (f" (default: {' '.join(default)})" if default else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key after merging, e.g. --set train.lr=3e-4 (repeatable; the value "
                             "is parsed as YAML)")
    parser.add_argument("--deepspeed-config", dest="overrides", action=_DeepSpeedConfigFile, metavar="JSON",
                        help="a DeepSpeed config file (ds_config.json) merged into the generated DeepSpeed config; "
                             "keys odegpt derives from its own settings win, with a message "
                             "(= --set deepspeed.config_file=JSON)")


class _DeepSpeedConfigFile(argparse.Action):
    """``--deepspeed-config FILE`` as the override ``deepspeed.config_file=<absolute FILE>`` (in order with --set)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        overrides = list(getattr(namespace, self.dest, None) or [])
        overrides.append(f"deepspeed.config_file={json.dumps(str(Path(value).resolve()))}")
        setattr(namespace, self.dest, overrides)


# ---- YAML, bounded ------------------------------------------------------------------------------

class _ExpansionTooLarge(Exception):
    """A YAML document whose aliases expand beyond :data:`MAX_CONFIG_NODES` nodes, or refer to themselves."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``3e-4`` and ``1e6`` are numbers (YAML 1.2 and most users
    agree; PyYAML alone wants ``3.0e-4``), and that a document whose aliases expand to more than
    :data:`MAX_CONFIG_NODES` nodes is refused before any Python object is built from it."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        expanded_size(node, MAX_CONFIG_NODES)
        return node


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes in the document under ``root`` with every alias expanded (an alias counts its anchor's whole
    subtree each time it is used), computed once per distinct node. Raises :class:`_ExpansionTooLarge` past
    ``limit`` or on an alias inside its own anchor (a recursive document)."""
    sizes: dict[int, int] = {}
    expanding: set[int] = set()  # the nodes on the path from the root to the current one
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            expanding.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[id(node)] > limit:
                raise _ExpansionTooLarge(f"its aliases expand to more than {limit:,} YAML nodes, the most a config "
                                         f"may hold (an alias bomb?)")
            continue
        if id(node) in sizes:
            continue
        expanding.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            if id(child) in expanding:
                raise _ExpansionTooLarge("an alias refers to the node that holds it (a recursive document)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def parse_yaml(text: str, where: str) -> Any:
    """YAML (see :class:`_Loader`), with a syntax error or an oversized document as one line naming ``where``
    (and for a syntax error the line and the column)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML: {problem}{position}") from None
    except _ExpansionTooLarge as error:
        raise ConfigError(f"{where}: {error}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read") from None


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, else relative to the repository's ``configs/`` (``.yaml`` optional)."""
    candidates = [Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"config file {str(name)!r} not found (also looked in {CONFIG_DIR})")


def read_config_file(path: Path) -> dict:
    """One YAML file as it is written (``defaults:`` not yet merged), bounded in bytes and nodes."""
    try:
        data = parse_yaml(read_limited(path, "config file").decode("utf-8"), str(path)) or {}
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


# ---- composing files ----------------------------------------------------------------------------

@dataclass
class Composition:
    """The files of one config, each read once (by resolved path) however often ``defaults:`` lists it, and
    the copying that merging them takes counted against :data:`MAX_MERGED_NODES`."""

    loaded: dict[Path, dict] = field(default_factory=dict)
    copied_nodes: int = 0

    def load(self, name: str | Path, including: tuple[Path, ...] = ()) -> dict:
        """The file ``name`` with its ``defaults:`` merged underneath it (``including``: the files on the way)."""
        path = resolve_config_path(name)
        if path in including:
            raise ConfigError(f"config {path} includes itself through defaults: {' -> '.join(map(str, including))}")
        if path not in self.loaded:
            self.loaded[path] = self._compose(path, including + (path,))
        return self.loaded[path]

    def _compose(self, path: Path, including: tuple[Path, ...]) -> dict:
        data = read_config_file(path)
        defaults = data.pop("defaults", None) or []
        if not isinstance(defaults, list) or not all(isinstance(include, str) for include in defaults):
            raise ConfigError(f"{path}: defaults must be a list of config files, got {shown(defaults)}")
        merged: dict = {}
        for include in defaults:
            include_path = path.parent / include
            merged = self.merge(merged, self.load(include_path if include_path.is_file() else include, including),
                                path)
        return self.merge(merged, data, path)

    def merge(self, base: dict, override: dict, where: Path | str) -> dict:
        """:func:`.trees.merge`, counting the nodes it copies."""
        self.copied_nodes += tree_size(base) + tree_size(override)
        if self.copied_nodes > MAX_MERGED_NODES:
            raise ConfigError(f"config {where}: merging its defaults copies more than {MAX_MERGED_NODES:,} nodes "
                              f"(a file listed many times?)")
        return merge(base, override)


def load_yaml(path: str | Path) -> dict:
    """One YAML file with its ``defaults:`` merged underneath it."""
    return Composition().load(path)


def apply_override(tree: dict, assignment: str) -> dict:
    """Apply one ``section.key=value`` (value parsed as YAML) to a raw config tree."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {shown(assignment)}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"--set expects section.key=value, got {shown(assignment)}")
    value = parse_yaml(raw, f"--set {one_line(assignment, 200)}: the value") if raw.strip() else None
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value
    return tree


def load_config(paths: list[str] | tuple = (), overrides: list[str] | tuple = (),
                world_size: int | None = None) -> RunConfig:
    """Compose ``paths`` in order, apply ``overrides``, validate; the one way runs get their config."""
    composition = Composition()
    tree: dict = {}
    for path in paths:
        tree = composition.merge(tree, composition.load(path), path)
    for assignment in overrides:
        tree = apply_override(tree, assignment)
    return build_config(tree).validate(world_size)


# ---- typing -------------------------------------------------------------------------------------

def build_config(tree: dict) -> RunConfig:
    """Typed ``RunConfig`` from a raw tree; unknown keys and wrong types are errors."""
    init_from = (tree.get("train") or {}).get("init_from") if isinstance(tree.get("train"), dict) else None
    if init_from is not None:
        tree = {**tree, "model": model_from_folder(str(init_from), tree.get("model") or {})}
    return typed_config(tree)


def model_from_folder(folder: str, configured: dict) -> dict:
    """The ``model`` section of a run that starts from ``folder`` (``train.init_from``): the folder's, with the
    settings that do not change the weights (step size, solver limit, special ids) as ``configured`` says; any
    other ``model.`` key the config sets must agree with the folder."""
    from odegpt.model.configuration_odegpt import OdeGPTConfig  # transformers: not for `odegpt --help`

    path = Path(folder) / "config.json"
    try:
        saved = json.loads(read_limited(path, "train.init_from:"))
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        raise ConfigError(f"train.init_from: cannot read {path}: {error}") from None
    if not isinstance(saved, dict) or saved.get("model_type") != OdeGPTConfig.model_type:
        kind = saved.get("model_type") if isinstance(saved, dict) else None
        raise ConfigError(f"train.init_from: {folder} holds a {kind!r} model, not an odegpt one; "
                          f"import it first (odegpt import --model {folder} --output DIR)")
    names = [setting.name for setting in dataclasses.fields(model_section())]
    try:
        folder_model = OdeGPTConfig(**{k: v for k, v in saved.items() if k in names})
        merged = OdeGPTConfig(**{**{k: v for k, v in saved.items() if k in names}, **configured})
    except (ValueError, TypeError) as error:
        raise ConfigError(f"train.init_from {folder}: {error}") from None
    differing = [f"model.{name} is {shown(getattr(merged, name))} in the config but "
                 f"{shown(getattr(folder_model, name))} in {folder}" for name in configured
                 if name in names and name not in RESUMABLE_MODEL_FIELDS
                 and getattr(merged, name) != getattr(folder_model, name)]
    if differing:
        raise ConfigError(f"train.init_from: {'; '.join(differing)}: the shape comes from the folder; remove those "
                          f"keys from the config or make them agree")
    return {name: getattr(merged, name) for name in names}


def typed_config(tree: dict) -> RunConfig:
    """``tree`` typed against the schema by pydantic; its errors as one line naming the key."""
    import pydantic  # 0.2 s with the adapter: not for `odegpt --help`

    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping, got {shown(tree)}")
    tree = {name: {} if value is None else value for name, value in tree.items()}  # an empty section: `train:`
    _refuse_renamed_keys(tree)
    try:
        typed = _config_adapter().validate_python(tree)
    except pydantic.ValidationError as error:
        raise ConfigError(_first_problem(error.errors(include_url=False), tree)) from None
    sections = section_types()
    return RunConfig(**{name: sections[name](**values) for name, values in typed.items()})


@functools.cache
def section_types() -> dict[str, type]:
    """Each section's dataclass by name, the ``model`` section built from ``OdeGPTConfig``'s signature."""
    hints = typing.get_type_hints(RunConfig)
    return {setting.name: setting.metadata["section"]() if "section" in setting.metadata else hints[setting.name]
            for setting in dataclasses.fields(RunConfig)}


@functools.cache
def _config_adapter():
    """A pydantic ``TypeAdapter`` of the whole tree: a ``TypedDict`` per section mirroring its dataclass's
    fields (all optional: the dataclass fills the defaults), strict, unknown keys forbidden."""
    import pydantic  # 0.2 s with the adapter: not for `odegpt --help`
    from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before Python 3.12

    strict = pydantic.with_config(pydantic.ConfigDict(strict=True, extra="forbid"))
    sections = {}
    for name, section in section_types().items():
        hints = typing.get_type_hints(section)
        fields = {setting.name: _pydantic_type(hints[setting.name]) for setting in dataclasses.fields(section)}
        sections[name] = strict(TypedDict(f"{section.__name__}Keys", fields, total=False))
    return pydantic.TypeAdapter(strict(TypedDict("RunConfigKeys", sections, total=False)))


def _pydantic_type(hint: Any) -> Any:
    """``hint`` for pydantic's strict mode, admitting what YAML users write: an integral float for an int
    (``1e6``), a numeric string for a float (``"3e-4"`` from a config.json, PyYAML's own ``3e-4``)."""
    from pydantic import BeforeValidator  # 0.1 s: not for `odegpt --help`

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, [_pydantic_type(option) for option in typing.get_args(hint)])
    if origin in (list, dict):
        return origin[tuple(_pydantic_type(argument) for argument in typing.get_args(hint))]
    if hint is int:
        return typing.Annotated[int, BeforeValidator(_integral_float_as_int)]
    if hint is float:
        return typing.Annotated[float, BeforeValidator(_numeric_string_as_float)]
    return hint


def _integral_float_as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _numeric_string_as_float(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _refuse_renamed_keys(tree: dict) -> None:
    for section, renamed in RENAMED.items():
        keys = tree.get(section)
        for old, new in renamed.items():
            if isinstance(keys, dict) and old in keys:
                raise ConfigError(f"{section}.{old} is now {section}.{new}; rename it in your config")


def _first_problem(errors: list[dict], tree: dict) -> str:
    """pydantic's errors as the one line a user reads: the unknown keys of a level (with the valid ones), or
    the first setting of the wrong type (with the type it must have and the value it has)."""
    sections = section_types()
    unknown = [error["loc"][0] for error in errors if error["type"] == "extra_forbidden" and len(error["loc"]) == 1]
    if unknown:
        return _unknown_keys("", unknown, sections)
    for section, values in tree.items():
        found = [error for error in errors if error["loc"][:1] == (section,)]
        if not found:
            continue
        if len(found[0]["loc"]) == 1:
            return f"{section} must be a mapping, got {shown(values)}"
        unknown = [error["loc"][1] for error in found if error["type"] == "extra_forbidden" and len(error["loc"]) == 2]
        if unknown:
            return _unknown_keys(section, unknown, [setting.name for setting in dataclasses.fields(sections[section])])
        key = found[0]["loc"][1]
        value = values[key]
        hint = typing.get_type_hints(sections[section])[key]
        return f"{section}.{key} must be {type_name(hint)}, got {shown(value)} ({type(value).__name__})"
    first = errors[0]  # not expected: every error lies under a section of the tree
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


def _unknown_keys(section: str, unknown: list[str], valid: typing.Iterable[str]) -> str:
    keys = ", ".join(repr(f"{section}.{key}" if section else key) for key in sorted(map(str, unknown)))
    place = f"section {section!r}" if section else "the top level"
    return f"unknown key(s) {keys} in {place}; valid keys: {', '.join(sorted(valid))}"


def type_name(hint: Any) -> str:
    """A type hint as an error says it: ``int``, ``list[dict] or str or null``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        names = [type_name(option) for option in options if option is not type(None)]
        return " or ".join(names + (["null"] if type(None) in options else []))
    if origin is not None:
        return str(hint)
    return getattr(hint, "__name__", str(hint))
