"""Sweeps of many fastvae models on a Ray cluster, through Ray Tune.

Each point of a search space (a grid over the settings ``fastvae train`` takes, or random
draws from ranges) is a Tune trial that trains one :class:`~fastvae.VAE` on one thread by
default, reports its validation loss after every epoch (so a scheduler such as ASHA can stop
it early) and saves a checkpoint through Tune's checkpoint API every epoch: the model with
Adam's state (to resume), and the weights of the trial's best epoch so far. The training data
go into Ray's object store once and reach every trial of a node from there, zero-copy.

The same code runs on a laptop (Ray started in-process) and on a cluster (``address``): the
trials share nothing but the machines. A Ray worker runs trial after trial (Tune's actor
reuse), so a trial does not pay for a new process. Ctrl-C stops the sweep with the rows of
the trials it cut short marked "unfinished"; ``run_sweep(..., resume=True)`` continues it.

Ray is an extra: ``pip install "fastvae[ray]"``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._files import atomic_write
from .errors import ConfigError, FastVAEError
from .model import VAE

__all__ = [
    "SETTINGS",
    "SweepSpec",
    "check_storage",
    "machines",
    "require_ray",
    "run_sweep",
    "trainable",
]

# The settings a sweep may vary: VAE constructor settings, each with how a value is read
# from the command line and whether ranges of it are drawn on a log scale.
SETTINGS: dict[str, tuple[type, bool]] = {
    "latent_dim": (int, False),
    "hidden_dims": (str, False),  # "400" or "200x200": one grid value
    "activation": (str, False),
    "lr": (float, True),
    "beta": (float, False),
    "kl_warmup": (int, False),
    "batch_size": (int, True),
    "k": (int, False),
    "objective": (str, False),
    "adam_eps": (float, True),
    "seed": (int, False),
}
# What every row of results.csv holds beside the trial's settings.
RESULT_COLUMNS = (
    "trial",
    "status",
    "best_val_loss",
    "best_epoch",
    "last_val_loss",
    "epochs",
    "samples_per_sec",
    "node_ip",
    "node_id",
    "restarts",
    "checkpoint",
)
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
STATE_FILE = "trial.json"
# Seconds to wait for a cluster's address to answer before giving up.
_CONNECT_TIMEOUT = 5.0


class _RayMissing(FastVAEError):
    pass


def require_ray() -> Any:
    """The ray module, or an error that says how to install it."""
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise _RayMissing(
            'sweeps run on Ray, which is not installed: pip install "fastvae[ray]"'
        ) from None
    return ray


def _hidden(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            dims = tuple(int(v) for v in value.split("x") if v.strip())
        except ValueError:
            raise ConfigError(
                f"hidden_dims values are widths joined by 'x' (200x200), got {value!r}"
            ) from None
        return dims
    return tuple(int(v) for v in value)


def _vae_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's config as VAE constructor settings."""
    out = dict(config)
    if "hidden_dims" in out:
        out["hidden_dims"] = _hidden(out["hidden_dims"])
    return out


