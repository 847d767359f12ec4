"""fastvae's exceptions. Every error fastvae raises on purpose derives from
:class:`FastVAEError`, itself a :class:`ValueError`, so callers can catch either.

The classes are defined in the compiled core (so Rust errors map onto them directly) and
re-exported here. A diverging training run raises the built-in :class:`FloatingPointError`.
"""

from __future__ import annotations

from ._core import CheckpointError, ConfigError, DataError, FastVAEError, InputError

__all__ = ["CheckpointError", "ConfigError", "DataError", "FastVAEError", "InputError"]
