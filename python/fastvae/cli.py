"""The ``fastvae`` command line: ``fastvae train`` trains on MNIST or on your own data (a .npy or
.npz array, a CSV table, a folder of images) and writes the model, per-epoch metrics and
pictures to an output directory; ``eval`` scores a model file on the test set (or the held-out
rows of its own data), ``sample`` writes prior samples and ``plot`` the pictures of what it
learned.

A run on your own data records what it read in DIR/data.json (and, for standardized tables,
the features' means and standard deviations in DIR/scaler.json), so ``--resume``, ``eval``,
``plot`` and ``sample`` read the same data the same way.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from . import __version__, _core
from ._files import atomic_write
from .checkpoint import metrics_lines
from .errors import DataError, FastVAEError

if TYPE_CHECKING:
    from .datasets import OwnData, Standardizer
    from .model import VAE

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
DATA_FILE = "data.json"
SCALER_FILE = "scaler.json"
BEST_FILE = "best.safetensors"
_RECORD_FORMAT = 1
_KIND_WORDS = {
    "npy": "a .npy array",
    "npz": "a .npz array",
    "csv": "a CSV table",
    "images": "a folder of images",
}
_KINDS = tuple(_KIND_WORDS)
_MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_DEFAULT_VAL_SPLIT = 0.1


def _dims(text: str) -> tuple[int, ...]:
    """'400' or '512,256' (or '' for none) -> a tuple of positive sizes."""
    if text.strip() == "":
        return ()
    try:
        dims = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sizes like 400 or 512,256, got {text!r}"
        ) from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return dims


def _number(kind: type, ok: Any, requirement: str, noun: str | None = None) -> Any:
    """An argparse type: text read as `kind`, finite and satisfying `ok`; the errors say
    "expected {noun}" and "must be {requirement}"."""
    noun = noun or f"a {kind.__name__}"

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not (np.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return v

    parse.__name__ = kind.__name__
    return parse


def _positive(kind: type) -> Any:
    return _number(kind, lambda v: v > 0, "positive")


def _lr_schedule(text: str) -> dict[str, Any]:
    """'burda' or a JSON learning-rate schedule, checked."""
    from . import schedule

    if text.strip() == "burda":
        return schedule.burda()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"expected 'burda' or a JSON schedule, got {text!r} ({e})"
        ) from None
    try:
        checked = schedule.check(spec)
    except FastVAEError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if checked is None:
        raise argparse.ArgumentTypeError("expected a schedule, got null")
    return checked


_non_negative_int = _number(int, lambda v: v >= 0, ">= 0", "an integer")
_non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0", "a number")
_fraction = _number(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)", "a fraction")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones (None, False) and ones the help already explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class _UsageError(Exception):
    """A bad combination of arguments found after parsing; reported like argparse errors."""


class _MnistError(DataError):
    """A problem with the MNIST files, reported with how --data names their folder."""


def _add_data(p: argparse.ArgumentParser, what: str, recorded: str) -> None:
    p.add_argument(
        "--data",
        metavar="PATH",
        default=None,
        help=f"{what}: a folder with the four MNIST .gz files, a .npy or .npz array, a .csv "
        f"table or a folder of images (default: {recorded}, else MNIST from $FASTVAE_DATA or "
        "a per-user cache, downloading missing files)",
    )


def _add_data_options(p: argparse.ArgumentParser, recorded: bool) -> None:
    """How own data is read; `recorded`: a model's run recorded these, the flags override."""
    default = " (default: as the model's run recorded it)" if recorded else ""
    p.add_argument(
        "--key",
        metavar="NAME",
        default=None,
        help=f"the array to use of a .npz file holding several{default}",
    )
    p.add_argument(
        "--label-column",
        metavar="NAME|INDEX",
        default=None,
        help="a table's column of labels (its header's name, or 0-based index): left out of "
        f"the features, and colours the latent map{default}",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="folders of images: 1 reads them as grayscale, 3 as RGB (default: "
        + ("as recorded, else " if recorded else "")
        + "RGB if any image is in colour)",
    )
    p.add_argument(
        "--image-size",
        type=_positive(int),
        metavar="N",
        default=None,
        help="folders of images: the side every image is resized (stretched) to (default: "
        + ("as recorded, else " if recorded else "")
        + "28)",
    )


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_positive(int),
        default=None,
        metavar="N",
        help="worker threads (default: all cores, or $FASTVAE_NUM_THREADS)",
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=f"a model file, such as DIR/{MODEL_FILE}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastvae",
        description="Train and inspect variational autoencoders on the CPU.",
    )
    p.add_argument("--version", action="version", version=f"fastvae {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = _HelpFormatter

    t = sub.add_parser(
        "train",
        help="train a VAE on MNIST or your own data and write the model, metrics and pictures",
        description=(
            "Train a VAE on MNIST (the canonical 784-400-20 model by default) or on your own "
            "data (--data: a .npy/.npz array, a CSV table, a folder of images). Writes to "
            f"--out: {MODEL_FILE} (after every epoch), {METRICS_FILE}, and the pictures of "
            f"'fastvae plot': for images {', '.join(PICTURES)}, loss_curve.png ({MANIFOLD} too "
            "when --latent-dim is 2); for tables loss_curve.png, latent_map.png and the "
            "reconstruction error per feature (feature_errors.csv and .png). Own data: "
            f"{DATA_FILE} records what was read, {SCALER_FILE} the standardization."
        ),
        formatter_class=fmt,
    )
    _add_data(t, "what to train on", f"with --resume, the data in the run's {DATA_FILE}")
    _add_data_options(t, recorded=False)
    t.add_argument("--out", metavar="DIR", default="fastvae-run", help="output directory")
    t.add_argument(
        "--likelihood",
        choices=("bernoulli", "gaussian"),
        default=None,
        help="p(x|z): bernoulli for values in [0, 1] (pixels), gaussian for any real values "
        "(default: bernoulli for MNIST and images, gaussian for tables; a resumed run's own)",
    )
    t.add_argument(
        "--no-standardize",
        action="store_true",
        help="gaussian tables: train on the features as they are. By default each feature is "
        "standardized, (x - mean) / std over the training rows (saved in "
        f"DIR/{SCALER_FILE}, and undone in samples and per-feature errors), because the "
        "learned log-variance of each feature is bounded to a fixed range, "
        f"[{_core.LOGVAR_MIN:g}, {_core.LOGVAR_MAX:g}] (standard deviations "
        f"{math.exp(_core.LOGVAR_MIN / 2):.2g} to {math.exp(_core.LOGVAR_MAX / 2):.3g}): "
        "features of much larger or smaller scale would be modelled badly",
    )
    t.add_argument(
        "--val-split",
        type=_fraction,
        metavar="F",
        default=None,
        help="own data: the fraction of rows held out at random (by --seed) for the "
        "validation loss and the pictures; 0 holds none out (default: 0.1, or the resumed "
        "run's; MNIST uses its test set)",
    )
    t.add_argument(
        "--epochs",
        type=_positive(int),
        default=_core.DEFAULT_EPOCHS,
        help="total epochs to train",
    )
    t.add_argument(
        "--batch-size",
        type=_positive(int),
        default=None,
        help=f"rows per Adam step (default: {_core.DEFAULT_BATCH_SIZE}, or the resumed run's)",
    )
    t.add_argument(
        "--lr",
        type=_positive(float),
        default=None,
        help=f"Adam learning rate (default: {_core.DEFAULT_LR:g}, or the resumed run's)",
    )
    t.add_argument(
        "--beta",
        type=_non_negative_float,
        default=None,
        help="weight of the KL term in the training loss, as in a beta-VAE; the reported "
        "losses are the true ELBO's (default: 1, or the resumed run's)",
    )
    t.add_argument(
        "--kl-warmup",
        type=_non_negative_int,
        metavar="N",
        default=None,
        help="epochs over which the KL weight rises linearly from 0 to --beta (default: 0, "
        "or the resumed run's)",
    )
    t.add_argument(
        "--lr-schedule",
        type=_lr_schedule,
        metavar="SPEC",
        default=None,
        help="learning rate per epoch: 'burda' (the IWAE paper's 3^i epochs at "
        "1e-3 * 10^(-i/7), i = 0..7) or a JSON schedule such as "
        '\'{"kind": "cosine", "epochs": 100}\' (kinds: stages, step, exponential, cosine; see '
        "fastvae.schedule); counted over every epoch the model trains, so --resume continues it "
        "(default: a constant --lr, or the resumed run's schedule)",
    )
    t.add_argument(
        "--output-bias-from-data",
        action="store_true",
        help="start the decoder's output bias at the logit of each input's training-set mean "
        "(the mean for --likelihood gaussian), as the IWAE paper's code does",
    )
    t.add_argument(
        "--adam-eps",
        type=_positive(float),
        metavar="EPS",
        default=None,
        help="Adam's epsilon (default: 1e-8, or the resumed run's; the IWAE paper used 1e-4)",
    )
    t.add_argument(
        "--k",
        type=_positive(int),
        metavar="K",
        default=None,
        help="samples of z per image in each training step (default: 1, the ELBO, or the "
        "resumed run's); above 1 they combine as --objective says",
    )
    t.add_argument(
        "--objective",
        choices=_core.OBJECTIVES,
        default=None,
        help="how --k > 1 samples combine: 'iwae', the importance-weighted bound (Burda et al.), "
        "or 'elbo', the ELBO averaged over them (default: iwae, or the resumed run's)",
    )
    t.add_argument(
        "--patience",
        type=_positive(int),
        metavar="N",
        default=None,
        help="stop when the validation (MNIST: test) loss has not improved for N epochs; the "
        "model then gets the weights of the epoch with the lowest, which training keeps in "
        f"DIR/{BEST_FILE} (default: train every epoch; give it again with --resume)",
    )
    t.add_argument(
        "--hidden-dims",
        type=_dims,
        default=(400,),
        help="hidden widths, comma separated, empty for none (default: 400)",
    )
    t.add_argument("--latent-dim", type=_positive(int), default=20, help="latent width Z")
    t.add_argument(
        "--activation", choices=_core.ACTIVATIONS, default="relu", help="hidden nonlinearity"
    )
    t.add_argument(
        "--binarize",
        choices=("none", "dynamic"),
        default=None,
        help="dynamic: train on a fresh Bernoulli draw of every image each epoch and evaluate "
        "on a fixed binarized test set (binarized MNIST, as papers report) (default: none, or "
        "the resumed run's)",
    )
    t.add_argument("--seed", metavar="S", type=_non_negative_int, default=0, help="random seed")
    _add_threads(t)
    t.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the run in --out from its {MODEL_FILE} (model settings come from the "
        f"file, data settings from its {DATA_FILE}; --epochs is the total)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "eval",
        help="score a model on the MNIST test set (or its own data's held-out rows): ELBO and "
        "importance-weighted log p(x)",
        description=(
            "Print a model's mean test ELBO per example in nats (one z sample per example; the "
            "negative of the training loss) and, with --k > 0, the importance-weighted "
            "estimate of log p(x) with k samples (Burda et al., 2016), a tighter lower bound "
            "(papers use k=5000). A model trained on your own data is scored on the rows its "
            f"run held out for validation (all rows with --val-split 0), read as its {DATA_FILE} "
            "says; standardized tables are scored in standardized units."
        ),
        formatter_class=fmt,
    )
    _add_model(e)
    _add_data(e, "what to score", f"the data in the {DATA_FILE} beside MODEL")
    _add_data_options(e, recorded=True)
    e.add_argument(
        "--k",
        type=_non_negative_int,
        metavar="K",
        default=0,
        help="samples per example for the importance-weighted estimate (0: skip it)",
    )
    e.add_argument(
        "--binarize",
        choices=("none", "dynamic"),
        default=None,
        help="dynamic: the model was trained on dynamically binarized images, so score it on "
        "the fixed Bernoulli draw of the test set, as papers do (default: the model's own "
        "training setting, none when the file has none)",
    )
    e.add_argument(
        "--limit",
        type=_positive(int),
        default=None,
        metavar="N",
        help="score only the first N examples (default: all, 10000 for MNIST)",
    )
    _add_threads(e)
    e.add_argument(
        "--seed", metavar="S", type=_non_negative_int, default=0, help="seed of the noise"
    )
    e.add_argument("--json", action="store_true", help="print one JSON object instead")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)

    s = sub.add_parser(
        "sample",
        help="write samples from the prior: an image grid, or rows of a table",
        description=(
            "Decode N draws z ~ N(0, I) and write them as one PNG grid (image models) or as "
            "rows of a .csv or .npy file (any model; tables in their own units, the "
            "standardization undone)."
        ),
        formatter_class=fmt,
    )
    _add_model(s)
    s.add_argument("--n", type=_positive(int), default=64, metavar="N", help="number of samples")
    s.add_argument(
        "--seed", metavar="S", type=_non_negative_int, default=0, help="seed of the draws"
    )
    s.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="a .png file for a grid of images, or a .csv or .npy file for rows (default: "
        "samples.png, or samples.csv for a model of a table)",
    )
    s.add_argument(
        "--draw",
        action="store_true",
        help="write draws x ~ p(x|z) (binary pixels, or means plus Gaussian noise) instead of "
        "the means of p(x|z)",
    )
    _add_threads(s)
    s.set_defaults(func=_sample)

    pl = sub.add_parser(
        "plot",
        help="write pictures of what a model learned",
        description=(
            f"Write {', '.join(PICTURES)} for the MNIST test set (or an image model's "
            f"held-out rows), {MANIFOLD} when the model's latent_dim is 2, and loss_curve.png "
            "when the model file holds a training history; for a model of a table, "
            "latent_map.png, the reconstruction error per feature (feature_errors.csv and "
            ".png) and loss_curve.png."
        ),
        formatter_class=fmt,
    )
    _add_model(pl)
    _add_data(pl, "what to draw", f"the data in the {DATA_FILE} beside MODEL")
    _add_data_options(pl, recorded=True)
    pl.add_argument(
        "--out", metavar="DIR", default=None, help="output directory (default: MODEL's folder)"
    )
    pl.add_argument(
        "--seed", metavar="S", type=_non_negative_int, default=0, help="seed of the samples"
    )
    _add_threads(pl)
    pl.set_defaults(func=_plot)

    pa = sub.add_parser(
        "paper",
        help="reproduce the IWAE paper's one-layer MNIST experiment (Burda et al., Table 1)",
        description=(
            "Train the IWAE paper's one-stochastic-layer model (784-200-200-50, tanh) as its "
            "code does: dynamic binarization, 59,600 training and 400 validation images, batch "
            "20, Adam with epsilon 1e-4, the decoder's output bias from the data; then the test "
            "NLL with 5000 importance samples and the active units. By default the paper's "
            "schedule (3^i epochs at 1e-3 * 10^(-i/7), i = 0..7: 3,280 epochs, hours), saved "
            "every epoch so --resume continues it; --budget fits the same eight stages, "
            "shortened, into a wall-time budget, evaluation included. Writes model.safetensors, "
            "run.json, metrics.jsonl, loss_curve.png, samples.png and result.json into --out."
        ),
        formatter_class=fmt,
    )
    pa.add_argument("--model", choices=("vae", "iwae"), required=True, help="the table's row")
    pa.add_argument(
        "--k",
        type=_positive(int),
        metavar="K",
        default=None,
        help="samples per image in training (the table's column: 1, 5 or 50; default: 1, or "
        "the resumed run's)",
    )
    pa.add_argument(
        "--budget",
        type=_positive(float),
        metavar="MINUTES",
        default=None,
        help="wall-time budget in minutes, the test evaluation included (default: the "
        "paper's full schedule)",
    )
    pa.add_argument(
        "--epochs",
        type=_positive(int),
        metavar="N",
        default=None,
        help="the paper's eight stages shortened to N epochs in all (default: 3280)",
    )
    pa.add_argument(
        "--out", metavar="DIR", default=None, help="output directory (default: paper-MODEL-kK)"
    )
    pa.add_argument("--resume", action="store_true", help="continue the run in --out")
    pa.add_argument(
        "--test-k",
        type=_positive(int),
        metavar="K",
        default=5000,
        help="importance samples for the test NLL (default: 5000, the paper's)",
    )
    pa.add_argument("--seed", metavar="S", type=_non_negative_int, default=0, help="seed")
    pa.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="the folder with the four MNIST .gz files (default: $FASTVAE_DATA or a per-user "
        "cache, downloading missing files)",
    )
    pa.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads(pa)
    pa.set_defaults(func=_paper)

    sw = sub.add_parser(
        "sweep",
        help="train many models at once on a Ray cluster (a grid or random search)",
        description=(
            "Train one model per point of a grid (values joined by commas, such as "
            "--latent-dim 2,8,20) or per random draw from ranges (LOW:HIGH, with --samples N), "
            "each a Ray Tune trial on one thread, reporting its validation loss every epoch and "
            "checkpointing through Tune. Ray starts on this machine, or joins the cluster at "
            "--address. Writes OUT/results.csv (one row per trial), OUT/best.safetensors and "
            'OUT/val_curves.png. Needs Ray: pip install "fastvae[ray]".'
        ),
        formatter_class=fmt,
    )
    for name, (_, log) in _sweep_settings().items():
        sw.add_argument(
            "--" + name.replace("_", "-"),
            metavar="V,V,..|LOW:HIGH",
            default=None,
            help=f"values of {name} to try"
            + (" (ranges drawn on a log scale)" if log else "")
            + (" (widths joined by 'x', such as 200x200)" if name == "hidden_dims" else ""),
        )
    sw.add_argument("--epochs", type=_positive(int), metavar="N", default=10, help="per trial")
    sw.add_argument("--out", metavar="DIR", required=True, help="output directory")
    sw.add_argument(
        "--samples",
        type=_positive(int),
        metavar="N",
        default=1,
        help="random draws from the ranges (with a grid: repeats of each point; default 1)",
    )
    sw.add_argument("--address", metavar="HOST:PORT", default=None, help="a Ray cluster to join")
    sw.add_argument("--scheduler", choices=("fifo", "asha"), default="fifo", help="trial scheduler")
    sw.add_argument(
        "--trials-per-cpu", type=_positive(int), metavar="N", default=1, help="default 1"
    )
    sw.add_argument(
        "--threads", type=_positive(int), metavar="N", default=1, help="fastvae threads per trial"
    )
    sw.add_argument(
        "--data",
        metavar="PATH",
        default=None,
        help="a folder with the four MNIST .gz files, or a .npy/.npz/.csv file or image folder "
        "(default: MNIST from $FASTVAE_DATA or a per-user cache)",
    )
    sw.add_argument(
        "--limit", type=_positive(int), metavar="N", default=None, help="use the first N rows"
    )
    sw.add_argument(
        "--val-split",
        type=_number(float, lambda v: 0 < v < 1, "in (0, 1)"),
        metavar="F",
        default=0.1,
        help="fraction of the rows held out for the validation loss (default 0.1)",
    )
    sw.add_argument(
        "--likelihood", choices=_core.LIKELIHOODS, default="bernoulli", help="default bernoulli"
    )
    sw.add_argument(
        "--max-failures",
        type=_non_negative_int,
        metavar="N",
        default=2,
        help="restarts of a trial whose worker dies, each from its last checkpoint (default 2)",
    )
    sw.add_argument(
        "--reuse-workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run trial after trial in each Ray worker process, instead of a new process per "
        "trial (default: reuse)",
    )
    sw.add_argument("--resume", action="store_true", help="continue the sweep in --out")
    sw.set_defaults(func=_sweep)
    return p


