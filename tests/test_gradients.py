"""The core's loss, gradients and Adam step against an independent NumPy reference.

Three independent checks of every gradient:

* the Rust core (float32) against ``numpy_vae`` (float64, hand-written backward pass);
* ``numpy_vae``'s backward pass against central finite differences of its own loss;
* the core's gradients against central finite differences of the core's own float32 loss,
  which does not involve the NumPy code at all.

Plus closed-form values of the BCE and KL terms for hand-built weights, and three Adam steps
against ``numpy_vae.adam_step``. The MNIST-sized case needs the real MNIST files (conftest.py's
``mnist`` fixture).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy_vae as nv
import pytest

from fastvae import VAE, _core

# Tolerances, relative to the largest absolute value of the tensor compared.
GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-5
ADAM_RTOL = 1e-5


@dataclass(frozen=True)
class Config:
    input_dim: int
    hidden_dims: tuple[int, ...]
    latent_dim: int
    activation: str

    @property
    def id(self) -> str:
        hidden = "x".join(map(str, self.hidden_dims)) or "none"
        return f"D{self.input_dim}-H{hidden}-Z{self.latent_dim}-{self.activation}"


SMALL_CONFIGS = [
    Config(5, (3,), 2, "relu"),
    Config(7, (6, 4), 3, "tanh"),
    Config(6, (), 2, "relu"),
    Config(9, (5, 4, 3), 2, "relu"),
]
CONFIG_IDS = [c.id for c in SMALL_CONFIGS]
# 130 rows is above the size at which the core splits a batch over its threads.
BATCH_SIZES = [1, 2, 3, 33, 130]


def make_case(
    config: Config, batch: int, seed: int, scale: float = 1.0
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Random float32 weights, x in [0, 1] (B, D) and noise eps (B, Z).

    Narrow relu layers on a row or two are easily all dead, which would make whole gradient
    tensors zero and their comparison vacuous: the first of up to 100 draws for ``seed`` in
    which every gradient tensor has a non-zero entry is taken.
    """
    for attempt in range(100):
        rng = np.random.default_rng([seed, attempt, batch, config.input_dim, *config.hidden_dims])
        weights = nv.init_weights(
            config.input_dim, config.hidden_dims, config.latent_dim, rng, scale=scale
        )
        x = rng.random((batch, config.input_dim)).astype(np.float32)
        # Some exact zeros and ones, as in binarized images.
        x[rng.random(x.shape) < 0.2] = 0.0
        x[rng.random(x.shape) < 0.2] = 1.0
        eps = rng.standard_normal((batch, config.latent_dim)).astype(np.float32)
        _, grads = nv.loss_and_grads(weights, x, eps, config.activation)
        if all(np.any(g != 0) for g in grads.values()):
            return weights, x, eps
    raise AssertionError(f"no case with all gradients non-zero for {config.id} B={batch}")


def core_model(config: Config, weights: dict[str, np.ndarray], threads: int = 1) -> _core.Model:
    model = _core.Model(
        config.input_dim,
        list(config.hidden_dims),
        config.latent_dim,
        config.activation,
        0,
        threads,
    )
    model.set_weights(weights)
    return model


def max_rel_diff(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max |actual - expected|, max |expected|)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    diff = float(np.max(np.abs(actual - expected), initial=0.0))
    scale = float(np.max(np.abs(expected), initial=0.0))
    return diff, scale


def assert_close_scaled(
    actual: np.ndarray, expected: np.ndarray, rtol: float, what: str, atol: float = 1e-12
) -> float:
    """|actual - expected| <= rtol * max|expected| + atol elementwise; returns the max diff."""
    diff, scale = max_rel_diff(actual, expected)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    assert diff <= rtol * scale + atol, (
        f"{what}: max abs diff {diff:.3e} > {rtol:g} * max|expected| {scale:.3e} + {atol:g} "
        f"(relative {diff / max(scale, 1e-300):.3e})"
    )
    return diff


def assert_grads_match(
    got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float, what: str
) -> None:
    assert sorted(got) == sorted(want), f"{what}: gradient names {sorted(got)} != {sorted(want)}"
    for name in want:
        assert_close_scaled(got[name], want[name], rtol, f"{what}: {name}")


# --------------------------------------------------------------------------------------------
# Core vs the NumPy reference
# --------------------------------------------------------------------------------------------


# The first layer's two paths: dense products, or only the nonzero inputs (which MNIST takes).
FIRST_LAYER = {"dense": False, "sparse": True}


