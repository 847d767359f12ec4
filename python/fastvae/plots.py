"""Plots of what a model learned, drawn with matplotlib and written as PNG files: the loss
per epoch, the latent means of a data set, the decoded latent plane, interpolations and the
reconstruction error per feature of a table. Figures
use the Agg renderer without pyplot, so a user's backend and pyplot's figures are left alone;
each file is written to a temporary name beside it and renamed.

Not the plain image grids (images.py, whose canvases the image plots draw) nor the choice of
pictures for a model (pictures.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._files import atomic_write
from .images import PAD_GRAY, grid_canvas, image_shape
from .pca import pca_2d

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .model import VAE

__all__ = [
    "feature_errors",
    "interpolations",
    "latent_map",
    "loss_curve",
    "manifold",
    "save_figure",
]

_DPI = 100


def save_figure(fig: Any, path: str | os.PathLike[str]) -> None:
    """Write a matplotlib figure as PNG, atomically; a pyplot figure is closed afterwards."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI, bbox_inches="tight"))
    finally:
        if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot
            import matplotlib.pyplot as plt

            plt.close(fig)


def _figure(width_in: float, height_in: float) -> Figure:
    """A figure drawn by the Agg renderer, independent of pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _image_figure(canvas: NDArray[np.float32], scale: int) -> tuple[Figure, Axes]:
    """A figure whose axes show `canvas` ((H, W) gray levels or (H, W, 3) RGB, in [0, 1]) at
    exactly `scale` screen pixels per image pixel, with margins for a title and tick labels."""
    h, w = canvas.shape[:2]
    left, right, bottom, top = 70, 20, 60, 80  # margins in pixels
    fw, fh = w * scale + left + right, h * scale + bottom + top
    fig = _figure(fw / _DPI, fh / _DPI)
    ax = fig.add_axes((left / fw, bottom / fh, w * scale / fw, h * scale / fh))
    ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    return fig, ax


def loss_curve(
    history: Mapping[str, Sequence[Any]],
    path: str | os.PathLike[str],
    val_label: str = "test",
    ylabel: str = "loss per example (nats): BCE + KL",
) -> None:
    """Train and test (validation) loss per epoch, as a line plot; ``val_label`` names the
    second curve and ``ylabel`` the loss."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    epochs = list(history["epoch"])
    # Markers while they stay apart; long runs are lines.
    marker = "o" if len(epochs) <= 60 else None
    ax.plot(epochs, history["train_loss"], marker=marker, label="train")
    val = [(e, v) for e, v in zip(epochs, history["val_loss"], strict=True) if v is not None]
    if val:
        ax.plot([e for e, _ in val], [v for _, v in val], marker=marker, label=val_label)
    ax.set_title("Loss per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if epochs and len(epochs) <= 20:
        ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


# -- the latent space ------------------------------------------------------------------------


def latent_map(
    means: ArrayLike,
    labels: ArrayLike | None,
    path: str | os.PathLike[str],
    title: str | None = None,
    legend_title: str = "digit",
    noun: str = "images",
) -> None:
    """Scatter plot of latent means (n, Z), one colour per label, with a legend.

    ``noun`` names the examples in the title ("images", "rows").

    Z == 2 plots (z1, z2) directly; Z > 2 plots the first two principal components of the
    centered means (the title gives the variance they explain); Z == 1 plots z1 against the
    label, jittered vertically (against pure jitter without labels).
    """
    mu = np.asarray(means, dtype=np.float64)
    if mu.ndim != 2 or mu.shape[0] == 0:
        raise ValueError(f"means must have shape (n, latent_dim) with n >= 1, got {mu.shape}")
    if not np.all(np.isfinite(mu)):
        raise ValueError("means hold NaN or infinite values")
    n, zdim = int(mu.shape[0]), int(mu.shape[1])
    lab: NDArray[Any] | None = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {lab.shape}")
    classes = np.unique(lab) if lab is not None else np.zeros(0)
    rng = np.random.default_rng(0)

    ylabel_ticks = False
    xs: NDArray[np.float64]
    ys: NDArray[np.float64]
    if zdim == 1:
        xs = mu[:, 0]
        jitter: NDArray[np.float64] = rng.uniform(-0.35, 0.35, size=int(n))
        if lab is not None:
            index = np.searchsorted(classes, lab)
            ys = index.astype(np.float64) + jitter
            ylabel_ticks = True
            ylabel = f"{legend_title} (points spread vertically)"
        else:
            ys = jitter
            ylabel = "random vertical spread (no meaning)"
        xlabel = "z1 (latent mean)"
        heading = f"Latent means of {n:,} {noun} (Z = 1)"
    elif zdim == 2:
        xs, ys = mu[:, 0], mu[:, 1]
        xlabel, ylabel = "z1 (latent mean)", "z2 (latent mean)"
        heading = f"Latent means of {n:,} {noun} (Z = 2)"
    else:
        proj, explained = pca_2d(mu)
        xs, ys = proj[:, 0], proj[:, 1]
        xlabel = f"PC 1 ({100 * explained[0]:.1f}% of variance)"
        ylabel = f"PC 2 ({100 * explained[1]:.1f}% of variance)"
        heading = (
            f"PCA of the latent means of {n:,} {noun} (Z = {zdim})\n"
            f"the two components shown explain {100 * explained.sum():.1f}% of the variance"
        )

    fig = _figure(7.5, 6.5)
    ax = fig.add_subplot()
    order = rng.permutation(n)  # no class is drawn entirely on top of the others
    size = float(np.clip(30000.0 / n, 2.0, 30.0))
    from matplotlib.lines import Line2D

    if lab is None:
        ax.scatter(xs[order], ys[order], s=size, alpha=0.6, linewidths=0, rasterized=True)
    else:
        import matplotlib

        index = np.searchsorted(classes, lab)
        if len(classes) <= 20:
            cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
            palette = cmap(np.arange(len(classes)))  # the first colours of the list, RGBA
            colors = palette[index]
            ax.scatter(
                xs[order],
                ys[order],
                c=colors[order],
                s=size,
                alpha=0.7,
                linewidths=0,
                rasterized=True,
            )
            handles = [
                Line2D(
                    [],
                    [],
                    marker="o",
                    linestyle="",
                    markersize=7,
                    color=palette[i],
                    label=str(c),
                )
                for i, c in enumerate(classes)
            ]
            ax.legend(
                handles=handles,
                title=legend_title,
                loc="center left",
                bbox_to_anchor=(1.01, 0.5),
                frameon=False,
            )
        else:
            points = ax.scatter(
                xs[order],
                ys[order],
                c=index[order],
                cmap="viridis",
                s=size,
                alpha=0.7,
                linewidths=0,
                rasterized=True,
            )
            fig.colorbar(points, ax=ax, label=f"{legend_title} (index)")
        if ylabel_ticks and len(classes) <= 20:
            ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    ax.set_title(title if title is not None else heading)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if zdim == 2:
        ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.25)
    save_figure(fig, path)


