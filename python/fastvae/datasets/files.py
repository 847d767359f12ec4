"""Your own data: NumPy arrays (.npy, .npz), CSV tables of numbers and folders of images,
read into one matrix of rows with what the pictures need to know about it (image shape,
feature names, labels); the held-out split and the standardization of tabular features.

Not MNIST (mnist.py) and no training. Every problem with a file is a
:class:`fastvae.errors.DataError` naming the file and, where there is one, the row and column;
a bad argument is an :class:`fastvae.errors.InputError`.
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import DataError, InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "OwnData",
    "Standardizer",
    "load_array",
    "load_csv",
    "load_data",
    "load_image_folder",
    "split_rows",
]

#: File name endings read as images in a folder of images (case-insensitive).
IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
)
CSV_EXTENSIONS = (".csv", ".tsv", ".txt")
DEFAULT_IMAGE_SIZE = 28
# Larger images make a fully connected VAE's first layer impractically wide.
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True, eq=False)
class OwnData:
    """Rows of a data set as fastvae trains on them.

    Attributes
    ----------
    x : ndarray of shape (n, d)
        float32 for images (intensities in [0, 1] when read from 8-bit pixels), float64 for
        tables; every value finite.
    labels : ndarray of shape (n,) or None
        The label column of a table, or the class (subfolder name) of each image.
    kind : {"npy", "npz", "csv", "images"}
        The file type read.
    image_shape : (h, w, c) or None
        For images, the shape of each row (stored row by row, channels last; c is 1 or 3);
        None for tables.
    feature_names : list of str or None
        For tables, a name for each of the d columns of x: the CSV header's, else the column's
        index in the file.
    label_name : str or None
        The label column's name (or index), or "class" for folders of images.
    path : str
        The file or folder read.
    """

    x: NDArray[np.floating]
    labels: NDArray[Any] | None
    kind: str
    image_shape: tuple[int, int, int] | None
    feature_names: list[str] | None
    label_name: str | None
    path: str

    @property
    def tabular(self) -> bool:
        """True for tables (rows of features), False for images."""
        return self.image_shape is None


def load_data(
    path: str | os.PathLike[str],
    *,
    key: str | None = None,
    label_column: str | int | None = None,
    channels: int | None = None,
    image_size: int | None = None,
) -> OwnData:
    """Read a .npy or .npz array, a CSV table or a folder of images, by what ``path`` is.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npy`` or ``.npz`` file (see :func:`load_array`), a ``.csv``, ``.tsv`` or ``.txt``
        table (:func:`load_csv`) or a folder of images (:func:`load_image_folder`).
    key : str, optional
        The array of a ``.npz`` file holding several.
    label_column : str or int, optional
        A table's column of labels (name or 0-based index), taken out of the features.
    channels : {1, 3}, optional
        For folders of images: grayscale or RGB (default: RGB if any image is in colour).
    image_size : int, optional
        For folders of images: the side every image is resized to (default 28).

    Returns
    -------
    OwnData

    Raises
    ------
    DataError
        If the path does not exist, is of an unknown type, or its content cannot be used.
    InputError
        If an option does not apply to this kind of data, or is out of range.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        _only_for("a folder of images", key=key, label_column=label_column)
        return load_image_folder(p, channels=channels, image_size=image_size)
    _only_for("folders of images", invert=True, channels=channels, image_size=image_size)
    suffix = p.suffix.lower()
    if suffix in (".npy", ".npz"):
        if suffix == ".npy":
            _only_for("a .npy file", key=key)
        return load_array(p, key=key, label_column=label_column)
    if suffix in CSV_EXTENSIONS:
        _only_for("a CSV file", key=key)
        return load_csv(p, label_column=label_column)
    raise DataError(
        f"{p}: unknown kind of data file; expected a .npy or .npz array, a .csv table or a "
        "folder of images"
    )


