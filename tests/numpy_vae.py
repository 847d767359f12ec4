"""A plain-NumPy float64 reference for the fastvae model: loss, gradients and Adam.

Written from the math of the Kingma & Welling VAE alone, independently of the Rust core, so
the tests can check the core against it. Weights are dicts named as ``VAE.weights()``:
``encoder.{i}``, ``fc_mu``, ``fc_logvar`` and ``decoder.{j}`` linear layers, each with a
``.weight`` of shape (out, in) and a ``.bias`` of shape (out,).

Model, for a batch x (B, D) and noise eps (B, Z)::

    h_0 = x,  h_i = act(h_{i-1} W_i^T + b_i)               encoder, i = 1..L
    mu = h_L W_mu^T + b_mu,  logvar = h_L W_lv^T + b_lv
    z = mu + exp(logvar / 2) * eps
    g_0 = z,  g_j = act(g_{j-1} V_j^T + c_j)                decoder, j = 1..L
    logits = g_L V_{L+1}^T + c_{L+1}
    Bernoulli:  nll = sum_{rows, pixels} [max(l, 0) - l x + log1p(exp(-|l|))]
    Gaussian (a weight "decoder_logvar", s (D,); l is the mean):
                nll = sum_{rows, features} [log(2 pi) / 2 + s / 2 + (x - l)^2 exp(-s) / 2]
    loss = nll + beta sum_rows -1/2 sum_k (1 + logvar - mu^2 - exp(logvar))

Backward (d = dloss/d(.)):

    d logits = sigmoid(logits) - x                          (Gaussian: (l - x) exp(-s))
    d s = sum_rows (1 - (x - l)^2 exp(-s)) / 2               (Gaussian only)
    through a linear layer y = u W^T + b:  dW = dy^T u,  db = sum_rows dy,  du = dy W
    through act: da = dh * act'(a), relu' = [a > 0], tanh' = 1 - tanh(a)^2
    d mu = dz + beta mu
    d logvar = dz * eps * exp(logvar / 2) / 2 + beta (exp(logvar) - 1) / 2
    d h_L = d mu W_mu + d logvar W_lv
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "AdamState",
    "Forward",
    "adam_step",
    "count_hidden",
    "forward",
    "init_weights",
    "loss_and_grads",
    "loss_and_grads_k",
    "loss_k",
    "loss_only",
    "weight_names",
]

Weights = dict[str, np.ndarray]


def count_hidden(weights: Weights) -> int:
    """Number of encoder hidden layers, read off the weight names."""
    n = 0
    while f"encoder.{n}.weight" in weights:
        n += 1
    return n


def weight_names(n_hidden: int) -> list[str]:
    """Every parameter name of a model with n_hidden hidden layers."""
    layers = [f"encoder.{i}" for i in range(n_hidden)]
    layers += ["fc_mu", "fc_logvar"]
    layers += [f"decoder.{j}" for j in range(n_hidden + 1)]
    return [f"{layer}.{part}" for layer in layers for part in ("weight", "bias")]


def init_weights(
    input_dim: int,
    hidden_dims: tuple[int, ...],
    latent_dim: int,
    rng: np.random.Generator,
    scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """Random float32 weights: N(0, scale^2 / fan_in), biases N(0, 0.1^2)."""
    shapes: list[tuple[str, int, int]] = []
    prev = input_dim
    for i, h in enumerate(hidden_dims):
        shapes.append((f"encoder.{i}", h, prev))
        prev = h
    shapes.append(("fc_mu", latent_dim, prev))
    shapes.append(("fc_logvar", latent_dim, prev))
    prev = latent_dim
    outs = list(reversed(hidden_dims)) + [input_dim]
    for j, out in enumerate(outs):
        shapes.append((f"decoder.{j}", out, prev))
        prev = out
    w: dict[str, np.ndarray] = {}
    for name, out, fan_in in shapes:
        std = scale / math.sqrt(fan_in)
        w[f"{name}.weight"] = (rng.standard_normal((out, fan_in)) * std).astype(np.float32)
        w[f"{name}.bias"] = (rng.standard_normal(out) * 0.1).astype(np.float32)
    return w


def _act(a: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(a, 0.0)
    if activation == "tanh":
        return np.tanh(a)
    raise ValueError(f"unknown activation {activation!r}")


def _act_grad(a: np.ndarray, h: np.ndarray, activation: str) -> np.ndarray:
    """act'(a), given a and h = act(a)."""
    if activation == "relu":
        return (a > 0).astype(np.float64)
    return 1.0 - h * h


