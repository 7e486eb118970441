"""Raw config trees (nested dicts and lists, as YAML and JSON give them): merging and measuring."""
from __future__ import annotations

import copy
from typing import Any


def merge(base: dict, override: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else (lists included) is replaced."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def set_path(tree: dict, path: str, value: Any) -> None:
    """Set the dotted key ``path`` (its parents exist) to a copy of ``value``."""
    *parents, last = path.split(".")
    for key in parents:
        tree = tree[key]
    tree[last] = copy.deepcopy(value)


def tree_size(tree: Any) -> int:
    """Nodes in ``tree`` as a copy of it would hold them: every container and leaf, keys included."""
    if isinstance(tree, dict):
        return 1 + sum(1 + tree_size(value) for value in tree.values())
    if isinstance(tree, list):
        return 1 + sum(tree_size(value) for value in tree)
    return 1