def _only_for(what: str, invert: bool = False, **options: Any) -> None:
    """Reject the options given (not None) that do not apply to `what`."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        if invert:
            raise InputError(f"{given[0]} applies to {what} only")
        raise InputError(f"{given[0]} does not apply to {what}")


# -- arrays ----------------------------------------------------------------------------------


def load_array(
    path: str | os.PathLike[str], key: str | None = None, label_column: str | int | None = None
) -> OwnData:
    """Read a ``.npy`` array, or one array of a ``.npz`` file (``key``, needed when it holds
    several).

    A 2-D array (n, d) is a table of n rows; a 3-D array (n, h, w) holds grayscale images and
    a 4-D one (n, h, w, c) images with c = 1 or 3 channels, channels last. 8-bit images
    (uint8) are scaled to [0, 1]; other numbers are used as they are. ``label_column`` (an
    index) takes a column of a 2-D array out as labels.
    """
    p = Path(path)
    arr = _read_array(p, key)
    name = f"{p}" if key is None else f"{p}[{key!r}]"
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{name}: holds {arr.dtype} values, expected numbers")
    if arr.ndim not in (2, 3, 4):
        hint = "; for one feature per row, save x.reshape(-1, 1)" if arr.ndim == 1 else ""
        raise DataError(
            f"{name}: expected a 2-D table (n, d) or images (n, h, w) or (n, h, w, c), got "
            f"shape {arr.shape}{hint}"
        )
    if arr.ndim == 4 and arr.shape[3] not in (1, 3):
        raise DataError(
            f"{name}: 4-D arrays must be images (n, h, w, c) with c = 1 or 3 channels last, got "
            f"shape {arr.shape} (for channels first, save np.moveaxis(x, 1, -1))"
        )
    if arr.shape[0] == 0 or any(s == 0 for s in arr.shape[1:]):
        raise DataError(f"{name}: holds no values (shape {arr.shape})")
    kind = p.suffix.lower()[1:]
    if arr.ndim == 2:
        x = arr.astype(np.float64)
        _check_finite(x, name)
        names = [str(j) for j in range(x.shape[1])]
        x, labels, names, label_name = _take_label(x, names, label_column, name, header=False)
        return OwnData(x, labels, kind, None, names, label_name, str(p))
    _only_for("images", label_column=label_column)
    h, w = arr.shape[1], arr.shape[2]
    c = arr.shape[3] if arr.ndim == 4 else 1
    rows = arr.reshape(arr.shape[0], h * w * c)
    # 8-bit pixels as load_mnist and the image folders give them; any other type as it is.
    x = rows.astype(np.float32)
    if arr.dtype == np.uint8:
        x /= np.float32(255.0)
    _check_finite(x, name)
    return OwnData(x, None, kind, (h, w, c), None, None, str(p))


def _read_array(p: Path, key: str | None) -> NDArray[Any]:
    try:
        loaded = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{p}: not a readable NumPy file ({e})") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:  # an NpzFile
        keys = list(loaded.files)
        if not keys:
            raise DataError(f"{p}: holds no arrays")
        if key is None:
            if len(keys) > 1:
                raise DataError(
                    f"{p}: holds {len(keys)} arrays ({', '.join(keys)}); choose one with key "
                    "(--key on the command line)"
                )
            key = keys[0]
        if key not in keys:
            raise DataError(f"{p}: holds no array {key!r}; its arrays: {', '.join(keys)}")
        try:
            return loaded[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{p}[{key!r}]: not a readable array ({e})") from None


def _check_finite(x: NDArray[np.floating], name: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DataError(f"{name}: row {i}, column {j} is {x[i, j]} (values must be finite)")


def _take_label(
    x: NDArray[np.float64],
    names: list[str],
    label_column: str | int | None,
    where: str,
    header: bool,
) -> tuple[NDArray[np.float64], NDArray[Any] | None, list[str], str | None]:
    """Split a numeric table's label column off: (features, labels, feature names, label name)."""
    if label_column is None:
        return x, None, names, None
    j = _column_index(label_column, names, where, header)
    if x.shape[1] == 1:
        raise DataError(f"{where}: the label column is its only column; no features are left")
    labels = _tidy_labels(x[:, j])
    keep = [k for k in range(x.shape[1]) if k != j]
    return np.ascontiguousarray(x[:, keep]), labels, [names[k] for k in keep], names[j]


def _column_index(label_column: str | int, names: list[str], where: str, header: bool) -> int:
    """The 0-based index of a column named, or numbered (negative: from the end)."""
    d = len(names)
    if isinstance(label_column, str):
        if header and label_column in names:
            return names.index(label_column)
        try:
            j = int(label_column)
        except ValueError:
            if not header:
                raise DataError(
                    f"{where}: has no column names, so the label column must be a 0-based "
                    f"index, got {label_column!r}"
                ) from None
            raise DataError(
                f"{where}: no column named {label_column!r}; columns: {', '.join(names)}"
            ) from None
    else:
        j = int(label_column)
    if not -d <= j < d:
        raise DataError(f"{where}: label column {j} is out of range for {d} columns")
    return j % d


def _tidy_labels(values: NDArray[Any]) -> NDArray[Any]:
    """Integral numbers as int64 (so legends read 3, not 3.0); anything else as it is."""
    whole = values.dtype.kind == "f" and np.all(np.isfinite(values))
    if whole and np.all(values == np.round(values)):
        return values.astype(np.int64)
    return values


# -- CSV -------------------------------------------------------------------------------------


