"""The importance-weighted estimate of log p(x) (Burda, Grosse & Salakhutdinov, 2016), checked
against a NumPy reference written from the math, and for the properties the estimator must
have: k=1 is the ELBO in expectation, it grows with k, seeds and slicing, and input checks.

The noise inside fastvae cannot be fed in, so the comparisons are statistical, with
tolerances taken from the Monte Carlo error of the estimates themselves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastvae import VAE, FastVAEError
from fastvae.datasets import binarize

LOG_2PI = math.log(2.0 * math.pi)


def _trained(activation: str, seed: int, x: np.ndarray) -> VAE:
    """784-32-3 model, two quick epochs on 10000 MNIST images (about half a second): trained
    enough that q(z|x) is near the posterior, so importance weights have moderate variance."""
    vae = VAE(hidden_dims=(32,), latent_dim=3, activation=activation, seed=seed, threads=2)
    return vae.fit(x[:10000], epochs=2, batch_size=100, lr=3e-3, progress=False)


@pytest.fixture(scope="module", params=["relu", "tanh"])
def tiny(request: pytest.FixtureRequest, mnist: dict[str, np.ndarray]) -> VAE:
    return _trained(request.param, 1, mnist["x"])


@pytest.fixture(scope="module")
def relu_model(mnist: dict[str, np.ndarray]) -> VAE:
    return _trained("relu", 2, mnist["x"])


# -- a NumPy reference -------------------------------------------------------------------------


def _linear(u: np.ndarray, w: dict[str, np.ndarray], layer: str) -> np.ndarray:
    weight = w[f"{layer}.weight"].astype(np.float64)  # (out, in), as torch's nn.Linear
    bias = w[f"{layer}.bias"].astype(np.float64)
    return u @ weight.T + bias


def _act(a: np.ndarray, activation: str) -> np.ndarray:
    return np.maximum(a, 0.0) if activation == "relu" else np.tanh(a)


def _encode(w: dict[str, np.ndarray], x: np.ndarray, activation: str) -> tuple[np.ndarray, ...]:
    h = x.astype(np.float64)
    i = 0
    while f"encoder.{i}.weight" in w:
        h = _act(_linear(h, w, f"encoder.{i}"), activation)
        i += 1
    return _linear(h, w, "fc_mu"), _linear(h, w, "fc_logvar")


def _decode_logits(w: dict[str, np.ndarray], z: np.ndarray, activation: str) -> np.ndarray:
    layers = 0
    while f"decoder.{layers}.weight" in w:
        layers += 1
    g = z
    for j in range(layers):
        g = _linear(g, w, f"decoder.{j}")
        if j < layers - 1:
            g = _act(g, activation)
    return g


def reference_log_weights(
    vae: VAE, x_row: np.ndarray, k: int, rng: np.random.Generator, chunk: int = 4000
) -> np.ndarray:
    """log w_j = log p(x|z_j) + log N(z_j; 0, I) - log N(z_j; mu, sigma^2), z_j ~ q(z|x),
    with log p(x|z) = -sum of BCE-with-logits over pixels (also for x in [0, 1])."""
    w = vae.weights()
    activation = vae.activation
    x = x_row.astype(np.float64)[None, :]
    mu, logvar = _encode(w, x, activation)
    sigma = np.exp(0.5 * logvar)
    zdim = mu.shape[1]
    out = []
    for start in range(0, k, chunk):
        m = min(chunk, k - start)
        z = mu + sigma * rng.standard_normal((m, zdim))
        logits = _decode_logits(w, z, activation)
        bce = np.maximum(logits, 0.0) - logits * x + np.log1p(np.exp(-np.abs(logits)))
        log_px_z = -bce.sum(axis=1)
        log_prior = -0.5 * (z**2).sum(axis=1) - 0.5 * zdim * LOG_2PI
        log_q = (
            -0.5 * (((z - mu) / sigma) ** 2).sum(axis=1) - 0.5 * logvar.sum() - 0.5 * zdim * LOG_2PI
        )
        out.append(log_px_z + log_prior - log_q)
    return np.concatenate(out)


def iw_estimate(log_w: np.ndarray) -> tuple[float, float]:
    """log mean exp(log_w), and its Monte Carlo standard error by the delta method:
    sd(log mean w) ~= sd(w) / (mean(w) sqrt(k))."""
    top = log_w.max()
    w = np.exp(log_w - top)
    estimate = float(top + np.log(w.mean()))
    stderr = float(w.std(ddof=1) / (w.mean() * math.sqrt(len(w))))
    return estimate, stderr


# -- agreement with the reference --------------------------------------------------------------


def test_matches_numpy_reference_at_large_k(tiny: VAE, mnist: dict[str, np.ndarray]) -> None:
    """Two independent k=20000 estimates of the same quantity (same model, same k, so the
    same small downward bias) differ by about sqrt(2) Monte Carlo standard errors; allow
    5 of them, plus 0.01 nats for fastvae's float32 arithmetic over 784 pixels."""
    k = 20000
    xt = mnist["x_test"]
    x = np.concatenate([xt[:3], binarize(xt[3:4])])  # grayscale and binarized inputs
    ours = tiny.log_likelihood(x, k=k, seed=11)
    rng = np.random.default_rng(5)
    for i in range(len(x)):
        ref, stderr = iw_estimate(reference_log_weights(tiny, x[i], k, rng))
        tol = 5 * math.sqrt(2) * stderr + 0.01
        assert stderr < 1.0, f"example {i}: reference too noisy to be a useful check ({stderr})"
        assert abs(ours[i] - ref) < tol, f"example {i}: fastvae {ours[i]} vs numpy {ref} ± {tol}"


