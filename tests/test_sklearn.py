"""VAE as a scikit-learn citizen: settings as constructor parameters (overridable per fit),
input_dim from the data, clone, pickling and deep copies that continue training bit for bit,
GridSearchCV and cross_val_score across processes, Pipeline, scikit-learn's own estimator
checks; and the training settings that came with them: the KL weight and its warm-up, early
stopping, and the Gaussian likelihood."""

from __future__ import annotations

import copy
import math
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastvae import VAE, CheckpointError, ConfigError, InputError, _core

sklearn = pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

# Tiny models keep every test fast; one thread makes results reproducible bit for bit.
TINY: dict[str, Any] = {"hidden_dims": (8,), "latent_dim": 2, "threads": 1}
# scikit-learn warns that VAE does not inherit its BaseEstimator: by design (no dependency).
not_base_estimator = pytest.mark.filterwarnings("ignore:Estimator VAE does not inherit")


@pytest.fixture(scope="module")
def unit() -> np.ndarray:
    """Intensities in [0, 1] (the Bernoulli likelihood's data), 120 rows of 6."""
    return np.random.default_rng(0).random((120, 6), dtype=np.float32)


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    """Real-valued data with structure (a 2-D latent space), 150 rows of 5, not standardized."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(150, 2))
    return (z @ rng.normal(size=(2, 5)) * 3 + 10 + 0.1 * rng.normal(size=(150, 5))).astype(
        np.float64
    )


def full_state(vae: VAE) -> dict[str, Any]:
    """Weights, Adam state and counters as bytes, and the history without its timings."""
    m, v, step, epoch = vae.model_.optimizer_state()
    h = {k: vae.history_[k] for k in vae.history_ if k not in ("samples_per_sec", "seconds")}
    return {
        "weights": {k: a.tobytes() for k, a in vae.weights().items()},
        "m": {k: a.tobytes() for k, a in m.items()},
        "v": {k: a.tobytes() for k, a in v.items()},
        "counters": (step, epoch),
        "history": h,
    }


# -- settings ---------------------------------------------------------------------------------


def test_every_training_setting_is_a_parameter() -> None:
    params = VAE().get_params()
    assert list(params) == [
        "input_dim",
        "hidden_dims",
        "latent_dim",
        "activation",
        "likelihood",
        "epochs",
        "batch_size",
        "lr",
        "beta",
        "kl_warmup",
        "patience",
        "validation_fraction",
        "binarize",
        "progress",
        "lr_schedule",
        "adam_eps",
        "k",
        "objective",
        "output_bias_from_data",
        "seed",
        "threads",
    ]
    assert params["input_dim"] is None and params["epochs"] == _core.DEFAULT_EPOCHS
    assert params["batch_size"] == _core.DEFAULT_BATCH_SIZE and params["lr"] == _core.DEFAULT_LR
    # Stored as given, never checked or converted (scikit-learn's convention).
    odd = VAE(epochs=-1, lr="fast", hidden_dims=np.array([3]), likelihood=None)
    assert odd.epochs == -1 and odd.lr == "fast" and odd.likelihood is None


def test_constructor_settings_drive_fit_and_keywords_override_one_call(unit: np.ndarray) -> None:
    vae = VAE(**TINY, epochs=2, batch_size=40, lr=2e-3, beta=0.5)
    vae.fit(unit, progress=False)
    assert vae.history_["epoch"] == [1, 2] and vae.model_.step == 2 * 3  # 120 rows / 40
    assert vae.fit_params_ == {
        "batch_size": 40,
        "lr": 2e-3,
        "binarize": None,
        "beta": 0.5,
        "kl_warmup": 0,
        "patience": None,
        "lr_schedule": None,
        "adam_eps": 1e-8,
        "k": 1,
        "objective": "iwae",
    }
    vae.fit(unit, epochs=1, batch_size=60, beta=1.0, progress=False)
    assert vae.history_["epoch"] == [1, 2, 3] and vae.model_.step == 6 + 2
    assert vae.fit_params_["batch_size"] == 60 and vae.fit_params_["beta"] == 1.0
    assert vae.history_["beta"] == [0.5, 0.5, 1.0]
    # The keywords applied to that call only: the settings are as constructed.
    assert (vae.epochs, vae.batch_size, vae.beta) == (2, 40, 0.5)
    vae.fit(unit, progress=False)
    assert vae.history_["epoch"][-1] == 5 and vae.history_["beta"][-2:] == [0.5, 0.5]


def test_keyword_override_equals_constructor_setting(unit: np.ndarray) -> None:
    a = VAE(**TINY, epochs=3, batch_size=16, lr=3e-3).fit(unit, progress=False)
    b = VAE(**TINY).fit(unit, epochs=3, batch_size=16, lr=3e-3, progress=False)
    assert full_state(a) == full_state(b)


def test_set_params_keeps_weights_unless_the_architecture_changes(unit: np.ndarray) -> None:
    vae = VAE(**TINY).fit(unit, epochs=1, progress=False)
    model = vae.model_
    # Training settings, seed and threads: the fitted model stays.
    vae.set_params(epochs=3, lr=1e-2, beta=2.0, kl_warmup=4, patience=2, batch_size=7, seed=5)
    assert vae.model_ is model and vae.n_features_in_ == 6
    # The architecture it already has (input_dim None means "the data's"): it stays too.
    vae.set_params(hidden_dims=[8], latent_dim=2, activation="relu", likelihood="bernoulli")
    vae.set_params(input_dim=6).set_params(input_dim=None)
    assert vae.model_ is model
    for change in (
        {"hidden_dims": (9,)},
        {"latent_dim": 3},
        {"activation": "tanh"},
        {"likelihood": "gaussian"},
        {"input_dim": 7},
    ):
        v = VAE(**TINY).fit(unit, epochs=1, progress=False)
        v.set_params(**change)
        fitted = [k for k in vars(v) if k.endswith("_") and not k.startswith("_")]
        assert fitted == [], (change, fitted)
        assert not hasattr(v, "n_features_in_") and not hasattr(v, "epochs_trained_")
    with pytest.raises(ConfigError, match="unknown parameter"):
        vae.set_params(epoch=3)


def test_clone_gives_an_unfitted_copy_of_the_settings(unit: np.ndarray) -> None:
    vae = VAE(**TINY, epochs=2, beta=0.25, patience=3, seed=7).fit(unit, progress=False)
    c = clone(vae)
    assert c.get_params() == vae.get_params()
    assert not hasattr(c, "model_") and not hasattr(c, "n_features_in_")
    assert hasattr(vae, "model_")


# -- input_dim from the data -----------------------------------------------------------------

_CALLS = {
    "fit": lambda v, x: v.fit(x, epochs=1, progress=False),
    "transform": lambda v, x: v.transform(x),
    "encode": lambda v, x: v.encode(x),
    "elbo": lambda v, x: v.elbo(x),
    "score": lambda v, x: v.score(x),
    "log_likelihood": lambda v, x: v.log_likelihood(x, k=2),
    "reconstruct": lambda v, x: v.reconstruct(x),
}


def test_input_dim_is_taken_from_the_data_and_checked_after(
    unit: np.ndarray, tmp_path: Path
) -> None:
    vae = VAE(**TINY)
    assert not hasattr(vae, "n_features_in_")
    vae.fit(unit, epochs=1, progress=False)
    assert vae.n_features_in_ == 6 and vae.input_dim is None  # the parameter is untouched
    assert vae.weights()["encoder.0.weight"].shape == (8, 6)
    narrow = unit[:, :4]
    for call in _CALLS.values():
        # scikit-learn's wording, which its checks match.
        with pytest.raises(InputError, match=r"X has 4 features, but VAE is expecting 6 features"):
            call(vae, narrow)
    assert vae.history_["epoch"] == [1]
    path = tmp_path / "m.safetensors"
    vae.save(path)
    back = VAE.load(path, threads=1)
    assert back.n_features_in_ == 6
    with pytest.raises(InputError, match="expecting 6 features"):
        back.transform(narrow)
    with pytest.raises(InputError, match="X has 7 features, but VAE is expecting 6"):
        pickle.loads(pickle.dumps(vae)).transform(np.zeros((2, 7)))


def test_explicit_input_dim_must_match_the_data(unit: np.ndarray) -> None:
    vae = VAE(**TINY, input_dim=5)
    with pytest.raises(InputError, match="X has 6 features, but VAE is expecting 5 features"):
        vae.fit(unit, progress=False)
    assert not hasattr(vae, "model_")
    vae.set_params(input_dim=6).fit(unit, epochs=1, progress=False)
    assert vae.n_features_in_ == 6
    # Validation data is held to the same width.
    with pytest.raises(InputError, match="validation_data has 5 features"):
        VAE(**TINY).fit(unit, validation_data=unit[:, :5], progress=False)


def test_set_weights_reads_input_dim_from_the_weights(unit: np.ndarray) -> None:
    src = VAE(**TINY).fit(unit, epochs=1, progress=False)
    dst = VAE(**TINY).set_weights(src.weights())
    assert dst.n_features_in_ == 6
    np.testing.assert_array_equal(dst.transform(unit), src.transform(unit))


def test_sklearn_error_wording_for_shapes() -> None:
    vae = VAE(**TINY)
    with pytest.raises(InputError, match="Reshape your data"):
        vae.fit(np.zeros(5), progress=False)
    with pytest.raises(InputError, match=r"0 feature\(s\) \(shape=\(3, 0\)\) while a minimum"):
        vae.fit(np.zeros((3, 0)), progress=False)
    with pytest.raises(InputError, match=r"0 sample\(s\)"):
        vae.fit(np.zeros((0, 3)), progress=False)
    with pytest.raises(InputError, match="Complex data not supported"):
        vae.fit(np.zeros((3, 3), np.complex64), progress=False)
    with pytest.raises(InputError, match="NaN"):
        vae.fit(np.full((3, 3), np.nan), progress=False)
    with pytest.raises(InputError, match="inf"):
        vae.fit(np.full((3, 3), np.inf), progress=False)
    assert not hasattr(vae, "model_")


# -- pickling and copies ----------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_continues_training_bit_for_bit(unit: np.ndarray, threads: int, how: str) -> None:
    vae = VAE(**(TINY | {"threads": threads}), kl_warmup=3, batch_size=32, seed=4)
    vae.fit(unit, epochs=2, validation_data=unit[:20], progress=False)
    twin = pickle.loads(pickle.dumps(vae)) if how == "pickle" else copy.deepcopy(vae)
    assert twin.model_ is not vae.model_ and twin.model_.threads == threads
    assert full_state(twin) == full_state(vae)
    assert twin.get_params() == vae.get_params() and twin.fit_params_ == vae.fit_params_
    assert twin.n_features_in_ == 6
    for m in (vae, twin):
        m.fit(unit, epochs=2, validation_data=unit[:20], progress=False)
    assert full_state(twin) == full_state(vae)
    assert twin.history_["beta"] == [1 / 3, 2 / 3, 1.0, 1.0]
    # And the copy is independent: training one leaves the other.
    before = full_state(vae)
    twin.fit(unit, epochs=1, progress=False)
    assert full_state(vae) == before and full_state(twin) != before


def test_pickled_copy_matches_a_straight_run(unit: np.ndarray) -> None:
    straight = VAE(**TINY, seed=2).fit(unit, epochs=3, progress=False)
    half = VAE(**TINY, seed=2).fit(unit, epochs=1, progress=False)
    resumed = pickle.loads(pickle.dumps(half)).fit(unit, epochs=2, progress=False)
    assert full_state(resumed)["weights"] == full_state(straight)["weights"]
    assert full_state(resumed)["m"] == full_state(straight)["m"]


def test_unfitted_model_pickles_its_settings() -> None:
    vae = VAE(**TINY, input_dim=None, beta=0.3, patience=4, likelihood="gaussian")
    data = pickle.dumps(vae)
    assert len(data) < 2000  # settings only
    back = pickle.loads(data)
    assert back.get_params() == vae.get_params() and not hasattr(back, "model_")
    # Each copy has its own lock.
    assert back._lock is not vae._lock and copy.deepcopy(vae).get_params() == vae.get_params()


def test_corrupted_pickle_is_refused_as_a_bad_model_file(unit: np.ndarray) -> None:
    vae = VAE(**TINY).fit(unit, epochs=1, progress=False)
    data = pickle.dumps(vae)
    # The model file inside: an 8-byte header length, the JSON header, then the tensors.
    at = data.find(b'{"__metadata__"') - 8
    assert at > 0
    header = struct.unpack("<Q", data[at : at + 8])[0]
    # A flipped bit among the tensors, as a damaged file would have.
    bad = bytearray(data)
    bad[at + 8 + header + 100] ^= 0x10
    with pytest.raises(CheckpointError):
        pickle.loads(bytes(bad))
    state = vae.__getstate__()
    blob = state["_model"]
    with pytest.raises(CheckpointError):
        VAE.__new__(VAE).__setstate__(state | {"_model": blob[: len(blob) // 2]})
    with pytest.raises(CheckpointError, match="pickled VAE"):
        VAE.__new__(VAE).__setstate__(state | {"_model": "not bytes"})
    # The untouched bytes still load: the damage, not the method, was refused.
    assert full_state(pickle.loads(data)) == full_state(vae)


# -- scikit-learn's tools ---------------------------------------------------------------------


def test_grid_search_in_two_processes(real: np.ndarray) -> None:
    pipe = Pipeline(
        [("scale", StandardScaler()), ("vae", VAE(**TINY, likelihood="gaussian", epochs=3))]
    )
    grid = {"vae__latent_dim": [1, 3], "vae__lr": [1e-4, 1e-2]}
    search = GridSearchCV(pipe, grid, cv=KFold(2), n_jobs=2).fit(real, vae__progress=False)
    scores = search.cv_results_["mean_test_score"]
    assert len(scores) == 4 and np.isfinite(scores).all()
    # The same search in this process gives the same scores: the estimators made in the
    # workers (pickled there and back) trained exactly as here.
    serial = GridSearchCV(pipe, grid, cv=KFold(2), n_jobs=1).fit(real, vae__progress=False)
    np.testing.assert_array_equal(scores, serial.cv_results_["mean_test_score"])
    # A larger learning rate fits these 3 epochs better; the search finds that.
    assert search.best_params_["vae__lr"] == 1e-2
    best = search.best_estimator_.named_steps["vae"]
    assert best.n_features_in_ == 5 and best.history_["epoch"] == [1, 2, 3]


def test_cross_val_score_in_two_processes(real: np.ndarray) -> None:
    x = StandardScaler().fit_transform(real)
    vae = VAE(**TINY, likelihood="gaussian", epochs=2)
    scores = cross_val_score(vae, x, cv=KFold(3), n_jobs=2, params={"progress": False})
    assert scores.shape == (3,) and np.isfinite(scores).all()
    # Each fold's score is that of a fresh clone fitted on the other folds.
    folds = list(KFold(3).split(x))
    train, test = folds[1]
    want = clone(vae).fit(x[train], progress=False).score(x[test])
    assert scores[1] == want
    assert not hasattr(vae, "model_")  # the estimator given was cloned, not fitted


def test_pipeline_with_a_scaler(real: np.ndarray) -> None:
    pipe = Pipeline(
        [("scale", StandardScaler()), ("vae", VAE(**TINY, likelihood="gaussian", epochs=2))]
    )
    z = pipe.fit_transform(real, vae__progress=False)
    assert z.shape == (150, 2) and z.dtype == np.float32
    vae = pipe.named_steps["vae"]
    np.testing.assert_array_equal(pipe.transform(real), z)
    scaled = StandardScaler().fit_transform(real)
    np.testing.assert_array_equal(vae.transform(scaled), z)
    assert pipe.score(real) == vae.score(scaled)
    # Unscaled data (values near 10) is real-valued too: the Gaussian likelihood takes it.
    assert np.isfinite(clone(vae).fit(real, progress=False).score(real))


# Checks whose premise is that fitting twice gives the model fitting once gives. fit continues
# training from the current weights instead (Keras style; fit(epochs=1) three times equals
# fit(epochs=3)), so each of these, fitting one estimator again, sees a model trained longer.
CONTINUES_TRAINING = (
    "fit continues training from the current weights and Adam state (Keras style), so a "
    "second fit of the same estimator trains further instead of starting over"
)
EXPECTED_FAILED_CHECKS = {
    "check_fit_idempotent": CONTINUES_TRAINING,
    # fit_transform on the fitted estimator is compared with a fresh clone's.
    "check_transformer_general": CONTINUES_TRAINING,
    "check_transformer_data_not_an_array": CONTINUES_TRAINING,
    # make_pipeline(est) holds est itself, which is then fitted twice.
    "check_pipeline_consistency": CONTINUES_TRAINING,
}


def _small_gaussian() -> VAE:
    return VAE(
        likelihood="gaussian", hidden_dims=(8,), latent_dim=2, epochs=2, threads=1, progress=False
    )


@not_base_estimator
def test_check_estimator() -> None:
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(
        _small_gaussian(), expected_failed_checks=EXPECTED_FAILED_CHECKS, on_skip=None
    )
    status = {}
    for r in results:
        status.setdefault(r["check_name"], set()).add(r["status"])
    # Every declared failure really fails (a stale entry would hide nothing but is a lie).
    for name in EXPECTED_FAILED_CHECKS:
        assert status[name] == {"xfail"}, (name, status[name])
    assert len(status) > 40  # the full set ran
    assert "failed" not in {s for v in status.values() for s in v}


class _FreshFit(VAE):
    """A VAE whose fit starts over, as scikit-learn's estimators do."""

    def fit(self, x: Any, y: Any = None, **kw: Any) -> _FreshFit:
        for name in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, name)
        super().fit(x, y, **kw)
        return self


