"""The command line as a user meets it: --help, --version, a short training run that writes
the model, metrics and pictures, resuming, and clear errors for bad flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy_vae as nv
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
        "--likelihood",
        "--no-standardize",
        "--val-split",
        "--beta",
        "--kl-warmup",
        "--patience",
        "--key",
        "--label-column",
        "--channels",
        "--image-size",
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
    assert rows[0]["val_loss"] < 200 and rows[0]["samples_per_sec"] > 0
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


# -- eval, sample, plot ------------------------------------------------------------------------

SUBCOMMAND_FLAGS = {
    "train": ["--binarize"],
    "eval": ["--data", "--k", "--binarize", "--limit", "--threads", "--seed", "--json"]
    + ["--no-progress", "--key", "--label-column", "--channels", "--image-size"],
    "sample": ["--n", "--seed", "--out", "--threads", "--draw"],
    "plot": ["--data", "--out", "--seed", "--threads", "--key", "--label-column"],
}


@pytest.mark.parametrize("command", sorted(SUBCOMMAND_FLAGS))
def test_subcommand_help_lists_every_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in SUBCOMMAND_FLAGS[command]:
        assert flag in text, flag
    if command != "train":
        assert "MODEL" in text


@pytest.fixture(scope="module")
def run2(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 784-32-2 model trained for one epoch by `fastvae train`: its output directory."""
    out = tmp_path_factory.mktemp("run2")
    args = ["train", "--data", str(mnist_dir), "--out", str(out), "--hidden-dims", "32"]
    args += ["--latent-dim", "2", "--epochs", "1", "--threads", "2", "--no-progress"]
    assert main(args) == 0
    return out


PICTURES = ["reconstructions.png", "samples.png", "latent_map.png", "interpolations.png"]


def test_latent_2_train_writes_latent_map_and_manifold(run2: Path) -> None:
    expected = ["model.safetensors", "metrics.jsonl", *PICTURES, "manifold.png", "loss_curve.png"]
    assert sorted(p.name for p in run2.iterdir()) == sorted(expected)  # no temporary files
    for name in ["latent_map.png", "manifold.png", "interpolations.png"]:
        with Image.open(run2 / name) as img:
            assert img.format == "PNG" and img.width > 400 and img.height > 400
            assert np.asarray(img.convert("L"), dtype=np.float32).std() > 10


