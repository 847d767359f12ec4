"""The one-stochastic-layer MNIST experiment of Burda, Grosse & Salakhutdinov ("Importance
Weighted Autoencoders", 2016, Table 1), as their code (yburda/iwae) runs it, on fastvae's core.

784-200-200-50 with tanh, a diagonal Gaussian q and Bernoulli p, the decoder's output bias
started at the logit of the training mean, every batch dynamically binarized, the first 59,600
training images trained on and the last 400 held out for validation, batch 20, Adam with
epsilon 1e-4, and the test NLL estimated with k = 5000 importance samples.

Two ways to run it:

- ``epochs=None, budget=None``: the paper's schedule, 3^i epochs at 1e-3 * 10^(-i/7) for
  i = 0..7 (3,280 epochs; hours). Every epoch is saved, so ``resume`` continues after an
  interruption.
- ``budget`` (seconds of wall time, evaluation included) or ``epochs``: the same eight stages,
  each stage's share of the epochs as in the paper (3^i / 3280), over as many epochs as fit. With
  a budget the count comes from the first epoch's measured time and the evaluation's measured
  cost, and training stops at the budget's training deadline whatever the count.

The run's folder holds ``model.safetensors`` (with Adam's state), ``run.json`` (the settings
and plan), ``metrics.jsonl`` (one line per epoch), ``loss_curve.png`` and, at the end,
``result.json`` (test NLL, active units, times, machine) and ``samples.png``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _core, images, plots, schedule
from ._files import atomic_write
from .checkpoint import metrics_lines
from .errors import ConfigError
from .model import VAE

__all__ = ["PaperRun", "plan_stages", "run"]

MODELS = ("vae", "iwae")
N_VALIDATION = 400
TEST_K = 5000
BATCH_SIZE = 20
PAPER_EPOCHS = sum(3**i for i in range(8))  # 3280
# Seconds kept back at the end of a budget for saving, pictures and the unexpected.
_RESERVE_SECONDS = 30.0
# Test images in the evaluation's probe (its time scales to the full test set).
_PROBE_IMAGES = 20


def plan_stages(epochs: int) -> dict[str, Any]:
    """The paper's eight stages (lr 1e-3 * 10^(-i/7), i = 0..7) fitted to `epochs` epochs.

    The first stages keep the paper's 3^i epochs while they take at most half of the epochs
    (they are short, and at the high rates most of the likelihood is gained); the stages after
    share the rest in the paper's proportions (largest remainders), each at least one epoch
    while there are epochs enough, the first stage always one (the first epoch trains at 1e-3).
    ``plan_stages(3280)`` is the paper's ``schedule.burda()``.
    """
    if epochs < 1:
        raise ConfigError(f"the plan needs at least 1 epoch, got {epochs}")
    kept = 0
    while kept < 7 and sum(3**i for i in range(kept + 1)) <= epochs / 2:
        kept += 1
    counts = [3**i for i in range(kept)] + [0] * (8 - kept)
    rest = epochs - sum(counts)
    total = sum(3**i for i in range(kept, 8))
    shares = {i: rest * 3**i / total for i in range(kept, 8)}
    for i, share in shares.items():
        counts[i] = math.floor(share)
    order = sorted(shares, key=lambda i: shares[i] - counts[i], reverse=True)
    for i in order[: rest - sum(counts[kept:])]:
        counts[i] += 1
    if counts[0] == 0:
        counts[counts.index(max(counts))] -= 1
        counts[0] = 1
    for i in range(8):
        if counts[i] == 0 and max(counts) > 1:
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    stages = [[c, 1e-3 * 10 ** (-i / 7)] for i, c in enumerate(counts) if c > 0]
    return {"kind": "stages", "stages": stages}


@dataclass
class PaperRun:
    """What the command was asked for."""

    out: Path
    model: str  # "vae" or "iwae"
    k: int | None = None  # None: 1, or a resumed run's
    budget: float | None = None  # seconds of wall time, evaluation included
    epochs: int | None = None
    threads: int | None = None
    seed: int = 0
    data: str | None = None  # the MNIST folder
    test_k: int = TEST_K
    resume: bool = False
    progress: bool = True


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _mnist(root: str | None) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[Any]]:
    """(training intensities, validation intensities, test intensities): the paper's split."""
    from .datasets import load_mnist

    train = load_mnist("train", root=root)[0]
    test = load_mnist("test", root=root)[0]
    train = train.reshape(len(train), -1)
    test = test.reshape(len(test), -1)
    return train[:-N_VALIDATION], train[-N_VALIDATION:], test