@pytest.mark.filterwarnings("ignore:Estimator _FreshFit does not inherit")
@pytest.mark.parametrize("check", sorted(EXPECTED_FAILED_CHECKS))
def test_expected_failures_are_only_due_to_continued_training(check: str) -> None:
    # The same checks pass once fit starts over: nothing else makes them fail.
    from sklearn.utils import estimator_checks

    estimator = _FreshFit(**_small_gaussian().get_params())
    getattr(estimator_checks, check)("_FreshFit", estimator)


def test_tags() -> None:
    from sklearn.utils import get_tags

    tags = get_tags(VAE())
    assert tags.transformer_tags is not None
    assert tags.transformer_tags.preserves_dtype == ["float32"]
    assert not tags.target_tags.required and tags.requires_fit
    assert not tags.input_tags.allow_nan and not tags.input_tags.sparse


# -- the KL weight ----------------------------------------------------------------------------


def test_kl_warmup_continues_across_fits_and_files(unit: np.ndarray, tmp_path: Path) -> None:
    vae = VAE(**TINY, beta=0.5, kl_warmup=4).fit(unit, epochs=2, progress=False)
    assert vae.history_["beta"] == [0.125, 0.25]
    path = tmp_path / "m.safetensors"
    vae.save(path)
    back = VAE.load(path, threads=1)
    assert back.history_["beta"] == [0.125, 0.25]
    assert back.fit_params_["beta"] == 0.5 and back.fit_params_["kl_warmup"] == 4
    # Resumed with its settings, the warm-up goes on from epoch 3.
    back.fit(unit, epochs=3, beta=0.5, kl_warmup=4, progress=False)
    assert back.history_["beta"] == [0.125, 0.25, 0.375, 0.5, 0.5]
    straight = VAE(**TINY, beta=0.5, kl_warmup=4).fit(unit, epochs=5, progress=False)
    assert full_state(back) == full_state(straight)


