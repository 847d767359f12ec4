"""The picture modules: image grids (fastvae.images), plots (fastvae.plots), the PCA
projection (fastvae.pca) and the set a model's run writes (fastvae.pictures). Each picture is a
valid, non-blank PNG, written atomically (nothing but the picture is left in the folder, also
when writing fails), and inputs that cannot be drawn are rejected."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fastvae import VAE, images, pca, pictures, plots


@pytest.fixture(scope="module")
def vae2(mnist: dict[str, np.ndarray]) -> VAE:
    """784-32-2, one epoch on 5000 MNIST images."""
    vae = VAE(hidden_dims=(32,), latent_dim=2, seed=0, threads=2)
    return vae.fit(
        mnist["x"][:5000], epochs=1, validation_data=mnist["x_test"][:500], progress=False
    )


@pytest.fixture(scope="module")
def vae3(mnist: dict[str, np.ndarray]) -> VAE:
    vae = VAE(hidden_dims=(16,), latent_dim=3, seed=0, threads=2)
    return vae.fit(mnist["x"][:1000], epochs=1, progress=False)


def open_png(path: Path) -> Image.Image:
    """The picture at path, checked to be a PNG, fully decoded."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img


def assert_not_blank(img: Image.Image, min_std: float = 10.0) -> None:
    pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert pixels.std() > min_std, f"picture looks blank (pixel std {pixels.std():.1f})"


