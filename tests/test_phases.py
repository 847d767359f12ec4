"""The training step's phase timers, which benches/bench.py reads: counted only while on, one
step per batch, every phase inside its step, and reset on reading."""

from __future__ import annotations

import math

import numpy as np

import fastvae
from fastvae import _core

PHASES = [
    "step", "gather", "noise", "first_forward", "latent_forward", "decoder_forward", "loss",
    "decoder_backward", "latent_backward", "encoder_backward", "check", "first_update", "update",
]  # fmt: skip


def _pixels(n: int = 300, d: int = 64) -> np.ndarray:
    """Intensities in [0, 1], three in four zero, as in MNIST (so the sparse first layer runs)."""
    rng = np.random.default_rng(0)
    x = rng.random((n, d), dtype=np.float32)
    x[rng.random((n, d)) < 0.75] = 0.0
    return x


def _fit(x: np.ndarray, epochs: int, batch: int, threads: int) -> None:
    vae = fastvae.VAE(hidden_dims=[32], latent_dim=4, threads=threads, seed=0)
    vae.fit(x, epochs=epochs, batch_size=batch, progress=False)


def test_phases_are_timed_only_while_on() -> None:
    x = _pixels()
    _core.set_phase_timers(False)
    _core.take_phase_times()
    _fit(x, epochs=1, batch=32, threads=1)
    steps, phases = _core.take_phase_times()
    assert steps == 0
    assert [name for name, _ in phases] == PHASES
    assert all(seconds == 0.0 for _, seconds in phases)


def test_each_phase_lies_inside_its_step() -> None:
    x = _pixels()
    for threads in (1, 2):
        _core.take_phase_times()
        _core.set_phase_timers(True)
        try:
            _fit(x, epochs=2, batch=32, threads=threads)
        finally:
            _core.set_phase_timers(False)
        steps, phases = _core.take_phase_times()
        assert steps == 2 * math.ceil(len(x) / 32)
        seconds = dict(phases)
        assert list(seconds) == PHASES
        parts = [seconds[name] for name in PHASES[1:]]
        # Every phase ran (the first layer's update too: the data are sparse), each inside a
        # step and none overlapping another, so together they take no longer than the steps.
        assert all(s > 0.0 for s in parts), seconds
        assert sum(parts) <= seconds["step"]
        assert _core.take_phase_times()[0] == 0, "reading resets"
