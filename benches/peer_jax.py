#!/usr/bin/env python3
"""JAX peer for the fastvae training benchmark.

Same model, loss, optimizer and batching as benches/peer_torch.py (the
Kingma & Welling VAE of pytorch/examples/vae with a logits decoder and
binary_cross_entropy_with_logits), written with jax + optax.  A whole epoch is
one jitted call: lax.scan over the full batches, then one extra step on the
last partial batch (its size is static, so it compiles once).  The epoch
function is compiled ahead of time, before the first timed epoch, so the
per-epoch seconds never include XLA compilation (compile time goes to stderr).

stdout gets one JSON line per epoch plus a final one:

    {"system": "jax", "epoch": 1, "seconds": ..., "samples_per_sec": ...,
     "train_loss": ...}
    {"system": "jax", "final": true, "test_loss": ..., "peak_rss_mb": ...}

Thread limiting (--threads T).  XLA:CPU has no option that sets its thread
count exactly.  Its thread pools are sized from the CPUs the process may run
on, so this script restricts the process's CPU affinity to T CPUs (the method
the JAX maintainers recommend, jax-ml/jax#1539) before jax is imported, and
for T == 1 also passes --xla_cpu_multi_thread_eigen=false so that Eigen
matmuls run on the calling thread.  That bounds the *cores* used to T, exactly.
The number of OS *threads* can still be larger than T: the runtime keeps
helper threads (compilation, dispatch), but they all share the same T CPUs.
(The "intra_op_parallelism_threads=T" token that old recipes put in XLA_FLAGS
is not an XLA flag: XLA ignores it, so it is not used here.)

Run with the peers virtualenv (see benches/setup_peers.sh), e.g.

    benches/.venv-peers/bin/python benches/peer_jax.py \
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

SYSTEM = "jax"
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
    p.add_argument("--data", required=True, help="directory with the four MNIST IDX .gz files")
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
    p.add_argument(
        "--flush-denormal",
        action="store_true",
        help="JAX analogue: XLA_FLAGS --xla_cpu_ftz=true (flush denormals "
        "to zero in XLA-generated CPU code)",
    )
    p.add_argument(
        "--limit", type=int, default=0, help="use only the first N training images (0 = all)"
    )
    return p.parse_args(argv)


def log(msg):
    print(f"[{SYSTEM}] {msg}", file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


def configure_xla(threads, flush_denormal):
    """Restrict XLA:CPU to `threads` cores. Must run before jax is imported."""
    note = []
    try:
        allowed = sorted(os.sched_getaffinity(0))
        if threads < len(allowed):
            os.sched_setaffinity(0, allowed[:threads])
        note.append(f"cpus={sorted(os.sched_getaffinity(0))}")
    except (AttributeError, OSError) as e:  # not Linux, or not permitted
        note.append(f"affinity not set ({e!r}); thread count NOT limited")
    flags = os.environ.get("XLA_FLAGS", "").split()
    if threads == 1 and not any(f.startswith("--xla_cpu_multi_thread_eigen") for f in flags):
        flags.append("--xla_cpu_multi_thread_eigen=false")
    if flush_denormal and not any(f.startswith("--xla_cpu_ftz") for f in flags):
        flags.append("--xla_cpu_ftz=true")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    note.append(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    return ", ".join(note)


def init_linear(rng, fan_in, fan_out):
    """torch.nn.Linear default init: W and b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    w = rng.uniform(-bound, bound, size=(fan_in, fan_out)).astype(np.float32)
    b = rng.uniform(-bound, bound, size=(fan_out,)).astype(np.float32)
    return {"w": w, "b": b}


def init_params(seed, hidden, latent):
    rng = np.random.default_rng(seed)
    enc, d_in = [], 784
    for h in hidden:
        enc.append(init_linear(rng, d_in, h))
        d_in = h
    mu = init_linear(rng, d_in, latent)
    logvar = init_linear(rng, d_in, latent)
    dec, d_in = [], latent
    for h in reversed(hidden):
        dec.append(init_linear(rng, d_in, h))
        d_in = h
    dec.append(init_linear(rng, d_in, 784))
    return {"enc": enc, "mu": mu, "logvar": logvar, "dec": dec}


