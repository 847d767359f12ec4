#!/usr/bin/env python3
"""PyTorch peer for the fastvae training benchmark.

Trains the Kingma & Welling VAE (the pytorch/examples/vae model, with the
decoder producing logits and the loss computed by
binary_cross_entropy_with_logits) on MNIST held in memory, and prints one JSON
line per epoch plus a final JSON line to stdout:

    {"system": "pytorch", "epoch": 1, "seconds": ..., "samples_per_sec": ...,
     "train_loss": ...}
    {"system": "pytorch", "final": true, "test_loss": ..., "peak_rss_mb": ...}

Only the training loop of each epoch is timed (shuffle + batches + optimizer
steps); the test evaluation runs once after the last epoch and is not timed.
Diagnostics go to stderr so that stdout stays machine readable.

Run with the peers virtualenv (see benches/setup_peers.sh), e.g.

    benches/.venv-peers/bin/python benches/peer_torch.py \
        --data /path/to/mnist --epochs 1 --batch-size 128 --threads 2
"""

import argparse
import gzip
import json
import os
import resource
import sys
import time

import numpy as np

SYSTEM = "pytorch"
IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path):
    """Read one (optionally gzipped) IDX file into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: size mismatch for dims {dims}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def load_images(data_dir, prefix):
    """Images of one split as float32 in [0, 1], shape (n, 784)."""
    for name in (
        f"{prefix}-images-idx3-ubyte.gz",
        f"{prefix}-images-idx3-ubyte",
        f"{prefix}-images.idx3-ubyte",
    ):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            imgs = read_idx(path)
            return imgs.reshape(imgs.shape[0], -1).astype(np.float32) / 255.0
    raise FileNotFoundError(f"no {prefix} images in {data_dir}")


def parse_hidden(text):
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"bad --hidden {text!r}")
    return sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="directory with the four MNIST IDX .gz files")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--hidden",
        type=parse_hidden,
        default=[400],
        help="hidden layer sizes, comma separated (e.g. 512,256)",
    )
    p.add_argument("--latent", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True)")
    p.add_argument(
        "--limit", type=int, default=0, help="use only the first N training images (0 = all)"
    )
    p.add_argument(
        "--npz",
        default=None,
        help="train on x_train and score x_test of this .npz instead of MNIST (--data unused)",
    )
    p.add_argument(
        "--likelihood",
        choices=["bernoulli", "gaussian"],
        default="bernoulli",
        help="p(x|z): Bernoulli logits, or Gaussian means with a learned log-variance per "
        "feature kept in [-10, 10] (as fastvae's)",
    )
    p.add_argument(
        "--eval-k",
        type=int,
        default=0,
        help="also report the importance-weighted log-likelihood of the test set with k samples",
    )
    p.add_argument(
        "--eval-draws",
        type=int,
        default=1,
        help="average the one-sample test loss over this many noise draws",
    )
    args = p.parse_args(argv)
    if args.npz is None and args.data is None:
        p.error("--data or --npz is required")
    return args


def log(msg):
    print(f"[{SYSTEM}] {msg}", file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


def main(argv=None):
    args = parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch import nn

    # Threads must be fixed before any parallel work happens.
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if args.flush_denormal:
        if not torch.set_flush_denormal(True):
            log("warning: flush-denormal not supported on this CPU")
    torch.manual_seed(args.seed)

    if args.npz:
        arrays = np.load(args.npz)
        train_np = arrays["x_train"].astype(np.float32)
        test_np = arrays["x_test"].astype(np.float32)
    else:
        train_np = load_images(args.data, "train")
        test_np = load_images(args.data, "t10k")
    d = train_np.shape[1]
    gaussian = args.likelihood == "gaussian"
    half_log_2pi = 0.5 * float(np.log(2 * np.pi))

    class VAE(nn.Module):
        def __init__(self, hidden, latent):
            super().__init__()
            enc, d_in = [], d
            for h in hidden:
                enc += [nn.Linear(d_in, h), nn.ReLU()]
                d_in = h
            self.encoder = nn.Sequential(*enc)
            self.fc_mu = nn.Linear(d_in, latent)
            self.fc_logvar = nn.Linear(d_in, latent)
            dec, d_in = [], latent
            for h in reversed(hidden):
                dec += [nn.Linear(d_in, h), nn.ReLU()]
                d_in = h
            dec.append(nn.Linear(d_in, d))
            self.decoder = nn.Sequential(*dec)
            # Gaussian p(x|z): one learned log-variance per feature.
            self.out_logvar = nn.Parameter(torch.zeros(d)) if gaussian else None

        def forward(self, x):
            h = self.encoder(x)
            mu, logvar = self.fc_mu(h), self.fc_logvar(h)
            std = torch.exp(0.5 * logvar)
            z = mu + std * torch.randn_like(std)
            return self.decoder(z), mu, logvar

    def nll_rows(out, x):
        """-log p(x|z) per row."""
        if gaussian:
            lv = model.out_logvar
            return (half_log_2pi + 0.5 * lv + 0.5 * (x - out) ** 2 * torch.exp(-lv)).sum(1)
        return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)

    def loss_function(logits, x, mu, logvar):
        if gaussian:
            rec = nll_rows(logits, x).sum()
        else:
            rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return rec + kld

    def log_likelihood(x, k):
        """Importance-weighted log p(x) per row with k samples (Burda et al.)."""
        h = model.encoder(x)
        mu, logvar = model.fc_mu(h), model.fc_logvar(h)
        std = torch.exp(0.5 * logvar)
        out = []
        for i in range(x.shape[0]):
            eps = torch.randn(k, mu.shape[1], dtype=torch.float64)
            z = (mu[i].double() + std[i].double() * eps).float()
            xi = x[i].expand(k, -1)
            log_px_z = -nll_rows(model.decoder(z), xi).double()
            log_pz = -0.5 * (z.double() ** 2).sum(1)
            log_qz = -0.5 * (eps**2).sum(1) - 0.5 * logvar[i].double().sum()
            w = log_px_z + log_pz - log_qz
            out.append(torch.logsumexp(w, 0) - np.log(k))
        return torch.stack(out)

    if args.limit and args.limit > 0:
        train_np = train_np[: args.limit]
    train_x = torch.from_numpy(np.ascontiguousarray(train_np))
    test_x = torch.from_numpy(np.ascontiguousarray(test_np))
    n = train_x.shape[0]
    bs = args.batch_size

    model = VAE(args.hidden, args.latent)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    log(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"interop={torch.get_num_interop_threads()}, n_train={n}, batch={bs}, "
        f"hidden={args.hidden}, latent={args.latent}, "
        f"flush_denormal={args.flush_denormal}"
    )

    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        t0 = time.perf_counter()
        perm = torch.randperm(n)
        for start in range(0, n, bs):  # last partial batch included
            x = train_x[perm[start : start + bs]]
            optimizer.zero_grad()
            logits, mu, logvar = model(x)
            loss = loss_function(logits, x, mu, logvar)
            loss.backward()
            total += loss.item()
            optimizer.step()
            if gaussian:
                with torch.no_grad():
                    model.out_logvar.clamp_(-10.0, 10.0)
        secs = time.perf_counter() - t0
        emit(
            {
                "system": SYSTEM,
                "epoch": epoch,
                "seconds": secs,
                "samples_per_sec": n / secs,
                "train_loss": total / n,
            }
        )

    # Test loss as pytorch/examples/vae: a sampled z, BCE sum + KL, per example.
    model.eval()
    test_total = 0.0
    extra = {}
    with torch.no_grad():
        for _ in range(args.eval_draws):
            for start in range(0, test_x.shape[0], 1000):
                x = test_x[start : start + 1000]
                logits, mu, logvar = model(x)
                test_total += loss_function(logits, x, mu, logvar).item()
        if args.eval_k:
            extra["test_log_likelihood"] = float(log_likelihood(test_x, args.eval_k).mean())
            extra["eval_k"] = args.eval_k
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    emit(
        {
            "system": SYSTEM,
            "final": True,
            "test_loss": test_total / (test_x.shape[0] * args.eval_draws),
            "peak_rss_mb": peak,
            **extra,
        }
    )


if __name__ == "__main__":
    main()
