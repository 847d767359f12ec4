#!/usr/bin/env python3
"""The Gaussian likelihood against an independent PyTorch implementation, and its speed.

Run from the repository root in the environment where fastvae is installed; PyTorch runs in
benches/.venv-peers (benches/setup_peers.sh):

    python benches/gaussian.py                # both parts
    python benches/gaussian.py --part elbo    # test ELBO on real-valued data sets only
    python benches/gaussian.py --part speed   # Gaussian vs Bernoulli samples/s only

elbo: scikit-learn's breast-cancer (569 x 30) and digits (1797 x 64) sets, standardized with
    the training rows' means and standard deviations, split 80/20 by the seed. fastvae and
    benches/peer_torch.py --likelihood gaussian train the same model (hidden 64, latent 8,
    ReLU, Adam lr 1e-3, batch 32, same epochs, learned per-feature log-variances kept in
    [-10, 10]) on the same rows; each reports the test set's mean negative ELBO (one z
    sample, averaged over 20 draws) and its importance-weighted log-likelihood (k = 1000).
    Different initial weights and noise: the figures agree to the spread of training runs,
    which --seeds measures for each system.

speed: the canonical 784-400-20 model on MNIST (values in [0, 1], which both likelihoods
    take) for --epochs epochs, Bernoulli and Gaussian, fastvae and PyTorch, interleaved;
    the median samples/s of the epochs after the first.

Results go to benches/results/gaussian-<time>.json. Benchmark on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

BENCHES = Path(__file__).resolve().parent
PEER_PYTHON = BENCHES / ".venv-peers" / "bin" / "python"
HIDDEN, LATENT, BATCH, LR = (64,), 8, 32, 1e-3


def real_valued_sets(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Standardized (train, test) splits of scikit-learn's bundled real-valued sets."""
    from sklearn.datasets import load_breast_cancer, load_digits

    out = {}
    for name, loader in (("breast-cancer", load_breast_cancer), ("digits", load_digits)):
        x = loader().data.astype(np.float64)
        order = np.random.default_rng(seed).permutation(len(x))
        cut = int(0.8 * len(x))
        train, test = x[order[:cut]], x[order[cut:]]
        mean, std = train.mean(0), train.std(0)
        std[std == 0] = 1.0  # constant features stay constant (at 0)
        out[name] = (
            ((train - mean) / std).astype(np.float32),
            ((test - mean) / std).astype(np.float32),
        )
    return out


def fastvae_elbo(x_train, x_test, epochs: int, seed: int, threads: int) -> dict:
    from fastvae import VAE

    vae = VAE(
        likelihood="gaussian",
        hidden_dims=HIDDEN,
        latent_dim=LATENT,
        epochs=epochs,
        batch_size=BATCH,
        lr=LR,
        seed=seed,
        threads=threads,
        progress=False,
    )
    t0 = time.perf_counter()
    vae.fit(x_train)
    seconds = time.perf_counter() - t0
    elbos = [vae.elbo(x_test, seed=s).mean() for s in range(20)]
    ll = vae.log_likelihood(x_test, k=1000, seed=seed).mean()
    return {
        "test_loss": -float(np.mean(elbos)),
        "test_log_likelihood": float(ll),
        "train_seconds": seconds,
    }