def _fixed_draw(x: NDArray[np.float32], seed: int) -> NDArray[np.float32]:
    """One Bernoulli draw of every pixel, keyed by `seed`: the held-out images, binarized."""
    from .datasets import binarize

    return binarize(x, seed=seed)


def _settings(model: str, k: int) -> dict[str, Any]:
    return {
        "hidden_dims": (200, 200),
        "latent_dim": 50,
        "activation": "tanh",
        "likelihood": "bernoulli",
        "batch_size": BATCH_SIZE,
        "lr": 1e-3,
        "adam_eps": 1e-4,
        "binarize": "dynamic",
        "output_bias_from_data": True,
        "k": k,
        "objective": "iwae" if model == "iwae" else "elbo",
    }


def _eval_seconds(vae: VAE, test: NDArray[np.float32], k: int) -> float:
    """The measured cost of the test NLL at k samples, from a probe of a few images."""
    vae.log_likelihood(test[:2], k=k)  # warm up
    t0 = time.perf_counter()
    vae.log_likelihood(test[:_PROBE_IMAGES], k=k)
    return (time.perf_counter() - t0) * len(test) / _PROBE_IMAGES


def run(r: PaperRun) -> dict[str, Any]:
    """Train and evaluate as `r` says; returns (and writes) the result."""
    if r.model not in MODELS:
        raise ConfigError(f"model must be one of {MODELS}, got {r.model!r}")
    if r.budget is not None and r.epochs is not None:
        raise ConfigError("give a time budget or a number of epochs, not both")
    wall0 = time.perf_counter()
    out = r.out
    out.mkdir(parents=True, exist_ok=True)
    model_path, run_path = out / "model.safetensors", out / "run.json"
    x_train, x_val, x_test = _mnist(r.data)
    # Fixed draws: the test set's is the one `fastvae eval --binarize dynamic` scores.
    val = _fixed_draw(x_val, 1)
    test = _fixed_draw(x_test, 0)

    record: dict[str, Any]
    if r.resume:
        if not run_path.exists() or not model_path.exists():
            raise ConfigError(f"{out} holds no run to resume (no run.json and model.safetensors)")
        record = json.loads(run_path.read_text())
        if r.model != record["model"] or r.k not in (None, record["k"]):
            raise ConfigError(
                f"the run in {out} trains {record['model']} with k={record['k']}; it cannot "
                f"resume as {r.model}" + ("" if r.k is None else f" with k={r.k}")
            )
        k = int(record["k"])
        vae = VAE.load(model_path, threads=r.threads)
        vae.set_params(progress=r.progress)
        spent = float(record["train_seconds"])
    else:
        k = 1 if r.k is None else r.k
        vae = VAE(**_settings(r.model, k), seed=r.seed, threads=r.threads, progress=r.progress)
        record = {
            "model": r.model,
            "k": k,
            "budget_seconds": r.budget,
            "settings": _settings(r.model, k),
            "seed": r.seed,
            "threads": r.threads,
            "test_k": r.test_k,
            "train_images": len(x_train),
            "validation_images": len(x_val),
            "plan": None,
            "train_seconds": 0.0,
        }
        spent = 0.0
    done_before = getattr(vae, "epochs_trained_", 0)

    def save(v: VAE) -> None:
        v.save(model_path)
        text = metrics_lines(v.history_)
        atomic_write(out / "metrics.jsonl", lambda f: f.write(text.encode("utf-8")))

    t_train = time.perf_counter()
    # The first epoch (at the first stage's rate) measures the epoch's cost.
    if record["plan"] is None:
        vae.fit(x_train, epochs=1, validation_data=val)
        save(vae)
        epoch_seconds = float(vae.history_["seconds"][-1])
        if r.budget is not None:
            eval_seconds = _eval_seconds(vae, test, r.test_k)
            used = time.perf_counter() - wall0
            left = r.budget - used - eval_seconds - _RESERVE_SECONDS
            # 5% for the validation, the save and the machine's noise.
            epochs = 1 + max(0, int(left / (epoch_seconds * 1.05)))
            record["eval_seconds_planned"] = eval_seconds
        else:
            epochs = r.epochs if r.epochs is not None else PAPER_EPOCHS
        record["plan"] = schedule.burda() if epochs == PAPER_EPOCHS else plan_stages(epochs)
        record["planned_epochs"] = epochs
        record["first_epoch_seconds"] = epoch_seconds
        _write_json(run_path, record)
    planned = int(record["planned_epochs"])
    deadline = None
    if record["budget_seconds"] is not None:
        # Training ends where the evaluation and the reserve still fit in the budget.
        remaining = float(record["budget_seconds"]) - spent - (time.perf_counter() - wall0)
        deadline = time.perf_counter() + remaining - float(record["eval_seconds_planned"])
        deadline -= _RESERVE_SECONDS

    def epoch_end(v: VAE) -> bool:
        save(v)
        record["train_seconds"] = spent + time.perf_counter() - t_train
        _write_json(run_path, record)
        h = v.history_
        print(
            f"epoch {h['epoch'][-1]}/{planned}  lr {h['lr'][-1]:.2e}  train loss "
            f"{h['train_loss'][-1]:.2f}  validation loss {h['val_loss'][-1]:.2f}  "
            f"{h['samples_per_sec'][-1]:,.0f} samples/s",
            flush=True,
        )
        if deadline is None:
            return False
        last = float(h["seconds"][-1])
        return time.perf_counter() + 1.1 * last > deadline

    left = planned - getattr(vae, "epochs_trained_", 0)
    if left > 0 and (deadline is None or time.perf_counter() < deadline):
        vae.fit(
            x_train,
            epochs=left,
            lr_schedule=record["plan"],
            validation_data=val,
            on_epoch_end=epoch_end,
        )
    record["train_seconds"] = spent + time.perf_counter() - t_train
    _write_json(run_path, record)

    t_eval = time.perf_counter()
    ll = vae.log_likelihood(test, k=r.test_k, seed=r.seed, progress=r.progress)
    nll = float(-ll.mean())
    sem = float(ll.std(ddof=1) / math.sqrt(len(ll)))
    active = vae.active_units(test)
    eval_seconds = time.perf_counter() - t_eval

    ylabel = "loss per image (nats): " + (
        f"-IWAE bound, k={k}" if r.model == "iwae" and k > 1 else "-ELBO"
    )
    plots.loss_curve(vae.history_, out / "loss_curve.png", "validation (400)", ylabel)
    images.save_png(images.image_grid(vae.sample(64, seed=r.seed), 8, 8), out / "samples.png")
    epochs = int(vae.epochs_trained_)
    result = {
        "model": r.model,
        "k": k,
        "objective": _settings(r.model, k)["objective"],
        "test_nll": nll,
        "test_nll_stderr": sem,
        "test_k": r.test_k,
        "active_units": active,
        "epochs": epochs,
        "planned_epochs": planned,
        "epochs_this_run": epochs - done_before,
        "schedule": record["plan"],
        "train_seconds": record["train_seconds"],
        "eval_seconds": eval_seconds,
        "wall_seconds_this_run": time.perf_counter() - wall0,
        "budget_seconds": record["budget_seconds"],
        "threads": vae.model_.threads,
        "cpu": _cpu_name(),
        "isa": _core.isa_paths(),
        "fastvae": _core.__version__,
    }
    _write_json(out / "result.json", result)
    return result


def format_result(result: dict[str, Any]) -> str:
    """The result in a line or two, for the terminal."""
    minutes = result["wall_seconds_this_run"] / 60
    return (
        f"{result['model'].upper()} k={result['k']}: test NLL {result['test_nll']:.2f} "
        f"(+- {result['test_nll_stderr']:.2f}, k={result['test_k']}), {result['active_units']} "
        f"active units, {result['epochs']} epochs, {minutes:.1f} min wall time (this run) on "
        f"{result['threads']} thread(s) of {result['cpu']}"
    )
