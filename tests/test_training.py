"""Training behaviour of ``VAE.fit``: reproducibility, resuming, threads, history and the
quality reached on MNIST.

``test_slow_mnist_one_epoch_reaches_test_loss_below_130`` is the slow one (a few seconds on two
cores); it runs by default. It needs the real MNIST files (conftest.py's ``mnist`` fixture),
and fails when they are absent.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import fastvae
from fastvae import VAE

SMALL = {"input_dim": 20, "hidden_dims": (16,), "latent_dim": 4}
HISTORY_KEYS = {"epoch", "train_loss", "val_loss", "samples_per_sec", "seconds", "beta", "lr"}


@pytest.fixture(scope="module")
def small_data() -> np.ndarray:
    return np.random.default_rng(0).random((500, 20)).astype(np.float32)


def fit_small(x: np.ndarray, seed: int, threads: int, epochs: int = 3) -> VAE:
    vae = VAE(**SMALL, seed=seed, threads=threads)
    return vae.fit(x, epochs=epochs, progress=False)


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def weights_differ(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return any(not np.array_equal(a[name], b[name]) for name in a)


# --------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_same_seed_and_threads_give_bit_identical_weights(
    small_data: np.ndarray, threads: int
) -> None:
    a = fit_small(small_data, seed=0, threads=threads)
    b = fit_small(small_data, seed=0, threads=threads)
    assert_same_weights(a.weights(), b.weights())
    assert a.history_["train_loss"] == b.history_["train_loss"]
    assert a.model_.step == b.model_.step == 3 * math.ceil(500 / 128)


@pytest.mark.parametrize("threads", [1, 2])
def test_different_seeds_give_different_weights(small_data: np.ndarray, threads: int) -> None:
    a = fit_small(small_data, seed=0, threads=threads)
    b = fit_small(small_data, seed=1, threads=threads)
    assert weights_differ(a.weights(), b.weights())
    # The initializations differ too, not only the training noise.
    init_a = VAE(**SMALL, seed=0, threads=threads).fit(small_data, epochs=1, progress=False)
    init_b = VAE(**SMALL, seed=1, threads=threads).fit(small_data, epochs=1, progress=False)
    assert weights_differ(init_a.weights(), init_b.weights())


@pytest.mark.parametrize("threads", [1, 2])
def test_three_fits_of_one_epoch_equal_one_fit_of_three(
    small_data: np.ndarray, threads: int
) -> None:
    once = fit_small(small_data, seed=5, threads=threads, epochs=3)
    stepwise = VAE(**SMALL, seed=5, threads=threads)
    for _ in range(3):
        assert stepwise.fit(small_data, epochs=1, progress=False) is stepwise
    assert_same_weights(once.weights(), stepwise.weights())

    m1, v1, t1, e1 = once.model_.optimizer_state()
    m2, v2, t2, e2 = stepwise.model_.optimizer_state()
    assert (t1, e1) == (t2, e2) == (3 * math.ceil(500 / 128), 3)
    assert_same_weights(m1, m2)
    assert_same_weights(v1, v2)

    assert once.history_["epoch"] == stepwise.history_["epoch"] == [1, 2, 3]
    assert once.history_["train_loss"] == stepwise.history_["train_loss"]


def test_thread_counts_both_train_to_similar_losses(small_data: np.ndarray) -> None:
    """One and two threads both train; their results need not be bit-identical."""
    runs = [fit_small(small_data, seed=3, threads=threads, epochs=3) for threads in (1, 2)]
    for vae in runs:
        losses = vae.history_["train_loss"]
        assert len(losses) == 3
        assert all(math.isfinite(loss) and loss > 0 for loss in losses), losses
        for w in vae.weights().values():
            assert np.all(np.isfinite(w))
    final = [vae.history_["train_loss"][-1] for vae in runs]
    assert math.isclose(final[0], final[1], rel_tol=0.02), final
    scores = [vae.score(small_data) for vae in runs]
    assert math.isclose(scores[0], scores[1], rel_tol=0.02), scores


# --------------------------------------------------------------------------------------------
# History and learning
# --------------------------------------------------------------------------------------------


def test_on_epoch_end_sees_each_epoch_and_can_stop(small_data: np.ndarray) -> None:
    seen: list[tuple[int, int]] = []

    def stop_after_two(vae: VAE) -> bool:
        seen.append((vae.epochs_trained_, len(vae.history_["epoch"])))
        return len(seen) == 2

    vae = VAE(**SMALL, seed=1, threads=1)
    vae.fit(small_data, epochs=5, progress=False, on_epoch_end=stop_after_two)
    assert seen == [(1, 1), (2, 2)]
    assert vae.epochs_trained_ == 2
    # Stopping there leaves what two epochs give, bit for bit.
    plain = VAE(**SMALL, seed=1, threads=1).fit(small_data, epochs=2, progress=False)
    assert_same_weights(vae.weights(), plain.weights())


def test_history_without_validation_data(small_data: np.ndarray) -> None:
    vae = fit_small(small_data, seed=0, threads=1, epochs=2)
    h = vae.history_
    assert set(h) == HISTORY_KEYS
    assert h["epoch"] == [1, 2]
    assert h["val_loss"] == [None, None]
    assert all(math.isfinite(v) and v > 0 for v in h["train_loss"])
    assert all(v > 0 for v in h["samples_per_sec"])
    assert all(v > 0 for v in h["seconds"])


def test_loss_decreases_on_a_tiny_dataset() -> None:
    """Noisy copies of four binary patterns: a small VAE learns them within a few epochs."""
    rng = np.random.default_rng(1)
    patterns = (rng.random((4, 16)) < 0.5).astype(np.float32)
    x = patterns[rng.integers(4, size=64)]
    flip = rng.random(x.shape) < 0.05
    x = np.where(flip, 1.0 - x, x).astype(np.float32)

    vae = VAE(input_dim=16, hidden_dims=(12,), latent_dim=2, activation="tanh", seed=2, threads=1)
    before = -vae.fit(x, epochs=1, batch_size=16, lr=1e-2, progress=False).score(x)
    vae.fit(x, epochs=29, batch_size=16, lr=1e-2, progress=False)
    after = -vae.score(x)
    losses = vae.history_["train_loss"]
    assert len(losses) == 30
    assert losses[-1] < 0.8 * losses[0], losses
    # Smoothed over the noise of single epochs, the loss goes down all the way.
    windows = [float(np.mean(losses[i : i + 5])) for i in range(0, 30, 5)]
    assert all(b < a for a, b in zip(windows, windows[1:], strict=False)), windows
    assert after < 0.8 * before, (before, after)


# --------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------


def test_slow_mnist_one_epoch_reaches_test_loss_below_130(mnist: dict[str, np.ndarray]) -> None:
    """The canonical 784-400-20 VAE, one epoch over the 60k training images (slow test)."""
    train, test = mnist["x"], mnist["x_test"]
    assert train.shape == (60000, 784) and test.shape == (10000, 784)
    vae = VAE(threads=2).fit(train, epochs=1, progress=False, validation_data=test)

    elbo = vae.elbo(test)
    assert elbo.shape == (10000,) and elbo.dtype == np.float64
    assert np.all(np.isfinite(elbo))
    test_loss = -float(elbo.mean())
    assert test_loss < 130.0, f"test loss {test_loss:.2f} after one epoch, expected < 130"

    h = vae.history_
    assert set(h) == HISTORY_KEYS
    assert h["epoch"] == [1]
    assert all(len(h[k]) == 1 for k in HISTORY_KEYS)
    train_loss, val_loss = h["train_loss"][0], h["val_loss"][0]
    # The epoch's mean loss includes the first batches, taken while still untrained.
    assert 100.0 < train_loss < 250.0, train_loss
    assert val_loss is not None and math.isfinite(val_loss)
    assert math.isclose(val_loss, -vae.score(test), rel_tol=1e-6), (val_loss, vae.score(test))
    assert math.isclose(val_loss, test_loss, rel_tol=1e-6)
    assert h["samples_per_sec"][0] > 0 and h["seconds"][0] > 0
    assert math.isclose(h["samples_per_sec"][0] * h["seconds"][0], 60000, rel_tol=1e-6)
    assert vae.model_.step == math.ceil(60000 / 128)


_AMX_FIT = """
import numpy as np, fastvae
rng = np.random.default_rng(0)
x = rng.random((1024, 784), dtype=np.float32) * (rng.random((1024, 784)) < 0.2)
vae = fastvae.VAE(seed=0, threads=2).fit(x, epochs=1, progress=False)
print(float(vae.elbo(x[:256], seed=1).mean()))
print(float(np.abs(vae.weights()["decoder.1.weight"]).sum()))
"""


def _amx_fit(amx: str) -> list[float]:
    env = dict(os.environ, FASTVAE_AMX=amx)
    out = subprocess.run(
        [sys.executable, "-c", _AMX_FIT], env=env, capture_output=True, text=True, check=True
    )
    return [float(v) for v in out.stdout.split()]


def test_amx_products_match_gemm_to_rounding() -> None:
    # The output layer's products run on AMX tiles where the CPU has them (split into three
    # bfloat16 parts) and through the gemm crate with FASTVAE_AMX=0. Eight steps of training
    # agree to float rounding: a part left out would move the ELBO by far more than 1e-4.
    # Without AMX both runs would take the gemm path and compare it with itself.
    if not fastvae._core.amx_available():
        pytest.skip("this CPU (or kernel) has no AMX: nothing to compare the gemm path with")
    on, off = _amx_fit("1"), _amx_fit("0")
    assert on[0] == pytest.approx(off[0], rel=1e-4)
    assert on[1] == pytest.approx(off[1], rel=1e-4)


_ISA_FIT = """
import hashlib, numpy as np, fastvae
rng = np.random.default_rng(0)
# Sparse like MNIST, and widths that reach every register block of the first layer's passes
# (448, 400, ..., 64 with two chains, 16 with eight, a ragged tail) and of its weight gradient.
x = rng.random((700, 300), dtype=np.float32) * (rng.random((700, 300)) < 0.2)
for hidden in ((400,), (1000,), (531, 37)):
    vae = fastvae.VAE(input_dim=300, hidden_dims=hidden, latent_dim=5, seed=0, threads=2)
    vae.fit(x, epochs=1, batch_size=128, progress=False)
    w = vae.weights()
    digest = hashlib.sha256(b"".join(w[k].tobytes() for k in sorted(w))).hexdigest()
    print(fastvae._core.isa_paths()["kernels"], digest, float(vae.elbo(x, seed=1).mean()))