def _latent_dim(vae: VAE) -> int:
    return int(vae._fitted().config[2])


def manifold(
    vae: VAE,
    path: str | os.PathLike[str],
    n: int = 20,
    span: tuple[float, float] = (0.05, 0.95),
    scale: int = 2,
    shape: Sequence[int] | None = None,
) -> None:
    """The decoded 2-D latent plane of a model with latent_dim == 2, as one image grid.

    ``shape`` is the images' (h, w) or (h, w, c), c = 1 or 3 (default: square grayscale).

    z1 (columns, left to right) and z2 (rows, top to bottom: descending) run over the
    standard normal's quantiles at ``n`` evenly spaced probabilities in ``span``, so the grid
    covers the prior's mass evenly (as in the Keras VAE example).
    """
    zdim = _latent_dim(vae)
    if zdim != 2:
        raise ValueError(
            f"manifold needs a model with latent_dim == 2, this one has latent_dim == {zdim}; "
            "use latent_map for a view of any latent space"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    lo, hi = float(span[0]), float(span[1])
    if not 0.0 < lo < hi < 1.0:
        raise ValueError(f"span must be probabilities 0 < lo < hi < 1, got {span!r}")
    normal = NormalDist()
    grid = np.array([normal.inv_cdf(float(q)) for q in np.linspace(lo, hi, n)])
    z1, z2 = np.meshgrid(grid, grid[::-1])  # row i has z2 = grid[n - 1 - i]
    z = np.stack([z1.ravel(), z2.ravel()], axis=1).astype(np.float32)
    decoded = vae.decode(z)
    h, w, c = image_shape(decoded.shape[1], shape)
    fig, ax = _image_figure(grid_canvas(decoded, n, n, pad=0, shape=shape), scale)
    labels = [f"{v:.2f}" for v in grid]
    ax.set_xticks(np.arange(n) * w + (w - 1) / 2, labels, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(n) * h + (h - 1) / 2, labels[::-1], fontsize=7)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(
        f"Decoded latent plane: z1, z2 at the N(0, 1) quantiles {lo:g} ... {hi:g}\n"
        f"({n} x {n} images, the mean of p(x|z) shown as {'colours' if c == 3 else 'gray levels'})"
    )
    save_figure(fig, path)


def interpolations(
    vae: VAE,
    pairs: ArrayLike,
    path: str | os.PathLike[str],
    steps: int = 10,
    labels: ArrayLike | None = None,
    scale: int = 2,
    shape: Sequence[int] | None = None,
) -> None:
    """Decoded straight lines between the latent means of pairs of images, one row per pair.

    ``pairs`` has shape (p, 2, input_dim). Each row shows the first original, ``steps``
    decoded points z = (1 - t) mu_a + t mu_b for t evenly spaced in [0, 1] (the ends are the
    reconstructions), then the second original. ``labels`` (p, 2), if given, name the rows.
    ``shape`` is the images' (h, w) or (h, w, c), c = 1 or 3 (default: square grayscale).
    """
    arr = np.asarray(pairs, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"pairs must have shape (p, 2, input_dim) with p >= 1, got {arr.shape}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    p, _, d = arr.shape
    mu = vae.transform(arr.reshape(2 * p, d)).astype(np.float64).reshape(p, 2, -1)
    t = np.linspace(0.0, 1.0, steps)[None, :, None]
    z = (1.0 - t) * mu[:, :1, :] + t * mu[:, 1:, :]  # (p, steps, Z)
    decoded = vae.decode(z.reshape(p * steps, -1).astype(np.float32))
    h, w, c = image_shape(d, shape)
    pad = 2
    gap_shape = (p * (h + pad) + pad, 3 * pad) + ((3,) if c == 3 else ())
    gap = np.full(gap_shape, PAD_GRAY, dtype=np.float32)
    canvas = np.hstack(
        [
            grid_canvas(arr[:, 0], p, 1, pad, shape),
            gap,
            grid_canvas(decoded, p, steps, pad, shape),
            gap,
            grid_canvas(arr[:, 1], p, 1, pad, shape),
        ]
    )
    fig, ax = _image_figure(canvas, scale)
    cell = w + pad
    block = cell + pad + 3 * pad  # first column, its right pad, the gap
    xs = [pad + (w - 1) / 2]
    xs += [block + pad + j * cell + (w - 1) / 2 for j in range(steps)]
    xs += [block + steps * cell + pad + 3 * pad + pad + (w - 1) / 2]
    names = ["A"] + [f"{v:.2g}" for v in np.linspace(0.0, 1.0, steps)] + ["B"]
    names[1], names[-2] = "t=0", "t=1"
    ax.xaxis.tick_top()
    ax.set_xticks(xs, names, fontsize=8)
    ys = pad + np.arange(p) * (h + pad) + (h - 1) / 2
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (p, 2):
            raise ValueError(f"labels must have shape ({p}, 2), got {lab.shape}")
        ax.set_yticks(ys, [f"{a} \u2192 {b}" for a, b in lab], fontsize=9)
    else:
        ax.set_yticks([])
    ax.set_xlabel(
        "A, B: original images;  t: decoded (1 - t) mu_A + t mu_B  (t = 0, 1: reconstructions)"
    )
    ax.set_title("Interpolating between the latent means of pairs of images", pad=12)
    save_figure(fig, path)


# -- tables ----------------------------------------------------------------------------------


def feature_errors(
    names: Sequence[str],
    errors: ArrayLike,
    path: str | os.PathLike[str],
    title: str = "Reconstruction error per feature",
    xlabel: str = "mean squared error / variance of the feature (1: no better than its mean)",
    top: int = 30,
) -> None:
    """Horizontal bars of a table's per-feature errors, the ``top`` largest first.

    ``errors`` holds one value per name; NaN values (features without an error, such as ones
    constant in the data) are left out.
    """
    err = np.asarray(errors, dtype=np.float64)
    if err.ndim != 1 or len(err) != len(names) or len(err) == 0:
        raise ValueError(f"need one error per feature name, got {err.shape} for {len(names)}")
    shown = [i for i in np.argsort(-np.nan_to_num(err, nan=-np.inf)) if np.isfinite(err[i])]
    shown = shown[:top]
    if not shown:
        raise ValueError("no finite errors to plot")
    fig = _figure(7.5, 1.5 + 0.28 * len(shown))
    ax = fig.add_subplot()
    ys = np.arange(len(shown))
    ax.barh(ys, err[shown], color="tab:blue")
    ax.set_yticks(ys, [str(names[i]) for i in shown], fontsize=8)
    ax.invert_yaxis()  # largest at the top
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)  # no better than the mean
    ax.set_ylabel("feature")
    more = f" (the {len(shown)} largest of {len(err)})" if len(shown) < len(err) else ""
    ax.set_title(title + more)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