def _linear(u: np.ndarray, weights: Weights, layer: str) -> np.ndarray:
    w = np.asarray(weights[f"{layer}.weight"], dtype=np.float64)
    b = np.asarray(weights[f"{layer}.bias"], dtype=np.float64)
    return u @ w.T + b


@dataclass
class Forward:
    """Every intermediate of a forward pass (float64)."""

    x: np.ndarray
    eps: np.ndarray
    enc_pre: list[np.ndarray] = field(default_factory=list)  # a_i
    enc_out: list[np.ndarray] = field(default_factory=list)  # h_i = act(a_i)
    mu: np.ndarray | None = None
    logvar: np.ndarray | None = None
    z: np.ndarray | None = None
    dec_pre: list[np.ndarray] = field(default_factory=list)  # hidden decoder pre-activations
    dec_out: list[np.ndarray] = field(default_factory=list)  # their activations
    logits: np.ndarray | None = None
    bce: float = 0.0  # -log p(x|z), Bernoulli or Gaussian
    kl: float = 0.0
    beta: float = 1.0

    @property
    def loss(self) -> float:
        return self.bce + self.beta * self.kl

    def min_abs_preactivation(self) -> float:
        """Distance of the nearest hidden pre-activation to 0 (a relu kink)."""
        pre = self.enc_pre + self.dec_pre
        return min((float(np.abs(a).min()) for a in pre), default=math.inf)


def forward(
    weights: Weights, x: np.ndarray, eps: np.ndarray, activation: str, beta: float = 1.0
) -> Forward:
    """The forward pass in float64; Gaussian when the weights hold "decoder_logvar"."""
    x = np.asarray(x, dtype=np.float64)
    eps = np.asarray(eps, dtype=np.float64)
    n_hidden = count_hidden(weights)
    f = Forward(x=x, eps=eps, beta=beta)
    h = x
    for i in range(n_hidden):
        a = _linear(h, weights, f"encoder.{i}")
        h = _act(a, activation)
        f.enc_pre.append(a)
        f.enc_out.append(h)
    f.mu = _linear(h, weights, "fc_mu")
    f.logvar = _linear(h, weights, "fc_logvar")
    f.z = f.mu + np.exp(0.5 * f.logvar) * eps
    g = f.z
    for j in range(n_hidden):
        a = _linear(g, weights, f"decoder.{j}")
        g = _act(a, activation)
        f.dec_pre.append(a)
        f.dec_out.append(g)
    f.logits = _linear(g, weights, f"decoder.{n_hidden}")
    lg = f.logits
    if "decoder_logvar" in weights:
        s = np.asarray(weights["decoder_logvar"], dtype=np.float64)
        f.bce = float(
            np.sum(0.5 * math.log(2 * math.pi) + 0.5 * s + 0.5 * (x - lg) ** 2 / np.exp(s))
        )
    else:
        f.bce = float(np.sum(np.maximum(lg, 0.0) - lg * x + np.log1p(np.exp(-np.abs(lg)))))
    f.kl = float(np.sum(-0.5 * (1.0 + f.logvar - f.mu**2 - np.exp(f.logvar))))
    return f


def loss_only(
    weights: Weights, x: np.ndarray, eps: np.ndarray, activation: str, beta: float = 1.0
) -> float:
    """The batch loss (sum over rows), float64."""
    return forward(weights, x, eps, activation, beta).loss