def only(folder: Path, *names: str) -> None:
    """folder holds exactly these files: no temporary files left behind."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def test_image_grid_and_save_png(tmp_path: Path, mnist: dict[str, np.ndarray]) -> None:
    grid = images.image_grid(mnist["x_test"][:12], rows=3, cols=4, scale=2, pad=2)
    assert grid.mode == "L"
    assert grid.size == ((4 * 30 + 2) * 2, (3 * 30 + 2) * 2)
    images.save_png(grid, tmp_path / "g.png")
    img = open_png(tmp_path / "g.png")
    assert img.mode == "L" and img.size == grid.size
    assert_not_blank(img)
    only(tmp_path, "g.png")


@pytest.mark.parametrize(("n", "shape"), [(1, (1, 1)), (10, (3, 4)), (64, (8, 8)), (65, (8, 9))])
def test_grid_shape_is_square_ish(n: int, shape: tuple[int, int]) -> None:
    rows, cols = images.grid_shape(n)
    assert (rows, cols) == shape and rows * cols >= n


def test_reconstructions(tmp_path: Path, vae2: VAE, mnist: dict[str, np.ndarray]) -> None:
    x = mnist["x_test"][:20]
    img = images.reconstructions(x, vae2.reconstruct(x))
    images.save_png(img, tmp_path / "r.png")
    out = open_png(tmp_path / "r.png")
    assert out.mode == "L" and out.size == ((10 * 30 + 2) * 2, (4 * 30 + 2) * 2)
    assert_not_blank(out)


def test_loss_curve(tmp_path: Path) -> None:
    history = {"epoch": [1, 2, 3], "train_loss": [190.0, 170.0, 165.0], "val_loss": [None] * 3}
    plots.loss_curve(history, tmp_path / "loss.png")
    history["val_loss"] = [180.0, 168.0, 164.0]
    plots.loss_curve(history, tmp_path / "loss2.png")
    for name in ("loss.png", "loss2.png"):
        img = open_png(tmp_path / name)
        assert img.width > 300 and img.height > 200
        assert_not_blank(img, 5.0)
    only(tmp_path, "loss.png", "loss2.png")


def clusters(n: int, zdim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points in zdim dimensions around 10 class centres, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    centres = rng.normal(0, 3, (10, zdim))
    return centres[labels] + rng.normal(0, 0.5, (n, zdim)), labels


@pytest.mark.parametrize("zdim", [1, 2, 20])
def test_latent_map(tmp_path: Path, zdim: int) -> None:
    means, labels = clusters(2000, zdim)
    plots.latent_map(means, labels, tmp_path / "map.png")
    img = open_png(tmp_path / "map.png")
    assert img.mode == "RGBA" and img.width > 500 and img.height > 400
    assert_not_blank(img, 5.0)
    # The ten classes are drawn in ten distinct colours.
    rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)
    saturated = rgb[(rgb.max(axis=1).astype(int) - rgb.min(axis=1)) > 60]
    assert len(np.unique(saturated // 32, axis=0)) >= 10
    only(tmp_path, "map.png")


def test_latent_map_of_a_model_and_without_labels(
    tmp_path: Path, vae2: VAE, mnist: dict[str, np.ndarray]
) -> None:
    mu = vae2.transform(mnist["x_test"][:3000])
    plots.latent_map(mu, mnist["y_test"][:3000], tmp_path / "a.png", title="custom title")
    plots.latent_map(mu, None, tmp_path / "b.png")
    plots.latent_map(mu[:, :1], None, tmp_path / "c.png")
    for name in ("a.png", "b.png", "c.png"):
        assert_not_blank(open_png(tmp_path / name), 5.0)


def test_pca_projection() -> None:
    """Points on a 2-D plane inside 20-D space: two components explain all the variance, and
    the projection keeps the distances between points."""
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(20, 2)))
    coords = rng.normal(size=(300, 2)) * [3.0, 1.0]
    points = coords @ basis.T + 5.0
    proj, explained = pca.pca_2d(points)
    assert explained.sum() == pytest.approx(1.0)
    assert explained[0] > explained[1] > 0.05
    np.testing.assert_allclose(proj.mean(axis=0), 0.0, atol=1e-9)
    d_proj = np.linalg.norm(proj[:, None] - proj[None], axis=-1)
    d_orig = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.testing.assert_allclose(d_proj, d_orig, atol=1e-8)


@pytest.mark.parametrize(
    ("means", "labels"),
    [
        (np.zeros((0, 2)), np.zeros(0)),
        (np.zeros(5), np.zeros(5)),
        (np.zeros((5, 2)), np.zeros(4)),
        (np.full((5, 2), np.nan), np.zeros(5)),
    ],
)
def test_latent_map_rejects_bad_input(tmp_path: Path, means: Any, labels: Any) -> None:
    with pytest.raises(ValueError):
        plots.latent_map(means, labels, tmp_path / "x.png")
    only(tmp_path)


def test_manifold(tmp_path: Path, vae2: VAE) -> None:
    plots.manifold(vae2, tmp_path / "m.png", n=12)
    img = open_png(tmp_path / "m.png")
    assert img.width > 12 * 28 * 2 and img.height > 12 * 28 * 2  # digits shown 2x, plus axes
    assert_not_blank(img)
    only(tmp_path, "m.png")


def test_manifold_needs_a_2d_latent_space(tmp_path: Path, vae3: VAE) -> None:
    with pytest.raises(ValueError, match="latent_dim == 2"):
        plots.manifold(vae3, tmp_path / "m.png")
    only(tmp_path)


@pytest.mark.parametrize("kwargs", [{"n": 1}, {"span": (0.0, 0.9)}, {"span": (0.6, 0.4)}])
def test_manifold_rejects_bad_grid(tmp_path: Path, vae2: VAE, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        plots.manifold(vae2, tmp_path / "m.png", **kwargs)


def test_interpolations(tmp_path: Path, vae2: VAE, mnist: dict[str, np.ndarray]) -> None:
    x, y = mnist["x_test"], mnist["y_test"]
    pairs = np.stack([x[:5], x[5:10]], axis=1)
    labels = np.stack([y[:5], y[5:10]], axis=1)
    plots.interpolations(vae2, pairs, tmp_path / "i.png", steps=8, labels=labels)
    plots.interpolations(vae2, pairs[:1], tmp_path / "j.png", steps=2)
    img = open_png(tmp_path / "i.png")
    assert img.width > 10 * 28 * 2 and img.height > 5 * 28 * 2
    assert_not_blank(img)
    assert_not_blank(open_png(tmp_path / "j.png"))
    only(tmp_path, "i.png", "j.png")


@pytest.mark.parametrize(
    ("pairs_shape", "steps"),
    [((4, 784), 10), ((3, 3, 784), 10), ((0, 2, 784), 10), ((2, 2, 784), 1)],
)
def test_interpolations_rejects_bad_input(
    tmp_path: Path, vae2: VAE, pairs_shape: tuple[int, ...], steps: int
) -> None:
    with pytest.raises(ValueError):
        plots.interpolations(vae2, np.zeros(pairs_shape, np.float32), tmp_path / "i.png", steps)
    only(tmp_path)


def test_write_pictures(tmp_path: Path, vae2: VAE, vae3: VAE, mnist: dict[str, np.ndarray]) -> None:
    x, y = mnist["x_test"][:2000], mnist["y_test"][:2000]
    every = ["reconstructions.png", "samples.png", "latent_map.png", "interpolations.png"]
    (tmp_path / "two").mkdir()
    names = pictures.write_pictures(vae2, x, y, tmp_path / "two", seed=1)
    assert names == [*every, "manifold.png", "loss_curve.png"]
    only(tmp_path / "two", *names)
    for name in names:
        assert_not_blank(open_png(tmp_path / "two" / name), 5.0)
    with open_png(tmp_path / "two" / "samples.png") as img:
        assert img.mode == "L" and img.width == img.height

    # latent_dim 3: no manifold. Weights set directly: no history, so no loss curve.
    fresh = VAE(hidden_dims=(16,), latent_dim=3, threads=2).set_weights(vae3.weights())
    (tmp_path / "three").mkdir()
    names = pictures.write_pictures(fresh, x, None, tmp_path / "three")
    assert names == every
    only(tmp_path / "three", *every)


class _FailingImage:
    def save(self, f: Any, format: str) -> None:
        f.write(b"\x89PNG partial")
        raise OSError("disk full")


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        images.save_png(_FailingImage(), target)  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"  # the old picture is untouched
    only(tmp_path, "keep.png")


# -- images of any shape, and tables ---------------------------------------------------------


def test_rgb_grid_of_non_square_images(tmp_path: Path) -> None:
    """Rows of 6 x 5 RGB pixels (channels last): each cell shows its image's colours."""
    rows = np.zeros((6, 6, 5, 3), np.float32)
    for k in range(6):
        rows[k, ..., k % 3] = 1.0  # red, green, blue, red, ...
    grid = images.image_grid(rows.reshape(6, -1), 2, 3, scale=3, pad=2, shape=(6, 5, 3))
    assert grid.mode == "RGB" and grid.size == ((3 * 7 + 2) * 3, (2 * 8 + 2) * 3)
    pixels = np.asarray(grid)
    for k in range(6):
        r, c = divmod(k, 3)
        y, x = (2 + r * 8 + 3) * 3, (2 + c * 7 + 2) * 3  # a pixel inside cell k
        expected = [0, 0, 0]
        expected[k % 3] = 255
        assert pixels[y, x].tolist() == expected, k
    assert images.image_grid(rows[:, ..., 0].reshape(6, -1), 1, 6, shape=(6, 5)).mode == "L"
    with pytest.raises(ValueError, match="not images of shape"):
        images.grid_canvas(rows.reshape(6, -1), 2, 3, 2, shape=(5, 5, 3))
    assert images.display_scale((28, 28)) == 2 and images.display_scale((100, 60, 3)) == 1