def _sweep_settings() -> dict[str, tuple[type, bool]]:
    from .sweep import SETTINGS

    return SETTINGS


PICTURES = ("reconstructions.png", "samples.png", "latent_map.png", "interpolations.png")
MANIFOLD = "manifold.png"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _load_model(path: str, threads: int | None) -> VAE:
    from .model import VAE

    if os.path.isdir(path):
        hint = f"; did you mean {os.path.join(path, MODEL_FILE)}?"
        hint = hint if os.path.exists(os.path.join(path, MODEL_FILE)) else ""
        raise _UsageError(f"{path} is a directory, not a model file{hint}")
    return VAE.load(path, threads=threads)


def _likelihood(vae: VAE) -> str:
    return str(getattr(vae, "likelihood", "bernoulli"))


# -- what a command trains on or scores ------------------------------------------------------


@dataclass(eq=False)
class _Data:
    """Rows ready for a model: training rows, held-out rows and how to describe them."""

    x_train: NDArray[np.float32] | None  # None when only scoring
    x_val: NDArray[np.float32] | None  # held out: MNIST's test set or own data's validation rows
    shown: NDArray[np.float32]  # the rows scored and pictured: x_val, else every row
    labels: NDArray[Any] | None  # of `shown`
    image_shape: tuple[int, int, int] | None  # None: a table
    val_name: str  # "test", "validation" or "training": what `shown` is
    described: str  # `shown` in words, for messages
    record: dict[str, Any] | None = None  # None: MNIST
    scaler: Standardizer | None = None
    feature_names: list[str] | None = None
    label_name: str | None = None

    @property
    def noun(self) -> str:
        return "rows" if self.image_shape is None else "images"