def _sigmoid(t: np.ndarray) -> np.ndarray:
    # Stable on both sides: exp of a non-positive number only.
    e = np.exp(-np.abs(t))
    return np.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _linear_backward(
    dy: np.ndarray, u: np.ndarray, weights: Weights, layer: str, grads: dict[str, np.ndarray]
) -> np.ndarray:
    """Gradients of y = u W^T + b into grads; returns du."""
    grads[f"{layer}.weight"] = dy.T @ u
    grads[f"{layer}.bias"] = dy.sum(axis=0)
    return dy @ np.asarray(weights[f"{layer}.weight"], dtype=np.float64)


def loss_and_grads(
    weights: Weights, x: np.ndarray, eps: np.ndarray, activation: str, beta: float = 1.0
) -> tuple[float, dict[str, np.ndarray]]:
    """Batch loss and float64 gradients of every weight, named as the weights."""
    f = forward(weights, x, eps, activation, beta)
    assert f.mu is not None and f.logvar is not None and f.z is not None and f.logits is not None
    n_hidden = count_hidden(weights)
    grads: dict[str, np.ndarray] = {}

    # Decoder, from the logits (or Gaussian means) back to z.
    if "decoder_logvar" in weights:
        inv_var = np.exp(-np.asarray(weights["decoder_logvar"], dtype=np.float64))
        resid = f.logits - f.x
        d = resid * inv_var
        grads["decoder_logvar"] = np.sum(0.5 * (1.0 - resid**2 * inv_var), axis=0)
    else:
        d = _sigmoid(f.logits) - f.x
    for j in range(n_hidden, -1, -1):
        u = f.dec_out[j - 1] if j > 0 else f.z
        du = _linear_backward(d, u, weights, f"decoder.{j}", grads)
        if j > 0:
            d = du * _act_grad(f.dec_pre[j - 1], f.dec_out[j - 1], activation)
        else:
            d = du
    dz = d

    # Reparameterization and KL.
    std = np.exp(0.5 * f.logvar)
    dmu = dz + beta * f.mu
    dlogvar = dz * f.eps * 0.5 * std + beta * 0.5 * (np.exp(f.logvar) - 1.0)
    h = f.enc_out[-1] if n_hidden else f.x
    dh = _linear_backward(dmu, h, weights, "fc_mu", grads)
    dh = dh + _linear_backward(dlogvar, h, weights, "fc_logvar", grads)

    # Encoder.
    for i in range(n_hidden - 1, -1, -1):
        da = dh * _act_grad(f.enc_pre[i], f.enc_out[i], activation)
        u = f.enc_out[i - 1] if i > 0 else f.x
        dh = _linear_backward(da, u, weights, f"encoder.{i}", grads)
    return f.loss, grads


# --------------------------------------------------------------------------------------------
# k samples per example: the importance-weighted bound and the k-sample ELBO
# --------------------------------------------------------------------------------------------
#
# For x (B, D) and noise eps (B, k, Z): mu, logvar (B, Z) once, z = mu + exp(logvar / 2) eps
# (B, k, Z), the decoder over all B k samples, nll (B, k) = -log p(x_i | z_ij).
#
#   "iwae": log w = -nll + beta (|eps|^2 / 2 - |z|^2 / 2 + sum(logvar) / 2)     (B, k)
#           loss = sum_i [log k - logsumexp_j log w_ij]
#   "elbo": loss = sum_i [mean_j nll_ij + beta KL_i]                           (closed-form KL)
#
# The backward pass below is the chain rule through these expressions, from dloss/dlog w
# = -softmax_j(log w) (or dloss/dnll = 1/k), with no shortcut taken from the core's derivation.


