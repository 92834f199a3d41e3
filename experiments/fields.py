"""The one way experiment configs declare a field: its default and its documentation together.

`distgame config` prints every field's `metadata["help"]`; game/solver_config.py keeps its own twin
because game/ does not import experiments/.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def documented(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field with a default (or a default factory) and its help text."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


class ConfigError(ValueError):
    """A user mistake in a config file or override; the CLI prints it as one line."""