def _is_mnist(path: str | None) -> bool:
    """Whether --data names MNIST: no path (the default folder, downloaded into when files are
    missing) or a folder holding any of its files; anything else, an empty folder included, is
    own data (whose reader says what is missing)."""
    if path is None:
        return True
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if not p.is_dir():
        return False
    return any((p / n).is_file() or (p / f"{n}.gz").is_file() for n in _MNIST_NAMES)


def _mnist(split: str, root: str | None) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    from .datasets import load_mnist

    try:
        return load_mnist(split, root=root)
    except _MnistError:
        raise
    except DataError as e:
        raise _MnistError(str(e)) from None


def _mnist_data(root: str | None, training: bool) -> _Data:
    x_test, y_test = _mnist("test", root)
    x_train = _mnist("train", root)[0] if training else None
    return _Data(x_train, x_test, x_test, y_test, (28, 28, 1), "test", "MNIST test set")


def _read_record(folder: Path) -> dict[str, Any] | None:
    """A run's data.json, checked; None when the run has none (it trained on MNIST)."""
    path = folder / DATA_FILE
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable record of the run's data ({e})") from None
    ok = (
        isinstance(rec, dict)
        and rec.get("format") == _RECORD_FORMAT
        and rec.get("kind") in _KINDS
        and isinstance(rec.get("path"), str)
        and isinstance(rec.get("val_split"), float | int)
        and 0 <= rec["val_split"] < 1
        and isinstance(rec.get("split_seed"), int)
        and isinstance(rec.get("standardize"), bool)
    )
    if not ok:
        raise DataError(f"{path}: not a record of the run's data written by fastvae train")
    return rec