def _decoder_forward(
    weights: Weights, z: np.ndarray, activation: str
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    n_hidden = count_hidden(weights)
    pre: list[np.ndarray] = []
    out: list[np.ndarray] = []
    g = z
    for j in range(n_hidden):
        a = _linear(g, weights, f"decoder.{j}")
        g = _act(a, activation)
        pre.append(a)
        out.append(g)
    return pre, out, _linear(g, weights, f"decoder.{n_hidden}")


def _nll_rows(weights: Weights, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """-log p(x|z) per row, and nothing else, for the decoder's outputs ``out``."""
    if "decoder_logvar" in weights:
        s = np.asarray(weights["decoder_logvar"], dtype=np.float64)
        terms = 0.5 * math.log(2 * math.pi) + 0.5 * s + 0.5 * (x - out) ** 2 / np.exp(s)
    else:
        terms = np.maximum(out, 0.0) - out * x + np.log1p(np.exp(-np.abs(out)))
    return np.asarray(terms.sum(axis=1))


def _k_forward(
    weights: Weights, x: np.ndarray, eps: np.ndarray, activation: str
) -> dict[str, object]:
    x = np.asarray(x, dtype=np.float64)
    eps = np.asarray(eps, dtype=np.float64)
    b, k, zd = eps.shape
    n_hidden = count_hidden(weights)
    enc_pre, enc_out = [], []
    h = x
    for i in range(n_hidden):
        a = _linear(h, weights, f"encoder.{i}")
        h = _act(a, activation)
        enc_pre.append(a)
        enc_out.append(h)
    mu = _linear(h, weights, "fc_mu")
    logvar = _linear(h, weights, "fc_logvar")
    z = mu[:, None, :] + np.exp(0.5 * logvar)[:, None, :] * eps
    x_rep = np.repeat(x, k, axis=0)
    dec_pre, dec_out, out = _decoder_forward(weights, z.reshape(b * k, zd), activation)
    nll = _nll_rows(weights, x_rep, out).reshape(b, k)
    return {
        "x": x, "eps": eps, "enc_pre": enc_pre, "enc_out": enc_out, "mu": mu,
        "logvar": logvar, "z": z, "x_rep": x_rep, "dec_pre": dec_pre, "dec_out": dec_out,
        "out": out, "nll": nll,
    }  # fmt: skip


def _k_loss(f: dict[str, object], beta: float, objective: str) -> tuple[float, np.ndarray]:
    """The batch loss and dloss/dnll (B, k); for "iwae" also returns via the same array the
    weights the prior terms take (dloss/dlog w = -that array)."""
    nll = np.asarray(f["nll"])
    eps, z = np.asarray(f["eps"]), np.asarray(f["z"])
    mu, logvar = np.asarray(f["mu"]), np.asarray(f["logvar"])
    k = nll.shape[1]
    if objective == "iwae":
        log_w = -nll + beta * (
            0.5 * np.sum(eps**2, axis=2)
            - 0.5 * np.sum(z**2, axis=2)
            + 0.5 * np.sum(logvar, axis=1, keepdims=True)
        )
        top = log_w.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(log_w - top).sum(axis=1))
        soft = np.exp(log_w - lse[:, None])
        return float(np.sum(math.log(k) - lse)), soft
    if objective == "elbo":
        kl = -0.5 * np.sum(1.0 + logvar - mu**2 - np.exp(logvar), axis=1)
        return float(np.sum(nll.mean(axis=1) + beta * kl)), np.full(nll.shape, 1.0 / k)
    raise ValueError(f"unknown objective {objective!r}")


def loss_k(
    weights: Weights,
    x: np.ndarray,
    eps: np.ndarray,
    activation: str,
    beta: float = 1.0,
    objective: str = "iwae",
) -> float:
    """The k-sample batch loss (float64); eps (B, k, Z)."""
    return _k_loss(_k_forward(weights, x, eps, activation), beta, objective)[0]


def loss_and_grads_k(
    weights: Weights,
    x: np.ndarray,
    eps: np.ndarray,
    activation: str,
    beta: float = 1.0,
    objective: str = "iwae",
) -> tuple[float, dict[str, np.ndarray]]:
    """The k-sample batch loss and float64 gradients of every weight; eps (B, k, Z)."""
    f = _k_forward(weights, x, eps, activation)
    loss, dnll = _k_loss(f, beta, objective)  # dloss/dnll (B, k)
    eps, z = np.asarray(f["eps"]), np.asarray(f["z"])
    mu, logvar = np.asarray(f["mu"]), np.asarray(f["logvar"])
    b, k, zd = eps.shape
    n_hidden = count_hidden(weights)
    grads: dict[str, np.ndarray] = {}

    # dloss/d out (B k, D) = dloss/dnll * dnll/d out.
    out, x_rep = np.asarray(f["out"]), np.asarray(f["x_rep"])
    row = dnll.reshape(b * k, 1)
    if "decoder_logvar" in weights:
        inv_var = np.exp(-np.asarray(weights["decoder_logvar"], dtype=np.float64))
        resid = out - x_rep
        d = row * resid * inv_var
        grads["decoder_logvar"] = np.sum(row * 0.5 * (1.0 - resid**2 * inv_var), axis=0)
    else:
        d = row * (_sigmoid(out) - x_rep)
    dec_pre, dec_out = list(f["dec_pre"]), list(f["dec_out"])  # type: ignore[call-overload]
    for j in range(n_hidden, -1, -1):
        u = dec_out[j - 1] if j > 0 else z.reshape(b * k, zd)
        du = _linear_backward(d, u, weights, f"decoder.{j}", grads)
        d = du * _act_grad(dec_pre[j - 1], dec_out[j - 1], activation) if j > 0 else du
    dz = d.reshape(b, k, zd)
    std = np.exp(0.5 * logvar)
    if objective == "iwae":
        # log w depends on z through -beta |z|^2 / 2 and on logvar through beta sum(logvar) / 2.
        dz = dz + beta * dnll[:, :, None] * z
        dlogvar_direct = -0.5 * beta * dnll.sum(axis=1, keepdims=True) * np.ones_like(logvar)
        dmu = dz.sum(axis=1)
        dlogvar = (dz * eps).sum(axis=1) * 0.5 * std + dlogvar_direct
    else:
        dmu = dz.sum(axis=1) + beta * mu
        dlogvar = (dz * eps).sum(axis=1) * 0.5 * std + beta * 0.5 * (np.exp(logvar) - 1.0)
    enc_pre, enc_out = list(f["enc_pre"]), list(f["enc_out"])  # type: ignore[call-overload]
    h = enc_out[-1] if n_hidden else np.asarray(f["x"])
    dh = _linear_backward(dmu, h, weights, "fc_mu", grads)
    dh = dh + _linear_backward(dlogvar, h, weights, "fc_logvar", grads)
    for i in range(n_hidden - 1, -1, -1):
        da = dh * _act_grad(enc_pre[i], enc_out[i], activation)
        u = enc_out[i - 1] if i > 0 else np.asarray(f["x"])
        dh = _linear_backward(da, u, weights, f"encoder.{i}", grads)
    return loss, grads


@dataclass
class AdamState:
    """Adam's moments and step count, float64, as torch.optim.Adam keeps them."""

    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]
    t: int = 0

    @classmethod
    def zeros(cls, weights: Weights) -> AdamState:
        return cls(
            m={k: np.zeros(np.shape(w)) for k, w in weights.items()},
            v={k: np.zeros(np.shape(w)) for k, w in weights.items()},
        )


def adam_step(
    weights: Weights,
    grads: dict[str, np.ndarray],
    state: AdamState,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> dict[str, np.ndarray]:
    """One torch.optim.Adam step (no weight decay): updates state, returns new float64 weights.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  t += 1
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    state.t += 1
    t = state.t
    out: dict[str, np.ndarray] = {}
    for k, w in weights.items():
        g = np.asarray(grads[k], dtype=np.float64)
        state.m[k] = beta1 * state.m[k] + (1.0 - beta1) * g
        state.v[k] = beta2 * state.v[k] + (1.0 - beta2) * g * g
        step_size = lr / (1.0 - beta1**t)
        denom = np.sqrt(state.v[k]) / math.sqrt(1.0 - beta2**t) + eps
        out[k] = np.asarray(w, dtype=np.float64) - step_size * state.m[k] / denom
    return out
