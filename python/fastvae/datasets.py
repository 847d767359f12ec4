"""Dataset loading for fastvae: MNIST and other IDX-format datasets.

This module reads the IDX file format used by MNIST, Fashion-MNIST, KMNIST
and similar datasets, and provides :func:`load_mnist`, which finds, verifies
and (optionally) downloads the four MNIST files.

All functions are pure Python + NumPy.  Every problem with the *content* of a
data file (bad header, truncated or over-long payload, corrupt gzip stream,
checksum mismatch, failed download) is reported as
:class:`fastvae.errors.DataError`, a :class:`ValueError` subclass.

Where MNIST is looked for, in order:

1. the ``root`` argument of :func:`load_mnist`;
2. the ``FASTVAE_DATA`` environment variable;
3. ``$XDG_CACHE_HOME/fastvae/mnist`` (or ``~/.cache/fastvae/mnist``).

Each file may be stored gzip-compressed (``train-images-idx3-ubyte.gz``) or
uncompressed (``train-images-idx3-ubyte``).  Downloads try the mirrors in
order; set ``FASTVAE_MNIST_MIRRORS`` to a comma-separated list of base URLs to
override them.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import math
import os
import struct
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

import numpy as np

from .errors import DataError, InputError

__all__ = ["binarize", "load_idx_dataset", "load_mnist", "read_idx"]

_log = logging.getLogger(__name__)

#: IDX data type codes (third byte of the magic number), all big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_DTYPE_NAMES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
#: Longest possible IDX header: 4-byte magic + 255 four-byte dimensions.
_MAX_HEADER = 4 + 4 * 255
#: How far past the expected end we keep reading just to count extra bytes
#: (or hash them) for an error message.
_OVERRUN_LIMIT = 64 << 20
#: Refuse to download more than this from one URL.
_MAX_DOWNLOAD_BYTES = 512 << 20
_DOWNLOAD_TIMEOUT = 60.0

#: Uncompressed file name -> (SHA256 of the uncompressed content, size in bytes).
_MNIST_FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        47_040_016,
    ),
    "train-labels-idx1-ubyte": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        60_008,
    ),
    "t10k-images-idx3-ubyte": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        7_840_016,
    ),
    "t10k-labels-idx1-ubyte": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        10_008,
    ),
}

#: split -> (images file, labels file), uncompressed names.
_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_DEFAULT_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_OFFLINE_HINT = (
    "For offline use, put the files in a directory and pass root=... "
    "or set the FASTVAE_DATA environment variable to it."
)


# --------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------


class _Reader(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _IdxHeader(NamedTuple):
    dtype: np.dtype
    dtype_name: str
    shape: tuple[int, ...]
    header_len: int
    payload_len: int


def _read_exact(stream: _Reader, n: int) -> bytes:
    """Read up to ``n`` bytes, fewer only at end of stream."""
    parts = []
    remaining = n
    while remaining > 0:
        chunk = stream.read(min(remaining, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def _parse_header(stream: _Reader, label: str) -> _IdxHeader:
    """Read and validate an IDX header from the start of ``stream``."""
    magic = _read_exact(stream, 4)
    if len(magic) < 4:
        what = "file is empty" if not magic else f"only {len(magic)} byte(s)"
        raise DataError(f"{label}: truncated IDX header: {what}, expected a 4-byte magic number")
    if magic[0] != 0 or magic[1] != 0:
        raise DataError(
            f"{label}: not an IDX file: magic number 0x{magic.hex()} must start with two zero bytes"
        )
    code, ndim = magic[2], magic[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X} {n}" for c, n in _IDX_DTYPE_NAMES.items())
        raise DataError(f"{label}: unknown IDX data type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{label}: IDX header declares 0 dimensions, at least 1 is required")
    raw_dims = _read_exact(stream, 4 * ndim)
    header_len = 4 + 4 * ndim
    if len(raw_dims) < 4 * ndim:
        raise DataError(
            f"{label}: truncated IDX header: {ndim} dimension(s) need a "
            f"{header_len}-byte header but the data ends after "
            f"{4 + len(raw_dims)} bytes"
        )
    shape = struct.unpack(f">{ndim}I", raw_dims)
    dtype = _IDX_DTYPES[code]
    # Python ints: no overflow however absurd the declared dimensions are.
    payload_len = math.prod(shape) * dtype.itemsize
    return _IdxHeader(dtype, _IDX_DTYPE_NAMES[code], shape, header_len, payload_len)


def _size_error(label: str, header: _IdxHeader, actual: int, at_least: bool) -> DataError:
    expected = header.payload_len
    declared = (
        f"header declares shape {header.shape} of {header.dtype_name} ({expected} payload bytes)"
    )
    if actual < expected:
        return DataError(
            f"{label}: truncated IDX data: {declared} but only {actual} bytes "
            f"follow the {header.header_len}-byte header"
        )
    amount = f"at least {actual}" if at_least else str(actual)
    return DataError(
        f"{label}: unexpected trailing bytes in IDX data: {declared} but "
        f"{amount} bytes follow the {header.header_len}-byte header "
        f"({'at least ' if at_least else ''}{actual - expected} extra)"
    )


def _to_array(buf: bytes | bytearray, offset: int, header: _IdxHeader, label: str) -> np.ndarray:
    """View the payload as an array of the declared shape, in native byte order."""
    count = header.payload_len // header.dtype.itemsize
    arr = np.frombuffer(buf, dtype=header.dtype, count=count, offset=offset)
    try:
        arr = arr.reshape(header.shape)
    except ValueError as exc:
        # Valid IDX, but numpy cannot represent it: more than 64 dimensions, or a
        # zero-size shape whose other dimensions multiply past the address space.
        raise DataError(
            f"{label}: IDX shape {header.shape} cannot be represented as a numpy array ({exc})"
        ) from exc
    native = header.dtype.newbyteorder("=")
    if arr.dtype != native:
        arr = arr.astype(native)
    return arr


def _parse_stream(stream: _Reader, label: str, raw_size: int | None) -> np.ndarray:
    """Parse a whole IDX file from a (decompressed) stream.

    ``raw_size`` is the total size when known (uncompressed files), which lets
    size mismatches be reported before anything large is read or allocated.
    """
    header = _parse_header(stream, label)
    expected = header.payload_len
    if raw_size is not None:
        actual = raw_size - header.header_len
        if actual != expected:
            raise _size_error(label, header, actual, at_least=False)
    # Read in chunks: memory grows only with data that is really there, so an
    # absurd declared size cannot trigger a huge allocation.
    payload = bytearray()
    while len(payload) < expected:
        chunk = stream.read(min(expected - len(payload), _CHUNK))
        if not chunk:
            raise _size_error(label, header, len(payload), at_least=False)
        payload += chunk
    # Always read to end of stream: this also makes gzip check its CRC.
    extra = 0
    while extra <= _OVERRUN_LIMIT:
        chunk = stream.read(_CHUNK)
        if not chunk:
            break
        extra += len(chunk)
    else:
        raise _size_error(label, header, expected + extra, at_least=True)
    if extra:
        raise _size_error(label, header, expected + extra, at_least=False)
    return _to_array(payload, 0, header, label)


def _parse_buffer(data: bytes | bytearray, label: str) -> np.ndarray:
    """Parse a complete IDX file already held in memory."""
    with memoryview(data)[:_MAX_HEADER] as head:
        header = _parse_header(_BytesReader(head), label)
    actual = len(data) - header.header_len
    if actual != header.payload_len:
        raise _size_error(label, header, actual, at_least=False)
    return _to_array(data, header.header_len, header, label)


class _BytesReader:
    """Minimal ``read(n)`` over a memoryview, without copying the whole buffer."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, n: int) -> bytes:
        out = bytes(self._view[self._pos : self._pos + n])
        self._pos += len(out)
        return out


