"""Learning-rate schedules as data: plain dicts that say the learning rate of every training
epoch, checked once, saved with the model (in its training settings) so that a resumed run
continues the schedule where it stopped.

Epochs count every epoch the model has trained (1 for the first), across ``fit`` calls and
resumes, as the KL warm-up does. ``lr`` is the rate the schedule starts from.

- ``None``: ``lr`` throughout.
- ``{"kind": "stages", "stages": [[epochs, lr], ...]}``: piecewise constant; after the last
  stage its rate stays.
- ``{"kind": "step", "every": E, "factor": f}``: ``lr * f ** ((epoch - 1) // E)``.
- ``{"kind": "exponential", "gamma": g}``: ``lr * g ** (epoch - 1)``.
- ``{"kind": "cosine", "epochs": T, "min_lr": m}``: from ``lr`` down to ``m`` along half a
  cosine over T epochs, then ``m`` (``min_lr`` defaults to 0).

``burda()`` is the schedule of Burda, Grosse & Salakhutdinov's experiments: 3^i epochs at
1e-3 * 10^(-i/7) for i = 0..7, 3,280 epochs in all.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import ConfigError

__all__ = ["KINDS", "burda", "check", "lr_at"]

KINDS = ("stages", "step", "exponential", "cosine")
_KEYS = {
    "stages": {"kind", "stages"},
    "step": {"kind", "every", "factor"},
    "exponential": {"kind", "gamma"},
    "cosine": {"kind", "epochs", "min_lr"},
}


def burda() -> dict[str, Any]:
    """The IWAE paper's schedule: 3^i epochs at 1e-3 * 10^(-i/7), i = 0..7."""
    return {"kind": "stages", "stages": [[3**i, 1e-3 * 10 ** (-i / 7)] for i in range(8)]}


def _positive_number(where: str, v: Any, strict: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ConfigError(f"{where} must be a finite number, got {v!r}")
    if v < 0 or (strict and v == 0):
        raise ConfigError(f"{where} must be {'positive' if strict else 'at least 0'}, got {v}")
    return float(v)


def _positive_int(where: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ConfigError(f"{where} must be a positive integer, got {v!r}")
    return int(v)


def check(schedule: Any) -> dict[str, Any] | None:
    """The schedule as plain JSON-ready data, checked; ConfigError names what is wrong."""
    if schedule is None:
        return None
    if not isinstance(schedule, dict):
        raise ConfigError(f"lr_schedule must be None or a dict, got {type(schedule).__name__}")
    kind = schedule.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"lr_schedule kind must be one of {', '.join(KINDS)}, got {kind!r}")
    unknown = set(schedule) - _KEYS[kind]
    if unknown:
        raise ConfigError(f"lr_schedule of kind {kind!r} takes no {', '.join(sorted(unknown))}")
    if kind == "stages":
        stages = schedule.get("stages")
        if not isinstance(stages, list | tuple) or not stages:
            raise ConfigError("lr_schedule stages must be a non-empty list of [epochs, lr]")
        out = []
        for i, stage in enumerate(stages):
            if not isinstance(stage, list | tuple) or len(stage) != 2:
                raise ConfigError(f"lr_schedule stages[{i}] must be [epochs, lr], got {stage!r}")
            out.append(
                [
                    _positive_int(f"lr_schedule stages[{i}] epochs", stage[0]),
                    _positive_number(f"lr_schedule stages[{i}] lr", stage[1]),
                ]
            )
        return {"kind": kind, "stages": out}
    if kind == "step":
        return {
            "kind": kind,
            "every": _positive_int("lr_schedule every", schedule.get("every")),
            "factor": _positive_number("lr_schedule factor", schedule.get("factor")),
        }
    if kind == "exponential":
        return {"kind": kind, "gamma": _positive_number("lr_schedule gamma", schedule.get("gamma"))}
    return {
        "kind": kind,
        "epochs": _positive_int("lr_schedule epochs", schedule.get("epochs")),
        "min_lr": _positive_number("lr_schedule min_lr", schedule.get("min_lr", 0.0), strict=False),
    }


def lr_at(schedule: dict[str, Any] | None, lr: float, epoch: int) -> float:
    """The learning rate of training epoch `epoch` (1-based) under a checked schedule."""
    if schedule is None:
        return lr
    kind = schedule["kind"]
    if kind == "stages":
        end = 0
        for epochs, rate in schedule["stages"]:
            end += epochs
            if epoch <= end:
                return float(rate)
        return float(schedule["stages"][-1][1])
    if kind == "step":
        return lr * schedule["factor"] ** ((epoch - 1) // schedule["every"])
    if kind == "exponential":
        return lr * schedule["gamma"] ** (epoch - 1)
    t, low = schedule["epochs"], schedule["min_lr"]
    done = min(epoch - 1, t) / t
    return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * done))
