"""What a Ray sweep gets out of the machine: the total samples/s of a sweep's trials against one
trial alone at one thread, and Ray's start-up and per-trial overhead.

    python benches/sweep.py [--trials 8] [--epochs 5] [--limit 60000]

Every trial trains the same model (the canonical one, on MNIST's first --limit training
images, a tenth held out for validation); only the seed differs, so the trials cost the same
and the sweep's total can be set against one trial's. In order, one process each:

1. one trial alone, one thread, no Ray (the reference rate), and two such trials at once as
   plain processes (what the cores give two trials without Ray), --repeats times each,
   alternating, half before the sweep and half after, medians (a shared host's speed drifts
   by tens of percent within minutes);
2. `fastvae sweep --seed 0,1,...` on a Ray started locally: Ray's start-up, the sweep's wall
   time, each trial's samples/s while it trains (from Tune's results), the sweep's total
   samples/s while trials train and over its whole wall time, and what each trial costs beyond
   its training epochs (starting its worker, its per-epoch validation, checkpoint and report).

Run it on an idle machine: anything beside it changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ALONE = """
import json, sys, time
from fastvae import VAE
from fastvae.datasets import load_mnist, split_rows
x = load_mnist("train")[0].reshape(-1, 784)[: {limit}]
tr, va = split_rows(len(x), 0.1, seed=0)
v = VAE(threads=1, progress=False, seed={seed})
v.fit(x[tr], epochs={epochs}, validation_data=x[va])
print(json.dumps(v.history_["samples_per_sec"]))
"""

SWEEP = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import ray
ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
t_ray = time.perf_counter() - t0
from pathlib import Path
from fastvae import sweep
from fastvae.datasets import load_mnist, split_rows
x = load_mnist("train")[0].reshape(-1, 784)[: {limit}].astype(np.float32)
tr, va = split_rows(len(x), 0.1, seed=0)
spec = sweep.SweepSpec(space={{"seed": list(range({trials}))}}, epochs={epochs},
                       out=Path({out!r}), fixed={{"likelihood": "bernoulli"}})
t1 = time.perf_counter()
rows = sweep.run_sweep(spec, x[tr], x[va])
wall = time.perf_counter() - t1
ray.shutdown()
print(json.dumps({{"ray_start": t_ray, "wall": wall, "rows": len(rows), "n": len(tr)}}))
"""


def run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return out.strip().splitlines()[-1]


def median_rate(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--limit", type=int, default=60000, help="MNIST training images used")
    p.add_argument("--repeats", type=int, default=4, help="rounds of the reference runs")
    p.add_argument("--ref-epochs", type=int, default=3, help="epochs of each reference run")
    args = p.parse_args()
    from fastvae import _core

    print(f"fastvae {_core.__version__}, ISA {_core.isa_paths()}, {os.cpu_count()} CPUs")
    fmt = {"limit": args.limit, "epochs": args.epochs}

    alones: list[float] = []
    pairs: list[float] = []

    def references(rounds: int) -> None:
        ref = {**fmt, "epochs": args.ref_epochs}
        for _ in range(rounds):
            alones.append(median_rate(json.loads(run(ALONE.format(seed=0, **ref)))))
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", ALONE.format(seed=s, **ref)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for s in (1, 2)
            ]
            pairs.append(
                sum(
                    median_rate(json.loads(pr.communicate()[0].strip().splitlines()[-1]))
                    for pr in procs
                )
            )
            print(f"  one trial alone {alones[-1]:,.0f}, two at once {pairs[-1]:,.0f} samples/s")

    references((args.repeats + 1) // 2)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep"
        res = json.loads(run(SWEEP.format(out=str(out), trials=args.trials, **fmt)))
        rates, busy, inside = [], 0.0, 0.0
        for d in sorted((out / "tune").glob("_trial_*")):
            reports = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
            epoch_rates = [float(x["samples_per_sec"]) for x in reports]
            r = median_rate(epoch_rates)
            rates.append(r)
            busy += args.epochs * res["n"] / r
            # From the trial function's start to its last report: its epochs and what it does
            # around them (building the model, validation, checkpoints, reports).
            inside += reports[-1]["time_total_s"] - sum(res["n"] / e for e in epoch_rates)
    references(args.repeats // 2)
    alone, pair = statistics.median(alones), statistics.median(pairs)
    print(
        f"one trial alone, 1 thread: median {alone:,.0f} samples/s "
        f"(min {min(alones):,.0f}, max {max(alones):,.0f})\n"
        f"two trials at once, plain processes: median {pair:,.0f} samples/s "
        f"(min {min(pairs):,.0f}, max {max(pairs):,.0f}), {pair / alone:.2f}x one trial"
    )
    slots = min(os.cpu_count() or 1, args.trials)
    while_training = slots * statistics.mean(rates)
    total = args.trials * args.epochs * res["n"] / res["wall"]
    per_trial = (slots * res["wall"] - busy) / args.trials
    print(
        f"fastvae sweep, {args.trials} trials x {args.epochs} epochs of {res['n']:,} images, "
        f"{slots} at a time:\n"
        f"  Ray start-up {res['ray_start']:.1f} s; sweep wall time {res['wall']:.1f} s\n"
        f"  per trial while training: median {statistics.median(rates):,.0f} samples/s "
        f"(min {min(rates):,.0f}, max {max(rates):,.0f})\n"
        f"  total while trials train: {while_training:,.0f} samples/s, "
        f"{while_training / alone:.2f}x one trial\n"
        f"  total over the sweep's wall time: {total:,.0f} samples/s, {total / alone:.2f}x one "
        f"trial\n"
        f"  each trial's cost beyond its training epochs: {per_trial:.2f} s "
        f"(its training: {args.epochs * res['n'] / statistics.median(rates):.1f} s), of which\n"
        f"    inside the trial (first-epoch set-up, per-epoch validation, checkpoint and "
        f"report): {inside / args.trials:.2f} s\n"
        f"    outside it (Tune's start and end, starting workers, scheduling; over the "
        f"trials): {per_trial - inside / args.trials:.2f} s"
    )


if __name__ == "__main__":
    main()
