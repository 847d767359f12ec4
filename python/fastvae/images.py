"""Pictures of what a model learned, as PNG files: image grids with Pillow, plots with
matplotlib. Every file is written to a temporary name and renamed, so a viewer never sees a
half-written picture."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

__all__ = ["image_grid", "save_png", "save_figure", "loss_curve"]


def _square_side(width: int) -> int:
    side = int(round(width**0.5))
    if side * side != width:
        raise ValueError(f"cannot show rows of {width} values as square images")
    return side


def image_grid(
    images: NDArray[np.floating], rows: int, cols: int, scale: int = 2, pad: int = 2
) -> Image.Image:
    """A grayscale grid of rows x cols square images from an (n, side*side) array in [0, 1]."""
    images = np.asarray(images, dtype=np.float32)
    side = _square_side(images.shape[1])
    cell = side + pad
    canvas = np.full((rows * cell + pad, cols * cell + pad), 0.5, dtype=np.float32)
    for k in range(min(len(images), rows * cols)):
        r, c = divmod(k, cols)
        y, x = pad + r * cell, pad + c * cell
        canvas[y : y + side, x : x + side] = images[k].reshape(side, side)
    pixels = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(pixels)  # uint8 (H, W): grayscale "L"
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def _atomic(path: str | os.PathLike[str], write: Any) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_png(img: Image.Image, path: str | os.PathLike[str]) -> None:
    """Write a Pillow image as PNG, atomically."""
    _atomic(path, lambda f: img.save(f, format="PNG"))


def save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    try:
        _atomic(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def reconstructions(
    originals: NDArray[np.floating], recon: NDArray[np.floating], cols: int = 10
) -> Image.Image:
    """Pairs of rows: originals above their reconstructions."""
    n = (len(originals) // cols) * cols
    if n == 0:
        raise ValueError(f"need at least {cols} images")
    interleaved = []
    for start in range(0, n, cols):
        interleaved.append(originals[start : start + cols])
        interleaved.append(recon[start : start + cols])
    return image_grid(np.concatenate(interleaved), 2 * n // cols, cols)


def loss_curve(history: Mapping[str, Sequence[Any]], path: str | os.PathLike[str]) -> None:
    """Train and validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = list(history["epoch"])
    ax.plot(epochs, history["train_loss"], marker="o", label="train")
    val = [(e, v) for e, v in zip(epochs, history["val_loss"], strict=True) if v is not None]
    if val:
        ax.plot([e for e, _ in val], [v for _, v in val], marker="o", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per example (nats): BCE + KL")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