def _recorded_path(args: argparse.Namespace, record: dict[str, Any]) -> str:
    """--data, else the path the run recorded (which must still be there)."""
    if args.data is not None:
        return str(args.data)
    path = str(record["path"])
    if not os.path.exists(path):
        raise DataError(
            f"{path}: no such file or folder; the run trained on it (if it moved, pass --data "
            "with its new place)"
        )
    return path


def _read_scaler(folder: Path, width: int) -> Standardizer:
    from .datasets import Standardizer

    path = folder / SCALER_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"{path}: the run standardized its features, but their means and standard "
            f"deviations cannot be read ({e})"
        ) from None
    return Standardizer.from_dict(raw, width, str(path))


def _given(args: argparse.Namespace, name: str) -> Any:
    return getattr(args, name, None)


def _own_data(
    args: argparse.Namespace,
    path: str,
    record: dict[str, Any] | None,
    folder: Path,
    likelihood: str | None,
    training: bool,
) -> tuple[_Data, dict[str, Any]]:
    """Read own data as `record` says (flags given override it; with no record, as the flags
    say), split it, standardize it; returns the rows and the record of what was read.

    `likelihood` is the model's (None: a new run, chosen here); `folder` holds the run's
    scaler.json. A new run fits the standardization on its training rows.
    """
    from .datasets import Standardizer, load_data, split_rows

    rec = record or {}
    if record is not None and _kind_of(path) not in (None, record["kind"]):
        raise _UsageError(
            f"the model was trained on {_KIND_WORDS[record['kind']]} ({record['path']}); "
            f"{path} is {_KIND_WORDS[str(_kind_of(path))]}"
        )
    settings = {
        name: _given(args, name) if _given(args, name) is not None else rec.get(name)
        for name in ("key", "label_column", "channels", "image_size")
    }
    data = load_data(path, **settings)
    if record is not None and data.kind != record["kind"]:
        raise _UsageError(
            f"the model was trained on {_KIND_WORDS[record['kind']]} ({record['path']}); "
            f"{path} holds {_KIND_WORDS[data.kind]}"
        )
    n = data.x.shape[0]
    if record is not None and record.get("rows") not in (None, n):
        print(
            f"fastvae: warning: {path} has {n} rows, the run was trained on {record['rows']}: "
            "its validation rows are not the ones held out then",
            file=sys.stderr,
        )

    val_split = rec.get("val_split", 0.0 if not training else _DEFAULT_VAL_SPLIT)
    given_split = _given(args, "val_split")
    if given_split is not None:
        if record is not None and given_split != record["val_split"]:
            raise _UsageError(
                f"the run held out --val-split {record['val_split']} of its rows; resuming "
                f"with {given_split} would train on rows it validated on"
            )
        val_split = given_split
    split_seed = rec.get("split_seed", args.seed)
    if likelihood is None:
        likelihood = _given(args, "likelihood") or ("gaussian" if data.tabular else "bernoulli")
    if record is not None:
        standardize = record["standardize"]
    else:
        standardize = training and data.tabular and likelihood == "gaussian"
        standardize = standardize and not args.no_standardize

    if likelihood == "bernoulli":
        _check_unit_range(data)
    train_idx, val_idx = split_rows(n, float(val_split), split_seed)
    scaler = None
    if standardize:
        if record is None:
            scaler = Standardizer.fit(data.x[train_idx])
        else:
            scaler = _read_scaler(folder, data.x.shape[1])
    x = scaler.transform(data.x) if scaler is not None else data.x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(
            f"{path}: values too large for 32-bit floats; standardize the features (Gaussian "
            "tables are, unless --no-standardize is given)"
        )
    x_train = x[train_idx] if training else None
    x_val = x[val_idx] if len(val_idx) else None
    shown = x_val if x_val is not None else x
    rows = val_idx if x_val is not None else np.arange(n)
    labels = data.labels[rows] if data.labels is not None else None
    val_name = "validation" if x_val is not None else "training"
    what = f"{val_name} rows of {path}" if x_val is not None else f"all rows of {path}"
    new_record = {
        "format": _RECORD_FORMAT,
        "kind": data.kind,
        "path": str(Path(path).expanduser().resolve()),
        "key": settings["key"],
        "label_column": settings["label_column"],
        # Images of a folder are read again at the size and channels chosen now.
        "channels": data.image_shape[2] if data.kind == "images" and data.image_shape else None,
        "image_size": data.image_shape[0] if data.kind == "images" and data.image_shape else None,
        "image_shape": list(data.image_shape) if data.image_shape else None,
        "features": data.feature_names,
        "label_name": data.label_name,
        "likelihood": likelihood,
        "standardize": scaler is not None,
        "val_split": float(val_split),
        "split_seed": split_seed,
        "rows": n,
    }
    prepared = _Data(
        x_train,
        x_val,
        shown,
        labels,
        data.image_shape,
        val_name,
        f"{what} ({data.kind})",
        new_record,
        scaler,
        data.feature_names,
        data.label_name,
    )
    return prepared, new_record


