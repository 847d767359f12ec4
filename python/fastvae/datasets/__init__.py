"""Datasets for fastvae: MNIST (mnist.py: find, verify, download), the IDX files it and
similar datasets are stored in (idx.py: read), your own data (files.py: .npy/.npz arrays, CSV
tables, folders of images; the held-out split and standardization), plus :func:`binarize`.
This package holds no model code; the binarization's draws are the core's.
"""

from __future__ import annotations

import numpy as np

from .. import _core
from ..errors import InputError
from .files import (
    OwnData,
    Standardizer,
    load_array,
    load_csv,
    load_data,
    load_image_folder,
    split_rows,
)
from .idx import load_idx_dataset, read_idx
from .mnist import load_mnist

__all__ = [
    "OwnData",
    "Standardizer",
    "binarize",
    "load_array",
    "load_csv",
    "load_data",
    "load_idx_dataset",
    "load_image_folder",
    "load_mnist",
    "read_idx",
    "split_rows",
]


def binarize(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """A fixed Bernoulli draw of intensities in [0, 1]: 1.0 with probability x, else 0.0.

    With the default seed this gives the same binarized set every time, for evaluating
    models trained with ``fit(..., binarize="dynamic")`` as papers do. The draws are the
    core's (keyed by seed and row), so they do not depend on the thread count.
    """
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise InputError(f"binarize expects floats in [0, 1], got dtype {arr.dtype}")
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.float32)
    rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim >= 1 else arr.reshape(1, 1)
    if rows.dtype not in (np.float32, np.float64):
        rows = rows.astype(np.float32)
    return _core.binarize(rows, seed).reshape(arr.shape)