def _trial(
    config: dict[str, Any],
    x_train: NDArray[np.float32],
    x_val: NDArray[np.float32],
    epochs: int,
    threads: int,
    fixed: dict[str, Any],
) -> None:
    """One Tune trial: train as `config` (and the sweep's `fixed` settings) say, reporting
    every epoch with a checkpoint; resumed from Tune's checkpoint after a failure."""
    import ray
    from ray import tune

    settings = {**fixed, **_vae_settings(config)}
    restarts, best, best_epoch = 0, math.inf, None
    checkpoint = tune.get_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="fastvae-trial-"))
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            vae = VAE.load(Path(d) / MODEL_FILE, threads=threads)
            state = json.loads((Path(d) / STATE_FILE).read_text())
            if (Path(d) / BEST_FILE).exists():
                shutil.copy(Path(d) / BEST_FILE, work / BEST_FILE)
        restarts = int(state["restarts"]) + 1
        best, best_epoch = float(state["best_val_loss"]), state["best_epoch"]
        vae.set_params(progress=False)
    else:
        vae = VAE(**settings, threads=threads, progress=False)
    node_ip = ray.util.get_node_ip_address()
    node_id = ray.get_runtime_context().get_node_id()

    def epoch_end(v: VAE) -> bool:
        nonlocal best, best_epoch
        h = v.history_
        epoch, val = int(h["epoch"][-1]), float(h["val_loss"][-1])
        if val < best:
            best, best_epoch = val, epoch
            v.save(work / BEST_FILE, include_optimizer=False)
        v.save(work / MODEL_FILE)
        state = {"restarts": restarts, "best_val_loss": best, "best_epoch": best_epoch}
        (work / STATE_FILE).write_text(json.dumps(state))
        metrics = {
            "epoch": epoch,
            "val_loss": val,
            "train_loss": float(h["train_loss"][-1]),
            "best_val_loss": best,
            "best_epoch": best_epoch,
            "samples_per_sec": float(h["samples_per_sec"][-1]),
            "node_ip": node_ip,
            "node_id": node_id,
            "restarts": restarts,
            "pid": os.getpid(),
        }
        # Tune copies the folder into the sweep's storage before report returns.
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(work)))
        return False

    left = epochs - getattr(vae, "epochs_trained_", 0)
    if left > 0:
        vae.fit(x_train, epochs=left, validation_data=x_val, on_epoch_end=epoch_end)
    shutil.rmtree(work, ignore_errors=True)


def trainable(
    x_train: NDArray[np.floating],
    x_val: NDArray[np.floating],
    epochs: int,
    threads: int = 1,
    fixed: Mapping[str, Any] | None = None,
) -> Any:
    """A Ray Tune trainable that trains one VAE per trial on `x_train`, validated on `x_val`.

    The trial's config holds VAE constructor settings (those in ``SETTINGS``; ``hidden_dims``
    as a string such as "200x200" or a sequence); ``fixed`` holds the settings every trial
    shares. Each trial reports ``val_loss`` (the negative ELBO of x_val, or of the
    importance-weighted bound for k > 1 with the "iwae" objective) after every epoch with a
    checkpoint, and resumes from Tune's checkpoint when restarted. The arrays go into Ray's
    object store once (``tune.with_parameters``). Use it with your own search algorithm or
    scheduler::

        tuner = tune.Tuner(
            tune.with_resources(sweep.trainable(x, x_val, epochs=20), {"cpu": 1}),
            param_space={
                "latent_dim": tune.grid_search([2, 20]),
                "lr": tune.loguniform(1e-4, 1e-2),
            },
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=4),
        )
    """
    require_ray()
    from ray import tune

    x_train = np.ascontiguousarray(x_train, dtype=np.float32)
    x_val = np.ascontiguousarray(x_val, dtype=np.float32)
    fixed = dict(fixed or {})
    fixed.setdefault("input_dim", x_train.shape[1])
    return tune.with_parameters(
        _trial, x_train=x_train, x_val=x_val, epochs=epochs, threads=threads, fixed=fixed
    )


@dataclass
class SweepSpec:
    """A sweep: the search space (setting -> list of values for a grid, or (low, high) for
    random draws), how many trials per grid point or draws, epochs per trial, threads per
    trial and trials per CPU, the scheduler, where to write, which cluster, and whether a
    worker process runs trial after trial (else each trial starts its own)."""

    space: dict[str, Any]
    epochs: int
    out: Path
    samples: int = 1
    address: str | None = None
    scheduler: str = "fifo"
    threads: int = 1
    trials_per_cpu: int = 1
    max_failures: int = 2
    fixed: dict[str, Any] = field(default_factory=dict)
    reuse_workers: bool = True


def check_space(space: Mapping[str, Any]) -> None:
    """ConfigError naming an unknown setting or an empty grid."""
    if not space:
        raise ConfigError(
            f"the sweep varies nothing: give values for at least one of {sorted(SETTINGS)}"
        )
    for name, values in space.items():
        if name not in SETTINGS:
            raise ConfigError(f"unknown sweep setting {name!r}; sweepable: {sorted(SETTINGS)}")
        if isinstance(values, list) and not values:
            raise ConfigError(f"the grid of {name} is empty")
        if isinstance(values, tuple) and not (
            len(values) == 2 and SETTINGS[name][0] in (int, float) and values[0] < values[1]
        ):
            raise ConfigError(f"a range of {name} is (low, high) with low < high, got {values}")