@pytest.mark.parametrize("first_layer", sorted(FIRST_LAYER))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=CONFIG_IDS)
def test_loss_and_grads_match_numpy(
    config: Config, batch: int, threads: int, first_layer: str
) -> None:
    weights, x, eps = make_case(config, batch, seed=1)
    vae = VAE(
        input_dim=config.input_dim,
        hidden_dims=config.hidden_dims,
        latent_dim=config.latent_dim,
        activation=config.activation,
        seed=3,
        threads=threads,
    ).set_weights(weights)
    model = vae.model_

    loss, grads = model.loss_and_grads(_core.Dataset(x, sparse=FIRST_LAYER[first_layer]), eps)
    ref_loss, ref_grads = nv.loss_and_grads(weights, x, eps, config.activation)

    what = f"{config.id} B={batch} threads={threads} {first_layer}"
    assert isinstance(loss, float)
    assert math.isclose(loss, ref_loss, rel_tol=LOSS_RTOL), (
        f"{what}: loss {loss!r} != numpy {ref_loss!r} (diff {abs(loss - ref_loss):.3e})"
    )
    assert_grads_match(grads, ref_grads, GRAD_RTOL, what)
    for name, g in grads.items():
        assert g.shape == weights[name].shape, f"{what}: {name} shape {g.shape}"

    # loss_and_grads leaves the model alone.
    after = model.weights()
    for name, w in weights.items():
        np.testing.assert_array_equal(after[name], w, err_msg=f"{what}: {name} changed")
    assert model.step == 0
    _, _, t, _ = model.optimizer_state()
    assert t == 0


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=CONFIG_IDS)
def test_thread_counts_agree(config: Config) -> None:
    """One and two threads give the same loss and gradients up to summation order."""
    weights, x, eps = make_case(config, 130, seed=2)
    results = [
        core_model(config, weights, threads).loss_and_grads(_core.Dataset(x), eps)
        for threads in (1, 2)
    ]
    (loss1, grads1), (loss2, grads2) = results
    assert math.isclose(loss1, loss2, rel_tol=1e-6), (loss1, loss2)
    assert_grads_match(grads2, grads1, 1e-5, f"{config.id} threads 2 vs 1")


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=CONFIG_IDS)
def test_float64_inputs_give_the_same_result(config: Config) -> None:
    """x and eps as float64 (holding float32 values) give what float32 inputs give."""
    weights, x, eps = make_case(config, 5, seed=4)
    model = core_model(config, weights)
    loss32, grads32 = model.loss_and_grads(_core.Dataset(x), eps)
    loss64, grads64 = model.loss_and_grads(
        _core.Dataset(x.astype(np.float64)), eps.astype(np.float64)
    )
    assert math.isclose(loss32, loss64, rel_tol=1e-6), (loss32, loss64)
    assert_grads_match(grads64, grads32, 1e-6, f"{config.id} float64 vs float32 inputs")


# --------------------------------------------------------------------------------------------
# The NumPy reference vs finite differences of itself (float64)
# --------------------------------------------------------------------------------------------

FD_STEP = 1e-6


def numeric_grads(
    weights: dict[str, np.ndarray], x: np.ndarray, eps: np.ndarray, activation: str
) -> dict[str, np.ndarray]:
    """Central differences of the float64 NumPy loss, every coordinate."""
    w64 = {k: v.astype(np.float64) for k, v in weights.items()}
    out: dict[str, np.ndarray] = {}
    for name, w in w64.items():
        g = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            old = w[idx]
            w[idx] = old + FD_STEP
            plus = nv.loss_only(w64, x, eps, activation)
            w[idx] = old - FD_STEP
            minus = nv.loss_only(w64, x, eps, activation)
            w[idx] = old
            g[idx] = (plus - minus) / (2 * FD_STEP)
        out[name] = g
    return out


FD_CASES = [
    (config, activation)
    for config in SMALL_CONFIGS
    for activation in sorted({config.activation, "tanh"})
]


