"""The IWAE paper's experiment: its schedule fitted to a budget, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastvae import schedule
from fastvae.cli import main
from fastvae.paper import PAPER_EPOCHS, plan_stages


def test_the_full_plan_is_the_papers_schedule() -> None:
    assert plan_stages(PAPER_EPOCHS) == schedule.burda()


@pytest.mark.parametrize("epochs", [1, 2, 7, 8, 50, 121, 400, 1000, 2000, 3280, 5000])
def test_plans_use_every_epoch_at_the_papers_rates(epochs: int) -> None:
    plan = plan_stages(epochs)
    assert schedule.check(plan) == plan
    counts = [c for c, _ in plan["stages"]]
    rates = [lr for _, lr in plan["stages"]]
    assert sum(counts) == epochs and min(counts) >= 1
    assert rates[0] == 1e-3 and rates == sorted(rates, reverse=True)
    paper = {lr for _, lr in schedule.burda()["stages"]}
    assert set(rates) <= paper
    if epochs >= 8:
        assert len(counts) == 8
    # The short early stages keep the paper's epochs while they take at most half.
    if epochs >= 242:
        assert counts[:5] == [1, 3, 9, 27, 81]


def test_paper_command_trains_evaluates_and_resumes(mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["paper", "--model", "iwae", "--k", "2", "--out", str(out), "--data", str(mnist_dir)]
    common += ["--test-k", "3", "--no-progress", "--threads", "2"]
    assert main([*common, "--epochs", "2"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "iwae" and result["k"] == 2 and result["objective"] == "iwae"
    assert result["epochs"] == 2 and result["test_k"] == 3
    assert 50 < result["test_nll"] < 300 and 0 <= result["active_units"] <= 50
    for name in ("model.safetensors", "run.json", "metrics.jsonl", "loss_curve.png", "samples.png"):
        assert (out / name).stat().st_size > 0, name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]
    # Resuming a finished run trains nothing more and scores the same model the same way.
    assert main([*common, "--resume"]) == 0
    again = json.loads((out / "result.json").read_text())
    assert again["epochs"] == 2 and again["epochs_this_run"] == 0
    assert again["test_nll"] == result["test_nll"]


def test_paper_command_refuses_what_it_cannot_do(mnist_dir: Path, tmp_path: Path) -> None:
    base = ["paper", "--model", "vae", "--data", str(mnist_dir), "--out", str(tmp_path / "r")]
    assert main([*base, "--budget", "5", "--epochs", "3"]) == 2
    assert main([*base, "--resume"]) == 2
