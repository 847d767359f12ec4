"""The VAE estimator: a scikit-learn-style front to the Rust core.

``VAE.__init__`` only stores settings; ``fit`` builds the core model on first use and trains
it; learned state lives in attributes ending in ``_``. Every public method validates its
arguments before touching the model, so a rejected call leaves the model as it was.

scikit-learn is not a dependency: the VAE follows its estimator protocol (``get_params``,
``set_params``, ``fit``/``transform``/``score``, fitted attributes, pickling and
``__sklearn_tags__``) without importing it, so ``clone``, ``Pipeline``, ``GridSearchCV`` and
``check_estimator`` work wherever scikit-learn is installed (``pip install "fastvae[sklearn]"``).
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core, schedule
from .checkpoint import (
    empty_history,
    feature_names_from_metadata,
    feature_names_to_metadata,
    from_metadata,
    to_metadata,
)
from .errors import CheckpointError, ConfigError, InputError

__all__ = ["VAE"]

_MAX_WIDTH = _core.MAX_WIDTH

# Settings that define the network: changing one through set_params discards a fitted model.
_ARCHITECTURE = ("input_dim", "hidden_dims", "latent_dim", "activation", "likelihood")
# Settings of fit, each overridable for one call by fit's keyword argument of the same name.
_TRAINING = (
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
)
# Every constructor parameter, in the constructor's order.
_PARAM_NAMES = (*_ARCHITECTURE, *_TRAINING, "output_bias_from_data", "seed", "threads")
# Target seconds per call into the core while training: short enough that Ctrl-C and the
# progress bar answer promptly, long enough that the call overhead is negligible.
_SLICE_SECONDS = 0.1
# Version of the state a VAE pickles to (see __getstate__).
_PICKLE_FORMAT = 1


# Bounds that keep every count inside the core's integer types with room to spare; the core
# has its own, tighter, limits on model size (MAX_PARAMS) and returned arrays.
_MAX_COUNT = 2**40


def _positive_int(name: str, value: Any, maximum: int = _MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    value = int(value)
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if int(value) > _MAX_COUNT:
        raise ConfigError(f"{name} must be at most {_MAX_COUNT}, got {value}")
    return int(value)


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)


def _seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    seed = int(value)
    if not 0 <= seed < 2**64:
        raise ConfigError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0])


def _same(a: Any, b: Any) -> bool:
    """Whether two setting values are equal; never raises (settings may hold anything)."""
    try:
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            return (
                isinstance(a, (list, tuple))
                and isinstance(b, (list, tuple))
                and len(a) == len(b)
                and all(_same(p, q) for p, q in zip(a, b, strict=True))
            )
        return isinstance(a, bool) == isinstance(b, bool) and bool(a == b)
    except (TypeError, ValueError):
        return False


def _column_names(x: Any) -> list[str] | None:
    """The column names of a table such as a pandas DataFrame, when they are all strings (as
    scikit-learn records them in ``feature_names_in_``); else None."""
    columns = getattr(x, "columns", None)
    if columns is None or isinstance(x, np.ndarray):
        return None
    try:
        names = list(columns)
    except TypeError:
        return None
    return names if names and all(isinstance(n, str) for n in names) else None


def _as_rows(
    x: Any, name: str, width: int | None, owner: str = "VAE", what: str = "features"
) -> NDArray[np.floating]:
    """x as a 2-D float32 or float64 array of `width` columns (None: any), converted and checked
    as scikit-learn's check_array does; no copy when it already is one. The values (finite, and
    in [0, 1] for the Bernoulli likelihood) are left to the core, which locates a bad one."""
    shape_hint = f"(n, {'n_features' if width is None else width})"
    if hasattr(x, "tocsr") or type(x).__module__.startswith("scipy.sparse"):
        raise InputError(
            f"{name} is a sparse {type(x).__name__}: sparse input is not supported, pass a "
            f"dense array of shape {shape_hint} ({name}.toarray())"
        )
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise InputError(f"{name} must be an array of shape {shape_hint}: {e}") from e
    if arr.ndim != 2:
        hint = ""
        if arr.ndim == 1:
            hint = (
                f". Reshape your data either using {name}.reshape(-1, 1) if it has a single "
                f"feature or {name}.reshape(1, -1) if it contains a single sample"
            )
        raise InputError(f"{name} must be 2-D with shape {shape_hint}, got shape {arr.shape}{hint}")
    kind = arr.dtype.kind
    if kind == "c":
        raise InputError(f"Complex data not supported: {name} has dtype {arr.dtype}")
    if kind == "O":
        # Numbers held as Python objects convert; anything else is named, as numpy words it.
        try:
            arr = arr.astype(np.float64)
        except TypeError as e:
            raise TypeError(f"{name} must hold numbers, got dtype object and {e}") from e
        except ValueError as e:
            raise InputError(f"{name} must hold numbers, got dtype object and {e}") from e
    elif kind in "iub" or (kind == "f" and arr.dtype.itemsize < 4):
        # Integers and booleans as float32, which holds every 8- and 16-bit value exactly.
        arr = arr.astype(np.float32)
    elif kind == "f" and arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)
    elif kind != "f":
        raise InputError(
            f"{name} must hold numbers, got dtype {arr.dtype}: convert it to numeric values "
            "explicitly"
        )
    elif not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.shape[0] == 0:
        raise InputError(
            f"{name} is empty: found array with 0 sample(s) (shape={arr.shape}) while a "
            "minimum of 1 is required."
        )
    if arr.shape[1] == 0:
        raise InputError(
            f"{name} has no columns: found array with 0 feature(s) (shape={arr.shape}) while "
            "a minimum of 1 is required."
        )
    if width is not None and arr.shape[1] != width:
        # scikit-learn's wording, which its estimator checks match.
        label = "X" if name == "x" else name
        raise InputError(
            f"{label} has {arr.shape[1]} {what}, but {owner} is expecting {width} {what} as "
            f"input: {name} must have shape (n, {width})"
        )
    return arr


class _Architecture(NamedTuple):
    input_dim: int | None  # None: from the data at the first fit
    hidden: list[int]
    latent_dim: int
    activation: str
    likelihood: str
    seed: int
    threads: int


class _Training(NamedTuple):
    epochs: int
    batch_size: int
    lr: float
    beta: float
    kl_warmup: int
    patience: int | None
    validation_fraction: float
    binarize: str | None
    progress: bool
    lr_schedule: dict[str, Any] | None
    adam_eps: float
    k: int
    objective: str


# Inputs beyond this magnitude are far from the unit scale the initial weights and the
# log-variance bounds suit; when training diverges on them, the error says so.
_LARGE_INPUT = 100.0


def _scale_hint(arr: NDArray[np.floating]) -> str:
    """A hint for a diverged fit on `arr`, or "" when its scale is not the likely cause."""
    if isinstance(arr, np.memmap):
        return ""
    with np.errstate(invalid="ignore"):
        top = float(np.max(np.abs(arr)))
    if not top > _LARGE_INPUT:
        return ""
    return (
        f". x holds values up to {top:.3g} in magnitude: standardize the features first "
        "(e.g. scikit-learn's StandardScaler in a Pipeline), so that the encoder's activations "
        "and the learned variances of p(x|z) stay in range"
    )


def _set_output_bias(model: _core.Model, x: NDArray[np.floating]) -> None:
    """Start the decoder's output bias at x's per-input mean: its logit (the mean clipped to
    [0.001, 0.999]) for Bernoulli pixels, the mean itself for Gaussian means."""
    mean = np.zeros(x.shape[1])
    for start in range(0, x.shape[0], 1 << 16):  # in pieces: x may be memory-mapped
        mean += np.asarray(x[start : start + (1 << 16)], dtype=np.float64).sum(axis=0)
    mean /= x.shape[0]
    if model.likelihood == "bernoulli":
        p = np.clip(mean, 0.001, 0.999)
        mean = np.log(p) - np.log1p(-p)
    weights = model.weights()
    last = max(int(k.split(".")[1]) for k in weights if k.startswith("decoder."))
    weights[f"decoder.{last}.bias"] = mean.astype(np.float32)
    model.set_weights(weights)


def _kl_weight(beta: float, kl_warmup: int, epoch: int) -> float:
    """The KL weight of training epoch `epoch` (1-based, counting every epoch the model has
    trained): beta, reached linearly over the first kl_warmup epochs."""
    if kl_warmup > 0:
        return beta * min(1.0, epoch / kl_warmup)
    return beta


class VAE:
    """A variational autoencoder (Kingma & Welling, 2014) trained by a multithreaded Rust core.

    Encoder q(z|x): an MLP ``input_dim -> hidden_dims... -> (mu, logvar)`` of width
    ``latent_dim``; decoder p(x|z): ``latent_dim -> reversed(hidden_dims)... -> input_dim``,
    the parameters of p(x|z) (Bernoulli logits, or Gaussian means). Training minimizes, per
    example, -log p(x|z) summed over inputs plus ``beta`` times KL(q(z|x) || N(0, I)), with Adam.

    The constructor only stores its arguments (scikit-learn's convention); ``fit`` checks them.

    Parameters
    ----------
    input_dim : int or None
        Number of inputs per example (784 for MNIST); None takes it from the data at the first
        ``fit`` (as ``n_features_in_``).
    hidden_dims : sequence of int
        Widths of the encoder's hidden layers; the decoder mirrors them. May be empty.
    latent_dim : int
        Width of the latent code z.
    activation : {"relu", "tanh"}
        Hidden-layer nonlinearity.
    likelihood : {"bernoulli", "gaussian"}
        p(x|z). "bernoulli" models intensities in [0, 1] (pixels; binary cross-entropy);
        "gaussian" models any real values (standardize them first, e.g. with scikit-learn's
        StandardScaler).
    epochs, batch_size : int
        Passes over x per ``fit``, and rows per Adam step (the last batch of an epoch may be
        smaller).
    lr : float
        Adam's learning rate.
    beta : float
        Weight of the KL term in the training objective (1 is the ELBO; beta-VAE above 1).
        ``elbo``, ``score`` and the validation loss always report the true ELBO.
    kl_warmup : int
        Epochs over which the KL weight rises linearly from 0 to ``beta``: the weight of the
        model's e-th training epoch is ``beta * min(1, e / kl_warmup)``, counting the epochs of
        earlier ``fit`` calls and of a saved model that is resumed. 0 means no warm-up.
    patience : int or None
        Early stopping: after ``patience`` epochs of a ``fit`` call without a lower validation
        loss, stop, and end with the weights of the epoch that had the lowest. None trains for
        every epoch.
    validation_fraction : float
        With ``patience`` and no ``validation_data``, the fraction of x's rows (chosen at random
        by ``seed``) held out from training to measure the validation loss.
    binarize : {None, "dynamic"}
        "dynamic" trains on a fresh Bernoulli draw of every image each time it is used
        (binarized MNIST, as papers report); x then holds the pixel probabilities. Bernoulli
        likelihood only.
    progress : bool
        Show a progress bar while training (False for searches over many models).
    lr_schedule : dict or None
        The learning rate of each epoch, as data (``fastvae.schedule``): piecewise constant
        ``stages``, ``step``, ``exponential`` or ``cosine`` decay from ``lr``, counted over
        every epoch the model trains (across fits and resumes); saved with the model.
        ``history_["lr"]`` records each epoch's rate. None keeps ``lr``.
    adam_eps : float
        Adam's epsilon (torch's default 1e-8; the IWAE paper used 1e-4).
    k : int
        Samples of z per example in each training step. 1 trains the ELBO (with its
        closed-form KL); above 1 the samples share the encoder's pass and combine as
        ``objective`` says.
    objective : {"iwae", "elbo"}
        How k > 1 samples combine: "iwae" trains the importance-weighted bound of Burda,
        Grosse & Salakhutdinov, log (1/k) sum_j p(x, z_j) / q(z_j|x) (tighter as k grows),
        "elbo" the ELBO averaged over the k samples (their "VAE" at k samples). ``beta``
        weights log p(z) - log q(z|x) in the bound as it weights the KL in the ELBO.
    output_bias_from_data : bool
        When the model is built (its first ``fit``), start the decoder's output bias at the
        data: the logit of each input's mean over x, clipped to [0.001, 0.999], for the
        Bernoulli likelihood (as the IWAE paper's code does), or the mean for the Gaussian
        one. False keeps PyTorch's default initialization.
    seed : int
        Seeds the initial weights, the shuffling and the noise: the same seed and thread count
        give bit-identical weights after ``fit``.
    threads : int or None
        Worker threads of this model's own pool; None uses every core (or the
        ``FASTVAE_NUM_THREADS`` environment variable when set).

    Attributes
    ----------
    n_features_in_ : int
        Number of inputs per example the model was built for.
    feature_names_in_ : ndarray of str
        The column names of the data of the first ``fit``, when it had string column names
        (a pandas DataFrame, say); later calls check theirs against them, as scikit-learn
        does. Saved with the model.
    history_ : dict of lists
        Per epoch: ``epoch``, ``train_loss`` (the training objective, with the KL weight),
        ``val_loss`` (the negative ELBO of the validation data; None without any),
        ``samples_per_sec``, ``seconds`` and ``beta`` (the KL weight used).
    fit_params_ : dict
        ``batch_size``, ``lr``, ``binarize``, ``beta``, ``kl_warmup`` and ``patience`` of the
        latest ``fit``, saved with the model.
    best_epoch_, stopped_epoch_ : int or None
        After a ``fit`` with ``patience``: the epoch whose weights the model holds (the lowest
        validation loss; None if none was finite) and the epoch after which training stopped
        early (None if it ran every epoch). Saved with the model.

    Notes
    -----
    ``fit`` continues training from the current weights and Adam state, as Keras does, so
    ``fit(x, epochs=1)`` three times equals ``fit(x, epochs=3)`` bit for bit; to start over,
    use a fresh estimator (``sklearn.base.clone``). Fitting twice is therefore not idempotent
    as scikit-learn's ``check_fit_idempotent`` expects.

    A fitted model pickles (and deep-copies) as its model file's bytes: weights, Adam state,
    configuration, history and training settings, so a copy continues training exactly as the
    original would.
    """

    def __init__(
        self,
        input_dim: int | None = None,
        hidden_dims: Sequence[int] = (400,),
        latent_dim: int = 20,
        activation: str = "relu",
        likelihood: str = "bernoulli",
        epochs: int = _core.DEFAULT_EPOCHS,
        batch_size: int = _core.DEFAULT_BATCH_SIZE,
        lr: float = _core.DEFAULT_LR,
        beta: float = 1.0,
        kl_warmup: int = 0,
        patience: int | None = None,
        validation_fraction: float = 0.1,
        binarize: str | None = None,
        progress: bool = True,
        lr_schedule: dict[str, Any] | None = None,
        adam_eps: float = 1e-8,
        k: int = 1,
        objective: str = "iwae",
        output_bias_from_data: bool = False,
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        self.input_dim = input_dim
        self.hidden_dims = hidden_dims
        self.latent_dim = latent_dim
        self.activation = activation
        self.likelihood = likelihood
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.beta = beta
        self.kl_warmup = kl_warmup
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.binarize = binarize
        self.progress = progress
        self.lr_schedule = lr_schedule
        self.adam_eps = adam_eps
        self.k = k
        self.objective = objective
        self.output_bias_from_data = output_bias_from_data
        self.seed = seed
        self.threads = threads
        # One call at a time per model: a second thread waits rather than racing the core.
        self._lock = threading.RLock()

    # -- scikit-learn conventions -------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's settings, as scikit-learn expects."""
        return {name: getattr(self, name) for name in _PARAM_NAMES}

    def set_params(self, **params: Any) -> VAE:
        """Change constructor settings, unchecked until ``fit`` (scikit-learn's convention).

        A fitted model is discarded when an architecture setting (input_dim, hidden_dims,
        latent_dim, activation, likelihood) changes; training settings, seed and threads keep
        the weights (seed and threads act when a model is next built).
        """
        for name in params:
            if name not in _PARAM_NAMES:
                raise ConfigError(f"unknown parameter {name!r}; valid: {', '.join(_PARAM_NAMES)}")
        with self._lock:
            model = getattr(self, "model_", None)
            discard = model is not None and any(
                not self._fits_model(model, name, value)
                for name, value in params.items()
                if name in _ARCHITECTURE
            )
            for name, value in params.items():
                setattr(self, name, value)
            if discard:
                for name in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
                    delattr(self, name)
        return self

    @staticmethod
    def _fits_model(model: _core.Model, name: str, value: Any) -> bool:
        """Whether architecture setting `name` = `value` describes the built `model`."""
        input_dim, hidden, latent_dim, activation, _ = model.config
        if name == "input_dim":
            return value is None or _same(value, input_dim)
        if name == "hidden_dims":
            return isinstance(value, (list, tuple)) and _same(list(value), list(hidden))
        if name == "latent_dim":
            return _same(value, latent_dim)
        if name == "activation":
            return _same(value, activation)
        return _same(value, model.likelihood)

    def __repr__(self) -> str:
        # The settings that differ from the defaults, as scikit-learn shows them.
        defaults = inspect.signature(type(self).__init__).parameters
        args = ", ".join(
            f"{k}={v!r}"
            for k, v in self.get_params().items()
            if not (_same(v, defaults[k].default) and type(v) is type(defaults[k].default))
        )
        return f"{type(self).__name__}({args})"

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's tags: an unsupervised transformer of dense, finite, 2-D data whose
        outputs are float32. Called by scikit-learn only, so importing it here costs nothing
        otherwise."""
        from sklearn.utils import (  # type: ignore[import-untyped]
            InputTags,
            Tags,
            TargetTags,
            TransformerTags,
        )

        return Tags(
            estimator_type=None,
            target_tags=TargetTags(required=False),
            transformer_tags=TransformerTags(preserves_dtype=["float32"]),
            input_tags=InputTags(two_d_array=True, sparse=False, allow_nan=False),
            requires_fit=True,
            non_deterministic=False,
        )

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    # -- pickling -------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """The settings and, when fitted, the model file's bytes (weights, Adam state,
        configuration, history, training settings): no Python objects of the core."""
        with self._lock:
            state: dict[str, Any] = {"_pickle_format": _PICKLE_FORMAT}
            state.update(self.get_params())
            if hasattr(self, "model_"):
                state["_model"] = self.model_.to_bytes(True, self._metadata())
                # The copy gets the same thread count: results depend on it.
                state["_model_threads"] = self.model_.threads
            return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lock = threading.RLock()
        if not isinstance(state, dict) or state.get("_pickle_format") != _PICKLE_FORMAT:
            raise CheckpointError("pickled VAE: not a state this version of fastvae wrote")
        defaults = inspect.signature(type(self).__init__).parameters
        for name in _PARAM_NAMES:
            setattr(self, name, state.get(name, defaults[name].default))
        data = state.get("_model")
        if data is None:
            return
        threads = state.get("_model_threads")
        if not isinstance(data, bytes) or not isinstance(threads, int):
            raise CheckpointError("pickled VAE: the model's bytes are missing or malformed")
        try:
            threads = _positive_int("threads", threads, _core.MAX_THREADS)
        except ConfigError as e:
            raise CheckpointError(f"pickled VAE: {e}") from None
        model, extra, _ = _core.Model.from_bytes(data, threads)
        self._restore(model, extra, "pickled VAE", settings_from_model=False)

    # -- construction ---------------------------------------------------------------------

    def _resolved_threads(self) -> int:
        threads = self.threads
        if threads is None:
            env = os.environ.get("FASTVAE_NUM_THREADS")
            if env:
                try:
                    threads = int(env)
                except ValueError:
                    raise ConfigError(
                        f"FASTVAE_NUM_THREADS must be a positive integer, got {env!r}"
                    ) from None
            else:
                threads = _core.default_threads()
        return _positive_int("threads", threads, _core.MAX_THREADS)

    def _architecture(self) -> _Architecture:
        """The architecture settings, checked; input_dim stays None when it is."""
        input_dim = None
        if self.input_dim is not None:
            input_dim = _positive_int("input_dim", self.input_dim, _MAX_WIDTH)
        if isinstance(self.hidden_dims, (str, bytes)) or not isinstance(self.hidden_dims, Sequence):
            raise ConfigError(
                f"hidden_dims must be a sequence of positive integers, got {self.hidden_dims!r}"
            )
        hidden = [
            _positive_int(f"hidden_dims[{i}]", h, _MAX_WIDTH)
            for i, h in enumerate(self.hidden_dims)
        ]
        latent_dim = _positive_int("latent_dim", self.latent_dim, _MAX_WIDTH)
        if not isinstance(self.activation, str) or self.activation not in _core.ACTIVATIONS:
            names = " or ".join(repr(a) for a in _core.ACTIVATIONS)
            raise ConfigError(f"activation must be {names}, got {self.activation!r}")
        if not isinstance(self.likelihood, str) or self.likelihood not in _core.LIKELIHOODS:
            names = " or ".join(repr(a) for a in _core.LIKELIHOODS)
            raise ConfigError(f"likelihood must be {names}, got {self.likelihood!r}")
        seed = _seed("seed", self.seed)
        threads = self._resolved_threads()
        return _Architecture(
            input_dim, hidden, latent_dim, self.activation, self.likelihood, seed, threads
        )

    @staticmethod
    def _build(arch: _Architecture, input_dim: int) -> _core.Model:
        return _core.Model(
            input_dim,
            arch.hidden,
            arch.latent_dim,
            arch.activation,
            arch.seed,
            arch.threads,
            likelihood=arch.likelihood,
        )

    def _training(self, overrides: dict[str, Any]) -> _Training:
        """The training settings of one fit: its keyword arguments where given (not None),
        else the constructor's; checked."""
        v = {
            name: getattr(self, name) if overrides.get(name) is None else overrides[name]
            for name in _TRAINING
        }
        epochs = _positive_int("epochs", v["epochs"])
        batch_size = _positive_int("batch_size", v["batch_size"], 2**31)
        lr = v["lr"]
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise ConfigError(f"lr must be a positive number, got {lr!r}")
        lr = float(lr)
        if not (math.isfinite(lr) and 0 < lr <= _core.MAX_LR):
            raise ConfigError(f"lr must be positive, finite and at most {_core.MAX_LR:g}, got {lr}")
        beta = _real("beta", v["beta"])
        if not 0 <= beta <= _core.MAX_BETA:
            raise ConfigError(f"beta must be in [0, {_core.MAX_BETA:g}], got {beta}")
        kl_warmup = _non_negative_int("kl_warmup", v["kl_warmup"])
        patience = None if v["patience"] is None else _positive_int("patience", v["patience"])
        fraction = _real("validation_fraction", v["validation_fraction"])
        if not 0 < fraction < 1:
            raise ConfigError(f"validation_fraction must be in (0, 1), got {fraction}")
        binarize = v["binarize"]
        if binarize not in (None, "dynamic"):
            raise ConfigError(f"binarize must be None or 'dynamic', got {binarize!r}")
        progress = v["progress"]
        if not isinstance(progress, bool | np.bool_):
            raise ConfigError(f"progress must be True or False, got {progress!r}")
        lr_schedule = schedule.check(v["lr_schedule"])
        adam_eps = _real("adam_eps", v["adam_eps"])
        if not (math.isfinite(adam_eps) and 0 < adam_eps <= 1):
            raise ConfigError(f"adam_eps must be in (0, 1], got {adam_eps}")
        # batch_size * k is checked against the data (a batch holds at most every row) in fit.
        k = _positive_int("k", v["k"], _core.MAX_STEP_ROWS)
        objective = v["objective"]
        if objective not in _core.OBJECTIVES:
            raise ConfigError(f"objective must be one of {_core.OBJECTIVES}, got {objective!r}")
        return _Training(
            epochs,
            batch_size,
            lr,
            beta,
            kl_warmup,
            patience,
            fraction,
            binarize,
            bool(progress),
            lr_schedule,
            adam_eps,
            k,
            objective,
        )

    def _adopt(self, model: _core.Model, history: dict[str, list[Any]] | None = None) -> None:
        """Make `model` this VAE's fitted state, with `history` (by default an empty one)."""
        self.model_ = model
        self.history_: dict[str, list[Any]] = empty_history() if history is None else history
        self.n_features_in_: int = model.config[0]

    def _restore(
        self, model: _core.Model, extra: dict[str, str], where: str, settings_from_model: bool
    ) -> None:
        """Adopt a model read from a file or bytes (`where` names it in errors), with the
        history and settings its metadata records."""
        try:
            history, fit_params, early = from_metadata(extra)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        if settings_from_model:
            self.input_dim, hidden, self.latent_dim, self.activation, self.seed = model.config
            self.hidden_dims = tuple(hidden)
            self.likelihood = model.likelihood
        self._adopt(model, history)
        if fit_params is not None:
            self.fit_params_: dict[str, Any] = fit_params
        if early is not None:
            self.best_epoch_: int | None = early["best_epoch"]
            self.stopped_epoch_: int | None = early["stopped_epoch"]
        try:
            names = feature_names_from_metadata(extra)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        if names is not None:
            if len(names) != self.n_features_in_:
                raise CheckpointError(
                    f"{where}: {len(names)} feature names for {self.n_features_in_} inputs"
                )
            self.feature_names_in_ = np.asarray(names, dtype=object)

    def _metadata(self) -> dict[str, str]:
        """What the model's file (or pickle) records besides the core's own state."""
        early = None
        if hasattr(self, "best_epoch_"):
            early = {"best_epoch": self.best_epoch_, "stopped_epoch": self.stopped_epoch_}
        names = getattr(self, "feature_names_in_", None)
        return {
            **to_metadata(
                getattr(self, "history_", empty_history()),
                getattr(self, "fit_params_", None),
                early,
            ),
            **feature_names_to_metadata(None if names is None else [str(n) for n in names]),
        }

    def _check_names(self, x: Any) -> None:
        """scikit-learn's checks of x's column names against those fit saw: a different set
        or order is an error; names on one side only, a warning."""
        fitted = getattr(self, "feature_names_in_", None)
        names = _column_names(x)
        owner = type(self).__name__
        if fitted is None and names is None:
            return
        if fitted is None:
            warnings.warn(
                f"X has feature names, but {owner} was fitted without feature names",
                UserWarning,
                stacklevel=3,
            )
            return
        if names is None:
            warnings.warn(
                f"X does not have valid feature names, but {owner} was fitted with feature names",
                UserWarning,
                stacklevel=3,
            )
            return
        if list(fitted) != names:
            unseen = [n for n in names if n not in set(fitted)]
            missing = [n for n in fitted if n not in set(names)]
            detail = ""
            if unseen:
                detail += f"\nFeature names unseen at fit time: {unseen[:5]}"
            if missing:
                detail += f"\nFeature names seen at fit time, yet now missing: {missing[:5]}"
            if not detail:
                detail = "\nFeature names must be in the same order as they were in fit."
            raise InputError(
                f"The feature names should match those that were passed during fit.{detail}"
            )

    def get_feature_names_out(self, input_features: Any = None) -> NDArray[np.object_]:
        """Names of ``transform``'s outputs, the latent means: ``vae0``, ``vae1``, ... (as
        scikit-learn names a transformer's new features)."""
        model = self._fitted()
        if input_features is not None:
            given = list(input_features)
            fitted = getattr(self, "feature_names_in_", None)
            if len(given) != model.config[0] or (fitted is not None and given != list(fitted)):
                raise InputError("input_features is not equal to feature_names_in_")
        prefix = type(self).__name__.lower()
        return np.asarray([f"{prefix}{i}" for i in range(model.config[2])], dtype=object)

    def _fitted(self) -> _core.Model:
        if not hasattr(self, "model_"):
            raise ConfigError("this VAE has no weights yet: call fit() or VAE.load() first")
        return self.model_

    @property
    def epochs_trained_(self) -> int:
        """Training epochs the model has completed, counting those before it was saved.

        Raises AttributeError while there are no weights, as scikit-learn's fitted attributes
        do, so ``hasattr(vae, "epochs_trained_")`` tells a fitted model from an unfitted one.
        """
        with self._lock:
            if not hasattr(self, "model_"):
                raise AttributeError("this VAE has no weights yet: call fit() or VAE.load() first")
            return self.model_.epoch

    @staticmethod
    def _core_rows(
        arr: NDArray[np.floating], name: str, likelihood: str
    ) -> _core.Dataset | _MappedRows:
        """Checked rows for the core: copied whole into core memory, or, for a memory-mapped
        array (which may be larger than memory), checked piece by piece and read as needed."""
        domain = _DOMAINS[likelihood]
        if isinstance(arr, np.memmap):
            return _MappedRows(arr, name, domain)
        return _dataset(arr, name, domain)

    def _rows(self, model: _core.Model, x: Any, name: str = "x") -> _core.Dataset | _MappedRows:
        """x checked against the fitted `model` (and its column names), for the core."""
        self._check_names(x)
        arr = _as_rows(x, name, model.config[0], type(self).__name__)
        return self._core_rows(arr, name, model.likelihood)

    # -- training -------------------------------------------------------------------------

    def fit(
        self,
        x: ArrayLike,
        y: Any = None,
        *,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        beta: float | None = None,
        kl_warmup: int | None = None,
        patience: int | None = None,
        binarize: str | None = None,
        lr_schedule: dict[str, Any] | None = None,
        adam_eps: float | None = None,
        k: int | None = None,
        objective: str | None = None,
        validation_data: Any = None,
        progress: bool | None = None,
        on_epoch_end: Callable[[VAE], bool | None] | None = None,
    ) -> VAE:
        """Train for ``epochs`` more epochs, continuing from the current weights and Adam state.

        Each training setting is the constructor's unless given here, for this call only (as
        Keras does); None means "the constructor's".

        Parameters
        ----------
        x : array-like of shape (n, input_dim)
            Real numbers of any dtype (converted to float32 unless float64), any memory order:
            intensities in [0, 1] for the Bernoulli likelihood, any finite values for the
            Gaussian one. A ``numpy.memmap`` is read piece by piece (it may exceed memory).
        y : ignored
            Accepted so the VAE fits in a scikit-learn Pipeline.
        epochs, batch_size, lr, beta, kl_warmup, patience, binarize, lr_schedule, adam_eps, k, \
        objective
            As the constructor's parameters of the same names.
        validation_data : array of shape (m, input_dim), or a tuple whose first item is one
            Evaluated after every epoch; its mean negative ELBO (for the "iwae" objective at
            k > 1, its negative k-sample importance-weighted bound) goes to
            ``history_["val_loss"]``, and early stopping watches it. Without it, early stopping
            holds out ``validation_fraction`` of x's rows.
        progress : bool or None
            Show a progress bar with the running loss and samples/s (None: the constructor's
            ``progress``).
        on_epoch_end : callable or None
            Called with the model after every epoch, once ``history_`` records it (to save a
            checkpoint, say); returning True stops training there. The data are converted
            once per ``fit``, so one ``fit`` with a callback is cheaper than a ``fit`` per epoch.

        Returns
        -------
        self

        Raises
        ------
        InputError, ConfigError
            On a bad argument; the model is then unchanged.
        FloatingPointError
            If the loss or a gradient stops being finite; the model keeps the weights of the
            last finite step.

        Notes
        -----
        With ``patience``, ``fit`` stops after ``patience`` epochs without a lower validation
        loss than the best of this call, and in any case ends with the weights of the epoch
        that had the lowest (Adam's state and the epoch count are not rewound);
        ``best_epoch_`` and ``stopped_epoch_`` record which.
        """
        s = self._training(
            {
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "beta": beta,
                "kl_warmup": kl_warmup,
                "patience": patience,
                "binarize": binarize,
                "progress": progress,
                "lr_schedule": lr_schedule,
                "adam_eps": adam_eps,
                "k": k,
                "objective": objective,
            }
        )
        arch = self._architecture()
        from_data = self.output_bias_from_data
        if not isinstance(from_data, bool | np.bool_):
            raise ConfigError(f"output_bias_from_data must be True or False, got {from_data!r}")
        model = getattr(self, "model_", None)
        likelihood = arch.likelihood if model is None else model.likelihood
        if s.binarize == "dynamic" and likelihood != "bernoulli":
            raise ConfigError(
                f"binarize='dynamic' draws binary images for the Bernoulli likelihood; "
                f"this model's likelihood is {likelihood!r}"
            )
        # The width: the model's once built, else input_dim, else the data's.
        width = arch.input_dim if model is None else model.config[0]
        owner = type(self).__name__
        if model is not None:
            self._check_names(x)
        names = _column_names(x)
        arr = _as_rows(x, "x", width, owner)
        if names is not None and len(names) != arr.shape[1]:
            names = None
        val_arr = None
        if validation_data is not None:
            if isinstance(validation_data, tuple):
                if not validation_data:
                    raise InputError("validation_data is an empty tuple")
                validation_data = validation_data[0]
            val_arr = _as_rows(validation_data, "validation_data", arr.shape[1], owner)
        elif s.patience is not None:
            arr, val_arr = self._hold_out(arr, s.validation_fraction, arch.seed)
        # The core checks this too, at the first epoch: here it is refused before the model is
        # built, so a refused fit leaves an unfitted VAE unfitted.
        step_rows = min(s.batch_size, arr.shape[0]) * s.k
        if step_rows > _core.MAX_STEP_ROWS:
            raise ConfigError(
                f"batch_size * k must be at most {_core.MAX_STEP_ROWS} (the decoder rows of one "
                f"step), got {min(s.batch_size, arr.shape[0])} * {s.k}"
            )
        data = self._core_rows(arr, "x", likelihood)
        val = None
        if val_arr is not None:
            val = self._core_rows(val_arr, "validation_data", likelihood)
        with self._lock:
            if not hasattr(self, "model_"):
                built = self._build(arch, arr.shape[1])
                if from_data:
                    _set_output_bias(built, arr)
                self._adopt(built)
                if names is not None:
                    self.feature_names_in_ = np.asarray(names, dtype=object)
            model = self.model_
            # Saved with the model, so a resumed run can continue as it was trained.
            self.fit_params_ = {
                "batch_size": s.batch_size,
                "lr": s.lr,
                "binarize": s.binarize,
                "beta": s.beta,
                "kl_warmup": s.kl_warmup,
                "patience": s.patience,
                "lr_schedule": s.lr_schedule,
                "adam_eps": s.adam_eps,
                "k": s.k,
                "objective": s.objective,
            }
            try:
                if s.patience is None:
                    for name in ("best_epoch_", "stopped_epoch_"):
                        self.__dict__.pop(name, None)
                    for _ in range(s.epochs):
                        self._fit_epoch(model, data, val, s, s.progress)
                        if on_epoch_end is not None and on_epoch_end(self):
                            break
                else:
                    assert val is not None
                    self._fit_early_stopping(model, data, val, s, s.progress, on_epoch_end)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e}{_scale_hint(arr)}") from None
        return self

    @staticmethod
    def _hold_out(
        arr: NDArray[np.floating], fraction: float, seed: int
    ) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
        """(training rows, validation rows): ceil(fraction * n) rows held out at random, chosen
        by the seed (so every fit of one model on one x holds out the same rows)."""
        n = arr.shape[0]
        n_val = math.ceil(fraction * n)
        if n_val >= n:
            raise InputError(
                f"early stopping holds out validation_fraction={fraction} of x's {n} rows as "
                "validation data, which leaves none to train on: pass validation_data, or more "
                "rows"
            )
        order = np.random.default_rng(seed).permutation(n)
        # Sorted, so the training rows keep x's order (and memory-mapped reads stay local).
        val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])
        return np.asarray(arr[train_rows]), np.asarray(arr[val_rows])

    def _fit_early_stopping(
        self,
        model: _core.Model,
        data: _core.Dataset | _MappedRows,
        val: _core.Dataset | _MappedRows,
        s: _Training,
        progress: bool,
        on_epoch_end: Callable[[VAE], bool | None] | None,
    ) -> None:
        assert s.patience is not None
        best = math.inf
        best_epoch: int | None = None
        best_weights: dict[str, NDArray[np.float32]] | None = None
        stopped: int | None = None
        since_best = 0
        for _ in range(s.epochs):
            val_loss = self._fit_epoch(model, data, val, s, progress)
            assert val_loss is not None
            if val_loss < best:  # False for NaN: no improvement
                best, best_epoch, since_best = val_loss, model.epoch, 0
                best_weights = model.weights()
            else:
                since_best += 1
                if since_best >= s.patience:
                    stopped = model.epoch
                    break
            if on_epoch_end is not None and on_epoch_end(self):
                break
        if best_weights is not None and best_epoch != model.epoch:
            model.set_weights(best_weights)
        self.best_epoch_ = best_epoch
        self.stopped_epoch_ = stopped

    def _fit_epoch(
        self,
        model: _core.Model,
        data: _core.Dataset | _MappedRows,
        val: _core.Dataset | _MappedRows | None,
        s: _Training,
        progress: bool,
    ) -> float | None:
        """One epoch, recorded in history_; its validation loss (None without validation)."""
        epoch = model.epoch + 1
        weight = _kl_weight(s.beta, s.kl_warmup, epoch)
        lr = schedule.lr_at(s.lr_schedule, s.lr, epoch)
        n = data.shape[0]
        train_loss, seconds = self._train_epoch(model, data, s, lr, weight, progress)
        val_loss = None
        if val is not None:
            # The true bound trained on (KL weight 1), comparable across epochs.
            if s.k > 1 and s.objective == "iwae":
                val_loss = float(-self._log_likelihood_rows(model, val, s.k).mean())
            else:
                val_loss = float(-self._elbo_rows(model, val, self._EVAL_SEED).mean())
        h = self.history_
        h["epoch"].append(epoch)
        h["train_loss"].append(train_loss)
        h["val_loss"].append(val_loss)
        h["samples_per_sec"].append(n / seconds if seconds > 0 else float("inf"))
        h["seconds"].append(seconds)
        h["beta"].append(weight)
        h["lr"].append(lr)
        return val_loss

    def _train_epoch(
        self,
        model: _core.Model,
        data: _core.Dataset | _MappedRows,
        s: _Training,
        lr: float,
        beta: float,
        progress: bool,
    ) -> tuple[float, float]:
        """One epoch, the core batching (a memory-mapped array is handed over as it is, and
        the core gathers each batch from it); (mean loss, seconds)."""
        from .progress import progress_bar

        source = data.arr if isinstance(data, _MappedRows) else data
        run = model.begin_epoch(
            source,
            s.batch_size,
            lr,
            s.binarize == "dynamic",
            beta=beta,
            adam_eps=s.adam_eps,
            k=s.k,
            objective=s.objective,
        )
        per_call = 1
        seconds = 0.0
        with progress_bar(run.total_batches, f"epoch {model.epoch + 1}", progress, "batch") as bar:
            while not run.done:
                t0 = time.perf_counter()
                before = run.batches_done
                model.run(source, run, per_call)
                dt = time.perf_counter() - t0
                seconds += dt
                # Grow slices until a call lasts about _SLICE_SECONDS.
                if dt < _SLICE_SECONDS / 2:
                    per_call = min(per_call * 2, 1 << 16)
                bar.update(run.batches_done - before)
                bar.set_postfix(
                    loss=f"{run.mean_loss:.2f}",
                    samples_s=f"{run.rows_done / max(seconds, 1e-9):,.0f}",
                )
        return model.end_epoch(run), seconds

    def _elbo_rows(
        self, model: _core.Model, data: _core.Dataset | _MappedRows, seed: int
    ) -> NDArray[np.float64]:
        if isinstance(data, _MappedRows):
            return np.concatenate(
                [model.elbo(piece, seed, start) for start, piece in data.pieces()]
            )
        return model.elbo(data, seed)

    # Evaluation noise does not depend on the model's seed, so equal weights give equal ELBOs.
    _EVAL_SEED = 0

    # -- inference ------------------------------------------------------------------------

    def encode(self, x: ArrayLike) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Mean and log-variance of q(z|x), each float32 of shape (n, latent_dim)."""
        with self._lock:
            model = self._fitted()
            data = self._rows(model, x)
            if isinstance(data, _MappedRows):
                parts = [model.encode(piece) for _, piece in data.pieces()]
                return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            return model.encode(data)

    def transform(self, x: ArrayLike) -> NDArray[np.float32]:
        """Latent means, shape (n, latent_dim): the VAE as a Pipeline transformer."""
        return self.encode(x)[0]

    def fit_transform(self, x: ArrayLike, y: Any = None, **fit_params: Any) -> NDArray[np.float32]:
        """fit(x, **fit_params), then transform(x)."""
        return self.fit(x, **fit_params).transform(x)

    def decode(self, z: ArrayLike) -> NDArray[np.float32]:
        """Means of p(x|z), shape (n, input_dim), for latent codes z (n, latent_dim): pixel
        probabilities for the Bernoulli likelihood, Gaussian means for the Gaussian one."""
        with self._lock:
            model = self._fitted()
            width = model.config[2]
            arr = _as_rows(z, "z", width, type(self).__name__, "latent dimensions")
            return model.decode(arr)

    def reconstruct(self, x: ArrayLike) -> NDArray[np.float32]:
        """Decode the latent mean of each row of x: means of p(x|z), shape (n, input_dim)."""
        return self.decode(self.transform(x))

    def sample(self, n: int, seed: int | None = None, draw: bool = False) -> NDArray[np.float32]:
        """Decode n draws from the prior z ~ N(0, I), float32 of shape (n, input_dim).

        Parameters
        ----------
        n : int
            Number of samples.
        seed : int or None
            Seeds the draws; None draws a fresh seed.
        draw : bool
            False returns the means of p(x|z) (pixel probabilities, or Gaussian means: smooth
            images); True returns draws x ~ p(x|z) (binary pixels, or means plus Gaussian
            noise): samples of the model's full distribution.
        """
        n = _positive_int("n", n)
        seed = _fresh_seed() if seed is None else _seed("seed", seed)
        if not isinstance(draw, bool):
            raise ConfigError(f"draw must be True or False, got {draw!r}")
        with self._lock:
            model = self._fitted()
            z = model.prior_samples(n, seed)
            if not draw:
                return model.decode(z)
            # The draws' own noise, independent of z's though keyed by the same seed.
            x_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1, np.uint64)[0])
            return model.decode_draw(z, x_seed)

    def elbo(self, x: ArrayLike, seed: int | None = None) -> NDArray[np.float64]:
        """Per-example evidence lower bound log p(x|z) - KL(q(z|x) || p(z)), one z sample each.

        float64 of shape (n,), in nats; higher is better. The KL weight is 1 whatever ``beta``
        trained the model. With seed None the noise comes from a fixed seed, so repeated calls,
        and models with equal weights, agree.
        """
        seed = self._EVAL_SEED if seed is None else _seed("seed", seed)
        with self._lock:
            model = self._fitted()
            return self._elbo_rows(model, self._rows(model, x), seed)

    def active_units(self, x: ArrayLike, threshold: float = 0.01) -> int:
        """The number of active latent units (Burda, Grosse & Salakhutdinov, 2016, sec. 5.2):
        dimensions u whose posterior mean E_q(u|x)[u] varies across the rows of x with a
        variance above ``threshold`` (the paper's 0.01). A dimension the encoder ignores keeps
        its mean at the prior's and carries no information about x."""
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise ConfigError(f"threshold must be a number, got {threshold!r}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ConfigError(f"threshold must be finite and at least 0, got {threshold}")
        mu = self.transform(x)
        if mu.shape[0] < 2:
            raise InputError("active_units needs at least 2 rows: it measures a variance")
        return int(np.count_nonzero(mu.astype(np.float64).var(axis=0) > threshold))

    def log_likelihood(
        self, x: ArrayLike, k: int = 5000, seed: int | None = None, progress: bool = False
    ) -> NDArray[np.float64]:
        """Importance-weighted estimate of log p(x) per example (Burda et al., 2016), in nats.

        log (1/k) sum_j p(x, z_j) / q(z_j | x) with z_j ~ q(z | x): a lower bound on log p(x)
        that tightens as k grows (k=1 is the ELBO in expectation). Computed in bounded memory
        for any k, on all of the model's threads; Ctrl-C stops it within a second.

        Returns
        -------
        float64 array of shape (n,).
        """
        from .progress import progress_bar

        k = _positive_int("k", k, _core.MAX_K)
        seed = self._EVAL_SEED if seed is None else _seed("seed", seed)
        with self._lock:
            model = self._fitted()
            data = self._rows(model, x)
            with progress_bar(data.shape[0], f"log-likelihood (k={k})", progress, "image") as bar:
                return self._log_likelihood_rows(model, data, k, seed, bar.update)

    @staticmethod
    def _log_likelihood_rows(
        model: _core.Model,
        data: _core.Dataset | _MappedRows,
        k: int,
        seed: int = _EVAL_SEED,
        done: Callable[[int], Any] | None = None,
    ) -> NDArray[np.float64]:
        """The core's k-sample estimate of log p(x) per row, in calls of a fraction of a second
        (so Ctrl-C answers), `done` told each call's rows."""
        n = data.shape[0]
        step = max(1, _core.LOG_LIKELIHOOD_CALL_ROWS // k)
        out = np.empty(n, dtype=np.float64)
        for start in range(0, n, step):
            end = min(n, start + step)
            if isinstance(data, _MappedRows):
                piece = data.read(start, end)
                out[start:end] = model.log_likelihood(piece, 0, end - start, k, seed, start)
            else:
                out[start:end] = model.log_likelihood(data, start, end, k, seed)
            if done is not None:
                done(end - start)
        return out

    def score(self, x: ArrayLike, y: Any = None) -> float:
        """Mean ELBO over x (higher is better), as scikit-learn's score."""
        return float(self.elbo(x).mean())

    # -- weights and files ----------------------------------------------------------------

    def weights(self) -> dict[str, NDArray[np.float32]]:
        """Copies of the weights, named and shaped as the state_dict of the equivalent PyTorch
        module (ModuleLists ``encoder`` and ``decoder`` of nn.Linear, and nn.Linear ``fc_mu``,
        ``fc_logvar``); weights are (out, in)."""
        with self._lock:
            return dict(self._fitted().weights())

    def set_weights(self, weights: Mapping[str, ArrayLike]) -> VAE:
        """Replace every weight from a dict shaped as ``weights()``; all or nothing.

        On an unfitted VAE this builds the model; with ``input_dim=None`` its input width is
        read from the first layer's weight.
        """
        if not isinstance(weights, dict):
            raise InputError(f"weights must be a dict of arrays, got {type(weights).__name__}")
        arrays = {}
        for k, v in weights.items():
            arr = np.asarray(v)
            if arr.dtype.kind != "f":
                raise InputError(f"weights[{k!r}] must be floating point, got dtype {arr.dtype}")
            arrays[k] = np.ascontiguousarray(arr, dtype=np.float32)
        with self._lock:
            if hasattr(self, "model_"):
                self.model_.set_weights(arrays)
            else:
                arch = self._architecture()
                input_dim = arch.input_dim
                if input_dim is None:
                    first = "encoder.0.weight" if arch.hidden else "fc_mu.weight"
                    if first not in arrays or arrays[first].ndim != 2:
                        raise InputError(
                            f"weights has no 2-D {first!r} to read input_dim from (and "
                            "input_dim is None)"
                        )
                    input_dim = _positive_int("input_dim", arrays[first].shape[1], _MAX_WIDTH)
                # Build aside and keep only on success: a rejected call leaves no model behind.
                model = self._build(arch, input_dim)
                model.set_weights(arrays)
                self._adopt(model)
        return self

    def save(self, path: str | os.PathLike[str], include_optimizer: bool = True) -> None:
        """Write the model to ``path`` in the safetensors format, atomically.

        The configuration, fastvae's version and a format version go in the metadata, with the
        history and training settings; with ``include_optimizer`` the Adam state and counters
        too, so training can resume.
        """
        with self._lock:
            model = self._fitted()
            if not isinstance(include_optimizer, bool):
                raise TypeError("include_optimizer must be True or False")
            model.save(os.fspath(path), include_optimizer, self._metadata())

    @classmethod
    def load(cls, path: str | os.PathLike[str], threads: int | None = None) -> VAE:
        """Read a model written by ``save``; raises CheckpointError on any defect.

        The architecture settings and seed come from the file; the training settings are the
        constructor's defaults (those the model was trained with are in ``fit_params_``).
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no model file at {path!r}")
        # Built first for its thread count (the argument, else the environment or every core);
        # the architecture then comes from the file.
        vae = cls(threads=threads)
        model, extra, _ = _core.Model.load(path, vae._resolved_threads())
        vae._restore(model, extra, path, settings_from_model=True)
        return vae


# The values each likelihood models, as the core's Dataset checks them.
_DOMAINS = {"bernoulli": "unit", "gaussian": "real"}


def _dataset(
    arr: NDArray[np.floating],
    name: str,
    domain: str,
    sparse: bool | None = None,
    first_row: int = 0,
) -> _core.Dataset:
    """`arr` copied into core memory, its values checked there (finite; in [0, 1] for the
    "unit" domain); a value outside [0, 1] gets a hint on what to do."""
    try:
        return _core.Dataset(arr, sparse=sparse, name=name, first_row=first_row, domain=domain)
    except InputError as e:
        if "[0, 1]" not in str(e):
            raise
        raise InputError(
            f"{e} (the Bernoulli likelihood models intensities in [0, 1]: for 8-bit pixels, "
            "pass x / 255; for other real values, use likelihood='gaussian')"
        ) from None


class _MappedRows:
    """A memory-mapped (n, d) array of rows, read in pieces and batches as needed.

    Its values are checked once, piece by piece, when it is wrapped, so a bad value is reported
    before any training step and the model stays unchanged.
    """

    # Rows per piece: a multiple of the core's evaluation chunk, so pieces draw the noise the
    # whole array would.
    PIECE_ROWS = _core.EVAL_PIECE_ROWS

    def __init__(self, arr: NDArray[np.floating], name: str, domain: str) -> None:
        self.arr = arr
        self.name = name
        self.domain = domain
        self.shape = arr.shape
        for start in range(0, arr.shape[0], self.PIECE_ROWS):
            self.read(start, start + self.PIECE_ROWS)  # the core checks each piece

    def read(self, start: int, end: int) -> _core.Dataset:
        # Pieces are only evaluated, which never takes the sparse path: no index needed.
        piece = np.ascontiguousarray(self.arr[start:end])
        return _dataset(piece, self.name, self.domain, sparse=False, first_row=start)

    def pieces(self) -> Iterator[tuple[int, _core.Dataset]]:
        for start in range(0, self.shape[0], self.PIECE_ROWS):
            yield start, self.read(start, start + self.PIECE_ROWS)