@pytest.mark.parametrize("batch", [1, 3, 33])
@pytest.mark.parametrize(
    ("config", "activation"),
    FD_CASES,
    ids=[f"{c.id}-as-{a}" for c, a in FD_CASES],
)
def test_numpy_reference_matches_finite_differences(
    config: Config, activation: str, batch: int
) -> None:
    # Finite differences are only valid away from relu's kink: no pre-activation may cross 0
    # when one weight moves by FD_STEP (inputs and activations here are O(1)), so take the first
    # case (by seed) whose pre-activations all keep a margin of 100 steps.
    for seed in range(5, 105):
        weights, x, eps = make_case(config, batch, seed=seed)
        margin = nv.forward(weights, x, eps, activation).min_abs_preactivation()
        if activation == "tanh" or margin > 100 * FD_STEP:
            break
    else:
        pytest.fail(f"no case with pre-activations away from the relu kink (last {margin:.2e})")
    _, analytic = nv.loss_and_grads(weights, x, eps, activation)
    numeric = numeric_grads(weights, x, eps, activation)
    what = f"numpy backward vs FD, {config.id} as {activation}, B={batch}"
    assert sorted(analytic) == sorted(numeric)
    for name in numeric:
        assert_close_scaled(analytic[name], numeric[name], 1e-6, f"{what}: {name}", atol=1e-7)


# --------------------------------------------------------------------------------------------
# The core vs finite differences of its own float32 loss (no NumPy reference involved)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_core_gradients_match_core_finite_differences(threads: int) -> None:
    config = Config(6, (5, 4), 3, "tanh")
    batch = 7
    # Small weights keep tanh away from saturation and logvar moderate, so the loss is smooth
    # on the scale of the step.
    weights, x, eps = make_case(config, batch, seed=6, scale=0.5)
    model = core_model(config, weights, threads)
    data = _core.Dataset(x)
    _, grads = model.loss_and_grads(data, eps)

    rng = np.random.default_rng(7)
    h = 1e-2
    for name in sorted(weights):
        w = weights[name]
        for _ in range(3):
            idx = tuple(int(rng.integers(n)) for n in w.shape)
            plus = {k: v.copy() for k, v in weights.items()}
            minus = {k: v.copy() for k, v in weights.items()}
            plus[name][idx] = np.float32(w[idx] + h)
            minus[name][idx] = np.float32(w[idx] - h)
            # The step the float32 weights really took.
            delta = float(plus[name][idx]) - float(minus[name][idx])
            model.set_weights(plus)
            loss_plus, _ = model.loss_and_grads(data, eps)
            model.set_weights(minus)
            loss_minus, _ = model.loss_and_grads(data, eps)
            numeric = (loss_plus - loss_minus) / delta
            analytic = float(grads[name][idx])
            err = abs(numeric - analytic)
            # float32 rounding of the loss (~1e-6 here) over 2h, plus h^2 truncation error.
            assert err <= 1e-3 + 5e-3 * abs(analytic), (
                f"{name}{list(idx)}: core gradient {analytic:.6g} vs finite difference of the "
                f"core's loss {numeric:.6g} (diff {err:.3e}, threads={threads})"
            )


# --------------------------------------------------------------------------------------------
# Closed-form values
# --------------------------------------------------------------------------------------------


def softplus(t: float) -> float:
    return max(t, 0.0) + math.log1p(math.exp(-abs(t)))


def sigmoid(t: float) -> float:
    return 1.0 / (1.0 + math.exp(-t))