def load_csv(path: str | os.PathLike[str], label_column: str | int | None = None) -> OwnData:
    """Read a table of numbers, one row per line, with an optional header.

    The delimiter is a tab for ``.tsv`` files, else the most frequent of ``,``, ``;`` and tab
    on the first line, else runs of spaces (as ``np.savetxt`` writes). A first line holding
    text where the next line holds numbers is a header of column names. ``label_column`` (a
    name from the header or a 0-based index) is taken out of the features as labels, which may
    be text; every other cell must be a finite number.
    """
    p = Path(path)
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e})") from None
    first = text.lstrip("\r\n").split("\n", 1)[0]
    if p.suffix.lower() == ".tsv":
        delimiter = "\t"
    else:
        counts = {d: first.count(d) for d in (",", ";", "\t")}
        delimiter = max(counts, key=lambda d: counts[d]) if max(counts.values()) > 0 else ","
    if delimiter == "," and "," not in first and " " in first.strip():
        # Columns separated by runs of spaces, as np.savetxt writes them.
        delimiter = " "
        text = "\n".join(line.strip() for line in text.splitlines())
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=delimiter == " "
    )
    rows: list[list[str]] = []
    lines: list[int] = []  # the file's line number of each row, for messages
    try:
        for row in reader:
            if row and any(cell.strip() for cell in row):
                rows.append([cell.strip() for cell in row])
                lines.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{p}, line {reader.line_num}: {e}") from None
    if not rows:
        raise DataError(f"{p}: empty, no rows of numbers")
    width = len(rows[0])
    header = _has_header(rows)
    names = rows[0] if header else [str(j) for j in range(width)]
    names = [name or f"column {j}" for j, name in enumerate(names)]
    body, body_lines = (rows[1:], lines[1:]) if header else (rows, lines)
    if not body:
        raise DataError(f"{p}: holds a header but no rows of numbers")
    for row, line in zip(body, body_lines, strict=True):
        if len(row) != width:
            raise DataError(f"{p}, line {line}: {len(row)} cells, expected {width} as on line 1")
    label_j = None if label_column is None else _column_index(label_column, names, str(p), header)
    if label_j is not None and width == 1:
        raise DataError(f"{p}: the label column is its only column; no features are left")
    keep = [j for j in range(width) if j != label_j]
    cells = np.array(body, dtype=str)
    x = _parse_numbers(cells[:, keep], p, body_lines, [names[j] for j in keep], keep)
    labels = None
    if label_j is not None:
        raw = cells[:, label_j]
        try:
            labels = _tidy_labels(raw.astype(np.float64))
        except ValueError:
            labels = raw  # text labels, such as class names
    label_name = None if label_j is None else names[label_j]
    return OwnData(x, labels, "csv", None, [names[j] for j in keep], label_name, str(p))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _has_header(rows: list[list[str]]) -> bool:
    """A first row with text in a column that holds a number on the second row."""
    if len(rows) == 1:
        return not all(_is_number(c) for c in rows[0])
    return any(not _is_number(a) and _is_number(b) for a, b in zip(rows[0], rows[1], strict=False))


def _parse_numbers(
    cells: NDArray[np.str_], p: Path, lines: list[int], names: list[str], columns: list[int]
) -> NDArray[np.float64]:
    """The cells as float64; the first bad cell is named by line and column."""
    try:
        x = cells.astype(np.float64)
    except ValueError:
        x = None
    if x is not None and np.all(np.isfinite(x)):
        return x
    for i in range(cells.shape[0]):
        for k in range(cells.shape[1]):
            cell = str(cells[i, k])
            where = f"{p}, line {lines[i]}, column {columns[k] + 1} ({names[k]!r})"
            if cell == "":
                raise DataError(f"{where}: empty cell; every feature needs a number")
            try:
                v = float(cell)
            except ValueError:
                raise DataError(f"{where}: {cell!r} is not a number") from None
            if not np.isfinite(v):
                raise DataError(f"{where}: {cell!r} is not a finite number")
    raise AssertionError("unreachable: a bad cell was expected")  # pragma: no cover


# -- folders of images -----------------------------------------------------------------------