def test_beta_weights_the_kl_term_of_training_only(unit: np.ndarray) -> None:
    base = VAE(**TINY, seed=3).fit(unit, epochs=2, progress=False)
    # From the same weights, Adam state and noise, with a learning rate too small to move a
    # float32 weight: every batch sees the same model, so the training losses differ by
    # exactly the KL term's weight times the mean KL, computed here from q(z|x).
    runs = {}
    for beta in (0.0, 0.5, 1.0):
        twin = copy.deepcopy(base)
        twin.fit(unit, epochs=1, lr=1e-300, beta=beta, validation_data=unit, progress=False)
        assert full_state(twin)["weights"] == full_state(base)["weights"]
        runs[beta] = twin.history_
    mu, logvar = base.encode(unit)
    mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
    kl = float(np.mean(0.5 * np.sum(mu**2 + np.exp(logvar) - 1 - logvar, axis=1)))
    assert kl > 0.01
    loss = {b: h["train_loss"][-1] for b, h in runs.items()}
    assert loss[1.0] - loss[0.0] == pytest.approx(kl, rel=1e-3)
    assert loss[1.0] - loss[0.5] == pytest.approx(0.5 * kl, rel=1e-3)
    # The validation loss (and elbo, score) is the true negative ELBO whatever beta trained.
    val = {b: h["val_loss"][-1] for b, h in runs.items()}
    assert val[0.0] == val[0.5] == val[1.0] == -base.score(unit)
    assert [h["beta"][-1] for h in runs.values()] == [0.0, 0.5, 1.0]


