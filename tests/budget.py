"""A bound for tests that guard against a hang or runaway work (a huge allocation, a long loop)
rather than measure speed, made to hold on a busy machine.

CPU time (of every thread of this process) bounds the work a block does, and a loaded machine
barely changes it; wall time, which a loaded machine stretches many times over, is only held
to a minute, which nothing but a hang or a long wait comes near.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def little_work(label: str, cpu_seconds: float, wall_seconds: float = 60.0) -> Iterator[None]:
    """Fail unless the block takes under ``cpu_seconds`` of CPU and ``wall_seconds`` of time."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    used, took = time.process_time() - cpu, time.perf_counter() - wall
    assert used < cpu_seconds, f"{label}: {used:.2f} s of CPU time, expected < {cpu_seconds} s"
    assert took < wall_seconds, f"{label}: took {took:.1f} s, expected < {wall_seconds} s"