def _kind_of(path: str) -> str | None:
    """The kind of own data a path holds, by its type and name (None: unknown)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "images"
    suffix = p.suffix.lower()
    return {".npy": "npy", ".npz": "npz", ".csv": "csv", ".tsv": "csv", ".txt": "csv"}.get(suffix)


def _check_unit_range(data: OwnData) -> None:
    """The Bernoulli likelihood's domain, [0, 1], with the first value outside it named."""
    x = data.x
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0.0 and hi <= 1.0:
        return
    i, j = (int(v) for v in np.argwhere((x < 0) | (x > 1))[0])
    if data.feature_names is not None:
        where = f"feature {data.feature_names[j]!r} of row {i}"
    else:
        where = f"value {j} of image {i}"
    raise DataError(
        f"{data.path}: the Bernoulli likelihood models values in [0, 1], but {where} is "
        f"{x[i, j]:g} (the values range from {lo:g} to {hi:g}); use --likelihood gaussian "
        "for real-valued data"
    )


def _model_data(args: argparse.Namespace, vae: VAE, model: str) -> _Data:
    """What eval and plot score and draw: the model's own data as its run recorded it
    (--data and the other flags override), else MNIST's test set, else --data as it is."""
    folder = Path(model).resolve().parent
    record = _read_record(folder)
    if record is None and _is_mnist(args.data):
        data = _mnist_data(args.data, training=False)
    else:
        path = args.data if record is None else _recorded_path(args, record)
        assert path is not None
        if record is not None and _is_mnist(path):
            raise _UsageError(
                f"the model was trained on {_KIND_WORDS[record['kind']]} ({record['path']}), "
                f"not on MNIST ({path})"
            )
        data, _ = _own_data(args, path, record, folder, _likelihood(vae), training=False)
    _check_width(vae, data)
    return data


def _check_width(vae: VAE, data: _Data) -> None:
    width = data.shown.shape[1]
    if vae.input_dim != width:
        raise _UsageError(
            f"the model takes {vae.input_dim} inputs per example, the {data.described} have {width}"
        )


# -- train -----------------------------------------------------------------------------------


def _stalled(val_loss: list[Any], patience: int) -> int | None:
    """The best epoch's index when the last `patience` epochs brought no lower loss."""
    values = [np.inf if v is None else v for v in val_loss]
    if not values:
        return None
    best = int(np.argmin(values))
    return best if len(values) - 1 - best >= patience else None