def test_beta_changes_what_is_learned(unit: np.ndarray) -> None:
    a = VAE(**TINY, epochs=3).fit(unit, progress=False)
    b = VAE(**TINY, epochs=3, beta=4.0).fit(unit, progress=False)
    assert full_state(a)["weights"] != full_state(b)["weights"]
    with pytest.raises(ConfigError, match="beta"):
        VAE(**TINY, beta=_core.MAX_BETA * 2).fit(unit, progress=False)


# -- early stopping ---------------------------------------------------------------------------


def _diverging_sets() -> tuple[np.ndarray, np.ndarray]:
    """Dim training images and bright validation ones: the more the model learns the first,
    the worse it explains the second, so the validation loss is lowest after epoch 1."""
    rng = np.random.default_rng(5)
    return (rng.random((200, 6)) * 0.1).astype(np.float32), (
        0.9 + rng.random((50, 6)) * 0.1
    ).astype(np.float32)


def test_patience_stops_and_restores_the_best_weights(unit: np.ndarray, tmp_path: Path) -> None:
    train, val = _diverging_sets()
    settings = TINY | {"lr": 1e-2, "batch_size": 50, "seed": 1}
    vae = VAE(**settings).fit(train, epochs=20, patience=2, validation_data=val, progress=False)
    h = vae.history_
    assert h["epoch"] == [1, 2, 3], h["val_loss"]
    assert h["val_loss"][0] < h["val_loss"][1] < h["val_loss"][2]
    assert vae.best_epoch_ == 1 and vae.stopped_epoch_ == 3
    # The weights are epoch 1's, bit for bit; Adam's state and the epoch count are not rewound.
    one = VAE(**settings).fit(train, epochs=1, progress=False)
    assert full_state(vae)["weights"] == full_state(one)["weights"]
    assert vae.epochs_trained_ == 3 and vae.model_.step == 3 * 4
    assert -vae.score(val) == h["val_loss"][0]
    # Recorded in the file.
    path = tmp_path / "m.safetensors"
    vae.save(path)
    back = VAE.load(path, threads=1)
    assert (back.best_epoch_, back.stopped_epoch_) == (1, 3)
    assert back.fit_params_["patience"] == 2
    assert (pickle.loads(pickle.dumps(vae)).best_epoch_, vae.stopped_epoch_) == (1, 3)
    # A later fit without early stopping drops the record, which no longer describes it.
    vae.fit(train, epochs=1, progress=False)
    assert not hasattr(vae, "best_epoch_") and not hasattr(vae, "stopped_epoch_")