def constant_weights(config: Config, biases: dict[str, list[float]]) -> dict[str, np.ndarray]:
    """All weights zero; the named biases set, the others zero."""
    w = nv.init_weights(
        config.input_dim, config.hidden_dims, config.latent_dim, np.random.default_rng(0)
    )
    out = {k: np.zeros_like(v) for k, v in w.items()}
    for k, v in biases.items():
        assert out[k].shape == (len(v),), k
        out[k] = np.array(v, dtype=np.float32)
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_loss_and_grads_closed_form(threads: int) -> None:
    """Zero weights and chosen biases: mu, logvar and the logits are the biases, so the loss
    and gradients have closed forms, computed here with the math module."""
    config = Config(3, (2,), 2, "relu")
    # Values exactly representable in float32, so the model holds exactly these numbers.
    enc_b = [0.375, -0.125]  # h = relu(enc_b) = [0.375, 0]
    mu0 = [0.5, -1.0]
    lv0 = [0.25, -0.75]
    dec0_b = [0.25, -0.25]  # decoder hidden = relu(dec0_b) = [0.25, 0]
    logits = [2.0, -1.5, 0.0]
    weights = constant_weights(
        config,
        {
            "encoder.0.bias": enc_b,
            "fc_mu.bias": mu0,
            "fc_logvar.bias": lv0,
            "decoder.0.bias": dec0_b,
            "decoder.1.bias": logits,
        },
    )
    x_rows = [[1.0, 0.0, 0.25], [0.0, 1.0, 0.5]]
    batch = len(x_rows)

    # Row 1: softplus(2) - 2 + softplus(-1.5) + softplus(0) - 0;
    # row 2: softplus(2) + softplus(-1.5) + 1.5 + softplus(0) - 0.
    log2 = math.log(2.0)
    bce = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.5)) + log2) + (
        math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(-1.5)) + 1.5 + log2
    )
    per_pixel = [
        softplus(lg) - lg * xi for row in x_rows for lg, xi in zip(logits, row, strict=True)
    ]
    assert math.isclose(bce, sum(per_pixel))
    # KL per row: -1/2 [(1 + 0.25 - 0.25 - e^0.25) + (1 - 0.75 - 1 - e^-0.75)].
    kl_row = -0.5 * ((1.0 - math.exp(0.25)) + (-0.75 - math.exp(-0.75)))
    expected_loss = bce + batch * kl_row

    model = core_model(config, weights, threads)
    x = np.array(x_rows, dtype=np.float32)
    h = [max(b, 0.0) for b in enc_b]
    g = [max(b, 0.0) for b in dec0_b]
    dlogits = [sum(sigmoid(lg) - row[d] for row in x_rows) for d, lg in enumerate(logits)]
    dlv = [0.5 * (math.exp(lv) - 1.0) for lv in lv0]
    expected = {
        "decoder.1.bias": dlogits,
        "decoder.1.weight": [[dl * gk for gk in g] for dl in dlogits],
        "fc_mu.bias": [batch * m for m in mu0],
        "fc_mu.weight": [[batch * m * hk for hk in h] for m in mu0],
        "fc_logvar.bias": [batch * d for d in dlv],
        "fc_logvar.weight": [[batch * d * hk for hk in h] for d in dlv],
    }
    # The noise cannot matter: the decoder ignores z when its first layer's weights are zero.
    for eps in (np.zeros((batch, 2)), np.array([[1.5, -0.3], [-2.0, 0.7]])):
        loss, grads = model.loss_and_grads(_core.Dataset(x), eps.astype(np.float32))
        assert math.isclose(loss, expected_loss, rel_tol=1e-6), (loss, expected_loss)
        for name, want in expected.items():
            np.testing.assert_allclose(grads[name], np.array(want), rtol=1e-6, atol=1e-7)
        for name in ("encoder.0.weight", "encoder.0.bias", "decoder.0.weight", "decoder.0.bias"):
            np.testing.assert_array_equal(grads[name], 0.0, err_msg=name)
        ref_loss, ref_grads = nv.loss_and_grads(weights, x, eps, config.activation)
        assert math.isclose(ref_loss, expected_loss, rel_tol=1e-12)
        for name, want in expected.items():
            np.testing.assert_allclose(ref_grads[name], np.array(want), rtol=1e-12)


