"""The estimator API as users call it: imports, scikit-learn conventions, shapes and dtypes of
every method, save/load round trips and the PyTorch naming of weights."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

import fastvae
from fastvae import VAE, CheckpointError, FastVAEError, InputError


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((300, 12), dtype=np.float32)


@pytest.fixture(scope="module")
def fitted(data: np.ndarray) -> VAE:
    return VAE(input_dim=12, hidden_dims=(10, 6), latent_dim=3, seed=1, threads=2).fit(
        data, epochs=2, batch_size=32, progress=False
    )


def test_public_names() -> None:
    assert isinstance(fastvae.__version__, str) and fastvae.__version__.count(".") == 2
    for name in fastvae.__all__:
        assert hasattr(fastvae, name)
    assert issubclass(FastVAEError, ValueError)
    assert issubclass(InputError, FastVAEError) and issubclass(CheckpointError, FastVAEError)


def test_init_stores_settings_only() -> None:
    m = VAE(input_dim=5, hidden_dims=(7,), latent_dim=2, activation="tanh", seed=4, threads=1)
    assert m.get_params() == {
        "input_dim": 5,
        "hidden_dims": (7,),
        "latent_dim": 2,
        "activation": "tanh",
        "likelihood": "bernoulli",
        "epochs": fastvae._core.DEFAULT_EPOCHS,
        "batch_size": fastvae._core.DEFAULT_BATCH_SIZE,
        "lr": fastvae._core.DEFAULT_LR,
        "beta": 1.0,
        "kl_warmup": 0,
        "patience": None,
        "validation_fraction": 0.1,
        "binarize": None,
        "progress": True,
        "lr_schedule": None,
        "adam_eps": 1e-8,
        "k": 1,
        "objective": "iwae",
        "output_bias_from_data": False,
        "seed": 4,
        "threads": 1,
    }
    assert not hasattr(m, "model_") and not hasattr(m, "history_")
    assert not hasattr(m, "n_features_in_")
    # input_dim defaults to None: the data's width at the first fit.
    assert VAE().input_dim is None
    # Invalid settings are stored without complaint (scikit-learn) and rejected by fit.
    bad = VAE(latent_dim=0)
    with pytest.raises(FastVAEError, match="latent_dim"):
        bad.fit(np.zeros((2, 784), np.float32), progress=False)


def test_set_params_and_repr() -> None:
    m = VAE().set_params(latent_dim=4, seed=9)
    assert m.latent_dim == 4 and m.seed == 9
    # The settings that differ from the defaults, as scikit-learn shows them.
    assert repr(m) == "VAE(latent_dim=4, seed=9)"
    assert repr(VAE()) == "VAE()"
    with pytest.raises(FastVAEError, match="unknown parameter"):
        m.set_params(nope=1)


def test_fit_returns_self_and_history(data: np.ndarray) -> None:
    m = VAE(input_dim=12, hidden_dims=(8,), latent_dim=2, threads=1)
    assert m.fit(data, epochs=2, batch_size=50, validation_data=data[:40], progress=False) is m
    h = m.history_
    assert h["epoch"] == [1, 2]
    assert len(h["train_loss"]) == len(h["val_loss"]) == len(h["samples_per_sec"]) == 2
    assert all(np.isfinite(h["val_loss"])) and all(s > 0 for s in h["samples_per_sec"])
    m.fit(data, epochs=1, progress=False)
    assert h["epoch"] == [1, 2, 3] and h["val_loss"][-1] is None


def test_epochs_trained(data: np.ndarray, tmp_path: Path) -> None:
    m = VAE(input_dim=12, hidden_dims=(8,), latent_dim=2, threads=1)
    # A fitted attribute: absent (AttributeError, so hasattr works) until there are weights.
    assert not hasattr(m, "epochs_trained_")
    with pytest.raises(AttributeError, match="fit"):
        m.epochs_trained_  # noqa: B018
    m.fit(data, epochs=2, progress=False)
    assert m.epochs_trained_ == 2
    m.save(tmp_path / "m.safetensors")
    back = VAE.load(tmp_path / "m.safetensors").fit(data, epochs=1, progress=False)
    assert back.epochs_trained_ == 3
    # A changed architecture discards the weights, and with them the count.
    assert not hasattr(m.set_params(latent_dim=3), "epochs_trained_")


def test_method_shapes_and_dtypes(fitted: VAE, data: np.ndarray) -> None:
    mu, logvar = fitted.encode(data)
    assert mu.shape == logvar.shape == (300, 3) and mu.dtype == np.float32
    np.testing.assert_array_equal(fitted.transform(data), mu)
    probs = fitted.decode(mu)
    assert probs.shape == (300, 12) and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_array_equal(fitted.reconstruct(data), probs)
    s = fitted.sample(7, seed=3)
    assert s.shape == (7, 12)
    np.testing.assert_array_equal(s, fitted.sample(7, seed=3))
    assert not np.array_equal(s, fitted.sample(7, seed=4))
    e = fitted.elbo(data)
    assert e.shape == (300,) and e.dtype == np.float64 and np.all(e < 0)
    np.testing.assert_array_equal(e, fitted.elbo(data))  # deterministic by default
    assert fitted.score(data) == pytest.approx(e.mean())


def test_accepts_float64_and_fortran_order(fitted: VAE, data: np.ndarray) -> None:
    ref = fitted.elbo(data)
    np.testing.assert_allclose(fitted.elbo(data.astype(np.float64)), ref, rtol=1e-6)
    np.testing.assert_array_equal(fitted.elbo(np.asfortranarray(data)), ref)
    np.testing.assert_array_equal(fitted.elbo(data[::1, :]), ref)
    strided = np.repeat(data, 2, axis=0)[::2]
    np.testing.assert_array_equal(fitted.elbo(strided), ref)


def test_weights_are_torch_named_copies(fitted: VAE) -> None:
    w = fitted.weights()
    assert list(w) == [
        "encoder.0.weight",
        "encoder.0.bias",
        "encoder.1.weight",
        "encoder.1.bias",
        "fc_mu.weight",
        "fc_mu.bias",
        "fc_logvar.weight",
        "fc_logvar.bias",
        "decoder.0.weight",
        "decoder.0.bias",
        "decoder.1.weight",
        "decoder.1.bias",
        "decoder.2.weight",
        "decoder.2.bias",
    ]
    assert w["encoder.0.weight"].shape == (10, 12)
    assert w["encoder.1.weight"].shape == (6, 10)
    assert w["fc_mu.weight"].shape == w["fc_logvar.weight"].shape == (3, 6)
    assert w["decoder.0.weight"].shape == (6, 3)
    assert w["decoder.2.weight"].shape == (12, 10) and w["decoder.2.bias"].shape == (12,)
    w["encoder.0.weight"][:] = 0  # a copy: the model is untouched
    assert np.abs(fitted.weights()["encoder.0.weight"]).sum() > 0


def test_set_weights_round_trip(fitted: VAE, data: np.ndarray) -> None:
    other = VAE(input_dim=12, hidden_dims=(10, 6), latent_dim=3, seed=99, threads=1)
    other.set_weights({k: v.astype(np.float64) for k, v in fitted.weights().items()})
    np.testing.assert_array_equal(other.transform(data), fitted.transform(data))


def test_save_load_round_trip(fitted: VAE, data: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    fitted.save(path)
    back = VAE.load(path)
    assert back.get_params() | {"threads": None} == fitted.get_params() | {"threads": None}
    assert back.hidden_dims == (10, 6)
    for k, v in fitted.weights().items():
        np.testing.assert_array_equal(back.weights()[k], v)
    assert back.history_ == fitted.history_
    np.testing.assert_array_equal(back.elbo(data), fitted.elbo(data))
    # No temporary files are left beside the model.
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_saved_file_loads_with_the_safetensors_package(fitted: VAE, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    path = tmp_path / "m.safetensors"
    fitted.save(path, include_optimizer=False)
    tensors = load_file(str(path))
    w = fitted.weights()
    assert set(tensors) == set(w)
    for k in w:
        np.testing.assert_array_equal(tensors[k], w[k])


def test_unfitted_errors_and_deepcopy(fitted: VAE, data: np.ndarray) -> None:
    m = VAE()
    with pytest.raises(FastVAEError, match="fit"):
        m.encode(np.zeros((1, 784), np.float32))
    # A fitted model deep-copies (test_sklearn.py checks pickling in depth): an independent
    # model with the same weights.
    twin = copy.deepcopy(fitted)
    assert twin.model_ is not fitted.model_
    np.testing.assert_array_equal(twin.elbo(data), fitted.elbo(data))
    assert twin.history_ == fitted.history_ and twin.get_params() == fitted.get_params()


def test_sklearn_pipeline_style(data: np.ndarray) -> None:
    # fit(x, y) with y given positionally, as Pipeline does, and fit_transform.
    m = VAE(input_dim=12, hidden_dims=(8,), latent_dim=2, threads=1)
    z = m.fit_transform(data, None, epochs=1, progress=False)
    assert z.shape == (300, 2)
    m2 = VAE(input_dim=12, hidden_dims=(8,), latent_dim=2, threads=1)
    assert m2.fit(data, np.zeros(300), epochs=1, progress=False) is m2


def test_memory_mapped_input_is_read_in_pieces(data: np.ndarray, tmp_path: Path) -> None:
    # A memmap is trained on batch by batch (it may exceed memory) with the same order and
    # noise as an in-memory array, and evaluated in pieces with the same noise.
    big = np.concatenate([data] * 60)  # 18,000 rows: more than one 16,384-row piece
    path = tmp_path / "x.f32"
    big.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=big.shape)

    def model() -> VAE:
        return VAE(input_dim=12, hidden_dims=(10,), latent_dim=3, seed=5, threads=2)

    a = model().fit(mapped, epochs=2, batch_size=100, validation_data=mapped, progress=False)
    b = model().fit(big, epochs=2, batch_size=100, validation_data=big, progress=False)
    for k, v in b.weights().items():
        np.testing.assert_array_equal(a.weights()[k], v, err_msg=k)
    np.testing.assert_allclose(a.history_["train_loss"], b.history_["train_loss"], rtol=1e-12)
    np.testing.assert_array_equal(a.history_["val_loss"], b.history_["val_loss"])
    np.testing.assert_array_equal(b.elbo(mapped), b.elbo(big))
    np.testing.assert_array_equal(b.transform(mapped), b.transform(big))
    np.testing.assert_array_equal(
        b.log_likelihood(mapped[:50], k=3), b.log_likelihood(big[:50], k=3)
    )


def test_memory_mapped_bad_value_is_located_before_training(
    data: np.ndarray, tmp_path: Path
) -> None:
    bad = np.concatenate([data] * 60)
    bad[17_000, 4] = np.nan
    path = tmp_path / "bad.f32"
    bad.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=bad.shape)
    m = VAE(input_dim=12, hidden_dims=(10,), latent_dim=3, threads=1)
    with pytest.raises(InputError, match=r"x\[17000, 4\] is NaN"):
        m.fit(mapped, epochs=1, progress=False)
    assert not hasattr(m, "model_")


def test_active_units_count_latent_dimensions_whose_mean_varies() -> None:
    # No hidden layers, so mu = x W_mu^T + b exactly: unit j's mean is c_j * x[:, 0], whose
    # variance across the rows is c_j^2 * var(x[:, 0]).
    c = np.array([0.0, 0.05, 0.2, 1.0])
    rng = np.random.default_rng(0)
    x = rng.random((4000, 3)).astype(np.float32)
    vae = VAE(input_dim=3, hidden_dims=(), latent_dim=4, threads=1)
    w = _zero_weights(3, 4)
    w["fc_mu.weight"][:, 0] = c
    vae.set_weights(w)
    variances = c**2 * x[:, 0].astype(np.float64).var()  # 0, 0.0002, 0.0033, 0.083
    for threshold in (0.01, 0.001, 1e-4, 0.0):
        want = int(np.count_nonzero(variances > threshold))
        assert vae.active_units(x, threshold=threshold) == want, threshold
    assert vae.active_units(x) == 1  # the paper's threshold, 0.01
    with pytest.raises(fastvae.ConfigError, match="threshold"):
        vae.active_units(x, threshold=-1.0)
    with pytest.raises(fastvae.InputError, match="at least 2 rows"):
        vae.active_units(x[:1])


def _zero_weights(d: int, z: int) -> dict[str, np.ndarray]:
    """Weights of a model without hidden layers, all zero."""
    return {
        "fc_mu.weight": np.zeros((z, d), np.float32),
        "fc_mu.bias": np.zeros(z, np.float32),
        "fc_logvar.weight": np.zeros((z, d), np.float32),
        "fc_logvar.bias": np.zeros(z, np.float32),
        "decoder.0.weight": np.zeros((d, z), np.float32),
        "decoder.0.bias": np.zeros(d, np.float32),
    }
