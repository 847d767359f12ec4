"""A model used before ``os.fork()`` works in the child (as multiprocessing's fork start method
and DataLoader-style workers make them): the core rebuilds its thread pools on first use in a
new process instead of waiting on workers that exist only in the parent."""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fastvae import VAE

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or "fork" not in mp.get_all_start_methods(),
    reason="needs the fork start method",
)

# A hang is what this guards against; a loaded machine still finishes in seconds.
_TIMEOUT_S = 300


def _data(n: int = 256, d: int = 36, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d), dtype=np.float32)


def _in_fork(work: Callable[[], Any]) -> Any:
    """Run work() in a child made by fork and return what it returned; fail, instead of
    hanging, when the child does not answer in time."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child_main() -> None:
        send.send(work())
        send.close()

    child = ctx.Process(target=child_main)
    child.start()
    send.close()
    try:
        if not recv.poll(_TIMEOUT_S):
            pytest.fail(f"the forked child did not answer within {_TIMEOUT_S} s: it hangs")
        result = recv.recv()
    finally:
        child.join(_TIMEOUT_S)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0
    return result


def _use(vae: VAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Everything a forked worker might do with a model made in the parent."""
    before = vae.elbo(x)
    vae.fit(x, epochs=1, batch_size=32, progress=False)
    after = vae.elbo(x)
    # A model made in the child too: a fresh pool, and the shared one that checks data.
    fresh = VAE(input_dim=x.shape[1], hidden_dims=(8,), latent_dim=2, threads=2, seed=3)
    fresh.fit(x, epochs=1, batch_size=32, progress=False)
    return before, after, fresh.elbo(x)


def test_a_fitted_model_works_in_a_forked_child() -> None:
    x = _data()
    vae = VAE(input_dim=x.shape[1], hidden_dims=(16,), latent_dim=3, threads=2, seed=1)
    vae.fit(x, epochs=1, batch_size=32, progress=False)
    parent_elbo = vae.elbo(x)

    before, after, fresh = _in_fork(lambda: _use(vae, x))

    # The child saw the parent's weights, and trained them as the parent would have.
    np.testing.assert_array_equal(before, parent_elbo)
    twin = VAE(input_dim=x.shape[1], hidden_dims=(16,), latent_dim=3, threads=2, seed=1)
    twin.fit(x, epochs=2, batch_size=32, progress=False)
    np.testing.assert_array_equal(after, twin.elbo(x))
    assert np.all(np.isfinite(fresh))
    # The parent's own pool is untouched by the child.
    np.testing.assert_array_equal(vae.elbo(x), parent_elbo)


def test_a_child_forked_twice_over_works() -> None:
    # The pool is rebuilt for each new process, not only the first child.
    x = _data(n=128)
    vae = VAE(input_dim=x.shape[1], hidden_dims=(8,), latent_dim=2, threads=2, seed=2)
    vae.fit(x, epochs=1, batch_size=32, progress=False)

    def middle() -> bool:
        before, after, _ = _in_fork(lambda: _use(vae, x))
        return bool(np.all(np.isfinite(before)) and np.all(np.isfinite(after)))

    assert _in_fork(middle) is True
