"""The VAE estimator: a scikit-learn-style front to the Rust core.

``VAE.__init__`` only stores settings; ``fit`` builds the core model on first use and trains
it; learned state lives in attributes ending in ``_``. Every public method validates its
arguments before touching the model, so a rejected call leaves the model as it was.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _core
from .checkpoint import empty_history, from_metadata, to_metadata
from .errors import CheckpointError, ConfigError, InputError

__all__ = ["VAE"]

_MAX_WIDTH = _core.MAX_WIDTH

_PARAM_NAMES = ("input_dim", "hidden_dims", "latent_dim", "activation", "seed", "threads")
# Target seconds per call into the core while training: short enough that Ctrl-C and the
# progress bar answer promptly, long enough that the call overhead is negligible.
_SLICE_SECONDS = 0.1


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


def _seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    seed = int(value)
    if not 0 <= seed < 2**64:
        raise ConfigError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0])


def _float_rows(x: Any, name: str, width: int, what: str) -> NDArray[np.floating]:
    """x as a 2-D float32/float64 array with `width` columns; no copy when it already is one."""
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise InputError(f"{name} must be an array of shape (n, {width}): {e}") from e
    if arr.dtype.kind != "f":
        hint = " (for 8-bit pixels, pass x / 255)" if arr.dtype.kind in "ui" else ""
        raise InputError(f"{name} must hold floating-point {what}, got dtype {arr.dtype}{hint}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    if arr.ndim != 2:
        raise InputError(f"{name} must be 2-D with shape (n, {width}), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise InputError(f"{name} is empty: shape {arr.shape}, need at least one row")
    if arr.shape[1] != width:
        raise InputError(f"{name} has {arr.shape[1]} columns, expected shape (n, {width})")
    return arr


class VAE:
    """A variational autoencoder (Kingma & Welling, 2014) trained by a multithreaded Rust core.

    Encoder q(z|x): an MLP ``input_dim -> hidden_dims... -> (mu, logvar)`` of width
    ``latent_dim``; decoder p(x|z): ``latent_dim -> reversed(hidden_dims)... -> input_dim``
    Bernoulli logits. Training minimizes, per example, the binary cross-entropy summed over
    pixels plus KL(q(z|x) || N(0, I)), with Adam.

    Parameters
    ----------
    input_dim : int
        Number of inputs per example (784 for MNIST).
    hidden_dims : sequence of int
        Widths of the encoder's hidden layers; the decoder mirrors them. May be empty.
    latent_dim : int
        Width of the latent code z.
    activation : {"relu", "tanh"}
        Hidden-layer nonlinearity.
    seed : int
        Seeds the initial weights, the shuffling and the noise: the same seed and thread count
        give bit-identical weights after ``fit``.
    threads : int or None
        Worker threads of this model's own pool; None uses every core (or the
        ``FASTVAE_NUM_THREADS`` environment variable when set).

    Attributes
    ----------
    history_ : dict of lists
        Per epoch: ``epoch``, ``train_loss``, ``val_loss`` (None without validation data),
        ``samples_per_sec`` and ``seconds``.
    fit_params_ : dict
        ``batch_size``, ``lr`` and ``binarize`` of the latest ``fit``, saved with the model.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (400,),
        latent_dim: int = 20,
        activation: str = "relu",
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        self.input_dim = input_dim
        self.hidden_dims = hidden_dims
        self.latent_dim = latent_dim
        self.activation = activation
        self.seed = seed
        self.threads = threads
        # One call at a time per model: a second thread waits rather than racing the core.
        self._lock = threading.RLock()

    # -- scikit-learn conventions -------------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's settings, as scikit-learn expects."""
        return {name: getattr(self, name) for name in _PARAM_NAMES}

    def set_params(self, **params: Any) -> VAE:
        """Change constructor settings; a fitted model is discarded if the architecture changes."""
        for name, value in params.items():
            if name not in _PARAM_NAMES:
                raise ConfigError(f"unknown parameter {name!r}; valid: {', '.join(_PARAM_NAMES)}")
            setattr(self, name, value)
        if hasattr(self, "model_"):
            del self.model_
            self.__dict__.pop("history_", None)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"VAE({args})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("fastvae models are not picklable; use save(path) and VAE.load(path)")

    # -- construction ---------------------------------------------------------------------

    def _checked_config(self) -> tuple[int, list[int], int, str, int, int]:
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
        if self.activation not in _core.ACTIVATIONS:
            names = " or ".join(repr(a) for a in _core.ACTIVATIONS)
            raise ConfigError(f"activation must be {names}, got {self.activation!r}")
        seed = _seed("seed", self.seed)
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
        threads = _positive_int("threads", threads, _core.MAX_THREADS)
        return input_dim, hidden, latent_dim, str(self.activation), seed, threads

    def _ensure_model(self) -> _core.Model:
        if not hasattr(self, "model_"):
            self._adopt(_core.Model(*self._checked_config()))
        return self.model_

    def _adopt(self, model: _core.Model, history: dict[str, list[Any]] | None = None) -> None:
        """Make `model` this VAE's fitted state, with `history` (by default an empty one)."""
        self.model_ = model
        self.history_: dict[str, list[Any]] = empty_history() if history is None else history

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

    def _dataset(self, x: Any, name: str = "x") -> _core.Dataset:
        input_dim = _positive_int("input_dim", self.input_dim, _MAX_WIDTH)
        arr = _float_rows(x, name, input_dim, "intensities in [0, 1]")
        return _core.Dataset(arr, name=name)

    def _rows(self, x: Any, name: str = "x") -> _core.Dataset | _MappedRows:
        """x for the core: copied whole into core memory, or, for a memory-mapped array (which
        may be larger than memory), checked piece by piece and read as it is needed."""
        if isinstance(x, np.memmap):
            input_dim = _positive_int("input_dim", self.input_dim, _MAX_WIDTH)
            return _MappedRows(_float_rows(x, name, input_dim, "intensities in [0, 1]"), name)
        return self._dataset(x, name)

    # -- training -------------------------------------------------------------------------

    def fit(
        self,
        x: ArrayLike,
        y: Any = None,
        *,
        epochs: int = _core.DEFAULT_EPOCHS,
        batch_size: int = _core.DEFAULT_BATCH_SIZE,
        lr: float = _core.DEFAULT_LR,
        validation_data: Any = None,
        progress: bool = True,
        binarize: str | None = None,
    ) -> VAE:
        """Train for ``epochs`` more epochs, continuing from the current weights and Adam state.

        Parameters
        ----------
        x : array of shape (n, input_dim)
            Intensities in [0, 1], float32 or float64, any memory order.
        y : ignored
            Accepted so the VAE fits in a scikit-learn Pipeline.
        epochs, batch_size : int
            Passes over x, and rows per Adam step (the last batch of an epoch may be smaller).
        lr : float
            Adam's learning rate.
        validation_data : array of shape (m, input_dim), or a tuple whose first item is one
            Evaluated after every epoch; its mean loss goes to ``history_["val_loss"]``.
        progress : bool
            Show a progress bar with the running loss and samples/s.
        binarize : {None, "dynamic"}
            "dynamic" trains on a fresh Bernoulli draw of every image each time it is used
            (binarized MNIST, as papers report); x then holds the pixel probabilities.

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
        """
        epochs = _positive_int("epochs", epochs)
        batch_size = _positive_int("batch_size", batch_size, 2**31)
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise ConfigError(f"lr must be a positive number, got {lr!r}")
        if not (math.isfinite(lr) and 0 < lr <= _core.MAX_LR):
            raise ConfigError(f"lr must be positive, finite and at most {_core.MAX_LR:g}, got {lr}")
        if binarize not in (None, "dynamic"):
            raise ConfigError(f"binarize must be None or 'dynamic', got {binarize!r}")
        self._checked_config()
        data = self._rows(x)
        val = None
        if validation_data is not None:
            if isinstance(validation_data, tuple):
                if not validation_data:
                    raise InputError("validation_data is an empty tuple")
                validation_data = validation_data[0]
            val = self._rows(validation_data, "validation_data")
        with self._lock:
            model = self._ensure_model()
            # Saved with the model, so a resumed run can continue as it was trained.
            self.fit_params_: dict[str, Any] = {
                "batch_size": batch_size,
                "lr": float(lr),
                "binarize": binarize,
            }
            for _ in range(epochs):
                self._fit_epoch(
                    model, data, val, batch_size, float(lr), progress, binarize == "dynamic"
                )
        return self

    def _fit_epoch(
        self,
        model: _core.Model,
        data: _core.Dataset | _MappedRows,
        val: _core.Dataset | _MappedRows | None,
        batch_size: int,
        lr: float,
        progress: bool,
        binarize: bool,
    ) -> None:

        epoch = model.epoch + 1
        n = data.shape[0]
        train_loss, seconds = self._train_epoch(model, data, batch_size, lr, progress, binarize)
        val_loss = None
        if val is not None:
            val_loss = float(-self._elbo_rows(model, val, self._EVAL_SEED).mean())
        h = self.history_
        h["epoch"].append(epoch)
        h["train_loss"].append(train_loss)
        h["val_loss"].append(val_loss)
        h["samples_per_sec"].append(n / seconds if seconds > 0 else float("inf"))
        h["seconds"].append(seconds)

    def _train_epoch(
        self,
        model: _core.Model,
        data: _core.Dataset | _MappedRows,
        batch_size: int,
        lr: float,
        progress: bool,
        binarize: bool,
    ) -> tuple[float, float]:
        """One epoch, the core batching (a memory-mapped array is handed over as it is, and
        the core gathers each batch from it); (mean loss, seconds)."""
        from .progress import progress_bar

        source = data.arr if isinstance(data, _MappedRows) else data
        run = model.begin_epoch(source, batch_size, lr, binarize)
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
        data = self._rows(x)
        with self._lock:
            model = self._fitted()
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
        """Pixel probabilities p(x|z), shape (n, input_dim), for latent codes z (n, latent_dim)."""
        arr = _float_rows(z, "z", _positive_int("latent_dim", self.latent_dim), "latent codes")
        with self._lock:
            return self._fitted().decode(arr)

    def reconstruct(self, x: ArrayLike) -> NDArray[np.float32]:
        """Decode the latent mean of each row of x: probabilities of shape (n, input_dim)."""
        return self.decode(self.transform(x))

    def sample(self, n: int, seed: int | None = None) -> NDArray[np.float32]:
        """Decode n draws from the prior z ~ N(0, I); probabilities of shape (n, input_dim)."""
        n = _positive_int("n", n)
        seed = _fresh_seed() if seed is None else _seed("seed", seed)
        with self._lock:
            model = self._fitted()
            return model.decode(model.prior_samples(n, seed))

    def elbo(self, x: ArrayLike, seed: int | None = None) -> NDArray[np.float64]:
        """Per-example evidence lower bound log p(x|z) - KL(q(z|x) || p(z)), one z sample each.

        float64 of shape (n,), in nats; higher is better. With seed None the noise comes from a
        fixed seed, so repeated calls, and models with equal weights, agree.
        """
        seed = self._EVAL_SEED if seed is None else _seed("seed", seed)
        data = self._rows(x)
        with self._lock:
            return self._elbo_rows(self._fitted(), data, seed)

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
        data = self._rows(x)
        n = data.shape[0]
        # A fraction of a second between interrupt checks.
        step = max(1, _core.LOG_LIKELIHOOD_CALL_ROWS // k)
        out = np.empty(n, dtype=np.float64)
        with self._lock, progress_bar(n, f"log-likelihood (k={k})", progress, "image") as bar:
            model = self._fitted()
            for start in range(0, n, step):
                end = min(n, start + step)
                if isinstance(data, _MappedRows):
                    piece = data.read(start, end)
                    out[start:end] = model.log_likelihood(piece, 0, end - start, k, seed, start)
                else:
                    out[start:end] = model.log_likelihood(data, start, end, k, seed)
                bar.update(end - start)
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

    def set_weights(self, weights: dict[str, ArrayLike]) -> VAE:
        """Replace every weight from a dict shaped as ``weights()``; all or nothing."""
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
                # Build aside and keep only on success: a rejected call leaves no model behind.
                model = _core.Model(*self._checked_config())
                model.set_weights(arrays)
                self._adopt(model)
        return self

    def save(self, path: str | os.PathLike[str], include_optimizer: bool = True) -> None:
        """Write the model to ``path`` in the safetensors format, atomically.

        The configuration, fastvae's version and a format version go in the metadata; with
        ``include_optimizer`` the Adam state and counters too, so training can resume.
        """
        with self._lock:
            model = self._fitted()
            if not isinstance(include_optimizer, bool):
                raise TypeError("include_optimizer must be True or False")
            history = getattr(self, "history_", empty_history())
            extra = to_metadata(history, getattr(self, "fit_params_", None))
            model.save(os.fspath(path), include_optimizer, extra)

    @classmethod
    def load(cls, path: str | os.PathLike[str], threads: int | None = None) -> VAE:
        """Read a model written by ``save``; raises CheckpointError on any defect."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no model file at {path!r}")
        # Built first for its thread count (the argument, else the environment or every core);
        # the architecture then comes from the file.
        vae = cls(threads=threads)
        model, extra, _ = _core.Model.load(path, vae._checked_config()[-1])
        vae.input_dim, hidden, vae.latent_dim, vae.activation, vae.seed = model.config
        vae.hidden_dims = tuple(hidden)
        try:
            history, fit_params = from_metadata(extra)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        vae._adopt(model, history)
        if fit_params is not None:
            vae.fit_params_ = fit_params
        return vae


class _MappedRows:
    """A memory-mapped (n, d) array of intensities, read in pieces and batches as needed.

    Its values are checked once, piece by piece, when it is wrapped, so a bad value is reported
    before any training step and the model stays unchanged.
    """

    # Rows per piece: a multiple of the core's evaluation chunk, so pieces draw the noise the
    # whole array would.
    PIECE_ROWS = _core.EVAL_PIECE_ROWS

    def __init__(self, arr: NDArray[np.floating], name: str) -> None:
        self.arr = arr
        self.name = name
        self.shape = arr.shape
        for start in range(0, arr.shape[0], self.PIECE_ROWS):
            self.read(start, start + self.PIECE_ROWS)  # the core checks each piece

    def read(self, start: int, end: int) -> _core.Dataset:
        # Pieces are only evaluated, which never takes the sparse path: no index needed.
        piece = np.ascontiguousarray(self.arr[start:end])
        return _core.Dataset(piece, sparse=False, name=self.name, first_row=start)

    def pieces(self) -> Iterator[tuple[int, _core.Dataset]]:
        for start in range(0, self.shape[0], self.PIECE_ROWS):
            yield start, self.read(start, start + self.PIECE_ROWS)
