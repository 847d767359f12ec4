"""The 2-D principal-component projection that latent maps of more than two latent dimensions
show. NumPy only; no plotting here (plots.py)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["pca_2d"]


def pca_2d(means: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The centered rows projected on their first two principal axes, and the fraction of
    the total variance each axis explains."""
    centered = means - means.mean(axis=0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    var = s**2
    total = var.sum()
    explained = var[:2] / total if total > 0 else np.zeros(2)
    proj = centered @ vt[:2].T
    # Fix each axis's sign (SVD's is arbitrary) so the picture is reproducible.
    for j in range(2):
        if proj[np.argmax(np.abs(proj[:, j])), j] < 0:
            proj[:, j] = -proj[:, j]
    return proj, explained