def main(argv=None):
    args = parse_args(argv)
    thread_note = configure_xla(args.threads, args.flush_denormal)

    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    def forward(params, x, key):
        h = x
        for layer in params["enc"]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        mu = h @ params["mu"]["w"] + params["mu"]["b"]
        logvar = h @ params["logvar"]["w"] + params["logvar"]["b"]
        eps = jax.random.normal(key, mu.shape, mu.dtype)
        h = mu + jnp.exp(0.5 * logvar) * eps
        for layer in params["dec"][:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        logits = h @ params["dec"][-1]["w"] + params["dec"][-1]["b"]
        return logits, mu, logvar

    def loss_fn(params, x, key):
        logits, mu, logvar = forward(params, x, key)
        # binary_cross_entropy_with_logits, the same stable form torch uses
        bce = jnp.sum(jnp.maximum(logits, 0.0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits))))
        kld = -0.5 * jnp.sum(1.0 + logvar - mu * mu - jnp.exp(logvar))
        return bce + kld

    opt = optax.adam(args.lr, b1=0.9, b2=0.999, eps=1e-8)

    train_np = load_images(args.data, "train")
    test_np = load_images(args.data, "t10k")
    if args.limit and args.limit > 0:
        train_np = train_np[: args.limit]
    n, bs = train_np.shape[0], args.batch_size
    n_full, rem = divmod(n, bs)
    train_x = jnp.asarray(train_np)
    test_x = jnp.asarray(test_np)

    def run_epoch(params, opt_state, data, key):
        def train_step(carry, batch):
            params, opt_state = carry
            idx, k = batch
            x = jnp.take(data, idx, axis=0)
            loss, grads = jax.value_and_grad(loss_fn)(params, x, k)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        k_perm, k_full, k_rem = jax.random.split(key, 3)
        perm = jax.random.permutation(k_perm, n)
        carry, total = (params, opt_state), jnp.zeros((), jnp.float32)
        if n_full:
            idx = perm[: n_full * bs].reshape(n_full, bs)
            keys = jax.random.split(k_full, n_full)
            carry, losses = lax.scan(train_step, carry, (idx, keys))
            total = total + jnp.sum(losses)
        if rem:  # last partial batch: static shape (rem,), compiled once
            carry, loss = train_step(carry, (perm[n_full * bs :], k_rem))
            total = total + loss
        return carry[0], carry[1], total

    @jax.jit
    def test_loss(params, data, key):
        return loss_fn(params, data, key)

    params = jax.tree_util.tree_map(jnp.asarray, init_params(args.seed, args.hidden, args.latent))
    opt_state = opt.init(params)
    key = jax.random.PRNGKey(args.seed)

    log(
        f"jax {jax.__version__}, optax {optax.__version__}, devices={jax.devices()}, "
        f"threads={args.threads} ({thread_note}), n_train={n}, batch={bs} "
        f"({n_full} full + {rem}), hidden={args.hidden}, latent={args.latent}"
    )

    t0 = time.perf_counter()
    epoch_fn = (
        jax.jit(run_epoch, donate_argnums=(0, 1)).lower(params, opt_state, train_x, key).compile()
    )
    log(f"epoch function compiled in {time.perf_counter() - t0:.2f} s (not timed)")

    for epoch in range(1, args.epochs + 1):
        key, k_epoch = jax.random.split(key)
        k_epoch = jax.block_until_ready(k_epoch)
        t0 = time.perf_counter()
        params, opt_state, total = epoch_fn(params, opt_state, train_x, k_epoch)
        jax.block_until_ready((params, opt_state, total))
        secs = time.perf_counter() - t0
        emit(
            {
                "system": SYSTEM,
                "epoch": epoch,
                "seconds": secs,
                "samples_per_sec": n / secs,
                "train_loss": float(total) / n,
            }
        )

    # Test loss as pytorch/examples/vae: a sampled z, BCE sum + KL, per example.
    key, k_test = jax.random.split(key)
    test_total = float(test_loss(params, test_x, k_test))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    emit(
        {
            "system": SYSTEM,
            "final": True,
            "test_loss": test_total / test_np.shape[0],
            "peak_rss_mb": peak,
        }
    )


if __name__ == "__main__":
    main()