def _train(args: argparse.Namespace) -> int:
    from .model import VAE

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    record = _read_record(out) if args.resume else None

    # Training settings: the flags, else the resumed run's, else the defaults.
    saved: dict[str, Any] = {}
    vae: VAE | None = None
    likelihood = None
    if args.resume:
        vae = VAE.load(model_path, threads=args.threads)
        saved = getattr(vae, "fit_params_", None) or {}
        likelihood = _likelihood(vae)
        if args.likelihood is not None and args.likelihood != likelihood:
            raise _UsageError(
                f"the run's model has the {likelihood} likelihood; it cannot resume as "
                f"--likelihood {args.likelihood}"
            )
        print(f"resuming {model_path} at epoch {len(vae.history_['epoch'])}", file=sys.stderr)

    path = args.data if record is None else _recorded_path(args, record)
    if record is None and _is_mnist(path):
        if args.resume is False:
            for stale in (DATA_FILE, SCALER_FILE, BEST_FILE):
                (out / stale).unlink(missing_ok=True)
        data = _mnist_data(path, training=True)
        likelihood = likelihood or args.likelihood or "bernoulli"
    else:
        assert path is not None
        if args.resume and record is None:
            raise _UsageError(
                f"{out} has no {DATA_FILE}, so its model was trained on MNIST, not on {path}"
            )
        if record is not None and _is_mnist(path):
            raise _UsageError(
                f"the run in {out} trained on {_KIND_WORDS[record['kind']]} ({record['path']}), "
                f"not on MNIST ({path})"
            )
        data, new_record = _own_data(args, path, record, out, likelihood, training=True)
        likelihood = new_record["likelihood"]
        if not args.resume:
            (out / BEST_FILE).unlink(missing_ok=True)
        # Written before training, so an interrupted run can resume.
        if data.scaler is not None:
            _write_text(out / SCALER_FILE, json.dumps(data.scaler.to_dict()) + "\n")
        else:
            (out / SCALER_FILE).unlink(missing_ok=True)
        _write_text(out / DATA_FILE, json.dumps(new_record, indent=1) + "\n")
    assert data.x_train is not None

    batch_size = args.batch_size or saved.get("batch_size", _core.DEFAULT_BATCH_SIZE)
    lr = args.lr or saved.get("lr", _core.DEFAULT_LR)
    mode = args.binarize or saved.get("binarize") or "none"
    dynamic = mode == "dynamic"
    if dynamic and likelihood != "bernoulli":
        raise _UsageError("--binarize dynamic draws binary pixels: it needs --likelihood bernoulli")
    if args.patience is not None and data.x_val is None:
        raise _UsageError("--patience watches the validation loss: it needs --val-split > 0")
    # None: the model's default.
    beta = args.beta if args.beta is not None else saved.get("beta")
    kl_warmup = args.kl_warmup if args.kl_warmup is not None else saved.get("kl_warmup")
    lr_schedule = args.lr_schedule if args.lr_schedule is not None else saved.get("lr_schedule")
    adam_eps = args.adam_eps if args.adam_eps is not None else saved.get("adam_eps")
    k = args.k if args.k is not None else saved.get("k")
    objective = args.objective if args.objective is not None else saved.get("objective")
    # Dynamic binarization is scored on one fixed Bernoulli draw of the test set.
    x_eval = data.x_val
    if dynamic and x_eval is not None:
        from .datasets import binarize

        x_eval = binarize(x_eval)
    if vae is None:
        vae = VAE(
            input_dim=data.x_train.shape[1],
            hidden_dims=args.hidden_dims,
            latent_dim=args.latent_dim,
            activation=args.activation,
            seed=args.seed,
            threads=args.threads,
            likelihood=likelihood,
            output_bias_from_data=args.output_bias_from_data,
        )
    else:
        _check_width(vae, data)

    done = getattr(vae, "epochs_trained_", 0)
    stopped: int | None = None
    if args.patience is not None and done:
        stopped = _stalled(vae.history_["val_loss"], args.patience)
    first = done + 1 if stopped is None else args.epochs + 1
    val_word = data.val_name
    t0 = time.perf_counter()

    def epoch_done(vae: VAE) -> bool:
        """Save and report the epoch just trained; whether patience has run out."""
        nonlocal t0, stopped
        h = vae.history_
        vae.save(model_path)
        _write_text(out / METRICS_FILE, metrics_lines(h))
        val = h["val_loss"][-1]
        val_text = f"  {val_word} loss {val:.2f}" if val is not None else ""
        print(
            f"epoch {h['epoch'][-1]}/{args.epochs}  train loss {h['train_loss'][-1]:.2f}"
            f"{val_text}  {h['samples_per_sec'][-1]:,.0f} samples/s  "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        t0 = time.perf_counter()
        if args.patience is None:
            return False
        # Patience counts across resumed runs (the model's own counts within one fit), so the
        # best weights are kept in a file of their own.
        earlier = [v for v in h["val_loss"][:-1] if v is not None]
        if val is not None and (not earlier or val < min(earlier)):
            vae.save(out / BEST_FILE)
        stopped = _stalled(h["val_loss"], args.patience)
        return stopped is not None

    if first <= args.epochs:
        # One fit for every epoch: the data are converted for the core once.
        vae.fit(
            data.x_train,
            epochs=args.epochs - first + 1,
            batch_size=batch_size,
            lr=lr,
            validation_data=x_eval,
            progress=not args.no_progress,
            binarize="dynamic" if dynamic else None,
            beta=beta,
            kl_warmup=kl_warmup,
            lr_schedule=lr_schedule,
            adam_eps=adam_eps,
            k=k,
            objective=objective,
            on_epoch_end=epoch_done,
        )
    if not hasattr(vae, "epochs_trained_"):
        raise FastVAEError("nothing to do: --epochs is not above the epochs already trained")
    if stopped is not None:
        best_epoch = vae.history_["epoch"][stopped]
        best_path = out / BEST_FILE
        if best_path.exists():
            vae.set_weights(VAE.load(best_path, threads=args.threads).weights())
            vae.save(model_path)
        print(
            f"stopped early: no lower {val_word} loss for {args.patience} epochs; the model "
            f"holds the weights of epoch {best_epoch}, the lowest"
        )

    names, errors = _pictures(vae, data, out, args.seed)
    if x_eval is not None:
        loss = -float(vae.elbo(x_eval).mean())
        if data.record is None:
            which = "fixed binarized test set" if dynamic else "test set"
        else:
            which = f"{len(x_eval):,} {data.val_name} {data.noun}"
            which += ", fixed binarization" if dynamic else ""
        print(f"{val_word} loss ({_loss_terms(vae)} per example, {which}): {loss:.2f} nats")
    if errors is not None:
        _print_worst(errors, data)
    written = [str(model_path), str(out / METRICS_FILE)]
    if data.record is not None:
        written.append(str(out / DATA_FILE))
    if data.scaler is not None:
        written.append(str(out / SCALER_FILE))
    print(f"wrote {', '.join(written[:-1])}, {written[-1]}, and pictures in {out}/:")
    print("  " + "  ".join(names))
    return 0


def _loss_terms(vae: VAE) -> str:
    return "Gaussian NLL + KL" if _likelihood(vae) == "gaussian" else "BCE + KL"


def _pictures(vae: VAE, data: _Data, out: Path, seed: int) -> tuple[list[str], Any]:
    """Write a model's pictures for `data`: the image set, or the table set with its
    per-feature errors (returned too; None for images)."""
    from . import pictures

    if data.image_shape is not None:
        names = pictures.write_pictures(
            vae,
            data.shown,
            data.labels,
            out,
            seed=seed,
            image_shape=data.image_shape,
            label_name=data.label_name or "digit",
            val_label=data.val_name,
        )
        return names, None
    scaler = data.scaler
    names, errors = pictures.write_table_pictures(
        vae,
        data.shown,
        data.labels,
        out,
        feature_names=data.feature_names,
        label_name=data.label_name or "label",
        mean=None if scaler is None else scaler.mean,
        std=None if scaler is None else scaler.std,
        val_label=data.val_name,
    )
    return names, errors


def _print_worst(errors: Any, data: _Data, k: int = 5) -> None:
    worst = errors.worst(k)
    parts = []
    for j in worst:
        rel = errors.relative[j]
        text = f"{errors.names[j]} {rel:.3f}" if np.isfinite(rel) else f"{errors.names[j]} -"
        parts.append(text)
    print(
        f"worst reconstructed features (mean squared error / variance, {data.val_name} rows; "
        f"0 is perfect, 1 no better than the mean): {', '.join(parts)}"
    )


# -- eval ------------------------------------------------------------------------------------


def _mean_and_stderr(v: NDArray[np.float64]) -> tuple[float, float]:
    sem = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), sem


