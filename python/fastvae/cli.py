"""The ``fastvae`` command line: ``fastvae train`` trains on MNIST and writes the model,
per-epoch metrics and pictures to an output directory; ``eval`` scores a model file on the
test set, ``sample`` writes prior samples and ``plot`` the pictures of what it learned."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from . import __version__, _core
from ._files import atomic_write
from .errors import DataError, FastVAEError

if TYPE_CHECKING:
    from .model import VAE

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"


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


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not v > 0 or (kind is float and not np.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return v

    parse.__name__ = kind.__name__
    return parse


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones (None, False) and ones the help already explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class _UsageError(Exception):
    """A bad combination of arguments found after parsing; reported like argparse errors."""


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="folder with the four MNIST .gz files (default: $FASTVAE_DATA, else a per-user "
        "cache, downloading missing files)",
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
        help="train a VAE on MNIST and write the model, metrics and pictures",
        description=(
            "Train a VAE on MNIST (the canonical 784-400-20 model by default). Writes to "
            f"--out: {MODEL_FILE} (after every epoch), {METRICS_FILE}, and the pictures of "
            f"'fastvae plot': {', '.join(PICTURES)}, loss_curve.png ({MANIFOLD} too when "
            "--latent-dim is 2)."
        ),
        formatter_class=fmt,
    )
    _add_data(t)
    t.add_argument("--out", metavar="DIR", default="fastvae-run", help="output directory")
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
        "file; --epochs is the total)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "eval",
        help="score a model on the MNIST test set: ELBO and importance-weighted log p(x)",
        description=(
            "Print a model's mean test ELBO per image in nats (one z sample per image; the "
            "negative of the training loss) and, with --k > 0, the importance-weighted "
            "estimate of log p(x) with k samples (Burda et al., 2016), a tighter lower bound "
            "(papers use k=5000)."
        ),
        formatter_class=fmt,
    )
    _add_model(e)
    _add_data(e)
    e.add_argument(
        "--k",
        type=_non_negative_int,
        metavar="K",
        default=0,
        help="samples per image for the importance-weighted estimate (0: skip it)",
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
        help="score only the first N test images (default: all 10000)",
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
        help="write a grid of images decoded from prior samples",
        description="Decode N draws z ~ N(0, I) and write them as one PNG grid.",
        formatter_class=fmt,
    )
    _add_model(s)
    s.add_argument("--n", type=_positive(int), default=64, metavar="N", help="number of samples")
    s.add_argument(
        "--seed", metavar="S", type=_non_negative_int, default=0, help="seed of the draws"
    )
    s.add_argument("--out", metavar="FILE", default="samples.png", help="PNG file to write")
    _add_threads(s)
    s.set_defaults(func=_sample)

    pl = sub.add_parser(
        "plot",
        help="write pictures of what a model learned",
        description=(
            f"Write {', '.join(PICTURES)} for the MNIST test set, {MANIFOLD} when the model's "
            "latent_dim is 2, and loss_curve.png when the model file holds a training history."
        ),
        formatter_class=fmt,
    )
    _add_model(pl)
    _add_data(pl)
    pl.add_argument(
        "--out", metavar="DIR", default=None, help="output directory (default: MODEL's folder)"
    )
    pl.add_argument(
        "--seed", metavar="S", type=_non_negative_int, default=0, help="seed of the samples"
    )
    _add_threads(pl)
    pl.set_defaults(func=_plot)
    return p


PICTURES = ("reconstructions.png", "samples.png", "latent_map.png", "interpolations.png")
MANIFOLD = "manifold.png"


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _metrics_lines(history: dict[str, list[Any]]) -> str:
    rows = []
    for i in range(len(history["epoch"])):
        rows.append(
            json.dumps(
                {
                    "epoch": history["epoch"][i],
                    "train_loss": history["train_loss"][i],
                    "val_loss": history["val_loss"][i],
                    "samples_per_sec": history["samples_per_sec"][i],
                    "seconds": history["seconds"][i],
                }
            )
        )
    return "".join(r + "\n" for r in rows)


def _load_model(path: str, threads: int | None) -> VAE:
    from .model import VAE

    if os.path.isdir(path):
        hint = f"; did you mean {os.path.join(path, MODEL_FILE)}?"
        hint = hint if os.path.exists(os.path.join(path, MODEL_FILE)) else ""
        raise _UsageError(f"{path} is a directory, not a model file{hint}")
    return VAE.load(path, threads=threads)


def _test_set(vae: VAE, data: str | None) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    from .datasets import load_mnist

    x, y = load_mnist("test", root=data)
    if vae.input_dim != x.shape[1]:
        raise _UsageError(
            f"the model takes {vae.input_dim} inputs per image, MNIST images have {x.shape[1]}"
        )
    return x, y


def _train(args: argparse.Namespace) -> int:
    from . import pictures
    from .datasets import binarize, load_mnist
    from .model import VAE

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    x_train, _ = load_mnist("train", root=args.data)
    x_test, y_test = load_mnist("test", root=args.data)

    # Training settings: the flags, else the resumed run's, else the defaults.
    saved: dict[str, Any] = {}
    if args.resume:
        vae = VAE.load(model_path, threads=args.threads)
        saved = getattr(vae, "fit_params_", {})
        print(f"resuming {model_path} at epoch {len(vae.history_['epoch'])}", file=sys.stderr)
    batch_size = args.batch_size or saved.get("batch_size", _core.DEFAULT_BATCH_SIZE)
    lr = args.lr or saved.get("lr", _core.DEFAULT_LR)
    mode = args.binarize or saved.get("binarize") or "none"
    dynamic = mode == "dynamic"
    # Dynamic binarization is scored on one fixed Bernoulli draw of the test set.
    x_eval = binarize(x_test) if dynamic else x_test
    if not args.resume:
        vae = VAE(
            input_dim=x_train.shape[1],
            hidden_dims=args.hidden_dims,
            latent_dim=args.latent_dim,
            activation=args.activation,
            seed=args.seed,
            threads=args.threads,
        )
    done = getattr(vae, "epochs_trained_", 0)
    for epoch in range(done + 1, args.epochs + 1):
        t0 = time.perf_counter()
        vae.fit(
            x_train,
            epochs=1,
            batch_size=batch_size,
            lr=lr,
            validation_data=x_eval,
            progress=not args.no_progress,
            binarize="dynamic" if dynamic else None,
        )
        h = vae.history_
        vae.save(model_path)
        _write_text(out / METRICS_FILE, _metrics_lines(h))
        print(
            f"epoch {epoch}/{args.epochs}  train loss {h['train_loss'][-1]:.2f}  "
            f"test loss {h['val_loss'][-1]:.2f}  {h['samples_per_sec'][-1]:,.0f} samples/s  "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    if not hasattr(vae, "epochs_trained_"):
        raise FastVAEError("nothing to do: --epochs is not above the epochs already trained")

    names = pictures.write_pictures(vae, x_test, y_test, out, seed=args.seed)
    test_loss = -float(vae.elbo(x_eval).mean())
    which = "fixed binarized test set" if dynamic else "test set"
    print(f"test loss (BCE + KL per example, {which}): {test_loss:.2f} nats")
    print(f"wrote {model_path}, {out / METRICS_FILE}, and pictures in {out}/:")
    print("  " + "  ".join(names))
    return 0


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
    x, _ = _test_set(vae, args.data)
    if mode == "dynamic":
        x = binarize(x)
    if args.limit is not None:
        x = x[: args.limit]
    t0 = time.perf_counter()
    elbo, elbo_sem = _mean_and_stderr(vae.elbo(x, seed=args.seed))
    elbo_seconds = time.perf_counter() - t0
    ll = ll_sem = ll_seconds = None
    if args.k > 0:
        t0 = time.perf_counter()
        values = _log_likelihood(vae, x, args.k, args.seed, not args.no_progress)
        ll, ll_sem = _mean_and_stderr(values)
        ll_seconds = time.perf_counter() - t0
    if args.json:
        result = {
            "model": args.model,
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
        }
        print(json.dumps(result))
        return 0
    arch = "-".join(str(d) for d in (vae.input_dim, *vae.hidden_dims, vae.latent_dim))
    print(f"model     {args.model}: {arch} {vae.activation}, {vae.epochs_trained_} epochs trained")
    data = "fixed binarization" if mode == "dynamic" else "grayscale"
    print(f"data      MNIST test set, {len(x):,} images ({data})")
    print(
        f"ELBO      {elbo:.2f} nats per image (+/- {elbo_sem:.2f} std. error; loss "
        f"{-elbo:.2f}), 1 sample, seed {args.seed}"
    )
    if ll is not None:
        print(
            f"log p(x) >= {ll:.2f} nats per image (+/- {ll_sem:.2f}), importance-weighted with "
            f"k={args.k}, seed {args.seed} ({ll_seconds:.1f} s)"
        )
    return 0


def _sample(args: argparse.Namespace) -> int:
    from . import images

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise _UsageError(f"--out must name a .png file, got {args.out!r}")
    vae = _load_model(args.model, args.threads)
    rows, cols = images.grid_shape(args.n)
    images.save_png(images.image_grid(vae.sample(args.n, seed=args.seed), rows, cols), out)
    print(f"wrote {out}: {args.n} samples from the prior ({rows} x {cols} grid, seed {args.seed})")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from . import pictures

    vae = _load_model(args.model, args.threads)
    out = Path(args.out) if args.out is not None else Path(args.model).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    x, y = _test_set(vae, args.data)
    names = pictures.write_pictures(vae, x, y, out, seed=args.seed)
    print(f"wrote pictures in {out}/:")
    print("  " + "  ".join(names))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FastVAEError, OSError, FloatingPointError, _UsageError) as e:
        print(f"fastvae: error: {e}", file=sys.stderr)
        if isinstance(e, DataError):
            print("fastvae: on the command line, --data DIR names the folder", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastvae: interrupted", file=sys.stderr)
        return 130
