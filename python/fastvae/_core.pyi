"""Type stub of the compiled core, ``fastvae._core`` (Rust, PyO3). Checked by mypy's stubtest."""

from os import PathLike
from typing import final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "__version__",
    "ACTIVATIONS",
    "LIKELIHOODS",
    "LOGVAR_MIN",
    "LOGVAR_MAX",
    "MAX_BETA",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "EVAL_CHUNK",
    "EVAL_PIECE_ROWS",
    "LOG_LIKELIHOOD_CALL_ROWS",
    "MAX_K",
    "MAX_STEP_ROWS",
    "OBJECTIVES",
    "MAX_PARAMS",
    "MAX_LR",
    "MAX_THREADS",
    "MAX_WIDTH",
    "Model",
    "Dataset",
    "EpochRun",
    "amx_available",
    "isa_paths",
    "set_phase_timers",
    "take_phase_times",
    "binarize",
    "default_threads",
    "FastVAEError",
    "ConfigError",
    "InputError",
    "DataError",
    "CheckpointError",
]

__version__: str
#: The activations' names.
ACTIVATIONS: list[str]
#: The likelihoods' names.
LIKELIHOODS: list[str]
#: Bounds of the Gaussian likelihood's learned per-feature log-variances.
LOGVAR_MIN: float
LOGVAR_MAX: float
#: Largest KL weight (beta) accepted.
MAX_BETA: float
#: Training defaults (the canonical MNIST run).
DEFAULT_EPOCHS: int
DEFAULT_BATCH_SIZE: int
DEFAULT_LR: float
#: Rows per inference chunk (evaluation noise is keyed by chunk).
EVAL_CHUNK: int
#: Rows per call for the ELBO of a large array: a multiple of EVAL_CHUNK.
EVAL_PIECE_ROWS: int
#: Decoder rows (examples times k) per call for the importance-weighted estimate.
LOG_LIKELIHOOD_CALL_ROWS: int
MAX_K: int
#: Most decoder rows (batch_size times k) one training step may hold.
MAX_STEP_ROWS: int
#: The k-sample training objectives' names.
OBJECTIVES: list[str]
MAX_PARAMS: int
MAX_LR: float
MAX_THREADS: int
MAX_WIDTH: int

class FastVAEError(ValueError):
    """Base class of fastvae's errors; a ValueError."""

class ConfigError(FastVAEError):
    """An invalid model or training setting."""

class InputError(FastVAEError):
    """Input data of the wrong shape, type or range."""

class DataError(FastVAEError):
    """A data file that is missing, corrupt or fails its checksum."""

class CheckpointError(FastVAEError):
    """A model file that cannot be read or does not match its configuration."""

def default_threads() -> int:
    """Number of logical cores, the default thread count."""

def amx_available() -> bool:
    """Whether matrix products run on AMX tiles in this process."""

def isa_paths() -> dict[str, str]:
    """The instruction sets this process runs on: fastvae's own kernels ("avx512", "avx2" or
    "generic", capped by FASTVAE_ISA), the gemm crate's, and whether AMX takes the large
    products ("on" or "off")."""

def set_phase_timers(on: bool) -> None:
    """Switch the timers of a training step's phases on or off (process-wide; off by default)."""

def take_phase_times() -> tuple[int, list[tuple[str, float]]]:
    """The training steps timed since the last call and each phase's seconds over them, in the
    order the phases run (process-wide: every model's steps count); resets both."""

def binarize(x: NDArray[np.float32] | NDArray[np.float64], seed: int = 0) -> NDArray[np.float32]:
    """A fixed Bernoulli draw of intensities x (n, d) in [0, 1]: 1.0 with probability x, else
    0.0, keyed by (seed, row); float32 (n, d)."""

@final
class Dataset:
    """Rows of finite values copied into memory the core owns, validated once."""

    def __new__(
        cls,
        x: NDArray[np.float32] | NDArray[np.float64],
        sparse: bool | None = None,
        name: str = "x",
        first_row: int = 0,
        domain: str = "unit",
    ) -> Dataset:
        """`sparse`: None picks the first layer's path by density; True or False forces it.
        `name` and `first_row` locate bad values in error messages. `domain`: "unit" accepts
        values in [0, 1] only (Bernoulli models), "real" any finite value (Gaussian models)."""
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def sparse(self) -> bool:
        """Whether training on this data uses the sparse first layer."""
    @property
    def unit(self) -> bool:
        """Whether every value is in [0, 1]."""

@final
class EpochRun:
    """Progress through one training epoch."""

    @property
    def done(self) -> bool: ...
    @property
    def total_batches(self) -> int: ...
    @property
    def batches_done(self) -> int: ...
    @property
    def rows_done(self) -> int: ...
    @property
    def mean_loss(self) -> float: ...

