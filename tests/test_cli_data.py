"""`fastvae train --data PATH` on your own data, as a user meets it: .npy and .npz arrays, CSV
tables (with and without a header, with a label column) and folders of images (grayscale and
RGB, with class subfolders), each trained end to end on tiny synthetic data, with its pictures,
its record of the data, resuming, eval, plot and sample; and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvae import VAE, images
from fastvae.cli import main

TINY = ["--hidden-dims", "16", "--latent-dim", "2", "--threads", "1", "--no-progress"]


def train(data: Path | str, out: Path, *flags: str, epochs: int = 1) -> int:
    return main(
        ["train", "--data", str(data), "--out", str(out), *TINY, "--epochs", str(epochs), *flags]
    )


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def table(n: int = 120, d: int = 4, seed: int = 0) -> np.ndarray:
    """Rows on a noisy line, with features of very different scales."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n, 1))
    x = t * np.arange(1, d + 1) + 0.1 * rng.normal(size=(n, d))
    return x * np.logspace(-2, 3, d)


def write_csv(path: Path, rows: list[list[object]], header: list[str] | None = None) -> Path:
    lines = [] if header is None else [",".join(header)]
    lines += [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def image_folder(
    root: Path, mode: str, classes: tuple[str, ...] = ("a", "b"), per: int = 10
) -> Path:
    """Small images of varied sizes (all resized on reading), one subfolder per class."""
    rng = np.random.default_rng(1)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per):
            h, w = 10 + i % 3, 12 - i % 2
            pixels = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            pixels[2:6, 2 + 4 * k : 6 + 4 * k] = (230, 60, 30) if mode == "RGB" else 230
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i}.png")
    return root