def _log_likelihood(
    vae: VAE, x: NDArray[np.float32], k: int, seed: int, progress: bool
) -> NDArray[np.float64]:
    """vae.log_likelihood, with a progress bar only when it should take over a second.

    A probe on the first few images (about a quarter of one call's work into the core) gives
    the time per image; the probe's results are the final ones when it covered every image.
    """
    n = len(x)
    probe = min(n, max(1, _core.LOG_LIKELIHOOD_CALL_ROWS // 4 // k))
    t0 = time.perf_counter()
    head = vae.log_likelihood(x[:probe], k=k, seed=seed)
    if probe == n:
        return head
    expected = (time.perf_counter() - t0) * n / probe
    return vae.log_likelihood(x, k=k, seed=seed, progress=progress and expected > 1.0)


def _eval(args: argparse.Namespace) -> int:
    from .datasets import binarize

    vae = _load_model(args.model, args.threads)
    mode = args.binarize or getattr(vae, "fit_params_", {}).get("binarize") or "none"
    if mode == "dynamic" and _likelihood(vae) != "bernoulli":
        raise _UsageError("--binarize dynamic draws binary pixels: the model is not Bernoulli")
    data = _model_data(args, vae, args.model)
    x = data.shown
    if mode == "dynamic":
        x = binarize(x)
    if args.limit is not None:
        x = x[: args.limit]
    t0 = time.perf_counter()
    elbo, elbo_sem = _mean_and_stderr(vae.elbo(x, seed=args.seed))
    elbo_seconds = time.perf_counter() - t0
    active = vae.active_units(x) if len(x) > 1 else None
    ll = ll_sem = ll_seconds = None
    if args.k > 0:
        t0 = time.perf_counter()
        values = _log_likelihood(vae, x, args.k, args.seed, not args.no_progress)
        ll, ll_sem = _mean_and_stderr(values)
        ll_seconds = time.perf_counter() - t0
    standardized = data.scaler is not None
    if args.json:
        result = {
            "model": args.model,
            "data": "mnist" if data.record is None else data.record["path"],
            "split": data.val_name,
            "likelihood": _likelihood(vae),
            "standardized": standardized,
            "examples": len(x),
            "binarize": mode,
            "seed": args.seed,
            "elbo": elbo,
            "elbo_stderr": elbo_sem,
            "loss": -elbo,
            "k": args.k,
            "log_likelihood": ll,
            "log_likelihood_stderr": ll_sem,
            "elbo_seconds": elbo_seconds,
            "log_likelihood_seconds": ll_seconds,
            "active_units": active,
            "latent_dim": vae.latent_dim,
        }
        print(json.dumps(result))
        return 0
    arch = "-".join(str(d) for d in (vae.input_dim, *vae.hidden_dims, vae.latent_dim))
    print(
        f"model     {args.model}: {arch} {vae.activation}, {_likelihood(vae)}, "
        f"{vae.epochs_trained_} epochs trained"
    )
    noun = data.noun[:-1]
    if data.record is None:
        kind = "fixed binarization" if mode == "dynamic" else "grayscale"
        print(f"data      MNIST test set, {len(x):,} images ({kind})")
    else:
        notes = ["standardized, so in standardized units"] if standardized else []
        notes += ["fixed binarization"] if mode == "dynamic" else []
        note = f" ({'; '.join(notes)})" if notes else ""
        print(f"data      {data.described}: {len(x):,} {data.noun}{note}")
    print(
        f"ELBO      {elbo:.2f} nats per {noun} (+/- {elbo_sem:.2f} std. error; loss "
        f"{-elbo:.2f}), 1 sample, seed {args.seed}"
    )
    if ll is not None:
        print(
            f"log p(x) >= {ll:.2f} nats per {noun} (+/- {ll_sem:.2f}), importance-weighted "
            f"with k={args.k}, seed {args.seed} ({ll_seconds:.1f} s)"
        )
    if active is not None:
        print(
            f"active    {active} of {vae.latent_dim} latent units (variance of the posterior "
            "mean across the data above 0.01, as Burda et al. count them)"
        )
    return 0


# -- sample and plot -------------------------------------------------------------------------

_ROW_SUFFIXES = (".csv", ".npy")


def _sample(args: argparse.Namespace) -> int:
    from . import images

    folder = Path(args.model).resolve().parent
    record = _read_record(folder)
    table = record is not None and record.get("image_shape") is None
    out = Path(args.out if args.out is not None else "samples.csv" if table else "samples.png")
    suffix = out.suffix.lower()
    if suffix not in (".png", *_ROW_SUFFIXES):
        raise _UsageError(
            f"--out must name a .png file (a grid of images) or a .csv or .npy file (rows), "
            f"got {str(out)!r}"
        )
    if suffix == ".png" and table:
        assert record is not None
        raise _UsageError(
            f"the model was trained on a table ({record['path']}), so its samples are rows: "
            "write them with --out FILE.csv or FILE.npy"
        )
    vae = _load_model(args.model, args.threads)
    x = vae.sample(args.n, seed=args.seed, draw=args.draw)
    what = "draws" if args.draw else "samples"
    if suffix == ".png":
        shape = record["image_shape"] if record is not None else None
        try:
            h, w, c = images.image_shape(x.shape[1], shape)
        except ValueError as e:
            raise _UsageError(f"{e}: write the samples with --out FILE.csv or FILE.npy") from None
        rows, cols = images.grid_shape(args.n)
        scale = images.display_scale((h, w))
        images.save_png(images.image_grid(x, rows, cols, scale=scale, shape=(h, w, c)), out)
        print(
            f"wrote {out}: {args.n} {what} from the prior ({rows} x {cols} grid, seed {args.seed})"
        )
        return 0
    values = np.asarray(x, dtype=np.float64)
    names = [str(j) for j in range(x.shape[1])]
    if record is not None:
        names = record.get("features") or names
        if record["standardize"]:
            values = _read_scaler(folder, x.shape[1]).inverse(values)
    if suffix == ".npy":
        atomic_write(out, lambda f: np.save(f, values))
    else:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([f"{v:.7g}" for v in row] for row in values)
        _write_text(out, text.getvalue())
    print(
        f"wrote {out}: {args.n} {what} from the prior, {x.shape[1]} values each (seed {args.seed})"
    )
    return 0


def _plot(args: argparse.Namespace) -> int:
    vae = _load_model(args.model, args.threads)
    out = Path(args.out) if args.out is not None else Path(args.model).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    data = _model_data(args, vae, args.model)
    names, errors = _pictures(vae, data, out, args.seed)
    if errors is not None:
        _print_worst(errors, data)
    print(f"wrote pictures in {out}/:")
    print("  " + "  ".join(names))
    return 0


def _paper(args: argparse.Namespace) -> int:
    from . import paper

    if args.budget is not None and args.epochs is not None:
        raise _UsageError("give --budget or --epochs, not both")
    out = Path(args.out or f"paper-{args.model}-k{args.k or 1}")
    result = paper.run(
        paper.PaperRun(
            out=out,
            model=args.model,
            k=args.k,
            budget=None if args.budget is None else 60.0 * args.budget,
            epochs=args.epochs,
            threads=args.threads,
            seed=args.seed,
            data=args.data,
            test_k=args.test_k,
            resume=args.resume,
            progress=not args.no_progress,
        )
    )
    print(paper.format_result(result))
    print(f"wrote {out / 'result.json'}, {out / 'loss_curve.png'} and {out / 'samples.png'}")
    return 0


def _sweep_values(name: str, text: str, kind: type) -> Any:
    """'a,b,c' -> a grid list; 'LOW:HIGH' -> a (low, high) range."""

    def one(v: str) -> Any:
        try:
            return kind(v) if kind is not str else v
        except ValueError:
            flag = "--" + name.replace("_", "-")
            raise _UsageError(f"{flag}: {v!r} is not a {kind.__name__}") from None

    if ":" in text:
        lo, _, hi = text.partition(":")
        return (one(lo.strip()), one(hi.strip()))
    return [one(v.strip()) for v in text.split(",") if v.strip()]


def _sweep(args: argparse.Namespace) -> int:
    from . import sweep

    sweep.require_ray()
    out = Path(args.out)
    spec_path = out / "sweep.json"
    if args.resume:
        if not spec_path.exists():
            raise _UsageError(f"{out} holds no sweep to resume (no sweep.json)")
        saved = json.loads(spec_path.read_text())
        space = {k: tuple(v) if saved["ranges"].get(k) else v for k, v in saved["space"].items()}
        for key in ("epochs", "samples", "scheduler", "threads", "trials_per_cpu", "data"):
            setattr(args, key, saved[key])
        for key in ("limit", "val_split", "likelihood", "max_failures"):
            setattr(args, key, saved[key])
        args.reuse_workers = saved.get("reuse_workers", True)
    else:
        space = {}
        for name, (kind, _) in sweep.SETTINGS.items():
            text = getattr(args, name)
            if text is not None:
                space[name] = _sweep_values(name, text, kind)
        sweep.check_space(space)
    x_train, x_val = _sweep_data(args)
    fixed: dict[str, Any] = {"likelihood": args.likelihood}
    spec = sweep.SweepSpec(
        space=space,
        epochs=args.epochs,
        out=out,
        samples=args.samples,
        address=args.address,
        scheduler=args.scheduler,
        threads=args.threads,
        trials_per_cpu=args.trials_per_cpu,
        max_failures=args.max_failures,
        fixed=fixed,
        reuse_workers=args.reuse_workers,
    )
    if not args.resume:
        out.mkdir(parents=True, exist_ok=True)
        record = {
            "space": {k: list(v) for k, v in space.items()},
            "ranges": {k: isinstance(v, tuple) for k, v in space.items()},
            "epochs": args.epochs,
            "samples": args.samples,
            "scheduler": args.scheduler,
            "threads": args.threads,
            "trials_per_cpu": args.trials_per_cpu,
            "data": args.data,
            "limit": args.limit,
            "val_split": args.val_split,
            "likelihood": args.likelihood,
            "max_failures": args.max_failures,
            "reuse_workers": args.reuse_workers,
        }
        _write_text(spec_path, json.dumps(record, indent=1) + "\n")
    rows = sweep.run_sweep(spec, x_train, x_val, resume=args.resume)
    done = [r for r in rows if r["best_val_loss"] is not None]
    print(f"{len(rows)} trials, {len(done)} with results; wrote {out / 'results.csv'}")
    unfinished = sum(r["status"] == "unfinished" for r in rows)
    if done:
        best = min(done, key=lambda r: r["best_val_loss"])
        settings = ", ".join(f"{k}={best[k]}" for k in space)
        print(
            f"best: {settings}: validation loss {best['best_val_loss']:.2f} at epoch "
            f"{best['best_epoch']}; its weights are in {out / 'best.safetensors'}"
        )
    if unfinished:
        print(
            f"fastvae: the sweep stopped with {unfinished} of {len(rows)} trials unfinished; "
            f"continue it with: fastvae sweep --out {out} --resume",
            file=sys.stderr,
        )
        return 130
    return 0 if len(done) == len(rows) and all(r["status"] == "done" for r in rows) else 1


def _sweep_data(args: argparse.Namespace) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The sweep's (training rows, validation rows): MNIST's training images or the data at
    --data, the first --limit rows, --val-split of them held out by a fixed seed."""
    from .datasets import load_data, split_rows

    if args.data is None or _is_mnist(args.data):
        x = _mnist("train", args.data)[0]
    else:
        x = load_data(args.data).x
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    if args.limit is not None:
        x = x[: args.limit]
    train_rows, val_rows = split_rows(len(x), args.val_split, seed=0)
    if len(train_rows) == 0:
        raise _UsageError(f"--val-split {args.val_split} leaves no rows of {len(x)} to train on")
    return x[train_rows], x[val_rows]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FastVAEError, OSError, FloatingPointError, _UsageError) as e:
        print(f"fastvae: error: {e}", file=sys.stderr)
        if isinstance(e, _MnistError):
            print("fastvae: on the command line, --data DIR names the folder", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastvae: interrupted", file=sys.stderr)
        return 130