def load_image_folder(
    path: str | os.PathLike[str], channels: int | None = None, image_size: int | None = None
) -> OwnData:
    """Read every image of a folder, resized (stretched) to ``image_size`` x ``image_size``
    and scaled to [0, 1].

    Images directly in the folder are unlabelled; with subfolders of images instead (as
    torchvision's ImageFolder reads them: ``root/cat/1.png``, ``root/dog/2.jpg``), each image's
    label is the name of its subfolder. Files not ending in one of IMAGE_EXTENSIONS, and
    hidden files, are skipped. ``channels`` 1 gives grayscale and 3 RGB; by default RGB if any
    image is in colour (not every pixel gray).
    """
    if channels not in (None, 1, 3):
        raise InputError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise InputError(f"image_size must be an integer in [1, {MAX_IMAGE_SIZE}], got {size!r}")
    root = Path(path)
    files, labels = _image_files(root)
    pixels = np.empty((len(files), size, size, 3), dtype=np.uint8)
    colour = False
    for i, f in enumerate(files):
        pixels[i] = _read_image(f, size)
        colour = colour or not _gray(pixels[i])
    c = channels if channels is not None else (3 if colour else 1)
    if c == 1:
        # Pillow's RGB -> L weights (ITU-R 601-2 luma); exact for gray pixels.
        luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        pixels = np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    x = pixels.reshape(len(files), size * size * c).astype(np.float32) / np.float32(255.0)
    lab = np.array(labels) if labels is not None else None
    label_name = "class" if labels is not None else None
    return OwnData(x, lab, "images", (size, size, c), None, label_name, str(root))


def _visible(entries: Sequence[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _is_image(e: os.DirEntry[str]) -> bool:
    return e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[Path]:
    """Every image file in folder and its subfolders, in a fixed (sorted) order."""
    found = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(top) / name)
    return found


def _image_files(root: Path) -> tuple[list[Path], list[str] | None]:
    """The images of a folder and their class labels (None when there are no classes)."""
    with os.scandir(root) as it:
        entries = _visible(list(it))
    top = [Path(e.path) for e in entries if _is_image(e)]
    files: list[Path] = []
    labels: list[str] = []
    for e in entries:
        if e.is_dir():
            inside = _images_under(Path(e.path))
            files += inside
            labels += [e.name] * len(inside)
    if top and files:
        raise DataError(
            f"{root}: holds images both directly and in subfolders; with subfolders, each is "
            f"a class: move {top[0].name} and the other loose images into one"
        )
    if top:
        return top, None
    if not files:
        raise DataError(
            f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files, also in "
            "subfolders)"
        )
    return files, labels


def _read_image(f: Path, size: int) -> NDArray[np.uint8]:
    """One image as (size, size, 3) uint8 RGB."""
    from PIL import Image, ImageOps

    try:
        with Image.open(f) as opened:
            img: Image.Image = ImageOps.exif_transpose(opened)  # as the camera meant them
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                # 16-bit and float grayscale: to 8 bits by the type's range, not by clipping.
                top = 1.0 if img.mode == "F" else 65535.0
                gray = np.clip(np.asarray(img, dtype=np.float64) / top * 255.0 + 0.5, 0, 255)
                img = Image.fromarray(gray.astype(np.uint8))
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{f}: not a readable image ({e})") from None


def _gray(rgb: NDArray[np.uint8]) -> bool:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return bool(np.array_equal(r, g) and np.array_equal(g, b))


# -- held-out rows and standardization -------------------------------------------------------


def split_rows(
    n: int, fraction: float, seed: int = 0
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Row indices (train, held out): ``fraction`` of n rows chosen at random by ``seed``, at
    least one when fraction > 0; each part in increasing order, so the same arguments give
    the same split."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"the held-out fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0.0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if n < 2:
        raise DataError(f"{n} row(s): need at least 2 to hold some out for validation")
    n_val = min(n - 1, max(1, int(round(n * fraction))))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclass(frozen=True, eq=False)
class Standardizer:
    """Per-feature standardization (x - mean) / std, and back.

    A feature that is constant in the data it was fitted on keeps std 1, so it is only
    centered.
    """

    mean: NDArray[np.float64]
    std: NDArray[np.float64]

    @classmethod
    def fit(cls, x: NDArray[np.floating]) -> Standardizer:
        """The mean and standard deviation of each column of x (n, d)."""
        x64 = np.asarray(x, dtype=np.float64)
        mean = x64.mean(axis=0)
        std = x64.std(axis=0)
        return cls(mean, np.where(std > 0, std, 1.0))

    def transform(self, x: NDArray[np.floating]) -> NDArray[np.float32]:
        """Standardized rows, float32 as the model takes them."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def inverse(self, z: NDArray[np.floating]) -> NDArray[np.float64]:
        """Rows in the data's own units."""
        return np.asarray(z, dtype=np.float64) * self.std + self.mean

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: Any, width: int, where: str) -> Standardizer:
        """Read to_dict's output back, checked to have `width` finite values (std > 0)."""
        try:
            mean = np.asarray(d["mean"], dtype=np.float64)
            std = np.asarray(d["std"], dtype=np.float64)
        except (TypeError, KeyError, ValueError) as e:
            raise DataError(f"{where}: not a mean and std per feature ({e})") from None
        if mean.shape != (width,) or std.shape != (width,):
            raise DataError(
                f"{where}: expected {width} means and stds, got {mean.shape} and {std.shape}"
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise DataError(f"{where}: means must be finite and stds positive")
        return cls(mean, std)