def grid_size(n: int, cols: int, shape: tuple[int, int, int]) -> tuple[int, int]:
    """The (width, height) of an image grid of n images in `cols` columns, as drawn."""
    h, w, _ = shape
    rows = -(-n // cols)
    scale = images.display_scale(shape)
    return (cols * (w + 2) + 2) * scale, (rows * (h + 2) + 2) * scale


# -- tables ------------------------------------------------------------------------------------


def test_npy_table_is_standardized_and_gets_table_pictures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = table()
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "run"
    assert train(tmp_path / "x.npy", out, epochs=2) == 0
    text = capsys.readouterr().out
    assert "worst reconstructed features" in text and "Gaussian NLL + KL" in text
    expected = ["data.json", "feature_errors.csv", "feature_errors.png", "latent_map.png"]
    expected += ["loss_curve.png", "metrics.jsonl", "model.safetensors", "scaler.json"]
    assert files(out) == expected

    record = json.loads((out / "data.json").read_text())
    assert record["kind"] == "npy" and record["likelihood"] == "gaussian"
    assert record["standardize"] is True and record["rows"] == 120 and record["val_split"] == 0.1
    assert record["image_shape"] is None and record["features"] == ["0", "1", "2", "3"]
    # Standardized over the 108 training rows (12 held out).
    scaler = json.loads((out / "scaler.json").read_text())
    assert np.all(np.asarray(scaler["std"]) > 0)
    assert np.asarray(scaler["std"])[3] / np.asarray(scaler["std"])[0] > 1e4
    vae = VAE.load(out / "model.safetensors")
    assert vae.likelihood == "gaussian" and vae.input_dim == 4

    lines = (out / "feature_errors.csv").read_text().splitlines()
    assert lines[0] == "feature,mse,mse_over_variance,sd" and len(lines) == 5
    # The learned sd is reported in the data's units: the last feature's is the largest.
    sd = [float(line.split(",")[3]) for line in lines[1:]]
    assert sd[3] > 100 * sd[0]
    with Image.open(out / "feature_errors.png") as img:
        assert img.width > 300 and img.height > 100

    # eval scores the 12 held-out rows, in standardized units.
    capsys.readouterr()
    assert main(["eval", str(out / "model.safetensors"), "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 12 and result["split"] == "validation"
    assert result["standardized"] is True and result["likelihood"] == "gaussian"
    assert np.isfinite(result["elbo"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_loss"] == pytest.approx(-result["elbo"], rel=1e-9)
    assert metrics[-1]["beta"] == 1.0

    # sample writes rows in the data's own units, never a picture.
    rows = tmp_path / "rows.csv"
    assert main(["sample", str(out / "model.safetensors"), "--n", "5", "--out", str(rows)]) == 0
    lines = rows.read_text().splitlines()
    assert lines[0] == "0,1,2,3" and len(lines) == 6
    assert main(["sample", str(out / "model.safetensors"), "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (64, 4)
    assert main(["sample", str(out / "model.safetensors"), "--out", str(tmp_path / "s.png")]) == 2
    assert "--out FILE.csv" in capsys.readouterr().err


def test_csv_with_header_and_text_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = table(90, 3)
    species = ["setosa", "versicolor", "virginica"]
    rows = [[f"{a:.4f}", species[i % 3], f"{b:.4f}", f"{c:.4f}"] for i, (a, b, c) in enumerate(x)]
    csv = write_csv(tmp_path / "t.csv", rows, ["length", "species", "width", "depth"])
    out = tmp_path / "run"
    assert train(csv, out, "--label-column", "species") == 0
    record = json.loads((out / "data.json").read_text())
    assert record["features"] == ["length", "width", "depth"]
    assert record["label_column"] == "species" and record["label_name"] == "species"
    assert VAE.load(out / "model.safetensors").input_dim == 3
    names = [line.split(",")[0] for line in (out / "feature_errors.csv").read_text().splitlines()]
    assert names == ["feature", "length", "width", "depth"]
    with Image.open(out / "latent_map.png") as img:
        # Three classes in three colours.
        rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)
    saturated = rgb[(rgb.max(axis=1).astype(int) - rgb.min(axis=1)) > 60]
    assert len(np.unique(saturated // 64, axis=0)) >= 3

    # plot redraws the same set for a model of a table, from the recorded data.
    pics = tmp_path / "pics"
    assert main(["plot", str(out / "model.safetensors"), "--out", str(pics)]) == 0
    assert files(pics) == [
        "feature_errors.csv",
        "feature_errors.png",
        "latent_map.png",
        "loss_curve.png",
    ]
    assert (pics / "feature_errors.csv").read_text() == (out / "feature_errors.csv").read_text()


def test_csv_without_header_label_by_index_and_bernoulli(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = [[int(rng.integers(0, 3))] + [f"{v:.3f}" for v in rng.random(5)] for _ in range(60)]
    csv = write_csv(tmp_path / "u.csv", rows)
    out = tmp_path / "run"
    assert train(csv, out, "--label-column", "0", "--likelihood", "bernoulli") == 0
    record = json.loads((out / "data.json").read_text())
    assert record["features"] == ["1", "2", "3", "4", "5"] and record["label_name"] == "0"
    assert record["likelihood"] == "bernoulli" and record["standardize"] is False
    assert not (out / "scaler.json").exists()
    lines = (out / "feature_errors.csv").read_text().splitlines()
    assert lines[0] == "feature,mse,mse_over_variance"  # no learned sd for Bernoulli


def test_resume_on_own_data_equals_straight_training(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", table(100, 3))
    flags = ["--seed", "4", "--batch-size", "16", "--beta", "0.5", "--kl-warmup", "2"]
    out, straight = tmp_path / "run", tmp_path / "straight"
    assert train(tmp_path / "x.npy", out, *flags, epochs=1) == 0
    # --data, --beta and --kl-warmup come from the run's files.
    assert main(["train", "--out", str(out), *TINY, "--epochs", "3", "--resume"]) == 0
    assert train(tmp_path / "x.npy", straight, *flags, epochs=3) == 0
    a = VAE.load(out / "model.safetensors")
    b = VAE.load(straight / "model.safetensors")
    assert a.history_["beta"] == b.history_["beta"] == [0.25, 0.5, 0.5]
    for k, v in b.weights().items():
        np.testing.assert_array_equal(a.weights()[k], v, err_msg=k)
    assert (out / "scaler.json").read_text() == (straight / "scaler.json").read_text()


def test_patience_stops_and_keeps_the_best_weights(tmp_path: Path) -> None:
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).normal(size=(60, 3)))
    out = tmp_path / "run"
    flags = ["--patience", "2", "--lr", "0.05", "--batch-size", "8"]
    assert train(tmp_path / "noise.npy", out, *flags, epochs=40) == 0
    vae = VAE.load(out / "model.safetensors")
    losses = vae.history_["val_loss"]
    assert len(losses) < 40
    best = int(np.argmin(losses))
    assert len(losses) - 1 - best == 2
    kept = VAE.load(out / "best.safetensors").weights()
    for k, v in kept.items():
        np.testing.assert_array_equal(vae.weights()[k], v, err_msg=k)


# -- arrays of images and folders of images --------------------------------------------------


def test_npz_images_need_a_key_when_there_are_several(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (50, 6, 5), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=pixels, labels=np.arange(50))
    out = tmp_path / "run"
    assert train(tmp_path / "d.npz", out) == 2
    assert "choose one with key" in capsys.readouterr().err
    assert train(tmp_path / "d.npz", out, "--key", "images", "--val-split", "0.2") == 0
    record = json.loads((out / "data.json").read_text())
    assert record["kind"] == "npz" and record["image_shape"] == [6, 5, 1]
    assert record["likelihood"] == "bernoulli"
    assert "reconstructions.png" in files(out) and "manifold.png" in files(out)
    with Image.open(out / "reconstructions.png") as img:
        # 10 held-out images over their reconstructions: 2 rows of 10.
        assert img.mode == "L" and img.size == grid_size(20, 10, (6, 5, 1))
    with Image.open(out / "samples.png") as img:
        assert img.size == grid_size(64, 8, (6, 5, 1))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_image_folder_with_classes(
    tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = image_folder(tmp_path / "imgs", mode)
    out = tmp_path / "run"
    assert train(root, out, "--image-size", "8", "--val-split", "0.2") == 0
    c = 3 if mode == "RGB" else 1
    record = json.loads((out / "data.json").read_text())
    assert record["kind"] == "images" and record["image_shape"] == [8, 8, c]
    assert record["channels"] == c and record["label_name"] == "class"
    every = ["interpolations.png", "latent_map.png", "loss_curve.png", "manifold.png"]
    every += ["reconstructions.png", "samples.png"]
    assert files(out) == sorted(["data.json", "metrics.jsonl", "model.safetensors", *every])
    with Image.open(out / "reconstructions.png") as img:
        # 4 held-out images (of 20) over their reconstructions.
        assert img.mode == mode and img.size == grid_size(8, 4, (8, 8, c))
    with Image.open(out / "samples.png") as img:
        assert img.mode == mode and img.size == grid_size(64, 8, (8, 8, c))
    for name in ["interpolations.png", "manifold.png", "latent_map.png"]:
        with Image.open(out / name) as img:
            assert img.width > 300 and img.height > 150, name

    # eval, sample and plot read the folder as it was read for training.
    capsys.readouterr()
    model = str(out / "model.safetensors")
    assert main(["eval", model, "--threads", "1", "--no-progress"]) == 0
    assert "4 images" in capsys.readouterr().out
    assert main(["sample", model, "--n", "6", "--out", str(tmp_path / "s.png")]) == 0
    with Image.open(tmp_path / "s.png") as img:
        assert img.mode == mode and img.size == grid_size(6, 3, (8, 8, c))
    assert main(["plot", model, "--out", str(tmp_path / "pics")]) == 0
    assert files(tmp_path / "pics") == sorted(every)


def test_channels_flag_reads_colour_as_gray(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs", "RGB")
    out = tmp_path / "run"
    assert train(root, out, "--image-size", "8", "--channels", "1") == 0
    assert json.loads((out / "data.json").read_text())["image_shape"] == [8, 8, 1]
    assert VAE.load(out / "model.safetensors").input_dim == 64


# -- bad input -------------------------------------------------------------------------------


def _file(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    return make


def _header_only(folder: Path) -> Path:
    return write_csv(folder / "h.csv", [], ["a", "b"])


def _bad_csv(folder: Path) -> Path:
    return write_csv(folder / "bad.csv", [[1, 2], [3, "oops"], [5, 6]], ["a", "b"])


def _corrupt_image(folder: Path) -> Path:
    root = image_folder(folder / "imgs", "L", per=3)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _no_images(folder: Path) -> Path:
    (folder / "docs").mkdir()
    (folder / "docs" / "notes.md").write_text("no pictures here")
    return folder / "docs"


def _empty_folder(folder: Path) -> Path:
    (folder / "photos").mkdir()
    return folder / "photos"


def _out_of_range(folder: Path) -> Path:
    np.save(folder / "big.npy", np.array([[0.5, 0.2], [0.1, 3.0]]))
    return folder / "big.npy"


@pytest.mark.parametrize(
    ("make", "flags", "message"),
    [
        (lambda p: p / "missing.csv", [], "missing.csv: no such file or folder"),
        (_file("e.csv", b""), [], "e.csv: empty, no rows of numbers"),
        (_header_only, [], "h.csv: holds a header but no rows"),
        (_bad_csv, [], "bad.csv, line 3, column 2 ('b'): 'oops' is not a number"),
        (_bad_csv, ["--label-column", "nope"], "no column named 'nope'"),
        (_file("ragged.csv", b"1,2\n3\n"), [], "ragged.csv, line 2: 1 cells, expected 2"),
        (_corrupt_image, [], "broken.png: not a readable image"),
        (_no_images, [], "docs: no images found"),
        (_empty_folder, [], "photos: no images found"),
        (_file("d.parquet", b"x"), [], "d.parquet: unknown kind of data file"),
        (_file("d.npy", b"not numpy"), [], "d.npy: not a readable NumPy file"),
        (_out_of_range, ["--likelihood", "bernoulli"], "is 3 (the values range from 0.1 to 3); "),
        (_out_of_range, ["--likelihood", "bernoulli"], "use --likelihood gaussian"),
        (_out_of_range, ["--key", "x"], "key does not apply to a .npy file"),
        (_out_of_range, ["--binarize", "dynamic"], "needs --likelihood bernoulli"),
        (_out_of_range, ["--val-split", "0", "--patience", "2"], "needs --val-split > 0"),
    ],
)
def test_bad_input_is_a_clear_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], Path],
    flags: list[str],
    message: str,
) -> None:
    path = make(tmp_path)
    out = tmp_path / "run"
    assert train(path, out, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastvae: error: ") and message in err, err
    assert "Traceback" not in err and "--data DIR names the folder" not in err
    assert not (out / "model.safetensors").exists()


def test_bad_input_exits_without_a_traceback(tmp_path: Path) -> None:
    """As a user runs it: a separate process, exit status 2, one line of error."""
    np.save(tmp_path / "nan.npy", np.array([[0.5, np.nan]]))
    r = subprocess.run(
        [sys.executable, "-m", "fastvae", "train", "--data", str(tmp_path / "nan.npy")]
        + ["--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    message = "row 0, column 1 is nan (values must be finite)"
    assert r.stderr == f"fastvae: error: {tmp_path / 'nan.npy'}: {message}\n"


def test_resume_cannot_change_the_held_out_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "x.npy", table(40, 2))
    out = tmp_path / "run"
    assert train(tmp_path / "x.npy", out) == 0
    assert train(tmp_path / "x.npy", out, "--resume", "--val-split", "0.3", epochs=2) == 2
    assert "would train on rows it validated on" in capsys.readouterr().err


# -- reading tables --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label", "names", "labels"),
    [
        ("a,b\n1,2\n3,4\n", None, ["a", "b"], None),  # header
        ("1,2\n3,4\n", None, ["0", "1"], None),  # none
        ("5.1,setosa\n6.2,virginica\n", "1", ["0"], ["setosa", "virginica"]),  # text labels
        ("x;y;k\n1.5;2;0\n3;4;1\n", "k", ["x", "y"], [0, 1]),  # ; delimiter, labels as ints
        ("  1.0   2.0\n 3.0  4.0\n", None, ["0", "1"], None),  # spaces, as np.savetxt writes
        ('"a","b"\n"1","2"\n\n3,4\n', None, ["a", "b"], None),  # quotes, a blank line
    ],
)
def test_csv_layouts(
    tmp_path: Path, text: str, label: str | None, names: list[str], labels: list[object] | None
) -> None:
    from fastvae.datasets import load_csv

    (tmp_path / "t.csv").write_text(text)
    data = load_csv(tmp_path / "t.csv", label_column=label)
    assert data.feature_names == names and data.x.dtype == np.float64
    assert data.x.shape == (2, len(names))
    assert (data.labels is None) == (labels is None)
    if labels is not None:
        assert data.labels is not None and data.labels.tolist() == labels
