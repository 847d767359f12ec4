#!/usr/bin/env python3
"""Side-by-side training benchmark: fastvae vs PyTorch vs JAX on MNIST, on the CPU.

Run from the repository root with the Python environment in which fastvae is installed; the
peers run in benches/.venv-peers (create it once with ``benches/setup_peers.sh``):

    python benches/bench.py                  # canonical 784-400-20 VAE, 2 threads, batch 128,
                                             # 10 epochs on the full training set
    python benches/bench.py --quick          # smoke run, under 2 minutes on 2 cores:
                                             # 2 epochs on the first 20000 images
    python benches/bench.py --repeats 3      # 3 interleaved rounds of every system
    python benches/bench.py --grid           # 9-point sweep, 2 epochs each, full data
    python benches/bench.py --grid --quick   # the same sweep on the first 10000 images
    python benches/bench.py --loaded         # one core kept busy by another process
    FASTVAE_ISA=avx2 python benches/bench.py # fastvae's AVX2 kernels on an AVX-512 CPU
    python benches/bench.py --max-isa avx2   # every system held to AVX2 (an AVX2-only CPU)
    python benches/bench.py --systems fastvae,pytorch --threads 1 --no-gemm-peak

The numbers only mean something on an otherwise idle machine.  The script checks: it samples
/proc/stat for one second before starting and around every run, and flags each run during
which other processes (or the hypervisor, as steal time) kept more than 0.15 cores busy
("machine busy" in the output, other_load in the JSON).  PyTorch on all cores is by far the
most sensitive to such load.

Systems
    fastvae      fastvae.VAE(...).fit(x, epochs=E, batch_size=B, progress=False) in a
                 subprocess of this script (``bench.py --worker fastvae``, same interpreter)
    pytorch      benches/peer_torch.py
    pytorch-ftz  benches/peer_torch.py --flush-denormal
    jax          benches/peer_jax.py
    jax-ftz      benches/peer_jax.py --flush-denormal   (not run unless asked for)
All train the same model (Kingma & Welling VAE, Bernoulli logits decoder, Adam lr 1e-3) on the
same data with the same epochs, batch size, thread count and seed.  Every run is a fresh
subprocess that prints one JSON line per epoch and a final line (test loss, peak RSS); only the
training loop of each epoch is timed by each system.

Interleaving
    For one configuration the systems run round-robin, once per repeat; repeat r starts the
    list rotated by r (default order fastvae, pytorch-ftz, jax, pytorch), so that slow drift
    of the machine hits every system alike.

Table (one per configuration)
    median / min / max samples/s over the epochs of all repeats of a system, leaving out the
    first --warmup epochs (default 1) of each run when a run has more epochs than that;
    fastvae/x = fastvae's median / the system's median (above 1: fastvae is faster);
    test loss = mean negative ELBO per test image (one z sample), averaged over repeats;
    peak RSS of the process (max over repeats); FLOP efficiency = samples/s x FLOP per sample
    / GEMM peak at the run's thread count.  FLOP per sample counts the matrix products only:
    forward 2*sum(in*out) over all linear layers (encoder, mu, logvar, decoder), the same
    again for the weight gradients, and the same minus the layers that read the input for
    the input gradients: 3.28 MFLOP for 784-400-20.  The GEMM peak is measured once per
    invocation with benches/gemm_peak.py (torch.mm, 1 and 2 threads; skip with
    --no-gemm-peak); there is no peak, hence no efficiency, for other thread counts.

Grid (--grid)
    One axis at a time around the centre given by --threads/--batch-size/--hidden/--latent
    (default 2 threads, batch 128, hidden 400, latent 20):
        centre; 1 thread; batch 32 and 512, each on 2 and on 1 thread;
        hidden 1024; latent 2; latent 64                         (9 points, duplicates dropped)
    Each point runs --epochs (default 2 in grid mode) with --warmup 1, i.e. the figure is the
    epoch-2 throughput.  Writes grid-<time>.{json,csv,png} and grid-<time>-epochs.csv: the PNG
    has grouped bars of samples/s per configuration, one bar per system (--log-y for a log
    axis), with fastvae's speed-up over the fastest peer above each group.

Output (--out, default benches/results): bench-<time>.json (everything, including each run's
command and stderr tail), bench-<time>.csv (one row per configuration and system) and
bench-<time>-epochs.csv (one row per epoch of every run).  Files are rewritten after each
configuration, so an interrupted run (Ctrl-C) keeps what was finished.

A system whose subprocess fails is reported with the tail of its stderr and the benchmark goes
on with the others.  Exit status: 0 if every run succeeded, 1 if some failed, 2 on a usage
problem (no data, nothing to run), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
REPO = BENCHES.parent
DEFAULT_PEER_PYTHON = BENCHES / ".venv-peers" / "bin" / "python"
DEFAULT_OUT = BENCHES / "results"
INPUT_DIM = 784

# name -> (script run by the peer interpreter, or None for the fastvae worker; extra flags)
SYSTEMS: dict[str, tuple[str | None, list[str]]] = {
    "fastvae": (None, []),
    "pytorch": ("peer_torch.py", []),
    "pytorch-ftz": ("peer_torch.py", ["--flush-denormal"]),
    "jax": ("peer_jax.py", []),
    "jax-ftz": ("peer_jax.py", ["--flush-denormal"]),
}
DEFAULT_SYSTEMS = ["fastvae", "pytorch-ftz", "jax", "pytorch"]
COLORS = {
    "fastvae": "#d62728",
    "pytorch": "#1f77b4",
    "pytorch-ftz": "#17becf",
    "jax": "#2ca02c",
    "jax-ftz": "#98df8a",
}

QUICK_EPOCHS = 2
QUICK_LIMIT = 20_000
QUICK_GRID_LIMIT = 10_000
GRID_EPOCHS = 2
# Longest a --loaded run of one system may take (--run-limit): a normal 10-epoch run of any
# system took under 2 minutes loaded; PyTorch, whose threads wait for each other, ran at a few
# hundred samples/s (AMD EPYC Zen 3), over half an hour.
LOADED_RUN_LIMIT = 900
STDERR_TAIL = 25


# --------------------------------------------------------------------------------------------
# configurations and FLOP counts
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    threads: int
    batch_size: int
    hidden: tuple[int, ...]
    latent: int

    @property
    def name(self) -> str:
        hidden = ",".join(str(h) for h in self.hidden) or "-"
        return f"t{self.threads} b{self.batch_size} h{hidden} z{self.latent}"

    def describe(self) -> str:
        hidden = ",".join(str(h) for h in self.hidden) or "none"
        return (
            f"threads={self.threads} batch={self.batch_size} hidden={hidden} latent={self.latent}"
        )


def linear_layers(hidden: tuple[int, ...], latent: int) -> list[tuple[int, int, bool]]:
    """(fan_in, fan_out, reads_input) of every linear layer of the VAE."""
    layers = []
    d_in = INPUT_DIM
    for h in hidden:
        layers.append((d_in, h, not layers))  # only the first encoder layer reads x
        d_in = h
    heads_read_input = not hidden
    layers += [(d_in, latent, heads_read_input), (d_in, latent, heads_read_input)]  # mu, logvar
    d_in = latent
    for h in reversed(hidden):
        layers.append((d_in, h, False))
        d_in = h
    layers.append((d_in, INPUT_DIM, False))
    return layers


def flops_per_sample(hidden: tuple[int, ...], latent: int) -> float:
    """Matrix-product FLOP of one training sample: forward + weight grads + input grads."""
    layers = linear_layers(hidden, latent)
    total = sum(i * o for i, o, _ in layers)
    first = sum(i * o for i, o, reads_input in layers if reads_input)
    return 2.0 * total + 2.0 * total + 2.0 * (total - first)


GRID_AXES: list[tuple[str, dict[str, Any]]] = [
    ("centre", {}),
    ("1 thread", {"threads": 1}),
    ("batch 32", {"batch_size": 32}),
    ("batch 32, 1 thread", {"batch_size": 32, "threads": 1}),
    ("batch 512", {"batch_size": 512}),
    ("batch 512, 1 thread", {"batch_size": 512, "threads": 1}),
    ("hidden 1024", {"hidden": (1024,)}),
    ("latent 2", {"latent": 2}),
    ("latent 64", {"latent": 64}),
]


def grid_configs(centre: Config) -> list[tuple[str, Config]]:
    points: list[tuple[str, Config]] = []
    seen: set[Config] = set()
    for label, change in GRID_AXES:
        cfg = dataclasses.replace(centre, **change)
        if cfg not in seen:
            seen.add(cfg)
            points.append((label, cfg))
    return points


# --------------------------------------------------------------------------------------------
# the fastvae worker (runs in its own subprocess)
# --------------------------------------------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def worker_fastvae(args: argparse.Namespace) -> int:
    import fastvae
    from fastvae import _core
    from fastvae.datasets import load_mnist

    x, _ = load_mnist("train", root=args.data, download=False)
    x_test, _ = load_mnist("test", root=args.data, download=False)
    if args.limit:
        x = x[: args.limit]
    vae = fastvae.VAE(
        hidden_dims=list(args.hidden),
        latent_dim=args.latent,
        threads=args.threads,
        seed=args.seed,
    )
    print(
        f"[fastvae] fastvae {fastvae.__version__}, threads={args.threads}, n_train={len(x)}, "
        f"batch={args.batch_size}, hidden={list(args.hidden)}, latent={args.latent}",
        file=sys.stderr,
        flush=True,
    )
    # The step's phases timed inside it (a dozen clock reads a step, some microseconds in
    # thousands): where the time goes, which kernels timed alone do not show.
    _core.take_phase_times()
    _core.set_phase_timers(True)
    vae.fit(x, epochs=args.epochs, batch_size=args.batch_size, progress=False)
    _core.set_phase_timers(False)
    steps, phases = _core.take_phase_times()
    _emit({"system": "fastvae", "steps": steps, "phase_seconds": dict(phases)})
    h = vae.history_
    for i in range(len(h["epoch"])):
        _emit(
            {
                "system": "fastvae",
                "epoch": int(h["epoch"][i]),
                "seconds": float(h["seconds"][i]),
                "samples_per_sec": float(h["samples_per_sec"][i]),
                "train_loss": float(h["train_loss"][i]),
            }
        )
    test_loss = float(-vae.elbo(x_test).mean())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    _emit({"system": "fastvae", "final": True, "test_loss": test_loss, "peak_rss_mb": peak})
    return 0


# --------------------------------------------------------------------------------------------
# subprocesses
# --------------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[str]) -> None:
    """Terminate a child started in its own session (and its process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(
    cmd: list[str],
    env: dict[str, str],
    on_line: Callable[[str], None],
    limit: float | None = None,
) -> tuple[int, str, bool]:
    """Run cmd, feeding each stdout line to on_line; return (exit code, stderr text, whether
    it was stopped at `limit` seconds).

    The child gets its own session, so Ctrl-C reaches only this script, which then stops it.
    """
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        stopped = threading.Event()

        def stop_at_limit() -> None:
            stopped.set()
            _stop(proc)

        timer = threading.Timer(limit, stop_at_limit) if limit else None
        try:
            if timer is not None:
                timer.daemon = True
                timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                on_line(line)
            rc = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if proc.stdout is not None:
                proc.stdout.close()
        err.seek(0)
        return rc, err.read(), stopped.is_set()


def _tail(text: str, n: int = STDERR_TAIL) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-n:]


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def system_command(
    system: str, cfg: Config, settings: dict[str, Any], peer_python: Path
) -> list[str]:
    common = [
        "--data", str(settings["data"]),
        "--epochs", str(settings["epochs"]),
        "--batch-size", str(cfg.batch_size),
        "--threads", str(cfg.threads),
        "--hidden", ",".join(str(h) for h in cfg.hidden),
        "--latent", str(cfg.latent),
        "--seed", str(settings["seed"]),
        "--limit", str(settings["limit"] or 0),
    ]  # fmt: skip
    script, extra = SYSTEMS[system]
    if script is None:
        return [sys.executable, str(Path(__file__).resolve()), "--worker", system, *common]
    return [str(peer_python), str(BENCHES / script), *common, *extra]