def test_patience_runs_every_epoch_while_the_loss_improves(unit: np.ndarray) -> None:
    settings = TINY | {"lr": 1e-2, "batch_size": 30, "seed": 2}
    vae = VAE(**settings, patience=3).fit(unit, epochs=4, validation_data=unit, progress=False)
    h = vae.history_
    assert h["epoch"] == [1, 2, 3, 4] and vae.stopped_epoch_ is None
    best = int(np.argmin(h["val_loss"])) + 1
    assert vae.best_epoch_ == best
    assert -vae.score(unit) == min(h["val_loss"])


def test_patience_without_validation_data_holds_out_rows(unit: np.ndarray) -> None:
    vae = VAE(**TINY, patience=5, validation_fraction=0.25, batch_size=30)
    vae.fit(unit, epochs=2, progress=False)
    # 30 of the 120 rows held out: 90 train, in 3 batches of 30 (not 4).
    assert vae.model_.step == 2 * 3
    assert all(v is not None and math.isfinite(v) for v in vae.history_["val_loss"])
    # The held-out rows depend on the seed only: the same fit gives the same model.
    again = VAE(**TINY, patience=5, validation_fraction=0.25, batch_size=30)
    assert full_state(again.fit(unit, epochs=2, progress=False)) == full_state(vae)
    # Without patience nothing is held out.
    plain = VAE(**TINY, batch_size=30).fit(unit, epochs=1, progress=False)
    assert plain.model_.step == 4 and plain.history_["val_loss"] == [None]


