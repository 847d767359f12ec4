"""The Gaussian likelihood and the KL weight in the core, against independent references:

* loss and every gradient of Gaussian models (and of both likelihoods with beta != 1) against
  the float64 NumPy reference ``numpy_vae``, whose own backward pass is checked against
  central finite differences of its loss;
* the ELBO and the importance-weighted log-likelihood against the exact log p(x) of a linear
  Gaussian model whose encoder is its exact posterior: then every importance weight is p(x),
  so the estimate equals log N(x; b, w w^T + diag(exp(s))) up to float rounding for any k,
  and the one-sample ELBO (an unbiased estimate) averages to it: this pins the 0.5 log(2 pi)
  constant, the log-variances and the KL together;
* decode (the means) and decode_draw (draws whose mean and spread match the model's).
"""

from __future__ import annotations

import math

import numpy as np
import numpy_vae as nv
import pytest
from test_gradients import FD_STEP, assert_close_scaled, assert_grads_match

from fastvae import _core

CONFIGS = [(5, (3,), 2, "relu"), (7, (6, 4), 3, "tanh"), (6, (), 2, "relu")]


def gaussian_case(
    d: int, hidden: tuple[int, ...], z: int, batch: int, seed: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Weights with log-variances away from 0, real x (signed, beyond 1, some exact zeros so
    the sparse first layer has work) and noise."""
    rng = np.random.default_rng([seed, d, batch, *hidden])
    weights = nv.init_weights(d, hidden, z, rng)
    weights["decoder_logvar"] = rng.uniform(-1.5, 1.5, d).astype(np.float32)
    x = (2.0 * rng.standard_normal((batch, d))).astype(np.float32)
    x[rng.random(x.shape) < 0.4] = 0.0
    eps = rng.standard_normal((batch, z)).astype(np.float32)
    return weights, x, eps


def core_model(
    d: int, hidden: tuple[int, ...], z: int, act: str, weights: dict, threads: int = 1
) -> _core.Model:
    model = _core.Model(d, list(hidden), z, act, 0, threads, likelihood="gaussian")
    model.set_weights(weights)
    return model


@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3, 130])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_gaussian_loss_and_grads_match_numpy(config, batch, threads, sparse, beta) -> None:
    d, hidden, z, act = config
    weights, x, eps = gaussian_case(d, hidden, z, batch, seed=1)
    model = core_model(d, hidden, z, act, weights, threads)
    data = _core.Dataset(x, sparse=sparse, domain="real")
    loss, grads = model.loss_and_grads(data, eps, beta=beta)
    ref_loss, ref_grads = nv.loss_and_grads(weights, x, eps, act, beta=beta)
    what = f"gaussian {config} B={batch} threads={threads} sparse={sparse} beta={beta}"
    assert math.isclose(loss, ref_loss, rel_tol=1e-5), (what, loss, ref_loss)
    assert "decoder_logvar" in grads
    assert_grads_match(grads, ref_grads, 1e-4, what)


@pytest.mark.parametrize("beta", [0.0, 0.25, 4.0])
def test_bernoulli_beta_matches_numpy(beta: float) -> None:
    rng = np.random.default_rng(7)
    weights = nv.init_weights(6, (5,), 2, rng)
    x = rng.random((40, 6)).astype(np.float32)
    eps = rng.standard_normal((40, 2)).astype(np.float32)
    model = _core.Model(6, [5], 2, "relu", 0, 2)
    model.set_weights(weights)
    loss, grads = model.loss_and_grads(_core.Dataset(x), eps, beta=beta)
    ref_loss, ref_grads = nv.loss_and_grads(weights, x, eps, "relu", beta=beta)
    assert math.isclose(loss, ref_loss, rel_tol=1e-5), (loss, ref_loss)
    assert_grads_match(grads, ref_grads, 1e-4, f"bernoulli beta={beta}")
    # The KL's weight reaches the gradients: beta = 1 differs.
    _, grads1 = model.loss_and_grads(_core.Dataset(x), eps)
    if beta != 1.0:
        assert not np.allclose(grads["fc_mu.bias"], grads1["fc_mu.bias"])


@pytest.mark.parametrize("beta", [1.0, 2.5])
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_numpy_gaussian_reference_matches_finite_differences(act: str, beta: float) -> None:
    for seed in range(5, 105):
        weights, x, eps = gaussian_case(5, (4,), 2, 3, seed)
        margin = nv.forward(weights, x, eps, act).min_abs_preactivation()
        if act == "tanh" or margin > 100 * FD_STEP:
            break
    _, analytic = nv.loss_and_grads(weights, x, eps, act, beta=beta)
    w64 = {k: v.astype(np.float64) for k, v in weights.items()}
    for name, w in w64.items():
        numeric = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            old = w[idx]
            w[idx] = old + FD_STEP
            plus = nv.loss_only(w64, x, eps, act, beta)
            w[idx] = old - FD_STEP
            minus = nv.loss_only(w64, x, eps, act, beta)
            w[idx] = old
            numeric[idx] = (plus - minus) / (2 * FD_STEP)
        assert_close_scaled(analytic[name], numeric, 1e-6, f"numpy vs FD {name}", atol=1e-6)


def linear_gaussian_with_exact_posterior(d: int, seed: int):
    """A latent_dim = 1 model with no hidden layers: x = w z + b + N(0, diag(exp(s))). Its
    posterior is N(m(x), v) with v = 1 / (1 + w^T P w), m = v w^T P (x - b), P = diag(exp(-s)),
    and the encoder is set to exactly that. Returns the weights and the exact log p(x)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1.5, d)
    b = rng.normal(0, 0.5, d)
    s = rng.uniform(-1.0, 0.5, d)
    prec = np.exp(-s)
    v = 1.0 / (1.0 + w @ (prec * w))
    weights = {
        "fc_mu.weight": (v * w * prec)[None, :],
        "fc_mu.bias": np.array([-v * (w * prec) @ b]),
        "fc_logvar.weight": np.zeros((1, d)),
        "fc_logvar.bias": np.array([math.log(v)]),
        "decoder.0.weight": w[:, None],
        "decoder.0.bias": b,
        "decoder_logvar": s,
    }
    weights = {k: np.asarray(val, dtype=np.float32) for k, val in weights.items()}
    # The exact marginal, from the float32 weights actually used.
    w32, b32 = weights["decoder.0.weight"][:, 0].astype(np.float64), weights["decoder.0.bias"]
    cov = np.outer(w32, w32) + np.diag(np.exp(weights["decoder_logvar"].astype(np.float64)))
    x = rng.multivariate_normal(b32, cov, size=50).astype(np.float32)
    diff = x.astype(np.float64) - b32
    _, logdet = np.linalg.slogdet(cov)
    maha = np.einsum("ij,ij->i", diff @ np.linalg.inv(cov), diff)
    log_px = -0.5 * (d * math.log(2 * math.pi) + logdet + maha)
    return weights, x, log_px