def test_eval_prints_elbo_and_log_likelihood(
    run2: Path, mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(run2 / "model.safetensors")
    common = ["eval", model, "--data", str(mnist_dir), "--limit", "300", "--threads", "2"]
    assert main([*common, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "ELBO" in text and "300 images" in text and "importance" not in text

    assert main([*common, "--k", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 300 and result["k"] == 20 and result["binarize"] == "none"
    assert result["loss"] == pytest.approx(-result["elbo"])
    assert -250 < result["elbo"] < -100
    # The k-sample bound is tighter than the ELBO on average.
    assert result["log_likelihood"] > result["elbo"]
    vae = VAE.load(model)
    x = fastvae.datasets.load_mnist("test", root=mnist_dir)[0][:300]
    assert result["elbo"] == pytest.approx(float(vae.elbo(x, seed=0).mean()), rel=1e-12)
    assert result["log_likelihood"] == pytest.approx(
        float(vae.log_likelihood(x, k=20, seed=0).mean()), rel=1e-12
    )

    assert main([*common, "--json", "--binarize", "dynamic", "--seed", "5"]) == 0
    fixed = json.loads(capsys.readouterr().out)
    assert fixed["binarize"] == "dynamic" and fixed["log_likelihood"] is None
    xb = fastvae.datasets.binarize(fastvae.datasets.load_mnist("test", root=mnist_dir)[0])[:300]
    assert fixed["elbo"] == pytest.approx(float(vae.elbo(xb, seed=5).mean()), rel=1e-12)


def test_sample_writes_a_grid(run2: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.png"
    assert main(["sample", str(run2 / "model.safetensors"), "--n", "10", "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "L"
        assert img.size == ((4 * 30 + 2) * 2, (3 * 30 + 2) * 2)  # 3 x 4 grid of 28 px, 2x
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]
    r = run_cli("sample", str(run2 / "model.safetensors"), "--out", str(tmp_path / "s.jpg"))
    assert r.returncode == 2 and "fastvae: error: --out must name a .png file" in r.stderr


def test_plot_writes_every_picture(run2: Path, mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pics"
    model = str(run2 / "model.safetensors")
    assert main(["plot", model, "--data", str(mnist_dir), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([*PICTURES, "manifold.png", "loss_curve.png"])
    for name in names:
        with Image.open(out / name) as img:
            assert img.format == "PNG"
            assert np.asarray(img.convert("L"), dtype=np.float32).std() > 5, name


def test_plot_skips_the_loss_curve_without_history(
    run2: Path, mnist_dir: Path, tmp_path: Path
) -> None:
    """A model saved from set_weights has no history; latent_dim 3: no manifold."""
    vae = VAE(hidden_dims=(8,), latent_dim=3, threads=2)
    vae.set_weights(nv.init_weights(784, (8,), 3, np.random.default_rng(0)))
    model = tmp_path / "m.safetensors"
    vae.save(model)
    assert main(["plot", str(model), "--data", str(mnist_dir)]) == 0  # default --out: beside it
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["m.safetensors", *PICTURES])


@pytest.mark.parametrize("command", ["eval", "sample", "plot"])
def test_bad_model_file_is_a_clear_error(command: str, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"this is not a model file" * 10)
    for path, message in [(corrupt, "corrupt.safetensors"), (tmp_path / "missing", "no model")]:
        flags = ["--out", str(tmp_path / "s.png")] if command == "sample" else ["--data", "."]
        r = run_cli(command, str(path), *flags)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("fastvae: error: ") and message in r.stderr
        assert "Traceback" not in r.stderr


def test_train_with_dynamic_binarization(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--binarize dynamic trains on Bernoulli draws and reports the loss on the fixed
    binarized test set; eval scores that model on the same set unless told otherwise."""
    out = tmp_path / "bin"
    args = ["train", "--data", str(mnist_dir), "--out", str(out), "--hidden-dims", "16"]
    args += ["--latent-dim", "4", "--epochs", "1", "--threads", "2", "--no-progress"]
    assert main([*args, "--binarize", "dynamic"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text())
    vae = VAE.load(out / "model.safetensors")
    x_test = fastvae.datasets.load_mnist("test", root=mnist_dir)[0]
    fixed = fastvae.datasets.binarize(x_test)
    assert row["val_loss"] == pytest.approx(-float(vae.elbo(fixed).mean()), rel=1e-9)
    assert (out / "latent_map.png").exists() and not (out / "manifold.png").exists()

    # eval without --binarize follows the model's training setting; --binarize none overrides.
    model = str(out / "model.safetensors")
    common = ["eval", model, "--data", str(mnist_dir), "--limit", "200", "--json"]
    capsys.readouterr()
    assert main(common) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["binarize"] == "dynamic"
    assert result["elbo"] == pytest.approx(float(vae.elbo(fixed[:200]).mean()), rel=1e-12)
    assert main([*common, "--binarize", "none"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["binarize"] == "none"
    assert result["elbo"] == pytest.approx(float(vae.elbo(x_test[:200]).mean()), rel=1e-12)


def test_resume_continues_with_the_saved_training_settings(mnist_dir: Path, tmp_path: Path) -> None:
    # --resume without --binarize, --lr, --batch-size, --k or --objective continues as the
    # run was trained.
    common = ["--data", str(mnist_dir), "--hidden-dims", "32", "--latent-dim", "4"]
    common += ["--threads", "2", "--no-progress", "--seed", "1"]
    flags = ["--binarize", "dynamic", "--lr", "0.002", "--batch-size", "256"]
    flags += ["--k", "3", "--objective", "elbo"]
    out, straight = tmp_path / "run", tmp_path / "straight"
    assert main(["train", *common, "--out", str(out), "--epochs", "1", *flags]) == 0
    assert main(["train", *common, "--out", str(out), "--epochs", "2", "--resume"]) == 0
    assert main(["train", *common, "--out", str(straight), "--epochs", "2", *flags]) == 0
    a, b = VAE.load(out / "model.safetensors"), VAE.load(straight / "model.safetensors")
    saved = {k: a.fit_params_[k] for k in ("batch_size", "lr", "binarize", "k", "objective")}
    assert saved == {
        "batch_size": 256,
        "lr": 0.002,
        "binarize": "dynamic",
        "k": 3,
        "objective": "elbo",
    }
    for k, v in b.weights().items():
        np.testing.assert_array_equal(a.weights()[k], v, err_msg=k)
