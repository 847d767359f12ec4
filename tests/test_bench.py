"""benches/bench.py: its busy loop (--loaded) never outlives the benchmark (a benchmark killed
outright, SIGKILL or a CI timeout, left it spinning on a core, and every later measurement on
the machine ran loaded without saying so); its table of fastvae's step by phase."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parents[1] / "benches"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def _running(pid: int) -> bool:
    """Whether pid exists and is not a zombie (an orphan's zombie may wait to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_busy_loop_ends_with_the_benchmark() -> None:
    parent_code = (
        f"import sys, time; sys.path.insert(0, {str(BENCHES)!r}); import bench; "
        "hog = bench.start_hog(); print(hog.pid, flush=True); time.sleep(120)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    hog = None
    try:
        assert parent.stdout is not None
        hog = int(parent.stdout.readline())
        time.sleep(0.3)
        assert _running(hog), "the busy loop did not start"
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _running(hog) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(hog), "the busy loop outlived the benchmark that started it"
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if hog is not None and _running(hog):
            os.kill(hog, signal.SIGKILL)


def test_phase_table_takes_medians_and_names_the_rest() -> None:
    sys.path.insert(0, str(BENCHES))
    import bench

    def run(step: float, first: float, ok: bool = True) -> dict[str, object]:
        seconds = {"step": step, "decoder_forward": 0.25 * step, "first_update": first}
        return {"system": "fastvae", "ok": ok, "phases": {"steps": 1000, "seconds": seconds}}

    runs = [run(3.0, 0.3), run(4.0, 0.5), run(5.0, 0.4), run(90.0, 9.0, ok=False)]
    runs.append({"system": "jax", "ok": True, "epochs": []})
    us = bench.phase_us(runs)
    # Medians over the good fastvae runs, in us per step.
    assert us == {"step": 4000.0, "decoder_forward": 1000.0, "first_update": 400.0}
    lines = bench.phase_lines(runs)
    assert "median of 3 run(s)" in lines[0] and "4,000 =" in lines[0]
    body = " | ".join(lines[1:])
    assert "decoder_forward 1,000 (25%)" in body
    assert "first_update 400 (10%)" in body
    assert "other 2,600 (65%)" in body
    assert bench.phase_lines([r for r in runs if r["system"] == "jax"]) == []