@final
class Model:
    """The core model: weights, Adam state and a thread pool."""

    def __new__(
        cls,
        input_dim: int,
        hidden_dims: list[int],
        latent_dim: int,
        activation: str,
        seed: int,
        threads: int,
        likelihood: str = "bernoulli",
    ) -> Model: ...
    @property
    def threads(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def step(self) -> int: ...
    @property
    def param_count(self) -> int: ...
    @property
    def likelihood(self) -> str:
        """The likelihood: "bernoulli" or "gaussian"."""
    @property
    def config(self) -> tuple[int, list[int], int, str, int]:
        """(input_dim, hidden_dims, latent_dim, activation, seed)."""
    def weights(self) -> dict[str, NDArray[np.float32]]:
        """Copies of the weights, named and shaped as PyTorch nn.Linear state_dict entries."""
    def set_weights(self, weights: dict[str, NDArray[np.float32]]) -> None:
        """Replace all weights; the model is unchanged if anything is missing or malformed."""
    def optimizer_state(
        self,
    ) -> tuple[dict[str, NDArray[np.float32]], dict[str, NDArray[np.float32]], int, int]:
        """Adam's moments (as weight-named dicts), its step count and the epoch count."""
    def set_optimizer_state(
        self,
        m: dict[str, NDArray[np.float32]],
        v: dict[str, NDArray[np.float32]],
        step: int,
        epoch: int,
    ) -> None: ...
    def begin_epoch(
        self,
        data: Dataset | NDArray[np.float32] | NDArray[np.float64],
        batch_size: int,
        lr: float,
        binarize: bool,
        beta: float = 1.0,
        adam_eps: float = 1e-8,
        k: int = 1,
        objective: str = "iwae",
    ) -> EpochRun:
        """Start the next epoch over `data`: a Dataset, or a 2-D array the core does not hold
        (memory-mapped), whose batches `run` then gathers one at a time. `beta` weights the KL
        term of the loss trained on (1: the ELBO); `adam_eps` is Adam's epsilon; `k` samples of
        z per example combine as `objective` says ("iwae" or "elbo") when k > 1."""
    def run(
        self,
        data: Dataset | NDArray[np.float32] | NDArray[np.float64],
        run: EpochRun,
        max_batches: int,
    ) -> None:
        """Train on up to max_batches further batches of the epoch, without the GIL. From a
        Dataset the core gathers them; from an array, each batch is gathered with the GIL held
        (Python owns that memory), checked, and trained on without it."""
    def end_epoch(self, run: EpochRun) -> float:
        """Count the finished epoch; its mean loss."""
    def elbo(self, data: Dataset, seed: int, row_offset: int = 0) -> NDArray[np.float64]:
        """Per-example ELBO with one z sample each, noise keyed by seed; float64 (n,).
        `row_offset`: where `data` starts in a larger array evaluated in pieces (a multiple of
        EVAL_CHUNK), so each piece draws the noise the whole array would."""
    def log_likelihood(
        self, data: Dataset, start: int, end: int, k: int, seed: int, row_offset: int = 0
    ) -> NDArray[np.float64]:
        """Importance-weighted log-likelihood (k samples) of rows [start, end); float64."""
    def loss_and_grads(
        self,
        x: Dataset,
        eps: NDArray[np.float32] | NDArray[np.float64],
        beta: float = 1.0,
        k: int = 1,
        objective: str = "iwae",
    ) -> tuple[float, dict[str, NDArray[np.float32]]]:
        """Loss and gradients (weight-named dict) for x (B, D) with the given noise eps (B k, Z),
        sample j of row i in eps row i k + j; the KL weighted by beta, the k samples combined as
        `objective` says when k > 1."""
    def step_with_noise(
        self,
        x: Dataset,
        eps: NDArray[np.float32] | NDArray[np.float64],
        lr: float,
        adam_eps: float = 1e-8,
        beta: float = 1.0,
        k: int = 1,
        objective: str = "iwae",
    ) -> float:
        """One Adam step on x with the given noise (B k, Z); returns the batch loss (sum over
        rows)."""
    def encode(self, data: Dataset) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(mu, logvar), each float32 (n, Z)."""
    def decode(self, z: NDArray[np.float32] | NDArray[np.float64]) -> NDArray[np.float32]:
        """The means of p(x|z) (n, D) for latent codes z (n, Z): probabilities for Bernoulli."""
    def decode_draw(
        self, z: NDArray[np.float32] | NDArray[np.float64], seed: int
    ) -> NDArray[np.float32]:
        """Draws x ~ p(x|z) (n, D) for latent codes z (n, Z), row r keyed by (seed, r)."""
    def to_bytes(self, include_optimizer: bool, extra: dict[str, str]) -> bytes:
        """The model file's bytes (as `save` writes them)."""
    @staticmethod
    def from_bytes(data: bytes, threads: int) -> tuple[Model, dict[str, str], bool]:
        """A model from a model file's bytes, checked as `load` checks a file: the model, its
        extra metadata, and whether it held optimizer state."""
    def save(
        self,
        path: str | PathLike[str],
        include_optimizer: bool,
        extra: dict[str, str],
    ) -> None:
        """Write a safetensors model file atomically; `extra` adds metadata entries."""
    @staticmethod
    def load(path: str | PathLike[str], threads: int) -> tuple[Model, dict[str, str], bool]:
        """Read a model file: the model, its extra metadata, and whether it held optimizer state."""
    def prior_samples(self, n: int, seed: int) -> NDArray[np.float32]:
        """n draws from the prior N(0, I), float32 (n, Z)."""