def test_closed_form_no_hidden_layer_log2() -> None:
    """Everything zero: mu = logvar = 0 (KL = 0) and logits 0, so each pixel costs log 2."""
    config = Config(4, (), 1, "relu")
    weights = constant_weights(config, {})
    x = np.random.default_rng(8).random((5, 4)).astype(np.float32)
    model = core_model(config, weights)
    loss, grads = model.loss_and_grads(_core.Dataset(x), np.ones((5, 1), np.float32))
    assert math.isclose(loss, 5 * 4 * math.log(2.0), rel_tol=1e-6), loss
    np.testing.assert_allclose(grads["decoder.0.bias"], (0.5 - x).sum(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(grads["fc_mu.bias"], 0.0)
    np.testing.assert_array_equal(grads["fc_logvar.bias"], 0.0)


@pytest.mark.parametrize(
    ("logit", "pixel"),
    [(40.0, 1.0), (40.0, 0.0), (-40.0, 1.0), (-40.0, 0.0), (90.0, 0.5), (-90.0, 0.5)],
)
def test_bce_is_stable_for_large_logits(logit: float, pixel: float) -> None:
    """max(l, 0) - l x + log1p(exp(-|l|)) with no overflow or cancellation to inf/nan."""
    config = Config(1, (), 1, "tanh")
    weights = constant_weights(config, {"decoder.0.bias": [logit]})
    model = core_model(config, weights)
    x = np.array([[pixel]], dtype=np.float32)
    loss, grads = model.loss_and_grads(_core.Dataset(x), np.zeros((1, 1), np.float32))
    expected = softplus(logit) - logit * pixel
    assert math.isclose(loss, expected, rel_tol=1e-6, abs_tol=1e-6), (loss, expected)
    assert math.isclose(
        float(grads["decoder.0.bias"][0]), sigmoid(logit) - pixel, rel_tol=1e-6, abs_tol=1e-7
    )


def test_kl_closed_form_large_and_small_logvar() -> None:
    """KL = -1/2 sum(1 + lv - mu^2 - exp(lv)) for extreme logvar; the BCE term is log 2 here."""
    config = Config(2, (), 3, "relu")
    mu0 = [3.0, 0.0, -0.5]
    lv0 = [-12.0, 5.0, 0.0]
    weights = constant_weights(config, {"fc_mu.bias": mu0, "fc_logvar.bias": lv0})
    model = core_model(config, weights)
    x = np.full((1, 2), 0.5, np.float32)
    loss, grads = model.loss_and_grads(_core.Dataset(x), np.ones((1, 3), np.float32))
    kl = -0.5 * sum(1.0 + lv - m * m - math.exp(lv) for m, lv in zip(mu0, lv0, strict=True))
    assert math.isclose(loss, kl + 2 * math.log(2.0), rel_tol=1e-6), (loss, kl)
    np.testing.assert_allclose(grads["fc_mu.bias"], mu0, rtol=1e-6)
    np.testing.assert_allclose(
        grads["fc_logvar.bias"], [0.5 * (math.exp(lv) - 1.0) for lv in lv0], rtol=1e-6
    )


def test_encode_decode_with_constant_weights() -> None:
    """encode returns the fc biases and decode the sigmoid of the last bias."""
    config = Config(3, (2,), 2, "tanh")
    mu0, lv0, logits = [0.5, -1.0], [0.2, -0.7], [2.0, -1.5, 0.0]
    weights = constant_weights(
        config, {"fc_mu.bias": mu0, "fc_logvar.bias": lv0, "decoder.1.bias": logits}
    )
    vae = VAE(input_dim=3, hidden_dims=(2,), latent_dim=2, activation="tanh", threads=1)
    vae.set_weights(weights)
    mu, logvar = vae.encode(np.random.default_rng(9).random((4, 3)))
    np.testing.assert_allclose(mu, np.tile(mu0, (4, 1)), rtol=1e-6)
    np.testing.assert_allclose(logvar, np.tile(lv0, (4, 1)), rtol=1e-6)
    probs = vae.decode(np.random.default_rng(10).standard_normal((4, 2)))
    np.testing.assert_allclose(probs, np.tile([sigmoid(v) for v in logits], (4, 1)), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Adam
# --------------------------------------------------------------------------------------------

ADAM_CASES = [*SMALL_CONFIGS, Config(8, (6,), 3, "tanh")]


@pytest.mark.parametrize("first_layer", sorted(FIRST_LAYER))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [3, 130])
@pytest.mark.parametrize("config", ADAM_CASES, ids=[c.id for c in ADAM_CASES])
def test_three_adam_steps_match_numpy(
    config: Config, batch: int, threads: int, first_layer: str
) -> None:
    """Three step_with_noise calls against NumPy gradients + NumPy Adam, all in float64.

    Adam divides each gradient entry by its own magnitude, so an entry much smaller than the
    rest of its tensor carries the float32 rounding of the core's gradient into the update
    almost undiminished: the weights are compared to 1e-5 of the tensor's scale plus 1e-3 of
    a step (lr). The Adam update alone is checked tightly in the next test. On the sparse
    path the first layer's gradient goes straight into its Adam update, never stored."""
    weights, x, eps = make_case(config, batch, seed=11)
    lr = 1e-2
    model = core_model(config, weights, threads)
    data = _core.Dataset(x, sparse=FIRST_LAYER[first_layer])

    ref_w = {k: v.astype(np.float64) for k, v in weights.items()}
    state = nv.AdamState.zeros(ref_w)
    what = f"{config.id} B={batch} threads={threads} {first_layer}"
    for step in range(1, 4):
        ref_loss, ref_grads = nv.loss_and_grads(ref_w, x, eps, config.activation)
        loss = model.step_with_noise(data, eps, lr)
        assert math.isclose(loss, ref_loss, rel_tol=LOSS_RTOL), (
            f"{what} step {step}: loss {loss!r} vs numpy {ref_loss!r}"
        )
        ref_w = nv.adam_step(ref_w, ref_grads, state, lr)
        got = model.weights()
        for name in weights:
            assert_close_scaled(
                got[name], ref_w[name], ADAM_RTOL, f"{what} step {step}: {name}", atol=1e-3 * lr
            )
        assert model.step == step

    m, _, t, epoch = model.optimizer_state()
    assert t == 3
    assert epoch == 0
    for name in weights:
        assert_close_scaled(m[name], state.m[name], ADAM_RTOL, f"{what}: Adam m of {name}")


@pytest.mark.parametrize("adam_eps", [1e-8, 1e-4, 0.1])
@pytest.mark.parametrize("first_layer", sorted(FIRST_LAYER))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("config", ADAM_CASES, ids=[c.id for c in ADAM_CASES])
def test_adam_update_matches_numpy_on_the_cores_gradients(
    config: Config, threads: int, first_layer: str, adam_eps: float
) -> None:
    """Each step_with_noise equals NumPy's Adam applied to the core's own gradients there
    (on the sparse path, the gradients loss_and_grads stores against the fused update), with
    torch's epsilon and others (the IWAE paper's 1e-4; 0.1 changes every update)."""
    weights, x, eps = make_case(config, 130, seed=12)
    lr = 1e-2
    model = core_model(config, weights, threads)
    data = _core.Dataset(x, sparse=FIRST_LAYER[first_layer])
    state = nv.AdamState.zeros(weights)
    for step in range(1, 4):
        before = model.weights()
        _, grads = model.loss_and_grads(data, eps)
        model.step_with_noise(data, eps, lr, adam_eps=adam_eps)
        want = nv.adam_step(before, grads, state, lr, eps=adam_eps)
        got = model.weights()
        for name in weights:
            what = f"{config.id} threads={threads} {first_layer} step {step}: {name}"
            assert_close_scaled(got[name], want[name], 1e-6, what, atol=1e-5 * lr)
            # The update itself, to 1e-4 of a step.
            assert_close_scaled(
                got[name] - before[name].astype(np.float64),
                want[name] - before[name],
                0.0,
                f"update of {what}",
                atol=1e-4 * lr,
            )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("config", ADAM_CASES, ids=[c.id for c in ADAM_CASES])
def test_adam_moments_match_numpy_on_the_cores_gradients(config: Config, threads: int) -> None:
    """m and v after three steps are torch's, fed with the core's own gradients:
    m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2 with b1 = 0.9, b2 = 0.999.

    Only float32 rounding separates the two (below 5e-7 relative), hence the tolerance of
    2e-6. (Computing 1 - b2 from a float32 b2, for instance, gives 0.00099998713 and a v too
    small by 1.29e-5.)"""
    weights, x, eps = make_case(config, 130, seed=11)
    model = core_model(config, weights, threads)
    data = _core.Dataset(x)
    state = nv.AdamState.zeros(weights)
    for _ in range(3):
        before = model.weights()
        _, grads = model.loss_and_grads(data, eps)
        model.step_with_noise(data, eps, 1e-2)
        nv.adam_step(before, grads, state, 1e-2)
    m, v, t, _ = model.optimizer_state()
    assert t == 3
    what = f"{config.id} threads={threads}"
    for name in weights:
        assert_close_scaled(m[name], state.m[name], 2e-6, f"{what}: Adam m of {name}")
        assert_close_scaled(v[name], state.v[name], 2e-6, f"{what}: Adam v of {name}")


# --------------------------------------------------------------------------------------------
# The canonical MNIST model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_mnist_canonical_model_matches_numpy(mnist: dict[str, np.ndarray], threads: int) -> None:
    config = Config(784, (400,), 20, "relu")
    x = mnist["x_test"][[0, 1, 2, 3]]
    # The core's own initialization (seed 0), as a real run starts from.
    weights = _core.Model(784, [400], 20, "relu", 0, threads).weights()
    eps = np.random.default_rng(12).standard_normal((4, 20)).astype(np.float32)
    model = core_model(config, weights, threads)
    loss, grads = model.loss_and_grads(_core.Dataset(x), eps)
    ref_loss, ref_grads = nv.loss_and_grads(weights, x, eps, "relu")
    assert math.isclose(loss, ref_loss, rel_tol=LOSS_RTOL), (loss, ref_loss)
    assert_grads_match(grads, ref_grads, GRAD_RTOL, f"MNIST 784-400-20 threads={threads}")