"""


def _isa_fit(isa: str | None) -> list[list[str]]:
    # AMX off throughout: a cap below AVX-512 turns it off, and it rounds otherwise than gemm.
    env = dict(os.environ, FASTVAE_AMX="0")
    env.pop("FASTVAE_ISA", None)
    if isa is not None:
        env["FASTVAE_ISA"] = isa
    out = subprocess.run(
        [sys.executable, "-c", _ISA_FIT], env=env, capture_output=True, text=True, check=True
    )
    return [line.split() for line in out.stdout.splitlines()]


def test_instruction_sets_give_the_same_training() -> None:
    # fastvae's own kernels are compiled for AVX-512, AVX2 and plain x86-64, one chosen at run
    # time (FASTVAE_ISA caps the choice). The vector versions sum every output in the same
    # order (fixed lanes, the same register blocks), so they train bit for bit alike; the plain
    # one, without FMA, agrees to rounding. Each path runs as far as this CPU has it, so the
    # AVX2 kernels are tested on AVX-512 machines too.
    best = _isa_fit(None)
    kernels = best[0][0]
    if kernels == "generic":
        pytest.skip("this CPU has neither AVX2 nor AVX-512: one path only")
    avx2 = _isa_fit("avx2")
    assert all(row[0] == "avx2" for row in avx2)
    assert [row[1] for row in avx2] == [row[1] for row in best], "weights differ from " + kernels
    plain = _isa_fit("generic")
    assert all(row[0] == "generic" for row in plain)
    for a, b in zip(plain, best, strict=True):
        assert float(a[2]) == pytest.approx(float(b[2]), rel=1e-4)
