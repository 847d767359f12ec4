"""Shared fixtures: MNIST, the one place the tests find it ($FASTVAE_DATA, else
../shared/data/mnist beside the repository). A test that needs it fails, never skips, when the
files are missing, so a run without the data cannot pass by leaving those tests out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

MNIST_DIR = Path(
    os.environ.get("FASTVAE_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
)
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder holding the four MNIST .gz files."""
    missing = [name for name in MNIST_FILES if not (MNIST_DIR / name).is_file()]
    if missing:
        pytest.fail(
            f"MNIST not found: {MNIST_DIR} lacks {', '.join(missing)}. Set FASTVAE_DATA to a "
            "folder holding the four MNIST .gz files.",
            pytrace=False,
        )
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path) -> dict[str, np.ndarray]:
    """MNIST as load_mnist gives it: x, y (training set) and x_test, y_test. Shared by every
    test of the session, so never write into these arrays."""
    from fastvae.datasets import load_mnist

    x, y = load_mnist("train", root=mnist_dir, download=False)
    xt, yt = load_mnist("test", root=mnist_dir, download=False)
    return {"x": x, "y": y, "x_test": xt, "y_test": yt}