# -- the Gaussian likelihood ------------------------------------------------------------------


def test_gaussian_model_end_to_end(real: np.ndarray, tmp_path: Path) -> None:
    x = StandardScaler().fit_transform(real)
    vae = VAE(**TINY, likelihood="gaussian", epochs=5, lr=1e-2).fit(x, progress=False)
    means = vae.decode(vae.transform(x))
    assert means.dtype == np.float32 and means.shape == x.shape
    assert means.min() < 0 < means.max()  # real values, not probabilities
    assert np.array_equal(vae.reconstruct(x), means)
    path = tmp_path / "g.safetensors"
    vae.save(path)
    back = VAE.load(path, threads=1)
    assert back.likelihood == "gaussian"
    np.testing.assert_array_equal(back.elbo(x), vae.elbo(x))
    # Bernoulli models still refuse values outside [0, 1], with the way out named.
    with pytest.raises(InputError, match=re.escape("[0, 1]")) as info:
        VAE(**TINY).fit(x, progress=False)
    assert "gaussian" in str(info.value)


def test_sample_means_and_draws(unit: np.ndarray, real: np.ndarray) -> None:
    bern = VAE(**TINY).fit(unit, epochs=1, progress=False)
    p = bern.sample(4000, seed=1)
    d = bern.sample(4000, seed=1, draw=True)
    assert set(np.unique(d)) <= {0.0, 1.0}
    # Each draw is 1 with its mean's probability: over 24,000 pixels the rates agree.
    assert abs(float(d.mean()) - float(p.mean())) < 0.02
    np.testing.assert_array_equal(d, bern.sample(4000, seed=1, draw=True))
    assert not np.array_equal(d, bern.sample(4000, seed=2, draw=True))

    x = StandardScaler().fit_transform(real)
    gauss = VAE(**TINY, likelihood="gaussian").fit(x, epochs=2, progress=False)
    means = gauss.sample(4000, seed=3)
    draws = gauss.sample(4000, seed=3, draw=True)
    # Draws scatter around their means with the decoder's learned per-feature deviation.
    sd = np.exp(0.5 * gauss.weights()["decoder_logvar"].astype(np.float64))
    np.testing.assert_allclose((draws - means).std(axis=0), sd, rtol=0.1)
    np.testing.assert_allclose((draws - means).mean(axis=0), 0, atol=0.1 * sd.max())
    with pytest.raises(ConfigError, match="draw"):
        gauss.sample(3, draw="yes")  # type: ignore[arg-type]