@pytest.mark.parametrize("threads", [1, 2])
def test_elbo_and_log_likelihood_equal_the_exact_marginal(threads: int) -> None:
    d = 6
    weights, x, log_px = linear_gaussian_with_exact_posterior(d, seed=3)
    model = _core.Model(d, [], 1, "relu", 0, threads, likelihood="gaussian")
    model.set_weights(weights)
    data = _core.Dataset(x, domain="real")
    for k in (1, 64):
        ll = model.log_likelihood(data, 0, len(x), k, 5)
        np.testing.assert_allclose(ll, log_px, rtol=0, atol=2e-4 * d)
    # 400 one-sample ELBOs of each row (each copy draws its own noise), averaged.
    copies = 400
    elbo = model.elbo(_core.Dataset(np.tile(x, (copies, 1)), domain="real"), 5)
    elbo = elbo.reshape(copies, len(x))
    sem = elbo.std(0) / math.sqrt(copies)
    assert np.all(np.abs(elbo.mean(0) - log_px) < 5 * sem + 1e-4), (elbo.mean(0) - log_px, sem)
    assert sem.max() > 0
    # With the posterior a little off, the ELBO drops below log p(x), and the estimate with
    # k samples (a lower bound in expectation) comes back to it.
    off = dict(weights, **{"fc_logvar.bias": weights["fc_logvar.bias"] + 1.0})
    model.set_weights(off)
    elbo_off = model.elbo(data, 5)
    ll_off = model.log_likelihood(data, 0, len(x), 2000, 5)
    gap = np.mean(log_px) - np.mean(elbo_off)
    assert gap > 0.05
    assert abs(np.mean(ll_off) - np.mean(log_px)) < 0.1 * gap


