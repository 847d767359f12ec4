"""The VAE on real data sets that ship with scikit-learn (digits, wine, breast cancer): a grid
search in two processes, the Gaussian likelihood learning real-valued features, and the errors
a user meets on them."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn is the test extra's")

from sklearn.datasets import load_breast_cancer, load_digits, load_wine  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from fastvae import VAE, InputError  # noqa: E402

# -log N(x; 0, 1) per standardized feature, in expectation: what predicting each feature's mean
# with unit variance scores; a model that learned anything beats it.
UNIT_GAUSSIAN_NATS = 0.5 * math.log(2 * math.pi * math.e)


def test_grid_search_over_lr_and_latent_dim_on_digits_in_two_processes() -> None:
    x = load_digits().data / 16.0  # 8 x 8 images in [0, 1]
    vae = VAE(hidden_dims=(64,), epochs=15, batch_size=32, progress=False, threads=1)
    grid = {"lr": [1e-3, 3e-3], "latent_dim": [2, 8]}
    search = GridSearchCV(vae, grid, cv=KFold(3, shuffle=True, random_state=0), n_jobs=2)
    search.fit(x)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and len(scores) == 4
    # More latent dimensions and the faster rate fit 15 epochs of digits better: the search
    # has a real signal to pick up.
    assert search.best_params_["latent_dim"] == 8, search.cv_results_
    best = search.best_estimator_
    assert best.n_features_in_ == 64 and best.transform(x[:5]).shape == (5, 8)


@pytest.mark.parametrize("loader", [load_wine, load_breast_cancer], ids=["wine", "cancer"])
def test_gaussian_vae_learns_standardized_real_features(loader) -> None:
    x = loader().data
    x_train, x_test = train_test_split(x, test_size=0.25, random_state=0)
    model = make_pipeline(
        StandardScaler(),
        VAE(
            likelihood="gaussian",
            hidden_dims=(32,),
            latent_dim=4,
            epochs=300,
            batch_size=16,
            seed=0,
            threads=1,
            progress=False,
        ),
    ).fit(x_train)
    d = x.shape[1]
    test_loss = -model.score(x_test)  # mean negative ELBO per row, nats
    baseline = d * UNIT_GAUSSIAN_NATS
    # The features are correlated: a latent code of 4 explains much of them.
    assert test_loss < baseline - 0.2 * d, (test_loss, baseline)
    vae = model[-1]
    lv = vae.weights()["decoder_logvar"]
    assert lv.shape == (d,) and np.all(lv < 0.5)  # learned variances below the data's own


def test_errors_on_real_data() -> None:
    x = StandardScaler().fit_transform(load_wine().data)
    vae = VAE(likelihood="gaussian", hidden_dims=(8,), latent_dim=2, epochs=1, progress=False)
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(InputError, match=r"x\[3, 5\] is NaN"):
        vae.fit(bad)
    assert not hasattr(vae, "model_")
    bad[3, 5] = np.inf
    with pytest.raises(InputError, match=r"x\[3, 5\] is inf"):
        vae.fit(bad)
    vae.fit(x)
    with pytest.raises(InputError, match="X has 12 features, but VAE is expecting 13"):
        vae.transform(x[:, :12])
    before = vae.weights()
    with pytest.raises(InputError, match="X has 12 features"):
        vae.fit(x[:, :12])
    after = vae.weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # Unscaled wine (proline is in the hundreds) is outside [0, 1]: a Bernoulli model says so.
    with pytest.raises(InputError, match="outside \\[0, 1\\].*gaussian"):
        VAE(hidden_dims=(8,), latent_dim=2, epochs=1, progress=False).fit(load_wine().data)


def test_divergence_on_unscaled_features_says_to_standardize() -> None:
    x = np.random.default_rng(0).normal(size=(500, 4)) * 1e6
    vae = VAE(likelihood="gaussian", hidden_dims=(8,), latent_dim=2, epochs=2, progress=False)
    with pytest.raises(FloatingPointError, match="values up to .* standardize the features"):
        vae.fit(x)
    # Standardized, the same data train.
    vae = VAE(likelihood="gaussian", hidden_dims=(8,), latent_dim=2, epochs=2, progress=False)
    assert np.isfinite(vae.fit(StandardScaler().fit_transform(x)).history_["train_loss"]).all()
