"""What k samples per example cost: samples/s of a k-sample epoch against a one-sample epoch at
the same batch size, interleaved, medians over repeats, for the canonical model and the IWAE
paper's.

    python benches/k_samples.py [--repeats 3] [--threads 2] [--ks 1,5,50]

The k-sample step runs the encoder once per example and the decoder and the loss once per
sample, so its cost grows with the decoder's share of the FLOPs; the table prints that share's
prediction beside the measured ratio.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from fastvae import VAE, _core
from fastvae.datasets import load_mnist

MODELS = {
    # name: (hidden, latent, activation, batch size, binarize)
    "canonical 784-400-20 relu, batch 128": ((400,), 20, "relu", 128, None),
    "IWAE paper 784-200-200-50 tanh, batch 20": ((200, 200), 50, "tanh", 20, "dynamic"),
}


def flops_ratio(hidden: tuple[int, ...], latent: int, k: int, density: float) -> float:
    """Predicted cost of a k-sample step over a one-sample one: multiply-adds per example of
    the encoder (first layer at the data's density, no input gradient there) and the decoder
    (forward and two backward products), the decoder's times k."""
    enc_dims = [784, *hidden]
    enc = 2 * 784 * hidden[0] * density
    enc += sum(3 * a * b for a, b in zip(enc_dims[1:], enc_dims[2:], strict=False))
    enc += 3 * hidden[-1] * 2 * latent
    dec_dims = [latent, *reversed(hidden), 784]
    dec = sum(3 * a * b for a, b in zip(dec_dims, dec_dims[1:], strict=False))
    return (enc + k * dec) / (enc + dec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ks", default="1,5")
    p.add_argument("--limit", type=int, default=20000, help="training images per epoch")
    args = p.parse_args()
    ks = [int(v) for v in args.ks.split(",")]
    x = load_mnist("train")[0][: args.limit]
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    density = float(np.count_nonzero(x) / x.size)
    print(f"fastvae {_core.__version__}, ISA {_core.isa_paths()}, {args.threads} threads")
    for name, (hidden, latent, act, batch, binarize) in MODELS.items():
        rates: dict[int, list[float]] = {k: [] for k in ks}
        for _ in range(args.repeats):
            for k in ks:
                vae = VAE(
                    hidden_dims=hidden,
                    latent_dim=latent,
                    activation=act,
                    batch_size=batch,
                    binarize=binarize,
                    k=k,
                    threads=args.threads,
                    progress=False,
                )
                vae.fit(x, epochs=3)
                # Epochs 2-3: the first includes building the model and converting the data.
                rates[k].append(statistics.median(vae.history_["samples_per_sec"][1:]))
        print(f"\n{name}")
        print("   k   samples/s (median)   cost vs k=1   FLOP prediction")
        base = statistics.median(rates[ks[0]])
        for k in ks:
            med = statistics.median(rates[k])
            pred = flops_ratio(hidden, latent, k, density)
            print(f"{k:>4}   {med:>18,.0f}   {base / med:>11.2f}   {pred:>15.2f}")


if __name__ == "__main__":
    main()