# What holds each system to AVX2+FMA on a CPU that has more (--max-isa avx2), so that one
# machine measures what CPUs without AVX-512 give: fastvae's dispatch (its gemm crate follows
# the build: without the avx512 feature it has AVX2 kernels only), XLA's code generation,
# and PyTorch's kernels, oneDNN and MKL (its sgemm).
MAX_ISA_ENV = {
    "avx2": {
        "FASTVAE_ISA": "avx2",
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
}


def apply_max_isa(isa: str) -> None:
    """Hold every child process to `isa` through its environment (XLA_FLAGS appended to)."""
    for var, value in MAX_ISA_ENV[isa].items():
        if var == "XLA_FLAGS" and os.environ.get(var):
            value = f"{os.environ[var]} {value}"
        os.environ[var] = value


# The busy loop checks every few milliseconds that this script is still its parent, so that it
# ends with the script however the script ends (SIGKILL included), never left spinning.
HOG_CODE = """
import os
parent = os.getppid()
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


def start_hog() -> subprocess.Popen[str]:
    """Another process that keeps one core busy (--loaded): what a browser, a notebook or a
    second job does to a training run on a shared machine."""
    return subprocess.Popen(
        [sys.executable, "-c", HOG_CODE],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def fastvae_paths() -> dict[str, str] | None:
    """The instruction sets fastvae takes here (its kernels, gemm's, AMX), asked of a fresh
    interpreter with this environment (FASTVAE_ISA and FASTVAE_AMX included)."""
    code = "import json, fastvae._core as c; print(json.dumps(c.isa_paths()))"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        paths: dict[str, str] = json.loads(out.stdout)
        return paths
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def isa_label(paths: dict[str, str] | None) -> str:
    """'AMX', 'AVX-512' or 'AVX2' (with gemm's set when it differs), for tables."""
    if not paths:
        return "unknown"
    names = {"avx512": "AVX-512", "avx2": "AVX2", "generic": "SSE2"}
    if paths.get("amx") == "on":
        return "AMX"
    kernels = names.get(paths.get("kernels", ""), "?")
    gemm = names.get(paths.get("gemm", ""), "?")
    return kernels if gemm == kernels else f"{kernels} (gemm {gemm})"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes spent busy so far (incl. steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = fields[0] + fields[1] + fields[2] + sum(fields[5:8])
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_system(
    system: str, cfg: Config, settings: dict[str, Any], peer_python: Path, tag: str
) -> dict[str, Any]:
    cmd = system_command(system, cfg, settings, peer_python)
    rec: dict[str, Any] = {
        "system": system,
        "config": cfg.name,
        "ok": False,
        "epochs": [],
        "test_loss": None,
        "peak_rss_mb": None,
        "error": None,
        "command": [_rel(c) for c in cmd],
    }
    print(f"{tag} {system:<12}", end="", flush=True)

    def on_line(line: str) -> None:
        line = line.strip()
        if not line.startswith("{"):
            return
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return
        if obj.get("final"):
            rec["test_loss"] = obj.get("test_loss")
            rec["peak_rss_mb"] = obj.get("peak_rss_mb")
        elif "phase_seconds" in obj:
            rec["phases"] = {"steps": obj.get("steps"), "seconds": obj["phase_seconds"]}
        elif "epoch" in obj:
            keys = ("epoch", "seconds", "samples_per_sec", "train_loss")
            rec["epochs"].append({k: obj.get(k) for k in keys})
            print(f" {_k(obj.get('samples_per_sec'))}", end="", flush=True)

    t0 = time.perf_counter()
    busy0, kids0, self0 = _busy_cpu_seconds(), _children_cpu_seconds(), _self_cpu_seconds()
    hog = start_hog() if settings.get("loaded") else None
    try:
        rc, stderr, timed_out = run_child(
            cmd, _child_env(cfg.threads), on_line, settings.get("run_limit")
        )
    except KeyboardInterrupt:
        print("  [interrupted]", flush=True)
        raise
    except OSError as e:
        rc, stderr, timed_out = -1, f"could not start {cmd[0]}: {e}", False
    finally:
        if hog is not None:
            # Stopped and waited for before the CPU accounting below, so its CPU time counts
            # as ours and other_load still measures only what else ran.
            _stop(hog)
    rec["wall_seconds"] = time.perf_counter() - t0
    busy1 = _busy_cpu_seconds()
    rec["other_load"] = None
    if busy0 is not None and busy1 is not None and rec["wall_seconds"] > 0:
        ours = (_children_cpu_seconds() - kids0) + (_self_cpu_seconds() - self0)
        # cores kept busy by other processes (or stolen by the hypervisor) during the run
        rec["other_load"] = max(0.0, (busy1 - busy0) - ours) / rec["wall_seconds"]
    rec["returncode"] = rc
    rec["stderr_tail"] = _tail(stderr, 12)
    problem = None
    if timed_out:
        rates = [e["samples_per_sec"] for e in rec["epochs"] if e.get("samples_per_sec")]
        so_far = f", median {statistics.median(rates):,.0f} samples/s" if rates else ""
        problem = (
            f"stopped at the run limit of {settings['run_limit']:.0f} s after "
            f"{len(rec['epochs'])} of {settings['epochs']} epochs{so_far}"
        )
    elif rc != 0:
        problem = f"exit code {rc}"
    elif len(rec["epochs"]) != settings["epochs"]:
        problem = f"{len(rec['epochs'])} of {settings['epochs']} epoch lines"
    elif rec["test_loss"] is None:
        problem = "no final line"
    if problem is None:
        rec["ok"] = True
        print(
            f"  samples/s | test loss {rec['test_loss']:.2f}, RSS {rec['peak_rss_mb']:.0f} MB, "
            f"{rec['wall_seconds']:.1f} s{_load_note(rec['other_load'])}",
            flush=True,
        )
    else:
        rec["error"] = problem
        rec["stderr_tail"] = _tail(stderr)
        print(f"  FAILED ({problem}); stderr tail:", flush=True)
        for line in rec["stderr_tail"] or ["(empty)"]:
            print(f"      | {line}", flush=True)
    return rec


def measure_gemm_peak(peer_python: Path, quick: bool) -> dict[str, Any] | None:
    cmd = [str(peer_python), str(BENCHES / "gemm_peak.py")]
    if quick:
        cmd += ["--min-time", "0.2", "--repeats", "3"]
    print("measuring GEMM peak (benches/gemm_peak.py, torch.mm at 1 and 2 threads) ...", flush=True)
    lines: list[str] = []
    t0 = time.perf_counter()
    busy0, kids0 = _busy_cpu_seconds(), _children_cpu_seconds()
    try:
        rc, stderr, _ = run_child(cmd, dict(os.environ), lines.append)
    except OSError as e:
        rc, stderr = -1, str(e)
    wall, busy1 = time.perf_counter() - t0, _busy_cpu_seconds()
    other = None
    if busy0 is not None and busy1 is not None and wall > 0:
        other = max(0.0, busy1 - busy0 - (_children_cpu_seconds() - kids0)) / wall
    result = None
    for line in reversed(lines):
        if line.strip().startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if rc != 0 or result is None:
        print(f"  GEMM peak failed (exit code {rc}); FLOP efficiency will be n/a. stderr tail:")
        for line in _tail(stderr) or ["(empty)"]:
            print(f"      | {line}")
        return None
    print(
        f"  peak {result['gflops_1t']:.1f} GFLOP/s on 1 thread, "
        f"{result['gflops_2t']:.1f} GFLOP/s on 2 threads{_load_note(other)}",
        flush=True,
    )
    result["other_load"] = other
    return result


def peer_versions(peer_python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json\n"
        "v = {}\n"
        "for p in ('torch', 'jax', 'jaxlib', 'optax', 'numpy'):\n"
        "    try: v[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(v))\n"
    )
    try:
        out = subprocess.run(
            [str(peer_python), "-c", code], capture_output=True, text=True, timeout=60
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


# --------------------------------------------------------------------------------------------
# statistics and printing
# --------------------------------------------------------------------------------------------


BUSY_WARN = 0.15  # cores used by other processes above which a run is flagged


def _load_note(load: float | None) -> str:
    if load is None or load < BUSY_WARN:
        return ""
    return f"  [machine busy: others used {load:.2f} cores]"


def _k(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _rel(path: str | os.PathLike[str]) -> str:
    """Path relative to the repository root when under it or next to it, else unchanged."""
    p = str(path)
    if not os.path.isabs(p):
        return p
    try:
        rel = os.path.relpath(p, REPO)
    except ValueError:
        return p
    return p if rel.startswith(os.pardir + os.sep + os.pardir) else rel


def used_epochs(epochs: int, warmup: int) -> range:
    skip = warmup if epochs > warmup else 0
    return range(skip + 1, epochs + 1)


def summarize(
    runs: list[dict[str, Any]],
    systems: list[str],
    cfg: Config,
    settings: dict[str, Any],
    peak: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    keep = set(used_epochs(settings["epochs"], settings["warmup"]))
    fps = flops_per_sample(cfg.hidden, cfg.latent)
    peak_gflops = (peak or {}).get(f"gflops_{cfg.threads}t")
    rows = []
    for system in systems:
        ok = [r for r in runs if r["system"] == system and r["ok"]]
        sps = [e["samples_per_sec"] for r in ok for e in r["epochs"] if e["epoch"] in keep]
        row: dict[str, Any] = {
            "system": system,
            "runs": sum(r["system"] == system for r in runs),
            "runs_ok": len(ok),
            "epochs_used": len(sps),
            "median_sps": statistics.median(sps) if sps else None,
            "min_sps": min(sps) if sps else None,
            "max_sps": max(sps) if sps else None,
            "test_loss": statistics.fmean(r["test_loss"] for r in ok) if ok else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok) if ok else None,
            "max_other_load": max(
                (r["other_load"] for r in ok if r.get("other_load") is not None), default=None
            ),
            "flops_per_sample": fps,
            "peak_gflops": peak_gflops,
        }
        med = row["median_sps"]
        row["gflops_achieved"] = med * fps / 1e9 if med else None
        row["flop_eff_pct"] = (
            100.0 * row["gflops_achieved"] / peak_gflops
            if row["gflops_achieved"] and peak_gflops
            else None
        )
        rows.append(row)
    fast = next((r["median_sps"] for r in rows if r["system"] == "fastvae"), None)
    for row in rows:
        row["fastvae_ratio"] = fast / row["median_sps"] if fast and row["median_sps"] else None
    return rows


def print_table(
    title: str,
    cfg: Config,
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    settings: dict[str, Any],
) -> None:
    epochs, warmup = settings["epochs"], settings["warmup"]
    used = used_epochs(epochs, warmup)
    n_train = settings["limit"] or "all"
    print()
    print(f"== {title}: {cfg.describe()} | {n_train} training images x {epochs} epochs")
    print(f"   CPU: {settings.get('cpu_model') or 'unknown'}; fastvae path: {settings.get('isa')}")
    if settings.get("max_isa"):
        print(f"   MAX ISA: every system held to {settings['max_isa'].upper()} (--max-isa)")
    if settings.get("loaded"):
        print("   LOADED: one core kept busy by another process during every run")
    if settings.get("quick"):
        print("   QUICK RUN (reduced data and epochs): a smoke test, not a benchmark result")
    if used.start > 1:
        what = f"epoch {used.start}" if len(used) == 1 else f"epochs {used.start}-{used.stop - 1}"
        print(f"   samples/s over {what} of each run (first {warmup} excluded as warm-up)")
    else:
        print("   samples/s over all epochs of each run (too few epochs to drop a warm-up)")
    head = (
        f"   {'system':<12} {'median/s':>10} {'min/s':>10} {'max/s':>10} {'fastvae/x':>9} "
        f"{'test loss':>9} {'RSS MB':>8} {'FLOP eff':>8}"
    )
    print(head)
    print("   " + "-" * (len(head) - 3))
    for r in rows:
        eff = _fmt(r["flop_eff_pct"], ".1f")
        print(
            f"   {r['system']:<12} {_fmt(r['median_sps'], ',.0f'):>10} "
            f"{_fmt(r['min_sps'], ',.0f'):>10} {_fmt(r['max_sps'], ',.0f'):>10} "
            f"{_fmt(r['fastvae_ratio'], '.2f'):>9} {_fmt(r['test_loss'], '.2f'):>9} "
            f"{_fmt(r['peak_rss_mb'], '.0f'):>8} {eff + ('%' if r['flop_eff_pct'] else ''):>8}"
            + ("" if r["runs_ok"] == r["runs"] else f"   ({r['runs'] - r['runs_ok']} failed)")
        )
    fps = flops_per_sample(cfg.hidden, cfg.latent)
    peak = rows[0]["peak_gflops"] if rows else None
    if peak:
        print(
            f"   FLOP eff = samples/s x {fps / 1e6:.2f} MFLOP/sample / {peak:.1f} GFLOP/s "
            f"(torch.mm peak, {cfg.threads} thread{'s' if cfg.threads > 1 else ''})"
        )
        effs = [r["flop_eff_pct"] for r in rows if r["flop_eff_pct"] is not None]
        if settings.get("gemm_busy") or (effs and max(effs) > 100.0):
            print(
                "   WARNING: the GEMM peak looks disturbed (measured on a busy machine, or an "
                "efficiency above 100%): FLOP efficiency is not meaningful"
            )
    else:
        print(f"   FLOP/sample {fps / 1e6:.2f} M; no GEMM peak for {cfg.threads} thread(s)")
    loads = [r["other_load"] for r in runs if r.get("other_load") is not None]
    if loads and max(loads) >= BUSY_WARN:
        print(
            f"   WARNING: other processes kept up to {max(loads):.2f} cores busy during these "
            "runs (see 'other_load' in the JSON): the machine was not idle, numbers unreliable"
        )
    for line in phase_lines(runs):
        print(line)
    print("   per-epoch samples/s:")
    for system in [r["system"] for r in rows]:
        for i, run in enumerate(r for r in runs if r["system"] == system):
            vals = " ".join(_k(e["samples_per_sec"]) for e in run["epochs"]) or "-"
            flag = "" if run["ok"] else f"  [failed: {run['error']}]"
            flag += _load_note(run.get("other_load"))
            print(f"     {system:<12} r{i + 1}: {vals}{flag}")


def _phase_runs(runs: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Each good fastvae run's microseconds per training step by phase."""
    return [
        {k: s / r["phases"]["steps"] * 1e6 for k, s in r["phases"]["seconds"].items()}
        for r in runs
        if r["system"] == "fastvae" and r["ok"] and (r.get("phases") or {}).get("steps")
    ]


def _medians(per_run: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(p[k] for p in per_run) for k in per_run[0]} if per_run else {}


def phase_us(runs: list[dict[str, Any]]) -> dict[str, float]:
    """fastvae's microseconds per training step by phase, the median over its good runs."""
    return _medians(_phase_runs(runs))


def phase_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The phase table's lines: each phase's us/step and share of the step, widest first."""
    per_run = _phase_runs(runs)
    us = _medians(per_run)
    step = us.pop("step", None)
    if not step:
        return []
    n = len(per_run)
    parts = sorted(us.items(), key=lambda kv: -kv[1])
    other = step - sum(us.values())
    cells = [f"{k} {v:,.0f} ({100 * v / step:.0f}%)" for k, v in parts if v >= 0.5]
    cells.append(f"other {other:,.0f} ({100 * other / step:.0f}%)")
    lines = [f"   fastvae's step by phase, us (median of {n} run(s), all epochs): {step:,.0f} ="]
    for i in range(0, len(cells), 4):
        lines.append("     " + " | ".join(cells[i : i + 4]))
    return lines


# --------------------------------------------------------------------------------------------
# output files
# --------------------------------------------------------------------------------------------

SUMMARY_FIELDS = [
    "config", "label", "threads", "batch_size", "hidden", "latent", "limit", "epochs",
    "warmup", "system", "runs", "runs_ok", "epochs_used", "median_sps", "min_sps", "max_sps",
    "fastvae_ratio", "test_loss", "peak_rss_mb", "flops_per_sample", "gflops_achieved",
    "peak_gflops", "flop_eff_pct", "max_other_load",
]  # fmt: skip
EPOCH_FIELDS = [
    "config", "system", "repeat", "position", "epoch", "seconds", "samples_per_sec", "train_loss",
]  # fmt: skip


def write_results(stem: Path, doc: dict[str, Any]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_name(stem.name + ".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(stem.with_name(stem.name + ".json"))
    s = doc["settings"]
    with open(stem.with_name(stem.name + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, SUMMARY_FIELDS)
        w.writeheader()
        for point in doc["configs"]:
            c = point["config"]
            for row in point["summary"]:
                w.writerow(
                    {
                        "config": point["name"],
                        "label": point["label"],
                        "threads": c["threads"],
                        "batch_size": c["batch_size"],
                        "hidden": ",".join(str(h) for h in c["hidden"]),
                        "latent": c["latent"],
                        "limit": s["limit"] or 0,
                        "epochs": s["epochs"],
                        "warmup": s["warmup"],
                        **{k: row.get(k) for k in SUMMARY_FIELDS if k in row},
                    }
                )
    with open(stem.with_name(stem.name + "-epochs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, EPOCH_FIELDS)
        w.writeheader()
        for point in doc["configs"]:
            for run in point["runs"]:
                for e in run["epochs"]:
                    w.writerow(
                        {
                            "config": point["name"],
                            "system": run["system"],
                            "repeat": run["repeat"],
                            "position": run["position"],
                            **e,
                        }
                    )


def plot_grid(doc: dict[str, Any], systems: list[str], path: Path, log_y: bool) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    points = [p for p in doc["configs"] if p["summary"]]
    if not points:
        return False
    n, k = len(points), len(systems)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(7.0, 1.45 * n + 1.5), 5.2))
    top, bottom = 0.0, float("inf")
    for j, system in enumerate(systems):
        xs, ys = [], []
        for i, p in enumerate(points):
            row = next((r for r in p["summary"] if r["system"] == system), None)
            if row and row["median_sps"]:
                xs.append(i + (j - (k - 1) / 2) * width)
                ys.append(row["median_sps"])
        top, bottom = max([top, *ys]), min([bottom, *ys])
        ax.bar(xs, ys, width, label=system, color=COLORS.get(system), edgecolor="white", lw=0.5)
    # fastvae's speed-up over the fastest peer, above each group
    for i, p in enumerate(points):
        med = {r["system"]: r["median_sps"] for r in p["summary"] if r["median_sps"]}
        peers = [v for s, v in med.items() if s != "fastvae"]
        if "fastvae" in med and peers:
            group_top = max(med.values())
            y = group_top * (1.08 if log_y else 1.0) + (0 if log_y else 0.02 * top)
            ax.text(i, y, f"\u00d7{med['fastvae'] / max(peers):.2f}", ha="center", va="bottom",
                    fontsize=8, color=COLORS["fastvae"], fontweight="bold")  # fmt: skip
    labels = []
    for p in points:
        c = p["config"]
        hidden = ",".join(str(h) for h in c["hidden"]) or "-"
        labels.append(
            f"{p['label']}\n{c['threads']}t  b{c['batch_size']}\nh{hidden}  z{c['latent']}"
        )
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    thousands = FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0")
    if log_y:
        ax.set_yscale("log")
        ax.set_ylim(bottom * 0.7, top * 1.5)
        ax.yaxis.set_minor_formatter(thousands)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    else:
        ax.set_ylim(0, top * 1.12)
    ax.yaxis.set_major_formatter(thousands)
    s = doc["settings"]
    used = used_epochs(s["epochs"], s["warmup"])
    what = f"epoch {used.start}" if len(used) == 1 else f"epochs {used.start}-{used.stop - 1}"
    ax.set_ylabel(f"training samples/s (median of {what})")
    data = f"first {s['limit']} images" if s["limit"] else "60000 images"
    flags = ["QUICK RUN: smoke test, not a result"] if s.get("quick") else []
    loads = [r.get("other_load") or 0.0 for p in doc["configs"] for r in p.get("runs", [])]
    if loads and max(loads) >= BUSY_WARN:
        flags.append("machine busy during some runs")
    title = [
        "VAE training throughput on MNIST",
        f"{data}, {s['epochs']} epochs per point; above each group: fastvae / fastest peer",
    ]
    if flags:
        title.append("[" + "; ".join(flags) + "]")
    ax.set_title("\n".join(title), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(ncol=min(k, 5), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
              frameon=False)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def parse_hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad hidden sizes {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"bad hidden sizes {text!r}")
    return sizes


def positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def default_data_dir() -> str:
    return os.environ.get("FASTVAE_DATA") or str(REPO.parent / "shared" / "data" / "mnist")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="benches/bench.py",
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add(
        "--data",
        default=default_data_dir(),
        help="MNIST directory (default: $FASTVAE_DATA, else ../shared/data/mnist "
        "relative to the repository root)",
    )
    add(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"epochs per run (default: 10; {GRID_EPOCHS} with --grid or --quick)",
    )
    add("--batch-size", type=positive_int, default=128, help="rows per step (default: 128)")
    add("--threads", type=positive_int, default=2, help="threads per system (default: 2)")
    add(
        "--hidden",
        type=parse_hidden,
        default=(400,),
        help="hidden layer sizes, comma separated (default: 400)",
    )
    add("--latent", type=positive_int, default=20, help="latent size (default: 20)")
    add("--seed", type=int, default=0, help="seed given to every system (default: 0)")
    add(
        "--repeats",
        type=positive_int,
        default=None,
        help="interleaved rounds of all systems per configuration (default: 1)",
    )
    add(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help=f"comma list, run in this order (default: {','.join(DEFAULT_SYSTEMS)}; "
        f"also available: jax-ftz)",
    )
    add(
        "--limit",
        type=int,
        default=None,
        help=f"train on the first N training images only (default: all; {QUICK_LIMIT} with "
        f"--quick, {QUICK_GRID_LIMIT} with --grid --quick)",
    )
    add(
        "--warmup",
        type=int,
        default=1,
        help="epochs left out of the statistics at the start of each run, when the run has "
        "more epochs than that (default: 1)",
    )
    add(
        "--quick",
        action="store_true",
        help=f"smoke run, not a result: {QUICK_EPOCHS} epochs on the first {QUICK_LIMIT} "
        "images, 1 repeat, shorter GEMM peak measurement",
    )
    add(
        "--grid",
        action="store_true",
        help="sweep of 9 configurations around the one given by the flags above",
    )
    add("--log-y", action="store_true", help="log-scale y axis in the grid plot")
    add(
        "--loaded",
        action="store_true",
        help="run every system with one core kept busy by another process (a spinning "
        "Python loop started before and stopped after each run): the shared-machine case",
    )
    add(
        "--run-limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop a system's run after this many seconds and report it as failed, with "
        f"the epochs it finished (default: none; {LOADED_RUN_LIMIT} with --loaded; 0 for none)",
    )
    add(
        "--max-isa",
        choices=sorted(MAX_ISA_ENV),
        default=None,
        help="hold every system to this instruction set (fastvae, XLA, PyTorch, oneDNN and "
        "MKL), to measure on an AVX-512 machine what an AVX2-only CPU gives; for fastvae's "
        "gemm too, install fastvae built without its avx512 feature",
    )
    add(
        "--out",
        default=str(DEFAULT_OUT),
        help="directory for the result files (default: benches/results)",
    )
    add(
        "--no-gemm-peak",
        action="store_true",
        help="skip the GEMM peak measurement (then no FLOP efficiency)",
    )
    add(
        "--peer-python",
        default=str(DEFAULT_PEER_PYTHON),
        help="interpreter with torch, jax and optax (default: benches/.venv-peers/bin/python, "
        "made by benches/setup_peers.sh)",
    )
    # debugging: run only the first N grid points
    add("--grid-points", type=positive_int, default=None, help=argparse.SUPPRESS)
    # internal: `bench.py --worker fastvae ...` is the fastvae subprocess
    add("--worker", choices=["fastvae"], default=None, help=argparse.SUPPRESS)
    return p  # fmt: skip


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    epochs = args.epochs
    if epochs is None:
        epochs = QUICK_EPOCHS if args.quick else GRID_EPOCHS if args.grid else 10
    limit = args.limit
    if limit is None and args.quick:
        limit = QUICK_GRID_LIMIT if args.grid else QUICK_LIMIT
    repeats = args.repeats or 1
    return {
        "data": args.data,
        "epochs": epochs,
        "limit": limit or 0,
        "repeats": repeats,
        "seed": args.seed,
        "warmup": max(0, args.warmup),
        "quick": args.quick,
    }


def has_mnist(data: str) -> bool:
    names = ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")
    return any(os.path.exists(os.path.join(data, n)) for n in names)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.worker:
        args.limit = args.limit or 0
        return worker_fastvae(args)

    # SIGTERM (kill, a CI timeout) stops the runs as Ctrl-C does: children and the busy loop
    # are stopped, and the results so far are written.
    signal.signal(signal.SIGTERM, _terminate)
    if args.max_isa:
        apply_max_isa(args.max_isa)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        parser.error(f"unknown system(s) {unknown}; available: {', '.join(SYSTEMS)}")
    systems = list(dict.fromkeys(systems))
    if not has_mnist(args.data):
        print(
            f"error: no MNIST training images in {args.data!r}. Pass --data DIR or set "
            "FASTVAE_DATA to a directory with train-images-idx3-ubyte(.gz) etc.",
            file=sys.stderr,
        )
        return 2

    peer_python = Path(args.peer_python)
    peers = [s for s in systems if SYSTEMS[s][0] is not None]
    peers_ok = peer_python.exists() and os.access(peer_python, os.X_OK)
    if not peers_ok:
        if peers:
            print(
                f"NOTE: peer interpreter {args.peer_python} not found: skipping {', '.join(peers)}."
                "\n      Run benches/setup_peers.sh to create benches/.venv-peers (torch, "
                "jax[cpu], optax), or pass --peer-python.",
                flush=True,
            )
        systems = [s for s in systems if s not in peers]
        if not systems:
            print("error: nothing left to run", file=sys.stderr)
            return 2

    settings = resolve_settings(args)
    settings["systems"] = systems
    settings["loaded"] = bool(args.loaded)
    # A system that collapses under load (PyTorch's threads wait for each other at a few
    # hundred samples/s) would hold a --loaded run for hours: such runs are stopped.
    run_limit = args.run_limit
    if run_limit is None and args.loaded:
        run_limit = LOADED_RUN_LIMIT
    settings["run_limit"] = run_limit if run_limit and run_limit > 0 else None
    centre = Config(args.threads, args.batch_size, tuple(args.hidden), args.latent)
    if args.grid:
        points = grid_configs(centre)
        if args.grid_points:
            points = points[: args.grid_points]
    else:
        points = [("", centre)]

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    kind = "grid" if args.grid else "bench"
    stem = Path(args.out) / f"{kind}-{stamp}"

    try:
        import importlib.metadata

        fastvae_version = importlib.metadata.version("fastvae")
    except Exception:  # noqa: BLE001 - purely informational
        fastvae_version = None
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        pass
    paths = fastvae_paths() if "fastvae" in systems else None
    settings["cpu_model"], settings["isa"] = cpu_model, isa_label(paths)
    settings["max_isa"] = args.max_isa
    if args.max_isa and paths and paths.get("gemm") not in (None, args.max_isa):
        print(
            f"NOTE: --max-isa {args.max_isa}, but fastvae's gemm takes {paths.get('gemm')}: "
            "build it without the avx512 feature to hold it too",
            flush=True,
        )
    doc: dict[str, Any] = {
        "kind": kind,
        "started": datetime.now().isoformat(timespec="seconds"),
        "finished": None,
        "interrupted": False,
        "argv": sys.argv[1:] if argv is None else argv,
        "settings": {**settings, "data": _rel(settings["data"])},
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_model": cpu_model,
            "cpu_count": os.cpu_count(),
            "fastvae_isa": isa_label(paths),
            "fastvae_paths": paths,
            "fastvae": fastvae_version,
            "peers": peer_versions(peer_python) if peers_ok and peers else {},
        },
        "gemm_peak": None,
        "configs": [],
    }

    n_runs = len(points) * settings["repeats"] * len(systems)
    print(
        f"{kind}: {len(points)} configuration(s) x {settings['repeats']} repeat(s) x "
        f"{len(systems)} system(s) = {n_runs} runs of {settings['epochs']} epoch(s) on "
        f"{settings['limit'] or 'all'} training images" + (" [QUICK RUN]" if args.quick else ""),
        flush=True,
    )
    if os.cpu_count() and args.threads > os.cpu_count():
        print(f"WARNING: --threads {args.threads} > {os.cpu_count()} CPUs", flush=True)

    busy0 = _busy_cpu_seconds()
    time.sleep(1.0)
    busy1 = _busy_cpu_seconds()
    if busy0 is not None and busy1 is not None and busy1 - busy0 > BUSY_WARN:
        print(
            f"WARNING: the machine is not idle (other processes use {busy1 - busy0:.2f} cores "
            "right now); results will be noisy",
            flush=True,
        )
    t_start = time.perf_counter()
    status = 0
    done_points: list[tuple[str, Config, list[dict[str, Any]], list[dict[str, Any]]]] = []
    try:
        if not args.no_gemm_peak:
            if peers_ok:
                doc["gemm_peak"] = measure_gemm_peak(peer_python, args.quick)
                other = (doc["gemm_peak"] or {}).get("other_load")
                settings["gemm_busy"] = other is not None and other >= BUSY_WARN
            else:
                print("no GEMM peak: it needs torch from the peer environment")
        run_no = 0
        for label, cfg in points:
            runs: list[dict[str, Any]] = []
            point = {
                "name": cfg.name,
                "label": label,
                "config": dataclasses.asdict(cfg),
                "flops_per_sample": flops_per_sample(cfg.hidden, cfg.latent),
                "runs": runs,
                "summary": [],
            }
            doc["configs"].append(point)
            print(f"\n-- {cfg.describe()}" + (f"  ({label})" if label else ""), flush=True)
            for rep in range(settings["repeats"]):
                shift = rep % len(systems)
                for pos, system in enumerate(systems[shift:] + systems[:shift]):
                    run_no += 1
                    tag = f"[{run_no}/{n_runs}]"
                    rec = run_system(system, cfg, settings, peer_python, tag)
                    rec.update(repeat=rep + 1, position=pos + 1)
                    runs.append(rec)
            point["summary"] = summarize(runs, systems, cfg, settings, doc["gemm_peak"])
            done_points.append((label, cfg, point["summary"], runs))
            write_results(stem, doc)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping; results so far are kept", flush=True)
        doc["interrupted"] = True
        status = 130
        for point in doc["configs"]:
            if not point["summary"] and point["runs"]:
                cfg = Config(**{**point["config"], "hidden": tuple(point["config"]["hidden"])})
                point["summary"] = summarize(
                    point["runs"], systems, cfg, settings, doc["gemm_peak"]
                )
                done_points.append((point["label"], cfg, point["summary"], point["runs"]))

    doc["finished"] = datetime.now().isoformat(timespec="seconds")
    doc["wall_seconds"] = time.perf_counter() - t_start
    for label, cfg, rows, runs in done_points:
        title = f"grid point '{label}'" if args.grid else "benchmark"
        print_table(title, cfg, rows, runs, settings)
    if args.grid and len(done_points) > 1:
        print_grid_overview(doc, systems)

    written: list[Path] = []
    if doc["configs"]:
        write_results(stem, doc)
        written += [stem.with_name(stem.name + ext) for ext in (".json", ".csv", "-epochs.csv")]
        if args.grid:
            png = stem.with_name(stem.name + ".png")
            if plot_grid(doc, systems, png, args.log_y):
                written.append(png)
    print(f"\nwall time {doc['wall_seconds']:.0f} s" + ("  [QUICK RUN]" if args.quick else ""))
    for path in written:
        print(f"wrote {_rel(path)}")
    failed = sum(not r["ok"] for p in doc["configs"] for r in p["runs"])
    if failed and status == 0:
        print(f"{failed} run(s) failed (see above)")
        status = 1
    return status


def print_grid_overview(doc: dict[str, Any], systems: list[str]) -> None:
    """One line per grid point: median samples/s of every system and fastvae's ratio."""
    print("\n== grid overview: median samples/s")
    head = f"   {'configuration':<22} {'':<20}" + "".join(f"{s:>13}" for s in systems)
    print(head)
    print("   " + "-" * (len(head) - 3))
    for point in doc["configs"]:
        med = {r["system"]: r["median_sps"] for r in point["summary"]}
        cells = "".join(f"{_fmt(med.get(s), ',.0f'):>13}" for s in systems)
        print(f"   {point['name']:<22} {point['label']:<20}{cells}")
    if "fastvae" in systems and len(systems) > 1:
        print("   fastvae/x:")
        for point in doc["configs"]:
            ratio = {r["system"]: r["fastvae_ratio"] for r in point["summary"]}
            cells = "".join(f"{_fmt(ratio.get(s), '.2f'):>13}" for s in systems)
            print(f"   {point['name']:<22} {point['label']:<20}{cells}")


if __name__ == "__main__":
    sys.exit(main())
