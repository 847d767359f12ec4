"""What a model file says about training, as plain Python values: the per-epoch history, the
latest fit's settings and its early stopping, which ride in the file's metadata as JSON strings.

This module is not the file format (the Rust core reads and writes safetensors, with its
checksums, atomic writes and checks of every tensor) and not the estimator (``VAE.save`` and
``VAE.load`` in model.py pair these values with the core's model); it imports neither.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import schedule
from .errors import CheckpointError, ConfigError

__all__ = [
    "HISTORY_KEYS",
    "empty_history",
    "metrics_lines",
    "feature_names_from_metadata",
    "feature_names_to_metadata",
    "from_metadata",
    "to_metadata",
]

# Per-epoch records of `VAE.history_`, in this order.
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "samples_per_sec", "seconds", "beta", "lr")
# Records added after files were first written, with the value an epoch of an older file had:
# those epochs trained with KL weight 1; their learning rate is in their training settings.
_ADDED_HISTORY_KEYS: dict[str, Any] = {"beta": 1.0, "lr": None}
# Training settings added since, likewise: the values older fits used.
_ADDED_FIT_PARAMS: dict[str, Any] = {
    "beta": 1.0,
    "kl_warmup": 0,
    "patience": None,
    "lr_schedule": None,
    "adam_eps": 1e-8,
    "k": 1,
    "objective": "iwae",
}


def empty_history() -> dict[str, list[Any]]:
    """A history with every key and no epochs."""
    return {k: [] for k in HISTORY_KEYS}


def metrics_lines(history: Mapping[str, list[Any]]) -> str:
    """``history`` as a metrics.jsonl file: one JSON object per epoch."""
    keys = ["epoch", "train_loss", "val_loss", "samples_per_sec", "seconds"]
    keys += [k for k in ("beta", "lr") if k in history]
    rows = [json.dumps({k: history[k][i] for k in keys}) for i in range(len(history["epoch"]))]
    return "".join(r + "\n" for r in rows)


def to_metadata(
    history: Mapping[str, list[Any]],
    fit_params: Mapping[str, Any] | None,
    early_stopping: Mapping[str, int | None] | None = None,
) -> dict[str, str]:
    """The metadata entries that record ``history`` and, when given, ``fit_params`` and
    ``early_stopping``.

    Parameters
    ----------
    history : mapping of lists
        ``VAE.history_``.
    fit_params : mapping or None
        ``VAE.fit_params_``; None for a model never fitted (its weights were set directly).
    early_stopping : mapping or None
        ``{"best_epoch": ..., "stopped_epoch": ...}`` after a fit with early stopping.

    Returns
    -------
    dict of str
        ``{"history": ..., "fit_params": ..., "early_stopping": ...}`` as JSON strings, for the
        core's ``Model.save`` and ``Model.to_bytes``.
    """
    extra = {"history": json.dumps(dict(history))}
    if fit_params is not None:
        extra["fit_params"] = json.dumps(dict(fit_params))
    if early_stopping is not None:
        extra["early_stopping"] = json.dumps(dict(early_stopping))
    return extra


def from_metadata(
    extra: Mapping[str, str],
) -> tuple[dict[str, list[Any]], dict[str, Any] | None, dict[str, int | None] | None]:
    """The history, fit settings and early stopping recorded by ``to_metadata``, checked.

    Parameters
    ----------
    extra : mapping of str
        The extra metadata the core's ``Model.load`` (or ``Model.from_bytes``) returns.

    Returns
    -------
    history : dict of lists
        Every key of HISTORY_KEYS; empty lists when the file holds no history. Records that
        files written by older versions lack are filled in (``beta`` 1.0 for every epoch).
    fit_params : dict or None
        ``batch_size``, ``lr``, ``binarize``, ``beta``, ``kl_warmup`` and ``patience`` (the
        last three filled in with the values older versions used); None when the file holds
        none.
    early_stopping : dict or None
        ``best_epoch`` and ``stopped_epoch`` (each an int or None); None when the latest fit
        did not stop early.

    Raises
    ------
    CheckpointError
        If any is not valid JSON or not laid out as written; the message does not name the
        file, which the caller adds.
    """
    return (
        _history(extra.get("history")),
        _fit_params(extra.get("fit_params")),
        _early_stopping(extra.get("early_stopping")),
    )


def _json(raw: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the file's {what}: not valid JSON ({e})") from e


def _history(raw: str | None) -> dict[str, list[Any]]:
    if raw is None:
        return empty_history()
    h = _json(raw, "training history")
    ok = isinstance(h, dict) and all(
        isinstance(h.get(k), list) for k in HISTORY_KEYS if k not in _ADDED_HISTORY_KEYS
    )
    if ok:
        n = len(h["epoch"])
        h = {k: h.get(k, [_ADDED_HISTORY_KEYS.get(k)] * n) for k in HISTORY_KEYS}
        ok = all(isinstance(v, list) and len(v) == n for v in h.values())
    if not ok:
        raise CheckpointError("the file's training history has an unexpected layout")
    return {k: list(h[k]) for k in HISTORY_KEYS}


def _fit_params(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    p = _json(raw, "training settings")
    if isinstance(p, dict):
        p = _ADDED_FIT_PARAMS | p
    ok = (
        isinstance(p, dict)
        and _is_int(p.get("batch_size"))
        and isinstance(p.get("lr"), float)
        and p.get("binarize") in (None, "dynamic")
        and isinstance(p.get("beta"), (int, float))
        and not isinstance(p.get("beta"), bool)
        and _is_int(p.get("kl_warmup"))
        and (p.get("patience") is None or _is_int(p.get("patience")))
        and _schedule_ok(p.get("lr_schedule"))
        and isinstance(p.get("adam_eps"), float)
        and 0 < p["adam_eps"] <= 1
        and _is_int(p.get("k"))
        and p["k"] >= 1
        and p.get("objective") in ("iwae", "elbo")
    )
    if not ok:
        raise CheckpointError("the file's training settings have an unexpected layout")
    keys = (
        "batch_size",
        "lr",
        "binarize",
        "beta",
        "kl_warmup",
        "patience",
        "lr_schedule",
        "adam_eps",
        "k",
        "objective",
    )
    return {k: float(p[k]) if k == "beta" else p[k] for k in keys}


def _early_stopping(raw: str | None) -> dict[str, int | None] | None:
    if raw is None:
        return None
    e = _json(raw, "early stopping record")
    ok = isinstance(e, dict) and all(
        e.get(k, 0) is None or _is_int(e.get(k)) for k in ("best_epoch", "stopped_epoch")
    )
    if not ok or "best_epoch" not in e or "stopped_epoch" not in e:
        raise CheckpointError("the file's early stopping record has an unexpected layout")
    return {"best_epoch": e["best_epoch"], "stopped_epoch": e["stopped_epoch"]}


def _schedule_ok(spec: Any) -> bool:
    try:
        return schedule.check(spec) == spec
    except ConfigError:
        return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def feature_names_to_metadata(names: list[str] | None) -> dict[str, str]:
    """The metadata entry recording the input's column names (``feature_names_in_``), if any."""
    return {} if names is None else {"feature_names": json.dumps(list(names))}


def feature_names_from_metadata(extra: Mapping[str, str]) -> list[str] | None:
    """The column names ``feature_names_to_metadata`` recorded, checked; None if there are none."""
    raw = extra.get("feature_names")
    if raw is None:
        return None
    names = _json(raw, "feature names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError("the file's feature names are not a list of strings")
    return names
