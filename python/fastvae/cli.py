"""The ``fastvae`` command line: ``fastvae train`` trains on MNIST and writes the model,
per-epoch metrics and pictures to an output directory."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import FastVAEError

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastvae",
        description="Train and inspect variational autoencoders on the CPU.",
    )
    p.add_argument("--version", action="version", version=f"fastvae {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a VAE on MNIST and write the model, metrics and pictures",
        description=(
            "Train a VAE on MNIST (the canonical 784-400-20 model by default). Writes to "
            f"--out: {MODEL_FILE} (after every epoch), {METRICS_FILE}, reconstructions.png, "
            "samples.png and loss_curve.png."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="folder with the four MNIST .gz files (default: $FASTVAE_DATA, else a per-user "
        "cache, downloading missing files)",
    )
    t.add_argument("--out", metavar="DIR", default="fastvae-run", help="output directory")
    t.add_argument("--epochs", type=_positive(int), default=10, help="total epochs to train")
    t.add_argument("--batch-size", type=_positive(int), default=128, help="rows per Adam step")
    t.add_argument("--lr", type=_positive(float), default=1e-3, help="Adam learning rate")
    t.add_argument(
        "--hidden-dims", type=_dims, default=(400,), help="hidden widths, comma separated"
    )
    t.add_argument("--latent-dim", type=_positive(int), default=20, help="latent width Z")
    t.add_argument("--activation", choices=("relu", "tanh"), default="relu")
    t.add_argument("--seed", type=_non_negative_int, default=0, help="random seed")
    t.add_argument(
        "--threads", type=_positive(int), default=None, help="worker threads (default: all cores)"
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the run in --out from its {MODEL_FILE} (model settings come from the "
        "file; --epochs is the total)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)
    return p


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _metrics_lines(history: dict[str, list[Any]]) -> str:
    rows = []
    for i in range(len(history["epoch"])):
        rows.append(
            json.dumps(
                {
                    "epoch": history["epoch"][i],
                    "train_loss": history["train_loss"][i],
                    "test_loss": history["val_loss"][i],
                    "samples_per_sec": history["samples_per_sec"][i],
                    "seconds": history["seconds"][i],
                }
            )
        )
    return "".join(r + "\n" for r in rows)


def _train(args: argparse.Namespace) -> int:
    from . import images
    from .datasets import load_mnist
    from .model import VAE

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    x_train, _ = load_mnist("train", root=args.data)
    x_test, _ = load_mnist("test", root=args.data)

    if args.resume:
        vae = VAE.load(model_path, threads=args.threads)
        print(f"resuming {model_path} at epoch {len(vae.history_['epoch'])}", file=sys.stderr)
    else:
        vae = VAE(
            input_dim=x_train.shape[1],
            hidden_dims=args.hidden_dims,
            latent_dim=args.latent_dim,
            activation=args.activation,
            seed=args.seed,
            threads=args.threads,
        )
    done = vae.model_.epoch if hasattr(vae, "model_") else 0
    for epoch in range(done + 1, args.epochs + 1):
        t0 = time.perf_counter()
        vae.fit(
            x_train,
            epochs=1,
            batch_size=args.batch_size,
            lr=args.lr,
            validation_data=x_test,
            progress=not args.no_progress,
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
    if not hasattr(vae, "model_"):
        raise FastVAEError("nothing to do: --epochs is not above the epochs already trained")

    test = x_test[:40]
    images.save_png(
        images.reconstructions(test, vae.reconstruct(test)), out / "reconstructions.png"
    )
    images.save_png(images.image_grid(vae.sample(64, seed=args.seed), 8, 8), out / "samples.png")
    images.loss_curve(vae.history_, out / "loss_curve.png")
    test_loss = -float(vae.elbo(x_test).mean())
    print(f"test loss (BCE + KL per example): {test_loss:.2f} nats")
    print(f"wrote {model_path}, {out / METRICS_FILE}, and pictures in {out}/:")
    print("  reconstructions.png  samples.png  loss_curve.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (FastVAEError, FileNotFoundError, FloatingPointError) as e:
        print(f"fastvae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastvae: interrupted", file=sys.stderr)
        return 130
