"""How much a configuration may hold: a few bytes of YAML must not turn into gigabytes of work.

The presets are about 1 KB and 100 YAML nodes each; the limits leave a thousand times that. A YAML alias is
counted every time it is used (as the composed document holds it), so an alias bomb — each list repeating the
previous one nine times — is refused while it is still a few hundred bytes.
"""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a config file (YAML, or a DeepSpeed config's JSON)
MAX_CONFIG_NODES = 100_000  # YAML nodes one file or one --set value may expand to, aliases counted at each use
MAX_MERGED_NODES = 1_000_000  # nodes one composition may copy while merging files (defaults: listed many times)


def read_limited(path: str | Path, what: str) -> bytes:
    """The bytes of ``path``, refused in one line naming ``what`` and the file when over
    :data:`MAX_CONFIG_BYTES` (read no further than that). OSError as ``open`` raises it."""
    with open(path, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_CONFIG_BYTES:,} bytes, the most a config may hold")
    return data
