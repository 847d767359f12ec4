"""The pictures of a model that ``fastvae train`` and ``fastvae plot`` write, chosen for MNIST:
reconstructions, prior samples, the latent map, interpolations between pairs of digits, the
decoded latent plane when it is 2-D, and the loss curve when there is a history.

Drawing is not done here: images.py makes the grids and plots.py the figures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import plots
from .images import image_grid, reconstructions, save_png

if TYPE_CHECKING:
    from .model import VAE

__all__ = ["write_pictures"]

# MNIST digit pairs for the interpolation rows (the first test images of each digit).
_DIGIT_PAIRS = ((1, 7), (3, 8), (4, 9), (0, 6), (2, 5), (5, 3), (7, 2), (9, 0))


def _pair_indices(labels: NDArray[Any] | None, n: int, count: int = 8) -> list[tuple[int, int]]:
    """Rows of the data to interpolate between: distinct images of the digits in _DIGIT_PAIRS when
    labels are given and hold them, else consecutive images."""
    if labels is not None:
        queues: dict[Any, list[int]] = {}
        for i, c in enumerate(labels.tolist()):
            queues.setdefault(c, []).append(i)
        chosen = []
        for a, b in _DIGIT_PAIRS:
            qa, qb = queues.get(a, []), queues.get(b, [])
            if qa and qb:
                chosen.append((qa.pop(0), qb.pop(0)))
        if len(chosen) >= 2:
            return chosen[:count]
    m = min(count, n // 2)
    return [(2 * i, 2 * i + 1) for i in range(m)]


def write_pictures(
    vae: VAE,
    x: NDArray[np.floating],
    labels: ArrayLike | None,
    folder: str | os.PathLike[str],
    seed: int = 0,
) -> list[str]:
    """Write every picture of a model into ``folder``; returns the file names written.

    From the images ``x`` (typically the test set) and their ``labels``: reconstructions.png
    (first 40 images over their reconstructions), samples.png (64 draws from the prior,
    ``seed``), latent_map.png (the latent means of all of x), interpolations.png, and
    manifold.png when latent_dim == 2; loss_curve.png when the model has a training history.
    """
    out = Path(folder)
    lab = None if labels is None else np.asarray(labels)
    written = []

    cols = min(10, len(x))
    shown = x[: 4 * cols] if len(x) >= 4 * cols else x[: max(cols, (len(x) // cols) * cols)]
    save_png(reconstructions(shown, vae.reconstruct(shown), cols), out / "reconstructions.png")
    written.append("reconstructions.png")

    save_png(image_grid(vae.sample(64, seed=seed), 8, 8), out / "samples.png")
    written.append("samples.png")

    mu = vae.transform(x)
    plots.latent_map(mu, lab, out / "latent_map.png")
    written.append("latent_map.png")

    idx = _pair_indices(lab, len(x))
    if idx:
        pairs = np.stack([np.stack([x[a], x[b]]) for a, b in idx])
        pair_labels = None if lab is None else np.array([[lab[a], lab[b]] for a, b in idx])
        plots.interpolations(vae, pairs, out / "interpolations.png", labels=pair_labels)
        written.append("interpolations.png")

    if mu.shape[1] == 2:
        plots.manifold(vae, out / "manifold.png")
        written.append("manifold.png")

    history = getattr(vae, "history_", None)
    if history and history.get("epoch"):
        plots.loss_curve(history, out / "loss_curve.png")
        written.append("loss_curve.png")
    return written
