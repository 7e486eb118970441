"""The one error a configuration raises."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""
