"""Training on k samples per example: the importance-weighted bound (IWAE) and the k-sample ELBO.

The core's loss and gradients against ``numpy_vae.loss_and_grads_k`` (float64, the chain rule
written out independently), that reference against finite differences of its own loss, and
the core against finite differences of the core's own float32 loss; for k = 1, 2, 5 and 50,
both likelihoods, the dense and sparse first layer, one and two threads.
"""

from __future__ import annotations

import math

import numpy as np
import numpy_vae as nv
import pytest
from test_gradients import GRAD_RTOL, LOSS_RTOL, assert_close_scaled, assert_grads_match

from fastvae import VAE, ConfigError, _core

# (input_dim, hidden_dims, latent_dim, activation)
CONFIGS = [
    (7, (6,), 3, "tanh"),
    (9, (5, 4), 2, "relu"),
    (6, (), 2, "tanh"),
]
CONFIG_IDS = ["D7-H6-Z3-tanh", "D9-H5x4-Z2-relu", "D6-Hnone-Z2-tanh"]


def case(
    config: tuple[int, tuple[int, ...], int, str],
    batch: int,
    k: int,
    likelihood: str,
    seed: int,
    scale: float = 1.0,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Weights, x (B, D) and noise eps (B, k, Z). Bernoulli x in [0, 1] with exact zeros and
    ones; Gaussian x real, with learned log-variances away from 0."""
    d, hidden, z, _ = config
    rng = np.random.default_rng([seed, batch, k, d, *hidden, likelihood == "gaussian"])
    weights = nv.init_weights(d, hidden, z, rng, scale=scale)
    if likelihood == "gaussian":
        weights["decoder_logvar"] = rng.uniform(-1.0, 1.0, d).astype(np.float32)
        x = (1.5 * rng.standard_normal((batch, d))).astype(np.float32)
    else:
        x = rng.random((batch, d)).astype(np.float32)
        x[rng.random(x.shape) < 0.2] = 1.0
    x[rng.random(x.shape) < 0.3] = 0.0
    eps = rng.standard_normal((batch, k, z)).astype(np.float32)
    return weights, x, eps


def core_model(
    config: tuple[int, tuple[int, ...], int, str],
    weights: dict[str, np.ndarray],
    likelihood: str,
    threads: int = 1,
) -> _core.Model:
    d, hidden, z, act = config
    model = _core.Model(d, list(hidden), z, act, 0, threads, likelihood=likelihood)
    model.set_weights(weights)
    return model


def dataset(x: np.ndarray, likelihood: str, sparse: bool | None = None) -> _core.Dataset:
    return _core.Dataset(x, sparse=sparse, domain="unit" if likelihood == "bernoulli" else "real")


def flat(eps: np.ndarray) -> np.ndarray:
    """(B, k, Z) -> (B k, Z): sample j of row i is row i k + j, as the core takes it."""
    b, k, z = eps.shape
    return np.ascontiguousarray(eps.reshape(b * k, z))


# --------------------------------------------------------------------------------------------
# The NumPy reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_k1_elbo_reference_is_the_one_sample_reference(
    config: tuple[int, tuple[int, ...], int, str], likelihood: str
) -> None:
    weights, x, eps = case(config, 5, 1, likelihood, seed=2)
    loss, grads = nv.loss_and_grads_k(weights, x, eps, config[3], beta=0.6, objective="elbo")
    ref_loss, ref_grads = nv.loss_and_grads(weights, x, eps[:, 0, :], config[3], beta=0.6)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert_grads_match(grads, ref_grads, 1e-12, "k=1 elbo vs the one-sample reference")


def test_k1_iwae_reference_is_the_monte_carlo_elbo() -> None:
    # One sample: log w = log p(x|z) + log p(z) - log q(z|x), the ELBO with the KL estimated
    # from the sample; its mean over many noise draws is the closed-form ELBO.
    config = CONFIGS[0]
    weights, x, eps = case(config, 3, 1, "bernoulli", seed=3)
    nll = nv.forward(weights, x, eps[:, 0, :], config[3]).bce
    f = nv.forward(weights, x, eps[:, 0, :], config[3])
    assert f.z is not None and f.logvar is not None
    log_q_minus_log_p = np.sum(
        0.5 * f.z**2 - 0.5 * eps[:, 0, :].astype(np.float64) ** 2 - 0.5 * f.logvar
    )
    iw = nv.loss_k(weights, x, eps, config[3], objective="iwae")
    assert iw == pytest.approx(nll + log_q_minus_log_p, rel=1e-12)

    # The same 2000 draws for both, so only the KL's estimate differs between them.
    rng = np.random.default_rng(0)
    many = rng.standard_normal((3, 2000, config[2]))
    mc = np.mean([nv.loss_k(weights, x, many[:, j : j + 1, :], config[3]) for j in range(2000)])
    closed = nv.loss_k(weights, x, many, config[3], objective="elbo")
    assert mc == pytest.approx(closed, rel=0.01)


# Finite differences need a smooth loss: the tanh configurations (relu's kinks would need the
# margin search test_gradients does; the math checked is the same).
TANH = [(c, i) for c, i in zip(CONFIGS, CONFIG_IDS, strict=True) if c[3] == "tanh"]


@pytest.mark.parametrize("objective", ["iwae", "elbo"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("config", [c for c, _ in TANH], ids=[i for _, i in TANH])
def test_numpy_reference_matches_finite_differences(
    config: tuple[int, tuple[int, ...], int, str], k: int, likelihood: str, objective: str
) -> None:
    act = config[3]
    weights, x, eps = case(config, 4, k, likelihood, seed=4)
    beta = 0.7
    _, grads = nv.loss_and_grads_k(weights, x, eps, act, beta, objective)
    h = 1e-6
    for name, w in weights.items():
        numeric = np.zeros(w.shape)
        for idx in np.ndindex(*w.shape):
            plus = {n: v.astype(np.float64) for n, v in weights.items()}
            minus = {n: v.astype(np.float64) for n, v in weights.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            numeric[idx] = (
                nv.loss_k(plus, x, eps, act, beta, objective)
                - nv.loss_k(minus, x, eps, act, beta, objective)
            ) / (2 * h)
        assert_close_scaled(grads[name], numeric, 1e-6, f"k={k} {objective}: {name}", atol=1e-7)


# --------------------------------------------------------------------------------------------
# The core against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("objective", ["iwae", "elbo"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("k", [1, 2, 5, 50])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_core_matches_numpy(
    config: tuple[int, tuple[int, ...], int, str],
    k: int,
    likelihood: str,
    objective: str,
    threads: int,
    sparse: bool,
) -> None:
    # 37 rows: with k = 50, 1850 decoder rows, split over the threads.
    batch, beta = 37, 0.8
    weights, x, eps = case(config, batch, k, likelihood, seed=5)
    model = core_model(config, weights, likelihood, threads)
    loss, grads = model.loss_and_grads(
        dataset(x, likelihood, sparse), flat(eps), beta, k, objective
    )
    # One sample is the ELBO with its closed-form KL whatever the objective.
    ref_objective = "elbo" if k == 1 else objective
    ref_loss, ref_grads = nv.loss_and_grads_k(weights, x, eps, config[3], beta, ref_objective)
    what = f"k={k} {objective} {likelihood} threads={threads} sparse={sparse}"
    assert math.isclose(loss, ref_loss, rel_tol=LOSS_RTOL), f"{what}: {loss} vs {ref_loss}"
    assert_grads_match(grads, ref_grads, GRAD_RTOL, what)


def test_k1_is_the_elbo_whatever_the_objective() -> None:
    config = CONFIGS[1]
    weights, x, eps = case(config, 20, 1, "bernoulli", seed=6)
    model = core_model(config, weights, "bernoulli", 2)
    data = dataset(x, "bernoulli")
    iw_loss, iw = model.loss_and_grads(data, flat(eps), 1.0, 1, "iwae")
    elbo_loss, elbo = model.loss_and_grads(data, flat(eps), 1.0, 1, "elbo")
    plain_loss, plain = model.loss_and_grads(data, eps[:, 0, :])
    assert iw_loss == elbo_loss == plain_loss
    for name in plain:
        np.testing.assert_array_equal(iw[name], plain[name])
        np.testing.assert_array_equal(elbo[name], plain[name])


@pytest.mark.parametrize("objective", ["iwae", "elbo"])
@pytest.mark.parametrize("threads", [1, 2])
def test_core_gradients_match_core_finite_differences(objective: str, threads: int) -> None:
    config = (6, (5, 4), 3, "tanh")
    k = 5
    weights, x, eps = case(config, 7, k, "bernoulli", seed=7, scale=0.5)
    model = core_model(config, weights, "bernoulli", threads)
    data = dataset(x, "bernoulli")
    _, grads = model.loss_and_grads(data, flat(eps), 1.0, k, objective)
    rng = np.random.default_rng(8)
    h = 1e-2
    for name in sorted(weights):
        w = weights[name]
        for _ in range(3):
            idx = tuple(int(rng.integers(n)) for n in w.shape)
            plus = {n: v.copy() for n, v in weights.items()}
            minus = {n: v.copy() for n, v in weights.items()}
            plus[name][idx] = np.float32(w[idx] + h)
            minus[name][idx] = np.float32(w[idx] - h)
            delta = float(plus[name][idx]) - float(minus[name][idx])
            model.set_weights(plus)
            lp, _ = model.loss_and_grads(data, flat(eps), 1.0, k, objective)
            model.set_weights(minus)
            lm, _ = model.loss_and_grads(data, flat(eps), 1.0, k, objective)
            numeric = (lp - lm) / delta
            analytic = float(grads[name][idx])
            assert abs(numeric - analytic) <= 1e-3 + 5e-3 * abs(analytic), (
                f"{name}{list(idx)}: core {analytic:.6g} vs finite difference {numeric:.6g}"
            )


def test_iwae_loss_is_at_most_the_k_sample_elbo_estimate() -> None:
    # On the same samples the bound is the log of the mean weight; the mean of the log weights
    # (with the KL estimated from the samples) is below it by Jensen, and the closed-form
    # k-sample ELBO is an estimate of the same expected ELBO: at k = 50 the IWAE loss is lower.
    config = CONFIGS[0]
    weights, x, eps = case(config, 30, 50, "bernoulli", seed=9)
    model = core_model(config, weights, "bernoulli")
    data = dataset(x, "bernoulli")
    iw, _ = model.loss_and_grads(data, flat(eps), 1.0, 50, "iwae")
    elbo, _ = model.loss_and_grads(data, flat(eps), 1.0, 50, "elbo")
    assert iw < elbo


@pytest.mark.parametrize("objective", ["iwae", "elbo"])
def test_adam_step_matches_numpy(objective: str) -> None:
    config = CONFIGS[1]
    k, lr, beta = 5, 3e-3, 0.9
    weights, x, eps = case(config, 16, k, "gaussian", seed=10)
    model = core_model(config, weights, "gaussian", 2)
    data = dataset(x, "gaussian")
    state = nv.AdamState.zeros(weights)
    want = {n: w.astype(np.float64) for n, w in weights.items()}
    for _ in range(3):
        loss = model.step_with_noise(data, flat(eps), lr, 1e-4, beta, k, objective)
        ref_loss, ref_grads = nv.loss_and_grads_k(want, x, eps, config[3], beta, objective)
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        want = nv.adam_step(want, ref_grads, state, lr, eps=1e-4)
    got = model.weights()
    for name in want:
        assert_close_scaled(got[name], want[name], 1e-4, f"{objective} after 3 steps: {name}")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def test_bad_settings_are_named() -> None:
    config = CONFIGS[0]
    weights, x, eps = case(config, 4, 2, "bernoulli", seed=11)
    model = core_model(config, weights, "bernoulli")
    data = dataset(x, "bernoulli")
    with pytest.raises(ValueError, match="objective must be one of"):
        model.loss_and_grads(data, flat(eps), 1.0, 2, "vae")
    with pytest.raises(ValueError, match="k must be at least 1"):
        model.loss_and_grads(data, flat(eps), 1.0, 0, "iwae")
    with pytest.raises(ValueError, match=r"eps must have shape \(12, 3\)"):
        model.loss_and_grads(data, flat(eps), 1.0, 3, "iwae")
    with pytest.raises(ValueError, match="batch_size \\* k must be at most"):
        model.begin_epoch(data, 128, 1e-3, False, k=_core.MAX_STEP_ROWS)
    assert _core.OBJECTIVES == ["elbo", "iwae"]


def test_vae_trains_on_k_samples() -> None:
    rng = np.random.default_rng(12)
    x = (rng.random((300, 16)) < 0.3).astype(np.float32)
    losses = {}
    for objective in ["iwae", "elbo"]:
        vae = VAE(input_dim=16, hidden_dims=(12,), latent_dim=3, k=5, objective=objective, seed=1)
        vae.fit(x, epochs=8, batch_size=30, lr=3e-3, progress=False)
        h = vae.history_["train_loss"]
        assert h[-1] < h[0], f"{objective}: {h}"
        losses[objective] = h[-1]
        assert vae.fit_params_["k"] == 5 and vae.fit_params_["objective"] == objective
    # The same seed and samples: the importance-weighted bound is the tighter one.
    assert losses["iwae"] < losses["elbo"]


def test_vae_rejects_bad_k_settings() -> None:
    x = np.zeros((10, 4), np.float32)
    for k in [0, -1, 2.5, True, "5"]:
        with pytest.raises(ConfigError, match="k must be"):
            VAE(input_dim=4, hidden_dims=(3,), latent_dim=2, k=k).fit(x, progress=False)
    with pytest.raises(ConfigError, match="objective must be one of"):
        VAE(input_dim=4, hidden_dims=(3,), latent_dim=2, k=2, objective="vae").fit(x)
    vae = VAE(input_dim=4, hidden_dims=(3,), latent_dim=2, batch_size=1000, k=30000)
    with pytest.raises(
        ConfigError, match=r"batch_size \* k must be at most 262144.*got 10 \* 30000"
    ):
        vae.fit(x, progress=False)
    assert not hasattr(vae, "model_")
    # Within the limit once the batch is clipped to the rows there are.
    vae.fit(x, k=20000, epochs=1, progress=False)
    assert vae.fit_params_["k"] == 20000
