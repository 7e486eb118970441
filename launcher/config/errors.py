"""The one error a configuration raises, and how a value is echoed in it.

Every message is one line of bounded length: a value a user wrote is shown through :func:`shown`, which cuts
long strings and large structures (the ``repr`` of a YAML alias bomb runs to gigabytes) without building
the whole ``repr`` first, and :class:`ConfigError` itself cuts whatever text reaches it from elsewhere.
"""
from __future__ import annotations

import reprlib
from typing import Any

MAX_MESSAGE_CHARS = 2000  # the longest message: the model section's key list is ~500 characters


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key, on one line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` with its line breaks as spaces, cut to ``limit`` characters (saying how much was cut)."""
    text = " ".join(str(text).split("\n"))
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... ({len(text) - limit:,} more characters)"


def _value_repr() -> reprlib.Repr:
    shortened = reprlib.Repr()
    shortened.maxlevel = 3
    shortened.maxtuple = shortened.maxlist = shortened.maxdict = shortened.maxset = shortened.maxfrozenset = 6
    shortened.maxstring = shortened.maxother = 60
    shortened.maxlong = 40
    return shortened


_SHOWN = _value_repr()
MAX_SHOWN_CHARS = 200


def shown(value: Any) -> str:
    """``repr(value)`` for an error message: six elements per container, three levels deep, at most 200
    characters. Built piece by piece (reprlib), so a huge value costs no more than a small one."""
    text = _SHOWN.repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS - 3] + "..."
