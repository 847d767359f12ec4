"""Shared fixtures: where MNIST is (FASTVAE_DATA, else ../shared/data/mnist beside the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

MNIST_DIR = Path(
    os.environ.get("FASTVAE_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"MNIST not found in {MNIST_DIR}: set FASTVAE_DATA")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path) -> dict[str, np.ndarray]:
    from fastvae.datasets import load_mnist

    x, y = load_mnist("train", root=mnist_dir, download=False)
    xt, yt = load_mnist("test", root=mnist_dir, download=False)
    return {"x": x, "y": y, "x_test": xt, "y_test": yt}