def test_decode_and_draws() -> None:
    d = 4
    weights, _, _ = linear_gaussian_with_exact_posterior(d, seed=4)
    model = _core.Model(d, [], 1, "relu", 0, 2, likelihood="gaussian")
    model.set_weights(weights)
    z = np.full((20000, 1), 0.5, np.float32)
    means = model.decode(z)
    w, b = weights["decoder.0.weight"][:, 0], weights["decoder.0.bias"]
    np.testing.assert_allclose(means[0], 0.5 * w + b, rtol=1e-6)
    draws = model.decode_draw(z, 11)
    sd = np.exp(0.5 * weights["decoder_logvar"])
    np.testing.assert_allclose(draws.mean(0), means[0], atol=4 * sd.max() / math.sqrt(len(z)))
    np.testing.assert_allclose(draws.std(0), sd, rtol=0.03)
    np.testing.assert_array_equal(draws, model.decode_draw(z, 11))
    assert not np.array_equal(draws, model.decode_draw(z, 12))
    # Bernoulli draws are 0 or 1 with the decoded probabilities.
    bern = _core.Model(3, [], 1, "relu", 0, 1)
    p = bern.decode(z[:20000])
    bits = bern.decode_draw(z[:20000], 2)
    assert set(np.unique(bits)) <= {0.0, 1.0}
    np.testing.assert_allclose(bits.mean(0), p[0], atol=0.02)


def test_logvar_bounds_and_domains() -> None:
    model = _core.Model(3, [4], 2, "relu", 0, 1, likelihood="gaussian")
    w = model.weights()
    assert w["decoder_logvar"].shape == (3,)
    np.testing.assert_array_equal(w["decoder_logvar"], 0.0)
    bad = dict(w, decoder_logvar=np.array([0.0, _core.LOGVAR_MAX + 1, 0.0], np.float32))
    with pytest.raises(_core.InputError, match="decoder_logvar"):
        model.set_weights(bad)
    # A constant feature: its log-variance runs down to the bound and stops there.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 3)).astype(np.float32)
    x[:, 1] = 0.25
    data = _core.Dataset(x, domain="real")
    for _ in range(60):
        run = model.begin_epoch(data, 64, 0.05, False)
        model.run(data, run, 1000)
        model.end_epoch(run)
    lv = model.weights()["decoder_logvar"]
    assert lv[1] == _core.LOGVAR_MIN, lv
    assert np.all(np.isfinite(model.elbo(data, 0)))
    # Real values: a Gaussian model takes them, a Bernoulli one names the first bad entry.
    with pytest.raises(_core.InputError, match=r"x\[0, 0\].*outside \[0, 1\]"):
        _core.Dataset(np.array([[1.5, 0.0]], np.float32))
    real = _core.Dataset(np.array([[0.5, 0.0], [0.2, -3.0]], np.float32), domain="real")
    assert not real.unit
    bern = _core.Model(2, [], 1, "relu", 0, 1)
    with pytest.raises(_core.InputError, match=r"x\[1, 1\] is -3.*gaussian"):
        bern.elbo(real, 0)
    with pytest.raises(_core.InputError, match="NaN"):
        _core.Dataset(np.array([[np.nan, 0.0]], np.float32), domain="real")
    with pytest.raises(_core.ConfigError, match="binarize"):
        model.begin_epoch(data, 64, 1e-3, True)
    with pytest.raises(_core.ConfigError, match="beta"):
        model.begin_epoch(data, 64, 1e-3, False, beta=-1.0)
