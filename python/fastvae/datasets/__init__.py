"""Datasets for fastvae: MNIST (mnist.py: find, verify, download) and the IDX files it and
similar datasets are stored in (idx.py: read), plus :func:`binarize`. This package holds no
model code; pure Python and NumPy.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .idx import load_idx_dataset, read_idx
from .mnist import load_mnist

__all__ = ["binarize", "load_idx_dataset", "load_mnist", "read_idx"]


def binarize(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """A fixed Bernoulli draw of intensities in [0, 1]: 1.0 with probability x, else 0.0.

    With the default seed this gives the same binarized set every time, for evaluating
    models trained with ``fit(..., binarize="dynamic")`` as papers do.
    """
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise InputError(f"binarize expects floats in [0, 1], got dtype {arr.dtype}")
    if arr.size and not (np.all(arr >= 0) and np.all(arr <= 1)):
        raise InputError("binarize expects values in [0, 1]")
    rng = np.random.default_rng(seed)
    return (rng.random(arr.shape, dtype=np.float32) < arr).astype(np.float32)
