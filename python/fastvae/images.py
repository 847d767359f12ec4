"""Image grids of square images (MNIST digits) as grayscale Pillow pictures, and writing
them as PNG files. A picture is written to a temporary file beside its name and renamed, so a
viewer never sees a half-written one.

Not the plots with axes, titles and legends (plots.py, matplotlib) nor the set of pictures
``fastvae train`` writes (pictures.py).
"""

from __future__ import annotations

import os

import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image

from ._files import atomic_write

__all__ = ["PAD_GRAY", "grid_canvas", "grid_shape", "image_grid", "reconstructions", "save_png"]

# Gray of the padding between cells, and of the strips that separate blocks of a grid.
PAD_GRAY = 0.5


def square_side(width: int) -> int:
    """The side of the square images whose rows hold `width` values (28 for 784)."""
    side = int(round(width**0.5))
    if side * side != width:
        raise ValueError(f"cannot show rows of {width} values as square images")
    return side


def grid_canvas(images: ArrayLike, rows: int, cols: int, pad: int) -> NDArray[np.float32]:
    """rows x cols square images from an (n, side*side) array, as one float32 array."""
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"images must be 2-D (n, side*side), got shape {arr.shape}")
    side = square_side(arr.shape[1])
    cell = side + pad
    out = np.full((rows * cell + pad, cols * cell + pad), PAD_GRAY, dtype=np.float32)
    for k in range(min(len(arr), rows * cols)):
        r, c = divmod(k, cols)
        y, x = pad + r * cell, pad + c * cell
        out[y : y + side, x : x + side] = arr[k].reshape(side, side)
    return np.clip(out, 0.0, 1.0)


def image_grid(
    images: NDArray[np.floating], rows: int, cols: int, scale: int = 2, pad: int = 2
) -> Image.Image:
    """A grayscale grid of rows x cols square images from an (n, side*side) array in [0, 1]."""
    grid = grid_canvas(images, rows, cols, pad)
    pixels = (grid * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(pixels)  # uint8 (H, W): grayscale "L"
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of a square-ish grid for n images: cols = ceil(sqrt(n))."""
    if n <= 0:
        raise ValueError(f"need at least one image, got {n}")
    cols = int(np.ceil(np.sqrt(n)))
    return -(-n // cols), cols


def save_png(img: Image.Image, path: str | os.PathLike[str]) -> None:
    """Write a Pillow image as PNG, atomically."""
    atomic_write(path, lambda f: img.save(f, format="PNG"))


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
