#!/usr/bin/env python3
"""Float32 GEMM throughput of this machine through torch.mm (no numpy).

Measures the two matmul shapes that dominate the default VAE (hidden 400,
batch 128):

    encoder-like  (128 x 784) @ (784 x 400)
    decoder-like  (128 x 400) @ (400 x 784)

with torch at 1 and 2 intra-op threads, and prints one JSON line to stdout:

    {"gflops_1t": ..., "gflops_2t": ..., "shapes": {...}, "torch": "..."}

gflops_Nt is the throughput of the two shapes run alternately (total flops /
total time, 2*M*N*K flops per matmul); "shapes" has each shape on its own.
Every figure is the best of several timed repeats, so it is a peak, not a mean.

Run with the peers virtualenv:  benches/.venv-peers/bin/python benches/gemm_peak.py
"""

import argparse
import json
import time

import torch

SHAPES = {"128x784@784x400": (128, 784, 400), "128x400@400x784": (128, 400, 784)}


def best_rate(fn, flops_per_call, min_time, repeats):
    """Best GFLOP/s over `repeats` runs of about `min_time` seconds each."""
    for _ in range(20):  # warm up (thread pool spin-up, caches, packing)
        fn()
    # how many calls fill min_time
    calls, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t = time.perf_counter() - t0
        if t >= min_time / 4:
            break
        calls *= 2
    calls = max(1, int(calls * min_time / t))
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t = time.perf_counter() - t0
        best = max(best, flops_per_call * calls / t / 1e9)
    return best


def main():
    p = argparse.ArgumentParser(description="float32 GEMM GFLOP/s via torch.mm")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    ops = {}
    for name, (m, k, n) in SHAPES.items():
        a, b = torch.rand(m, k), torch.rand(k, n)
        out = torch.empty(m, n)
        ops[name] = (lambda a=a, b=b, out=out: torch.mm(a, b, out=out), 2.0 * m * k * n)

    result = {}
    shapes = {name: {} for name in SHAPES}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, (fn, flops) in ops.items():
            shapes[name][f"{threads}t"] = best_rate(fn, flops, args.min_time, args.repeats)
        fns = [fn for fn, _ in ops.values()]
        total = sum(f for _, f in ops.values())

        def both(fns=fns):
            for fn in fns:
                fn()

        result[f"gflops_{threads}t"] = best_rate(both, total, args.min_time, args.repeats)
    result["shapes"] = shapes
    result["torch"] = torch.__version__
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