def test_single_log_weights_match_reference_in_distribution(
    tiny: VAE, mnist: dict[str, np.ndarray]
) -> None:
    """With k=1 the estimate is one log weight log p(x, z) - log q(z|x), so fastvae's values
    on 5000 copies of an example (each copy has its own noise) and 5000 NumPy log weights are
    two samples of one distribution: their Kolmogorov-Smirnov distance stays under the 0.1%
    critical value 1.95 sqrt(2/n), and their means agree within four standard errors."""
    n = 5000
    for i, x in enumerate(mnist["x_test"][10:12]):
        ours = tiny.log_likelihood(np.repeat(x[None, :], n, axis=0), k=1, seed=3)
        ref = reference_log_weights(tiny, x, n, np.random.default_rng(i))
        grid = np.sort(np.concatenate([ours, ref]))
        cdf_ours = np.searchsorted(np.sort(ours), grid, side="right") / n
        cdf_ref = np.searchsorted(np.sort(ref), grid, side="right") / n
        ks = np.abs(cdf_ours - cdf_ref).max()
        assert ks < 1.95 * math.sqrt(2 / n), f"example {i}: KS distance {ks:.4f}"
        se = math.sqrt(ours.var(ddof=1) / n + ref.var(ddof=1) / n)
        assert abs(ours.mean() - ref.mean()) < 4 * se + 0.01, (i, ours.mean(), ref.mean())


# -- properties of the estimator -----------------------------------------------------------------


def test_k1_is_the_elbo_in_expectation(relu_model: VAE, mnist: dict[str, np.ndarray]) -> None:
    """log_likelihood(k=1) and elbo() are both unbiased for the ELBO of each example: their
    means over 2000 independent draws (copies of the example, two seeds) agree within four
    combined standard errors."""
    copies = 1000
    xs = mnist["x_test"][:4]
    big = np.repeat(xs, copies, axis=0)  # each copy gets its own noise
    ll = np.concatenate([relu_model.log_likelihood(big, k=1, seed=s) for s in (0, 1)])
    el = np.concatenate([relu_model.elbo(big, seed=s) for s in (0, 1)])
    ll = ll.reshape(2, 4, copies).transpose(1, 0, 2).reshape(4, -1)
    el = el.reshape(2, 4, copies).transpose(1, 0, 2).reshape(4, -1)
    m = ll.shape[1]
    for i in range(4):
        se = math.sqrt(ll[i].var(ddof=1) / m + el[i].var(ddof=1) / m)
        assert abs(ll[i].mean() - el[i].mean()) < 4 * se + 1e-3, (i, ll[i].mean(), el[i].mean())


