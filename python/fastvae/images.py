"""Image grids of images stored as rows (MNIST digits, or any images of h x w pixels, grayscale
or RGB) as Pillow pictures, and writing them as PNG files. A picture is written to a temporary
file beside its name and renamed, so a viewer never sees a half-written one.

Not the plots with axes, titles and legends (plots.py, matplotlib) nor the set of pictures
``fastvae train`` writes (pictures.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from PIL import Image

from ._files import atomic_write

__all__ = [
    "PAD_GRAY",
    "display_scale",
    "grid_canvas",
    "grid_shape",
    "image_grid",
    "image_shape",
    "reconstructions",
    "save_png",
]

# Gray of the padding between cells, and of the strips that separate blocks of a grid.
PAD_GRAY = 0.5


def square_side(width: int) -> int:
    """The side of the square images whose rows hold `width` values (28 for 784)."""
    side = int(round(width**0.5))
    if side * side != width:
        raise ValueError(f"cannot show rows of {width} values as square images")
    return side


def image_shape(width: int, shape: Sequence[int] | None = None) -> tuple[int, int, int]:
    """(h, w, c) of the images whose rows hold `width` values.

    ``shape`` is (h, w) or (h, w, c) with c = 1 (grayscale) or 3 (RGB, each row holding
    pixels channels last), checked against `width`; None means square grayscale images.
    """
    if shape is None:
        side = square_side(width)
        return side, side, 1
    dims = tuple(int(v) for v in shape)
    if len(dims) == 2:
        dims = (*dims, 1)
    if len(dims) != 3 or dims[2] not in (1, 3) or min(dims) <= 0:
        raise ValueError(f"image shape must be (h, w) or (h, w, c) with c = 1 or 3, got {shape}")
    h, w, c = dims
    if h * w * c != width:
        raise ValueError(f"rows of {width} values are not images of shape {dims}")
    return h, w, c


def display_scale(shape: Sequence[int]) -> int:
    """Screen pixels per image pixel for showing images of this (h, w[, c]): about 56 pixels
    a side (MNIST's 28 at 2x), never less than 1x."""
    return max(1, 56 // max(int(shape[0]), int(shape[1])))


def grid_canvas(
    images: ArrayLike, rows: int, cols: int, pad: int, shape: Sequence[int] | None = None
) -> NDArray[np.float32]:
    """rows x cols images from an (n, h*w*c) array, as one float32 array in [0, 1]: (H, W)
    for grayscale, (H, W, 3) for RGB. ``shape`` as for :func:`image_shape`."""
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"images must be 2-D (n, h*w*c), got shape {arr.shape}")
    h, w, c = image_shape(arr.shape[1], shape)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), PAD_GRAY, np.float32)
    for k in range(min(len(arr), rows * cols)):
        r, col = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y : y + h, x : x + w] = arr[k].reshape(h, w, c)
    return np.clip(out if c == 3 else out[..., 0], 0.0, 1.0)


def image_grid(
    images: NDArray[np.floating],
    rows: int,
    cols: int,
    scale: int = 2,
    pad: int = 2,
    shape: Sequence[int] | None = None,
) -> Image.Image:
    """A grid of rows x cols images from an (n, h*w*c) array in [0, 1]: a grayscale ("L")
    picture, or "RGB" for colour images. ``shape`` as for :func:`image_shape` (default:
    square grayscale)."""
    grid = grid_canvas(images, rows, cols, pad, shape)
    pixels = (grid * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(pixels)  # uint8 (H, W): "L"; (H, W, 3): "RGB"
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
    originals: NDArray[np.floating],
    recon: NDArray[np.floating],
    cols: int = 10,
    shape: Sequence[int] | None = None,
    scale: int = 2,
) -> Image.Image:
    """Pairs of rows: originals above their reconstructions."""
    n = (len(originals) // cols) * cols
    if n == 0:
        raise ValueError(f"need at least {cols} images")
    interleaved = []
    for start in range(0, n, cols):
        interleaved.append(originals[start : start + cols])
        interleaved.append(recon[start : start + cols])
    return image_grid(np.concatenate(interleaved), 2 * n // cols, cols, scale=scale, shape=shape)
