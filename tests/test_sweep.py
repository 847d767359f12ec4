"""Sweeps on a real Ray cluster: two nodes started on this machine with ``ray start`` (both on
127.0.0.1, one CPU each), a CLI sweep across them, the same under ASHA, a worker killed
mid-trial, and bad input. No mock: the test that starts the cluster stops it."""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastvae import VAE, ConfigError, FastVAEError
from fastvae.cli import main

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
ROWS = 3000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(*args: str, env: dict[str, str]) -> None:
    subprocess.run([RAY, *args], check=True, env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A two-node Ray cluster on 127.0.0.1, stopped at the end whatever happens; its address."""
    # Ray 2.60 authenticates with a token and no longer makes one for a new head: this
    # cluster gets its own, given to its nodes and to this process's clients.
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    if "RAY_AUTH_TOKEN" not in env and not (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        _ray(
            "start", "--head", "--port", str(port), "--include-dashboard", "false", *common, env=env
        )
        _ray("start", "--address", address, *common, env=env)
        # This process's clients (the CLI's ray.init) use the cluster's credentials until
        # the module ends.
        with pytest.MonkeyPatch.context() as mp:
            for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
                if k in env:
                    mp.setenv(k, env[k])
            yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _sweep_args(out: Path, mnist_dir: Path, address: str, *extra: str) -> list[str]:
    return [
        "sweep",
        "--latent-dim", "2,4",
        "--lr", "1e-3,3e-3",
        "--hidden-dims", "32",
        "--epochs", "2",
        "--limit", str(ROWS),
        "--data", str(mnist_dir),
        "--out", str(out),
        "--address", address,
        *extra,
    ]  # fmt: skip


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _validation_rows(mnist_dir: Path) -> np.ndarray:
    from fastvae.datasets import load_mnist, split_rows

    x = load_mnist("train", root=mnist_dir)[0][:ROWS]
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    return x[split_rows(len(x), 0.1, seed=0)[1]]


def _reports(out: Path) -> list[list[dict[str, Any]]]:
    """Each trial's reports to Tune so far: the lines of its result.json."""
    return [
        [json.loads(s) for s in result.read_text().splitlines() if s.strip()]
        for result in (out / "tune").glob("*/result.json")
    ]


def _pids(out: Path) -> set[int]:
    """The worker processes that ran the sweep's trials."""
    return {r["pid"] for reports in _reports(out) for r in reports}


def test_sweep_runs_on_both_nodes(cluster: str, mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    t0 = time.perf_counter()
    # A worker per trial: these trials last less than a worker's start, so with workers
    # reused (the default) the first worker up may run them all, on one node.
    assert main(_sweep_args(out, mnist_dir, cluster, "--no-reuse-workers")) == 0
    print(f"4 trials x 2 epochs on two nodes: {time.perf_counter() - t0:.1f} s")
    rows = _rows(out)
    assert len(rows) == 4
    assert {(r["latent_dim"], r["lr"]) for r in rows} == {
        (z, lr) for z in ("2", "4") for lr in ("0.001", "0.003")
    }
    assert all(r["status"] == "done" and r["epochs"] == "2" for r in rows)
    assert len({r["node_id"] for r in rows}) == 2, "both nodes ran trials"
    assert len(_pids(out)) == 4
    for r in rows:
        assert Path(r["checkpoint"], "model.safetensors").is_file()
        assert float(r["samples_per_sec"]) > 0
    # The rows are sorted by their best validation loss; best.safetensors is the first's best
    # epoch, and scores what its row says.
    best = rows[0]
    assert float(best["best_val_loss"]) == min(float(r["best_val_loss"]) for r in rows)
    vae = VAE.load(out / "best.safetensors")
    assert vae.latent_dim == int(best["latent_dim"])
    val_loss = -float(vae.elbo(_validation_rows(mnist_dir)).mean())
    assert val_loss == pytest.approx(float(best["best_val_loss"]), rel=1e-9)
    assert (out / "val_curves.png").stat().st_size > 0


def test_sweep_under_asha(cluster: str, mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "asha"
    args = _sweep_args(out, mnist_dir, cluster, "--scheduler", "asha")
    args[args.index("--epochs") + 1] = "4"
    # The good rates first, so that the trials at a rate 30 times lower meet rungs already
    # set by them.
    args[args.index("--lr") + 1] = "3e-3,1e-4"
    assert main(args) == 0
    rows = _rows(out)
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    epochs = sorted(int(r["epochs"]) for r in rows)
    # ASHA (reduction factor 2, grace 1 epoch) stops the worse trials at its rungs.
    assert epochs[-1] == 4 and epochs[0] < 4, epochs
    # Workers are reused: at most two trials start before one has ended.
    assert len(_pids(out)) < 4


def test_ctrl_c_stops_the_sweep_and_resume_continues_it(
    cluster: str, mnist_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "interrupted"
    epochs = 100
    args = _sweep_args(out, mnist_dir, cluster)
    args[args.index("--epochs") + 1] = str(epochs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastvae", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(r["epoch"] >= 3 for reports in _reports(out) for r in reports):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert f"fastvae sweep --out {out} --resume" in stderr
    rows = _rows(out)
    assert len(rows) == 4 and any(r["status"] == "unfinished" for r in rows)

    assert main(["sweep", "--out", str(out), "--address", cluster, "--resume"]) == 0
    rows = _rows(out)
    assert len(rows) == 4
    assert all(r["status"] == "done" and r["epochs"] == str(epochs) for r in rows)
    # Every trial went on from where it was: at most the epoch in flight when Ctrl-C came (its
    # report written, its checkpoint not yet in the experiment's state) is trained again, never
    # the ones before it.
    for reports in _reports(out):
        seen = [r["epoch"] for r in reports]
        assert seen[-1] == epochs, seen
        back = [i for i in range(1, len(seen)) if seen[i] != seen[i - 1] + 1]
        assert len(back) <= 1, seen
        if back:
            assert seen[back[0]] == seen[back[0] - 1], seen


def test_a_killed_worker_resumes_from_its_checkpoint(
    cluster: str, mnist_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fault"
    args = ["-m", "fastvae", "sweep", "--latent-dim", "3", "--hidden-dims", "32"]
    args += ["--epochs", "40", "--limit", str(ROWS), "--data", str(mnist_dir)]
    args += ["--out", str(out), "--address", cluster, "--max-failures", "2"]
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    try:
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            for lines in _reports(out):
                if lines and lines[-1]["epoch"] >= 3:
                    killed = lines[-1]
                    os.kill(int(killed["pid"]), signal.SIGKILL)
                    break
            time.sleep(0.05)
        assert killed is not None, "no trial reached epoch 3 to be killed"
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout
    rows = _rows(out)
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "done" and row["epochs"] == "40"
    assert int(row["restarts"]) >= 1
    # The restarted trial continued from a checkpoint: no epoch was trained from scratch.
    epochs = [m["epoch"] for m in _reports(out)[0]]
    assert epochs[-1] == 40 and min(epochs) == 1 and epochs.count(1) == 1


def test_a_cluster_of_several_machines_needs_shared_storage(tmp_path: Path) -> None:
    from fastvae import sweep

    node = {"NodeManagerAddress": "10.0.0.1", "Alive": True}
    # Two nodes on one machine (as in these tests), or a dead node elsewhere: no warning.
    one_machine = [node, dict(node), {"NodeManagerAddress": "10.0.0.2", "Alive": False}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sweep.check_storage(one_machine, tmp_path)
    two = [node, {"NodeManagerAddress": "10.0.0.2", "Alive": True}]
    with pytest.warns(UserWarning, match=r"spans 2 machines \(10.0.0.1, 10.0.0.2\).*mounts"):
        sweep.check_storage(two, tmp_path)


def test_bad_input_fails_fast(mnist_dir: Path, tmp_path: Path) -> None:
    from fastvae import sweep

    base = ["sweep", "--data", str(mnist_dir), "--limit", "500", "--out", str(tmp_path / "s")]
    t0 = time.perf_counter()
    with pytest.raises(SystemExit):
        main([*base, "--latnt-dim", "2"])  # an unknown setting
    assert main([*base, "--latent-dim", ","]) == 2  # an empty grid
    assert main(base) == 2  # nothing to sweep
    assert main([*base, "--latent-dim", "2", "--address", "nonsense"]) == 2
    assert main([*base, "--latent-dim", "2", "--address", f"127.0.0.1:{_free_port()}"]) == 2
    assert main([*base, "--resume"]) == 2
    assert time.perf_counter() - t0 < 30
    with pytest.raises(ConfigError, match="unknown sweep setting 'latnt_dim'"):
        sweep.check_space({"latnt_dim": [2]})
    with pytest.raises(ConfigError, match="low < high"):
        sweep.check_space({"lr": (1e-2, 1e-3)})


def test_without_ray_the_sweep_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastvae import sweep

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(FastVAEError, match=r'pip install "fastvae\[ray\]"'):
        sweep.require_ray()
    assert main(["sweep", "--latent-dim", "2", "--out", "x"]) == 2
    assert 'pip install "fastvae[ray]"' in capsys.readouterr().err