def test_estimate_grows_with_k(relu_model: VAE, mnist: dict[str, np.ndarray]) -> None:
    """Mean over 200 examples for k = 1, 10, 100, 1000 does not decrease, up to three
    standard errors of the paired per-example differences; and k=1000 is clearly above k=1."""
    x = mnist["x_test"][:200]
    est = {k: relu_model.log_likelihood(x, k=k, seed=4) for k in (1, 10, 100, 1000)}
    ks = sorted(est)
    for a, b in zip(ks, ks[1:], strict=False):
        d = est[b] - est[a]
        se = d.std(ddof=1) / math.sqrt(len(d))
        assert d.mean() > -3 * se, f"k={a}: {est[a].mean():.3f}, k={b}: {est[b].mean():.3f}"
    assert est[1000].mean() > est[1].mean() + 0.5
    assert np.all(np.isfinite(est[1000])) and np.all(est[1000] < 0)


def test_same_seed_same_result(relu_model: VAE, mnist: dict[str, np.ndarray]) -> None:
    x = mnist["x_test"][:20]
    a = relu_model.log_likelihood(x, k=50, seed=7)
    b = relu_model.log_likelihood(x, k=50, seed=7)
    np.testing.assert_array_equal(a, b)
    c = relu_model.log_likelihood(x, k=50, seed=8)
    assert not np.array_equal(a, c)
    # seed None is a fixed seed too
    np.testing.assert_array_equal(
        relu_model.log_likelihood(x, k=50), relu_model.log_likelihood(x, k=50)
    )


@pytest.mark.parametrize("k", [20000, 100, 3])
def test_prefix_slices_agree(relu_model: VAE, mnist: dict[str, np.ndarray], k: int) -> None:
    """An example's noise is keyed by (seed, its row index), so how a call splits its rows
    (65536 // k rows per call into the core; several examples per decoder pass when k < 1024)
    does not matter: a prefix of x gives the values of all of x, up to float32 rounding when
    examples share a decoder pass in different groupings (about 4e-8 relative is seen)."""
    x = mnist["x_test"][:1000] if k <= 100 else mnist["x_test"][:10]
    whole = relu_model.log_likelihood(x, k=k, seed=9)
    for m in (1, 5, len(x) - 3):
        part = relu_model.log_likelihood(x[:m], k=k, seed=9)
        if k >= 1024:  # one example per pass: bit-identical
            np.testing.assert_array_equal(part, whole[:m])
        else:
            np.testing.assert_allclose(part, whole[:m], rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "10", 2**24 + 1])
def test_invalid_k_is_rejected(relu_model: VAE, mnist: dict[str, np.ndarray], k: object) -> None:
    with pytest.raises(FastVAEError, match="k must"):
        relu_model.log_likelihood(mnist["x_test"][:3], k=k)  # type: ignore[arg-type]


def test_binarized_inputs(relu_model: VAE, mnist: dict[str, np.ndarray]) -> None:
    """On a fixed binarization: finite, negative, and above the ELBO on average."""
    xb = binarize(mnist["x_test"][:100])
    ll = relu_model.log_likelihood(xb, k=200, seed=1)
    assert ll.shape == (100,) and ll.dtype == np.float64
    assert np.all(np.isfinite(ll)) and np.all(ll < 0)
    assert ll.mean() > relu_model.elbo(xb).mean()


def test_progress_bar_does_not_change_results(
    relu_model: VAE, mnist: dict[str, np.ndarray]
) -> None:
    x = mnist["x_test"][:30]
    a = relu_model.log_likelihood(x, k=30, seed=2, progress=True)
    np.testing.assert_array_equal(a, relu_model.log_likelihood(x, k=30, seed=2))