@contextlib.contextmanager
def _open_decompressed(path: Path, label: str) -> Iterator[tuple[_Reader, int | None]]:
    """Open ``path`` and yield ``(stream, raw_size)``.

    Gzip is detected by the magic bytes ``1f 8b``; ``raw_size`` is ``None``
    for gzip streams.  Gzip corruption is converted to :class:`DataError`.
    """
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    yield gz, None
            else:
                yield raw, os.fstat(raw.fileno()).st_size
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        detail = str(exc) or type(exc).__name__
        raise DataError(f"{label}: corrupt gzip data ({detail})") from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the format of MNIST and similar datasets).

    Parameters
    ----------
    path : str or os.PathLike
        File to read, either raw or gzip-compressed (detected from the
        content, not the file name).

    Returns
    -------
    numpy.ndarray
        Array with the shape declared in the header and the declared element
        type (uint8, int8, int16, int32, float32 or float64), converted to
        native byte order.  The array is C-contiguous and writeable.

    Raises
    ------
    fastvae.errors.DataError
        If the file is not a valid IDX file: non-zero leading magic bytes,
        unknown type code, zero dimensions, truncated header, payload shorter
        or longer than declared, or corrupt gzip data.
    OSError
        If the file cannot be opened (e.g. :class:`FileNotFoundError`).

    Notes
    -----
    The payload is read in chunks and compared with the size declared in the
    header, so a corrupt header declaring an enormous shape fails with a
    :class:`DataError` instead of attempting a huge allocation.
    """
    path = Path(path)
    label = str(path)
    with _open_decompressed(path, label) as (stream, raw_size):
        return _parse_stream(stream, label, raw_size)


# --------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------


def _images_labels(
    images: np.ndarray, labels: np.ndarray, images_label: str, labels_label: str
) -> tuple[np.ndarray, np.ndarray]:
    """Convert raw IDX arrays to ``(float32 (n, d) images, int64 (n,) labels)``."""
    if images.ndim < 2:
        raise DataError(
            f"{images_label}: images must have at least 2 dimensions "
            f"(n, ...), got shape {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(
            f"{labels_label}: labels must have 1 dimension (n,), got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{labels_label}: labels must be integers, got {labels.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"image/label count mismatch: {images_label} has {images.shape[0]} "
            f"images but {labels_label} has {labels.shape[0]} labels"
        )
    n = images.shape[0]
    flat = images.reshape(n, -1)
    if images.dtype == np.uint8:
        out = flat.astype(np.float32, order="C")  # always a fresh copy
        np.divide(out, np.float32(255), out=out)
    else:
        out = np.ascontiguousarray(flat, dtype=np.float32)
    return out, np.ascontiguousarray(labels, dtype=np.int64)


def load_idx_dataset(
    images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Load an images/labels pair of IDX files as training arrays.

    Works for MNIST-like datasets such as Fashion-MNIST or KMNIST.

    Parameters
    ----------
    images_path : str or os.PathLike
        IDX file of images with shape ``(n, rows, cols)`` (or any
        ``(n, ...)``), raw or gzip-compressed.
    labels_path : str or os.PathLike
        IDX file of integer labels with shape ``(n,)``.

    Returns
    -------
    images : numpy.ndarray
        float32 array of shape ``(n, rows * cols)``, C-contiguous.  uint8
        images are scaled by 1/255 to ``[0, 1]``; other types are converted to
        float32 unchanged.
    labels : numpy.ndarray
        int64 array of shape ``(n,)``.

    Raises
    ------
    fastvae.errors.DataError
        If either file is not valid IDX, the shapes are not ``(n, ...)`` and
        ``(n,)``, the labels are not integers, or the counts differ.
    OSError
        If a file cannot be opened.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    return _images_labels(images, labels, str(images_path), str(labels_path))


def _default_root() -> Path:
    """Per-user cache directory for MNIST (without consulting FASTVAE_DATA)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative paths must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "fastvae" / "mnist"


