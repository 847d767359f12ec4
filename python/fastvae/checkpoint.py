"""Reading and writing model files. The file format and its checks live in the Rust core
(safetensors, atomic writes, checksums); this module maps it onto the ``VAE`` estimator and
keeps the training history in the metadata as JSON."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from . import _core
from .errors import CheckpointError
from .model import HISTORY_KEYS

if TYPE_CHECKING:
    from .model import VAE

__all__ = ["load", "save"]


def save(vae: VAE, path: str | os.PathLike[str], include_optimizer: bool) -> None:
    model = vae._fitted()
    if not isinstance(include_optimizer, bool):
        raise TypeError("include_optimizer must be True or False")
    extra = {"history": json.dumps(getattr(vae, "history_", {}))}
    if hasattr(vae, "fit_params_"):
        extra["fit_params"] = json.dumps(vae.fit_params_)
    model.save(os.fspath(path), include_optimizer, extra)


def _json(raw: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the file's {what}: not valid JSON ({e})") from e


def _history(raw: str | None) -> dict[str, list[Any]]:
    empty: dict[str, list[Any]] = {k: [] for k in HISTORY_KEYS}
    if raw is None:
        return empty
    h = _json(raw, "training history")
    if not isinstance(h, dict) or not all(isinstance(h.get(k), list) for k in HISTORY_KEYS):
        raise CheckpointError("the file's training history has an unexpected layout")
    return {k: list(h[k]) for k in HISTORY_KEYS}


def load(cls: type[VAE], path: str | os.PathLike[str], threads: int | None) -> VAE:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    probe = cls(threads=threads)
    n_threads = probe._checked_config()[-1]
    model, extra, _ = _core.Model.load(path, n_threads)
    input_dim, hidden, latent_dim, activation, seed = model.config
    vae = cls(input_dim, tuple(hidden), latent_dim, activation, seed, threads)
    try:
        history = _history(extra.get("history"))
        fit_params = _fit_params(extra.get("fit_params"))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    vae._adopt(model)
    vae.history_ = history
    if fit_params is not None:
        vae.fit_params_ = fit_params
    return vae


def _fit_params(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    p = _json(raw, "training settings")
    ok = (
        isinstance(p, dict)
        and isinstance(p.get("batch_size"), int)
        and isinstance(p.get("lr"), float)
        and p.get("binarize") in (None, "dynamic")
    )
    if not ok:
        raise CheckpointError("the file's training settings have an unexpected layout")
    return {"batch_size": p["batch_size"], "lr": p["lr"], "binarize": p["binarize"]}
