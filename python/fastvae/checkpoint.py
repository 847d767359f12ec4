"""What a model file says about training, as plain Python values: the per-epoch history and the
latest fit's settings, which ride in the file's metadata as JSON strings.

This module is not the file format (the Rust core reads and writes safetensors, with its
checksums, atomic writes and checks of every tensor) and not the estimator (``VAE.save`` and
``VAE.load`` in model.py pair these values with the core's model); it imports neither.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .errors import CheckpointError

__all__ = ["HISTORY_KEYS", "empty_history", "from_metadata", "to_metadata"]

# Per-epoch records of `VAE.history_`, in this order.
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "samples_per_sec", "seconds")


def empty_history() -> dict[str, list[Any]]:
    """A history with every key and no epochs."""
    return {k: [] for k in HISTORY_KEYS}


def to_metadata(
    history: Mapping[str, list[Any]], fit_params: Mapping[str, Any] | None
) -> dict[str, str]:
    """The metadata entries that record ``history`` and, when given, ``fit_params``.

    Parameters
    ----------
    history : mapping of lists
        ``VAE.history_``.
    fit_params : mapping or None
        ``VAE.fit_params_``; None for a model never fitted (its weights were set directly).

    Returns
    -------
    dict of str
        ``{"history": ..., "fit_params": ...}`` as JSON strings, for the core's ``Model.save``.
    """
    extra = {"history": json.dumps(dict(history))}
    if fit_params is not None:
        extra["fit_params"] = json.dumps(dict(fit_params))
    return extra


def from_metadata(extra: Mapping[str, str]) -> tuple[dict[str, list[Any]], dict[str, Any] | None]:
    """The history and fit settings recorded by ``to_metadata``, checked.

    Parameters
    ----------
    extra : mapping of str
        The extra metadata the core's ``Model.load`` returns.

    Returns
    -------
    history : dict of lists
        Every key of HISTORY_KEYS; empty lists when the file holds no history.
    fit_params : dict or None
        ``batch_size``, ``lr`` and ``binarize``; None when the file holds none.

    Raises
    ------
    CheckpointError
        If either is not valid JSON or not laid out as written; the message does not name the
        file, which the caller adds.
    """
    return _history(extra.get("history")), _fit_params(extra.get("fit_params"))


def _json(raw: str, what: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the file's {what}: not valid JSON ({e})") from e


def _history(raw: str | None) -> dict[str, list[Any]]:
    if raw is None:
        return empty_history()
    h = _json(raw, "training history")
    if not isinstance(h, dict) or not all(isinstance(h.get(k), list) for k in HISTORY_KEYS):
        raise CheckpointError("the file's training history has an unexpected layout")
    return {k: list(h[k]) for k in HISTORY_KEYS}


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