def _tune_space(space: Mapping[str, Any]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for name, values in space.items():
        kind, log = SETTINGS[name]
        if isinstance(values, tuple):
            lo, hi = values
            if kind is int:
                out[name] = (tune.lograndint if log else tune.randint)(int(lo), int(hi) + 1)
            else:
                out[name] = (tune.loguniform if log else tune.uniform)(float(lo), float(hi))
        else:
            out[name] = tune.grid_search(list(values))
    return out


def check_address(address: str) -> None:
    """Fail within seconds when nothing answers at a Ray cluster's address (host:port)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"a Ray address is HOST:PORT (as ray start prints it), got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT):
            pass
    except OSError as e:
        raise ConfigError(
            f"no Ray cluster answers at {address} ({e}); start one with 'ray start --head' "
            "or check the address"
        ) from None


def _connect(address: str | None) -> bool:
    """Connect to Ray: the cluster at `address` (checked first), else a Ray of this machine
    (an already running one, or one started here). Whether this call started the connection
    (and so should end it)."""
    ray = require_ray()
    if address is not None:
        check_address(address)
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


def machines(nodes: Sequence[Mapping[str, Any]]) -> set[str]:
    """The addresses of the machines among Ray's live nodes (``ray.nodes()``)."""
    return {str(n["NodeManagerAddress"]) for n in nodes if n.get("Alive")}


def check_storage(nodes: Sequence[Mapping[str, Any]], out: Path) -> None:
    """Warn when the cluster spans machines: each trial writes its checkpoints to ``out`` on
    the machine it runs on (Ray 2.7 and later copy nothing to the head), so ``out`` must be
    a folder every machine mounts at the same path."""
    hosts = machines(nodes)
    if len(hosts) > 1:
        warnings.warn(
            f"the Ray cluster spans {len(hosts)} machines ({', '.join(sorted(hosts))}): the "
            f"trials write their checkpoints to {out} on the machine each runs on, so it must "
            "be a folder every machine mounts at that path (NFS, say), or results, resumes "
            "and best.safetensors will miss the other machines' trials",
            stacklevel=3,
        )


def run_sweep(
    spec: SweepSpec,
    x_train: NDArray[np.floating],
    x_val: NDArray[np.floating],
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run (or with `resume`, continue) the sweep; write results.csv, best.safetensors and
    val_curves.png into spec.out; return the rows."""

    check_space(spec.space)
    if spec.scheduler not in ("fifo", "asha"):
        raise ConfigError(f"scheduler must be 'fifo' or 'asha', got {spec.scheduler!r}")
    out = spec.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = _connect(spec.address)
    try:
        check_storage(require_ray().nodes(), out)
        return _run(spec, out, x_train, x_val, resume)
    finally:
        if started:
            require_ray().shutdown()


def _run(
    spec: SweepSpec,
    out: Path,
    x_train: NDArray[np.floating],
    x_val: NDArray[np.floating],
    resume: bool,
) -> list[dict[str, Any]]:
    from ray import tune

    cpus = 1.0 / spec.trials_per_cpu
    train = tune.with_resources(
        trainable(x_train, x_val, spec.epochs, spec.threads, spec.fixed), {"cpu": cpus}
    )
    exp = out / "tune"
    if resume:
        if not tune.Tuner.can_restore(str(exp)):
            raise ConfigError(f"{out} holds no sweep to resume")
        tuner = tune.Tuner.restore(str(exp), train, resume_errored=True)
    else:
        scheduler = None
        if spec.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(
                time_attr="epoch", max_t=spec.epochs, grace_period=1, reduction_factor=2
            )
        tuner = tune.Tuner(
            train,
            param_space=_tune_space(spec.space),
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                num_samples=spec.samples,
                scheduler=scheduler,
                # A worker trains trial after trial: its process, its imports and the memory
                # it has touched are paid for once (about 2.4 s a trial on 2 cores otherwise,
                # measured by benches/sweep.py). A trial that ends before another node's
                # worker is up hands its worker to the next trial, so very short trials may
                # all run on one node.
                reuse_actors=spec.reuse_workers,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(out),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # The latest two: the one a restarted trial resumes from, and its predecessor
                # while the latest is written.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=1,
            ),
        )
    # A checkpoint every epoch is what a sweep asks for: Tune's warning that the experiment's
    # snapshots follow them closely is expected, and repeats.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    t0 = time.perf_counter()
    grid = tuner.fit()
    rows = _rows(grid, exp, list(spec.space))
    _write_results(out, rows, list(spec.space))
    _copy_best(out, rows)
    _plot_curves(out, grid)
    (out / "sweep_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return rows


def _trials(exp: Path) -> dict[str, Any]:
    """Tune's trials as the experiment's saved state holds them, by folder name: their status
    and config (which a trial stopped before its first report has only there). After a
    Ctrl-C, Tune marks its live trials ended but saves the unfinished ones as pending, which
    is what ``--resume`` continues."""
    import logging

    from ray.tune import ExperimentAnalysis

    # It warns of every trial without results yet, as after a Ctrl-C.
    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return {Path(str(t.path)).name: t for t in ExperimentAnalysis(str(exp)).trials}
    finally:
        log.setLevel(level)


# A trial's row status from Tune's: ASHA's early stops are TERMINATED too.
_STATUS = {"TERMINATED": "done", "ERROR": "error"}


def _rows(grid: Any, exp: Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial; status "done", "error" or "unfinished" (the sweep was stopped
    before the trial's end: ``--resume`` continues it)."""
    trials = _trials(exp)
    rows = []
    for result in grid:
        m = result.metrics or {}
        df = result.metrics_dataframe
        trial = trials.get(Path(result.path).name)
        config = result.config or (trial.config if trial is not None else {})
        row: dict[str, Any] = {n: config.get(n) for n in names}
        row["trial"] = Path(result.path).name
        if result.error:
            row["status"] = "error"
        elif trial is not None:
            row["status"] = _STATUS.get(trial.status, "unfinished")
        else:
            row["status"] = "done"
        row["best_val_loss"] = m.get("best_val_loss")
        row["best_epoch"] = m.get("best_epoch")
        row["last_val_loss"] = m.get("val_loss")
        row["epochs"] = m.get("epoch")
        sps = df["samples_per_sec"] if df is not None and "samples_per_sec" in df else None
        row["samples_per_sec"] = float(sps.mean()) if sps is not None and len(sps) else None
        row["node_ip"] = m.get("node_ip")
        row["node_id"] = m.get("node_id")
        row["restarts"] = m.get("restarts", 0)
        row["checkpoint"] = result.checkpoint.path if result.checkpoint else None
        rows.append(row)
    return rows


def _write_results(out: Path, rows: list[dict[str, Any]], names: Sequence[str]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*names, *RESULT_COLUMNS])
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r["best_val_loss"] is None, r["best_val_loss"] or 0)):
        writer.writerow(row)
    atomic_write(out / "results.csv", lambda f: f.write(buf.getvalue().encode("utf-8")))


def _copy_best(out: Path, rows: list[dict[str, Any]]) -> None:
    done = [r for r in rows if r["best_val_loss"] is not None and r["checkpoint"]]
    if not done:
        return
    best = min(done, key=lambda r: r["best_val_loss"])
    path = Path(best["checkpoint"]) / BEST_FILE
    if not path.exists():
        return
    data = path.read_bytes()
    atomic_write(out / BEST_FILE, lambda f: f.write(data))


def _plot_curves(out: Path, grid: Any) -> None:
    from . import plots

    fig = plots._figure(7, 4.5)
    ax = fig.add_subplot()
    for result in grid:
        df = result.metrics_dataframe
        if df is None or "val_loss" not in df:
            continue
        label = ", ".join(f"{k}={v}" for k, v in sorted((result.config or {}).items()))
        ax.plot(df["epoch"], df["val_loss"], marker="o", markersize=3, label=label)
    ax.set_title("Validation loss of every trial")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss per example (nats)")
    ax.grid(alpha=0.3)
    if len(ax.lines) <= 16:
        ax.legend(fontsize=6)
    plots.save_figure(fig, out / "val_curves.png")
