"""fastvae: variational autoencoders trained fast on the CPU.

The numerics (forward and backward passes, sampling, loss, Adam) run in a multithreaded Rust
core, ``fastvae._core``; this package holds the estimator API, data loading, pictures and the
command line.
"""

from __future__ import annotations

from . import datasets
from ._core import __version__
from .errors import CheckpointError, ConfigError, DataError, FastVAEError, InputError
from .model import VAE

__all__ = [
    "VAE",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FastVAEError",
    "InputError",
    "__version__",
    "datasets",
]
