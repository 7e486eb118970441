"""The run configuration: YAML files composed in order, ``--set`` overrides, strict typed validation.

- :mod:`.schema`: the sections (dataclasses), each key with its type, default and comment;
  docs/config.md is generated from it (:mod:`.reference`);
- :mod:`.loading`: YAML files with ``defaults:``, ``--set``, ``--deepspeed-config``, typing by pydantic;
- :mod:`.validation`: the checks, one function per section;
- :mod:`.deepspeed`: the DeepSpeed config generated from the run config and merged with the user's own;
- :mod:`.limits`: what a config may hold (bytes, YAML nodes), so a few bytes cannot cost gigabytes.

Every mistake is a :class:`ConfigError`: one line naming the key or the file.
"""
from .deepspeed import USER_DEFAULTS
from .errors import ConfigError
from .limits import MAX_CONFIG_BYTES, MAX_CONFIG_NODES
from .loading import (
    CONFIG_DIR,
    RENAMED,
    add_config_arguments,
    apply_override,
    build_config,
    load_config,
    load_yaml,
    model_from_folder,
    resolve_config_path,
)
from .schema import (
    CheckpointSection,
    DataSection,
    DeepSpeedSection,
    EvalSection,
    LoggingSection,
    RunConfig,
    RunSection,
    TrainSection,
    model_section,
)
from .trees import merge

__all__ = ["CONFIG_DIR", "MAX_CONFIG_BYTES", "MAX_CONFIG_NODES", "RENAMED", "USER_DEFAULTS", "CheckpointSection",
           "ConfigError", "DataSection", "DeepSpeedSection", "EvalSection", "LoggingSection", "RunConfig",
           "RunSection", "TrainSection", "add_config_arguments", "apply_override", "build_config", "load_config",
           "load_yaml", "merge", "model_from_folder", "model_section", "resolve_config_path"]