def _resolve_root(root: str | os.PathLike[str] | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("FASTVAE_DATA", "")
    if env:
        return Path(env).expanduser()
    return _default_root()


def _mirrors() -> list[str]:
    env = os.environ.get("FASTVAE_MNIST_MIRRORS", "")
    mirrors = [m.strip() for m in env.split(",") if m.strip()]
    return mirrors or list(_DEFAULT_MIRRORS)


def _find(root: Path, name: str) -> Path | None:
    """Existing file for ``name`` in ``root``: ``name.gz`` first, then ``name``."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    return None


def _read_all(path: Path, label: str, limit: int) -> tuple[bytearray, str, bool]:
    """Read the decompressed content of ``path``, keeping at most ``limit`` bytes.

    Returns ``(data, sha256 hex digest, complete)``.  Content beyond ``limit``
    is hashed but not kept (``_OVERRUN_LIMIT`` bytes at most); ``complete`` is
    ``False`` if even that was exceeded, in which case the digest is partial.
    """
    data = bytearray()
    hasher = hashlib.sha256()
    with _open_decompressed(path, label) as (stream, _raw_size):
        while len(data) < limit:
            chunk = stream.read(min(limit - len(data), _CHUNK))
            if not chunk:
                break
            data += chunk
        hasher.update(data)
        extra = 0
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                return data, hasher.hexdigest(), True
            hasher.update(chunk)
            extra += len(chunk)
            if extra > _OVERRUN_LIMIT:
                return data, hasher.hexdigest(), False


def _load_file(path: Path, name: str, verify: bool, label: str) -> np.ndarray:
    """Load one MNIST file, checking its SHA256 first if ``verify``."""
    if not verify:
        with _open_decompressed(path, label) as (stream, raw_size):
            return _parse_stream(stream, label, raw_size)
    expected_hash, size = _MNIST_FILES[name]
    data, actual_hash, complete = _read_all(path, label, size)
    if actual_hash != expected_hash or len(data) != size:
        actual = actual_hash if complete else f"(not computed: content exceeds {size} bytes)"
        raise DataError(
            f"{label}: SHA256 checksum mismatch for {name} (uncompressed "
            f"content): expected {expected_hash}, got {actual}. The file is "
            "corrupt or is not the original MNIST file; delete it to download "
            "it again, or pass verify=False to load another IDX dataset stored "
            "under the MNIST file names."
        )
    return _parse_buffer(data, label)


def _fetch(url: str, out: BinaryIO) -> None:
    """Stream ``url`` into ``out``; raise on short or oversized bodies."""
    request = urllib.request.Request(url, headers={"User-Agent": "fastvae"})
    with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT) as response:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header else None
        if length is not None and length > _MAX_DOWNLOAD_BYTES:
            raise DataError(f"{url}: refusing to download {length} bytes")
        total = 0
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > _MAX_DOWNLOAD_BYTES:
                raise DataError(
                    f"{url}: refusing to download more than {_MAX_DOWNLOAD_BYTES} bytes"
                )
            out.write(chunk)
    if length is not None and total != length:
        raise DataError(f"{url}: incomplete download, got {total} of {length} bytes")


def _download(root: Path, name: str, verify: bool) -> np.ndarray:
    """Download ``name`` into ``root`` from the first mirror that works.

    Each attempt goes to a temporary file in ``root`` which is verified
    (checksum if ``verify``, otherwise IDX structure) before being moved into
    place with :func:`os.replace`.  Returns the loaded array.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data directory {root}: {exc}. {_OFFLINE_HINT}") from exc
    filename = f"{name}.gz"
    failures: list[str] = []
    for base in _mirrors():
        url = f"{base.rstrip('/')}/{filename}"
        tmp = root / f".{filename}.{os.urandom(6).hex()}.part"
        created = False
        try:
            _log.info("downloading %s", url)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
            with os.fdopen(fd, "wb") as out:
                _fetch(url, out)
            array = _load_file(tmp, name, verify, label=url)
            with open(tmp, "rb") as f:
                compressed = f.read(2) == _GZIP_MAGIC
            os.replace(tmp, root / (filename if compressed else name))
            return array
        except DataError as exc:  # messages already start with the URL
            failures.append(str(exc))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failures.append(f"{url}: {type(exc).__name__}: {exc}")
        finally:
            if created:  # still there unless os.replace succeeded
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
    tried = "\n".join(f"  - {f}" for f in failures)
    raise DataError(
        f"could not download {filename} into {root}; tried:\n{tried}\n"
        f"{_OFFLINE_HINT} Mirrors can be set with FASTVAE_MNIST_MIRRORS "
        "(comma-separated base URLs)."
    )


def load_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    verify: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Load the MNIST training or test set.

    Parameters
    ----------
    split : {"train", "test"}
        Which part to load: 60000 training or 10000 test examples.
    root : str or os.PathLike, optional
        Directory holding the files.  Defaults to ``$FASTVAE_DATA`` if set,
        else ``$XDG_CACHE_HOME/fastvae/mnist`` (``~/.cache/fastvae/mnist``).
        Files may be gzip-compressed (``train-images-idx3-ubyte.gz``, ...) or
        not (``train-images-idx3-ubyte``, ...).
    download : bool, default True
        Download missing files from the mirrors (overridable with the
        ``FASTVAE_MNIST_MIRRORS`` environment variable, comma-separated base
        URLs).  Each download goes to a temporary file in ``root`` and is only
        moved into place once verified; a failing mirror falls back to the
        next one.
    verify : bool, default True
        Check the SHA256 of each file's uncompressed content against the
        official MNIST files.  Pass ``False`` to load another dataset stored
        under the same file names (e.g. Fashion-MNIST); its files are then
        only checked to be well-formed IDX.

    Returns
    -------
    images : numpy.ndarray
        float32 array of shape ``(n, 784)``, C-contiguous, values in
        ``[0, 1]`` (pixel / 255).  With ``verify=False`` the shape is
        ``(n, rows * cols)`` of whatever dataset is stored.
    labels : numpy.ndarray
        int64 array of shape ``(n,)`` with values 0-9 for MNIST.

    Raises
    ------
    fastvae.errors.InputError
        If ``split`` is not ``"train"`` or ``"test"`` (a ``ValueError``).
    fastvae.errors.DataError
        If files are missing and ``download`` is false, fail verification,
        are malformed, or cannot be downloaded from any mirror.

    Examples
    --------
    >>> images, labels = load_mnist("test")  # doctest: +SKIP
    >>> images.shape, labels.shape  # doctest: +SKIP
    ((10000, 784), (10000,))
    """
    if not isinstance(split, str) or split not in _SPLITS:
        raise InputError(f"split must be one of {sorted(_SPLITS)!r}, got {split!r}")
    directory = _resolve_root(root)
    names = _SPLITS[split]
    found = {name: _find(directory, name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing and not download:
        expected = ", ".join(f"{n}.gz" for n in names)
        raise DataError(
            f"MNIST {split} file(s) not found in {directory}: missing "
            f"{', '.join(f'{n}.gz' for n in missing)} (expected {expected}, "
            "optionally uncompressed). Pass download=True, or point root= or "
            "FASTVAE_DATA at a directory containing them."
        )
    arrays = []
    for name in names:
        path = found[name]
        if path is None:
            arrays.append(_download(directory, name, verify))
        else:
            arrays.append(_load_file(path, name, verify, label=str(path)))
    images_label, labels_label = (str(found[n] or directory / f"{n}.gz") for n in names)
    return _images_labels(arrays[0], arrays[1], images_label, labels_label)


def binarize(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """A fixed Bernoulli draw of intensities in [0, 1]: 1.0 with probability x, else 0.0.

    With the default seed this gives the same binarized set every time, for evaluating
    models trained with ``fit(..., binarize="dynamic")`` as papers do.
    """
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise InputError(f"binarize expects floats in [0, 1], got dtype {arr.dtype}")
    if arr.size and not (np.all(arr >= 0) and np.all(arr <= 1)):
        raise InputError("binarize expects values in [0, 1]")
    rng = np.random.default_rng(seed)
    return (rng.random(arr.shape, dtype=np.float32) < arr).astype(np.float32)