@pytest.fixture(scope="module")
def rgb_vae() -> tuple[VAE, np.ndarray]:
    """A 2-D latent model of 40 random 7 x 6 RGB images, and the images."""
    x = np.random.default_rng(0).random((40, 7 * 6 * 3)).astype(np.float32)
    vae = VAE(hidden_dims=(8,), latent_dim=2, threads=1).fit(x, epochs=1, progress=False)
    return vae, x


def test_write_pictures_of_rgb_images(tmp_path: Path, rgb_vae: tuple[VAE, np.ndarray]) -> None:
    vae, x = rgb_vae
    labels = np.array(["cat", "dog"] * 20)
    names = pictures.write_pictures(
        vae, x, labels, tmp_path, image_shape=(7, 6, 3), label_name="class", val_label="val"
    )
    assert names == [
        "reconstructions.png",
        "samples.png",
        "latent_map.png",
        "interpolations.png",
        "manifold.png",
        "loss_curve.png",
    ]
    only(tmp_path, *names)
    scale = images.display_scale((7, 6))
    with open_png(tmp_path / "reconstructions.png") as img:
        assert img.mode == "RGB" and img.size == ((10 * 8 + 2) * scale, (8 * 9 + 2) * scale)
    with open_png(tmp_path / "samples.png") as img:
        assert img.mode == "RGB" and img.size == ((8 * 8 + 2) * scale, (8 * 9 + 2) * scale)
    for name in ("interpolations.png", "manifold.png"):
        assert_not_blank(open_png(tmp_path / name), 5.0)


def test_interpolation_pairs_of_named_classes() -> None:
    labels = np.array(["a", "b", "c", "a", "b", "c"])
    pairs = pictures._pair_indices(labels, len(labels))
    assert [(labels[i], labels[j]) for i, j in pairs] == [("a", "b"), ("b", "c"), ("c", "a")]
    assert len({i for pair in pairs for i in pair}) == 6  # every image used once


def test_write_table_pictures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    vae = VAE(hidden_dims=(8,), latent_dim=2, threads=1, likelihood="gaussian")
    vae.fit(x, epochs=1, progress=False)
    mean, std = np.array([1.0, 2.0, 3.0]), np.array([1.0, 10.0, 100.0])
    names, errors = pictures.write_table_pictures(
        vae, x, None, tmp_path, feature_names=["a", "b", "c,d"], mean=mean, std=std
    )
    assert names == ["loss_curve.png", "latent_map.png", "feature_errors.csv", "feature_errors.png"]
    only(tmp_path, *names)
    lines = (tmp_path / "feature_errors.csv").read_text().splitlines()
    assert lines[0] == "feature,mse,mse_over_variance,sd" and lines[3].startswith('"c,d",')
    # In the data's units: the errors scale with std squared, the relative ones do not.
    raw = pictures.feature_errors(vae, x)
    np.testing.assert_allclose(errors.mse, raw.mse * std**2, rtol=1e-6)
    np.testing.assert_allclose(errors.relative, raw.relative, rtol=1e-6)
    assert errors.sd is not None and raw.sd is not None
    np.testing.assert_allclose(errors.sd, raw.sd * std, rtol=1e-6)
    assert sorted(errors.worst(3)) == [0, 1, 2]
    assert_not_blank(open_png(tmp_path / "feature_errors.png"), 5.0)
