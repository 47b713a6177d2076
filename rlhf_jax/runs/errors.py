"""The error type of start-up checks, and dotted config lookups (spec §6.2 step 4: validate
before launching)."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value, flag or output location is invalid; the message names it."""


def config_value(config: Any, path: str) -> Any:
    """`config.a.b` for the dotted path "a.b" (KeyError or AttributeError when absent)."""
    node = config
    for key in path.split("."):
        node = node[key]
    return node