def torch_run(args: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run(
        [str(PEER_PYTHON), str(BENCHES / "peer_torch.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"peer_torch.py failed:\n{out.stderr[-2000:]}")
    lines = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    epochs = [ln for ln in lines if "epoch" in ln]
    final = next(ln for ln in lines if ln.get("final"))
    return {**final, "epochs": epochs}


def torch_elbo(x_train, x_test, epochs: int, seed: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        np.savez(path, x_train=x_train, x_test=x_test)
        t0 = time.perf_counter()
        res = torch_run(
            [
                "--npz",
                path,
                "--likelihood",
                "gaussian",
                "--epochs",
                str(epochs),
                "--batch-size",
                str(BATCH),
                "--threads",
                str(threads),
                "--hidden",
                ",".join(map(str, HIDDEN)),
                "--latent",
                str(LATENT),
                "--seed",
                str(seed),
                "--lr",
                str(LR),
                "--eval-k",
                "1000",
                "--eval-draws",
                "20",
            ],  # fmt: skip
            threads,
        )
    return {
        "test_loss": res["test_loss"],
        "test_log_likelihood": res["test_log_likelihood"],
        "train_seconds": sum(e["seconds"] for e in res["epochs"]),
        "wall_seconds": time.perf_counter() - t0,
    }


def part_elbo(args: argparse.Namespace) -> dict:
    results: dict = {}
    for name, (x_train, x_test) in real_valued_sets(args.split_seed).items():
        epochs = args.elbo_epochs
        rows = {"fastvae": [], "pytorch": []}
        for seed in range(args.seeds):
            rows["fastvae"].append(fastvae_elbo(x_train, x_test, epochs, seed, args.threads))
            if PEER_PYTHON.exists():
                rows["pytorch"].append(torch_elbo(x_train, x_test, epochs, seed, args.threads))
        results[name] = {
            "shape": list(x_train.shape),
            "test_rows": len(x_test),
            "epochs": epochs,
            "runs": rows,
        }
        print(f"\n== {name}: {x_train.shape[0]} train / {len(x_test)} test rows x "
              f"{x_train.shape[1]} features, standardized; {epochs} epochs, batch {BATCH}, "
              f"{args.seeds} seeds")  # fmt: skip
        print(f"{'system':10} {'-ELBO (nats)':>22} {'-log p(x), k=1000':>22} {'train s':>9}")
        for system, runs in rows.items():
            if not runs:
                continue
            loss = [r["test_loss"] for r in runs]
            ll = [-r["test_log_likelihood"] for r in runs]
            secs = statistics.median(r["train_seconds"] for r in runs)
            print(
                f"{system:10} {np.mean(loss):>14.3f} ± {np.std(loss):<5.3f} "
                f"{np.mean(ll):>14.3f} ± {np.std(ll):<5.3f} {secs:>9.2f}"
            )
    return results


def part_speed(args: argparse.Namespace) -> dict:
    from fastvae import VAE
    from fastvae.datasets import load_mnist

    x, _ = load_mnist("train", root=args.data, download=False)
    results: dict = {}
    for repeat in range(args.repeats):
        for likelihood in ("bernoulli", "gaussian"):
            vae = VAE(likelihood=likelihood, epochs=args.epochs, seed=repeat, progress=False)
            vae.set_params(threads=args.threads)
            vae.fit(x)
            sps = vae.history_["samples_per_sec"][1:] or vae.history_["samples_per_sec"]
            results.setdefault(f"fastvae {likelihood}", []).extend(sps)
            if PEER_PYTHON.exists():
                res = torch_run(
                    [
                        "--data",
                        str(args.data),
                        "--likelihood",
                        likelihood,
                        "--epochs",
                        str(args.epochs),
                        "--threads",
                        str(args.threads),
                        "--seed",
                        str(repeat),
                        "--flush-denormal",
                    ],  # fmt: skip
                    args.threads,
                )
                eps = [e["samples_per_sec"] for e in res["epochs"]]
                results.setdefault(f"pytorch-ftz {likelihood}", []).extend(eps[1:] or eps)
    print(f"\n== MNIST 784-400-20, batch 128, {args.threads} threads, {args.epochs} epochs x "
          f"{args.repeats} repeats: median samples/s of epochs 2 on")  # fmt: skip
    for key, values in results.items():
        print(f"{key:24} {statistics.median(values):>10,.0f}")
    for system in ("fastvae", "pytorch-ftz"):
        b, g = results.get(f"{system} bernoulli"), results.get(f"{system} gaussian")
        if b and g:
            ratio = statistics.median(g) / statistics.median(b)
            print(f"{system}: gaussian / bernoulli = {ratio:.2f}")
    return {k: {"median": statistics.median(v), "all": v} for k, v in results.items()}


def main() -> int:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--part", choices=["elbo", "speed", "both"], default="both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3, help="training runs per system and set")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--elbo-epochs", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3, help="MNIST epochs per speed run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved speed runs per system")
    p.add_argument(
        "--data",
        default=os.environ.get("FASTVAE_DATA") or str(BENCHES.parent.parent / "shared/data/mnist"),
    )
    p.add_argument("--out", default=str(BENCHES / "results"))
    args = p.parse_args()
    if not PEER_PYTHON.exists():
        print("NOTE: no benches/.venv-peers: fastvae only (run benches/setup_peers.sh)")
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; threads {args.threads}")
    doc_out = {"started": datetime.now().isoformat(timespec="seconds"), "cpu": cpu}
    doc_out["settings"] = {k: v for k, v in vars(args).items()}
    if args.part in ("elbo", "both"):
        doc_out["elbo"] = part_elbo(args)
    if args.part in ("speed", "both"):
        doc_out["speed"] = part_speed(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"gaussian-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(doc_out, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
