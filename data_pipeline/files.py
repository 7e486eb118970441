"""Files that are either whole or absent, and digests that name their content.

Every package writes records a crash must not leave half-written (a corpus manifest, a
checkpoint's ``COMPLETE`` marker, a run's ``config.json``) and keys caches by the content of a
JSON-able description. Both live here, at the bottom of the import graph, so ``data_pipeline``,
``odegpt`` and ``launcher`` share one implementation.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import xxhash


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``:
    a reader (or a crash) sees the old file or the whole new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON, written with :func:`write_atomic`."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def json_digest(obj: Any) -> str:
    """xxh3-64 hex digest of ``obj`` as canonical JSON (sorted keys): equal descriptions, equal keys."""
    return xxhash.xxh3_64_hexdigest(json.dumps(obj, sort_keys=True).encode())
