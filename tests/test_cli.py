"""The command line as a user meets it: --help, --version, a short training run that writes
the model, metrics and pictures, resuming, and clear errors for bad flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastvae
from fastvae import VAE
from fastvae.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastvae", *args], capture_output=True, text=True, timeout=600
    )


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"fastvae {fastvae.__version__}"


def test_help_lists_every_flag() -> None:
    r = run_cli("train", "--help")
    assert r.returncode == 0
    for flag in [
        "--data",
        "--out",
        "--epochs",
        "--batch-size",
        "--lr",
        "--hidden-dims",
        "--latent-dim",
        "--activation",
        "--seed",
        "--threads",
        "--resume",
        "--no-progress",
    ]:
        assert flag in r.stdout


@pytest.mark.parametrize(
    "flags",
    [["--epochs", "0"], ["--lr", "-1"], ["--batch-size", "x"], ["--hidden-dims", "400,-3"]],
)
def test_bad_flags_are_rejected(flags: list[str], tmp_path: Path) -> None:
    r = run_cli("train", "--out", str(tmp_path), *flags)
    assert r.returncode == 2
    assert "error" in r.stderr
    assert not (tmp_path / "model.safetensors").exists()


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    r = run_cli("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr


def test_train_writes_model_metrics_pictures_and_resumes(mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["--data", str(mnist_dir), "--out", str(out), "--hidden-dims", "64", "--threads", "2"]
    common += ["--latent-dim", "8", "--no-progress", "--seed", "3"]
    assert main(["train", *common, "--epochs", "1"]) == 0
    for name in ["model.safetensors", "metrics.jsonl", "reconstructions.png", "samples.png"]:
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert rows[0]["test_loss"] < 200 and rows[0]["samples_per_sec"] > 0
    with Image.open(out / "samples.png") as img:
        assert img.mode == "L" and img.width == img.height
        pixels = np.asarray(img, dtype=np.float32)
    assert pixels.std() > 10  # not a blank picture
    with Image.open(out / "reconstructions.png") as img:
        assert img.height > img.width / 2

    # Resuming to 2 epochs equals training 2 epochs straight.
    assert main(["train", *common, "--epochs", "2", "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    straight = tmp_path / "straight"
    args = [*common[:3], str(straight), *common[4:], "--epochs", "2"]
    assert main(["train", *args]) == 0
    a = VAE.load(out / "model.safetensors").weights()
    b = VAE.load(straight / "model.safetensors").weights()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
