"""The pictures of a model that ``fastvae train`` and ``fastvae plot`` write.

For images (MNIST, or any images of h x w pixels, grayscale or RGB): reconstructions, prior
samples, the latent map, interpolations between pairs of images, the decoded latent plane when
it is 2-D, and the loss curve when there is a history. For tables: the loss curve, the latent
map and the reconstruction error of each feature (a CSV file and a bar chart).

Drawing is not done here: images.py makes the grids and plots.py the figures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import plots
from ._files import atomic_write
from .images import display_scale, image_grid, reconstructions, save_png
from .images import image_shape as shape_of

if TYPE_CHECKING:
    from .model import VAE

__all__ = ["FeatureErrors", "feature_errors", "write_pictures", "write_table_pictures"]

# MNIST digit pairs for the interpolation rows (the first test images of each digit).
_DIGIT_PAIRS = ((1, 7), (3, 8), (4, 9), (0, 6), (2, 5), (5, 3), (7, 2), (9, 0))

FEATURE_ERRORS_CSV = "feature_errors.csv"
FEATURE_ERRORS_PNG = "feature_errors.png"


def _pair_indices(labels: NDArray[Any] | None, n: int, count: int = 8) -> list[tuple[int, int]]:
    """Rows of the data to interpolate between: distinct images of the digits in _DIGIT_PAIRS
    when labels hold them; else, with labels of two classes or more, images of each class and
    the next; else consecutive images."""
    if labels is not None:
        queues = _queues(labels)
        chosen = []
        for a, b in _DIGIT_PAIRS:
            qa, qb = queues.get(a, []), queues.get(b, [])
            if qa and qb:
                chosen.append((qa.pop(0), qb.pop(0)))
        if len(chosen) >= 2:
            return chosen[:count]
        queues = _queues(labels)
        classes = sorted(queues)
        chosen = []
        # Each class towards the next, round after round, while both have unused images.
        while len(classes) >= 2 and len(chosen) < count:
            before = len(chosen)
            for k, a in enumerate(classes):
                qa, qb = queues[a], queues[classes[(k + 1) % len(classes)]]
                if len(chosen) < count and qa and qb:
                    chosen.append((qa.pop(0), qb.pop(0)))
            if len(chosen) == before:
                break
        if len(chosen) >= 2:
            return chosen
    m = min(count, n // 2)
    return [(2 * i, 2 * i + 1) for i in range(m)]


def _queues(labels: NDArray[Any]) -> dict[Any, list[int]]:
    """The row indices of each label, in order."""
    queues: dict[Any, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        queues.setdefault(c, []).append(i)
    return queues


def _loss_label(vae: VAE) -> str:
    """The y-axis label of the loss curve: what the training loss adds up."""
    gaussian = getattr(vae, "likelihood", "bernoulli") == "gaussian"
    recon = "Gaussian NLL" if gaussian else "BCE"
    betas = [b for b in getattr(vae, "history_", {}).get("beta", []) if b is not None]
    kl = "KL" if all(b == 1.0 for b in betas) else "beta KL"
    return f"loss per example (nats): {recon} + {kl}"


def _loss_curve(vae: VAE, out: Path, val_label: str, written: list[str]) -> None:
    history = getattr(vae, "history_", None)
    if history and history.get("epoch"):
        plots.loss_curve(history, out / "loss_curve.png", val_label, _loss_label(vae))
        written.append("loss_curve.png")


def write_pictures(
    vae: VAE,
    x: NDArray[np.floating],
    labels: ArrayLike | None,
    folder: str | os.PathLike[str],
    seed: int = 0,
    *,
    image_shape: Sequence[int] | None = None,
    label_name: str = "digit",
    val_label: str = "test",
) -> list[str]:
    """Write every picture of an image model into ``folder``; returns the file names written.

    From the images ``x`` (typically the test set) and their ``labels``: reconstructions.png
    (first 40 images over their reconstructions), samples.png (64 draws from the prior,
    ``seed``), latent_map.png (the latent means of all of x, coloured by label), and
    interpolations.png; manifold.png when latent_dim == 2; loss_curve.png when the model has
    a training history (``val_label`` names its second curve).

    ``image_shape`` is the images' (h, w) or (h, w, c) with c = 1 or 3, each row of x holding
    one image channels last (default: square grayscale); ``label_name`` titles the legend.
    """
    out = Path(folder)
    lab = None if labels is None else np.asarray(labels)
    shape = shape_of(x.shape[1], image_shape)
    scale = display_scale(shape)
    written = []

    cols = min(10, len(x))
    shown = x[: 4 * cols] if len(x) >= 4 * cols else x[: max(cols, (len(x) // cols) * cols)]
    grid = reconstructions(shown, vae.reconstruct(shown), cols, shape=shape, scale=scale)
    save_png(grid, out / "reconstructions.png")
    written.append("reconstructions.png")

    samples = vae.sample(64, seed=seed)
    save_png(image_grid(samples, 8, 8, scale=scale, shape=shape), out / "samples.png")
    written.append("samples.png")

    mu = vae.transform(x)
    plots.latent_map(mu, lab, out / "latent_map.png", legend_title=label_name)
    written.append("latent_map.png")

    idx = _pair_indices(lab, len(x))
    if idx:
        pairs = np.stack([np.stack([x[a], x[b]]) for a, b in idx])
        pair_labels = None if lab is None else np.array([[lab[a], lab[b]] for a, b in idx])
        plots.interpolations(
            vae, pairs, out / "interpolations.png", labels=pair_labels, scale=scale, shape=shape
        )
        written.append("interpolations.png")

    if mu.shape[1] == 2:
        plots.manifold(vae, out / "manifold.png", scale=scale, shape=shape)
        written.append("manifold.png")

    _loss_curve(vae, out, val_label, written)
    return written


@dataclass(frozen=True, eq=False)
class FeatureErrors:
    """How well a model reconstructs each feature of a table, in the data's own units.

    Attributes
    ----------
    names : list of str
        The features.
    mse : ndarray (d,)
        Mean squared error of the reconstructions (decoded latent means) per feature.
    relative : ndarray (d,)
        mse over the feature's variance in the same rows: 0 is perfect, 1 no better than the
        feature's mean; NaN for a feature constant in these rows.
    sd : ndarray (d,) or None
        The learned standard deviation of each feature under a Gaussian p(x|z); None for
        Bernoulli models.
    """

    names: list[str]
    mse: NDArray[np.float64]
    relative: NDArray[np.float64]
    sd: NDArray[np.float64] | None

    def worst(self, k: int = 5) -> list[int]:
        """Indices of the k features with the largest relative error (then mse)."""
        key = np.nan_to_num(self.relative, nan=-np.inf)
        order = np.lexsort((-self.mse, -key))
        return [int(i) for i in order[:k]]

    def csv_text(self) -> str:
        """The table as CSV, one feature per line."""
        head = ["feature", "mse", "mse_over_variance"] + (["sd"] if self.sd is not None else [])
        lines = [",".join(head)]
        for j, name in enumerate(self.names):
            cells = [_csv_cell(name), f"{self.mse[j]:.6g}", f"{self.relative[j]:.6g}"]
            if self.sd is not None:
                cells.append(f"{self.sd[j]:.6g}")
            lines.append(",".join(cells))
        return "\n".join(lines) + "\n"


def _csv_cell(text: str) -> str:
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def feature_errors(
    vae: VAE,
    x: NDArray[np.floating],
    feature_names: Sequence[str] | None = None,
    mean: ArrayLike | None = None,
    std: ArrayLike | None = None,
) -> FeatureErrors:
    """Per-feature reconstruction error of a table's rows ``x`` (as the model takes them).

    When the model was trained on standardized features, ``mean`` and ``std`` (one per
    feature) map x and its reconstructions back to the data's units first.
    """
    d = x.shape[1]
    names = [str(j) for j in range(d)] if feature_names is None else list(feature_names)
    if len(names) != d:
        raise ValueError(f"{len(names)} feature names for {d} features")
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(vae.reconstruct(x), dtype=np.float64)
    scale = np.ones(d) if std is None else np.asarray(std, dtype=np.float64)
    if mean is not None:
        offset = np.asarray(mean, dtype=np.float64)
        a, b = a * scale + offset, b * scale + offset
    mse = ((a - b) ** 2).mean(axis=0)
    var = a.var(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(var > 0, mse / np.where(var > 0, var, 1.0), np.nan)
    sd = None
    if getattr(vae, "likelihood", "bernoulli") == "gaussian":
        logvar = vae.weights().get("decoder_logvar")
        if logvar is not None and np.shape(logvar) == (d,):
            sd = np.exp(0.5 * np.asarray(logvar, dtype=np.float64)) * scale
    return FeatureErrors(names, mse, relative, sd)


def write_table_pictures(
    vae: VAE,
    x: NDArray[np.floating],
    labels: ArrayLike | None,
    folder: str | os.PathLike[str],
    *,
    feature_names: Sequence[str] | None = None,
    label_name: str = "label",
    mean: ArrayLike | None = None,
    std: ArrayLike | None = None,
    val_label: str = "validation",
) -> tuple[list[str], FeatureErrors]:
    """Write the pictures of a model of a table into ``folder``: loss_curve.png (with a
    history), latent_map.png of the rows ``x`` (as the model takes them) coloured by
    ``labels``, and feature_errors.csv with feature_errors.png (see :func:`feature_errors`;
    ``mean`` and ``std`` undo a standardization).

    Returns the file names written and the errors.
    """
    out = Path(folder)
    written: list[str] = []
    _loss_curve(vae, out, val_label, written)

    lab = None if labels is None else np.asarray(labels)
    plots.latent_map(
        vae.transform(x), lab, out / "latent_map.png", legend_title=label_name, noun="rows"
    )
    written.append("latent_map.png")

    errors = feature_errors(vae, x, feature_names, mean, std)
    text = errors.csv_text()
    atomic_write(out / FEATURE_ERRORS_CSV, lambda f: f.write(text.encode("utf-8")))
    written.append(FEATURE_ERRORS_CSV)
    if np.isfinite(errors.relative).any():
        plots.feature_errors(
            errors.names,
            errors.relative,
            out / FEATURE_ERRORS_PNG,
            title=f"Reconstruction error per feature ({len(x):,} {val_label} rows)",
        )
        written.append(FEATURE_ERRORS_PNG)
    return written, errors