def test_feature_names_of_a_dataframe(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    x = np.random.default_rng(0).normal(size=(120, 3))
    df = pd.DataFrame(x, columns=["height", "weight", "age"])
    vae = VAE(likelihood="gaussian", hidden_dims=(4,), latent_dim=2, epochs=1, progress=False)
    vae.fit(df)
    assert list(vae.feature_names_in_) == ["height", "weight", "age"]
    assert list(vae.get_feature_names_out()) == ["vae0", "vae1"]
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        plain_codes = vae.transform(x.astype(np.float32))
    np.testing.assert_array_equal(vae.transform(df), plain_codes)
    # Kept through pickling and model files.
    assert list(pickle.loads(pickle.dumps(vae)).feature_names_in_) == list(df.columns)
    vae.save(tmp_path / "m.safetensors")
    assert list(VAE.load(tmp_path / "m.safetensors").feature_names_in_) == list(df.columns)
    # Other names, or the same in another order, are refused; names on one side only warn.
    with pytest.raises(InputError, match="feature names should match"):
        vae.transform(df[["weight", "height", "age"]])
    with pytest.raises(InputError, match="unseen at fit time: \\['bmi'\\]"):
        vae.score(df.rename(columns={"age": "bmi"}))
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        vae.transform(x)
    plain = VAE(likelihood="gaussian", hidden_dims=(4,), latent_dim=2, epochs=1, progress=False)
    plain.fit(x)
    assert not hasattr(plain, "feature_names_in_")
    with pytest.warns(UserWarning, match="fitted without feature names"):
        plain.transform(df)
