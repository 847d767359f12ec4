"""The IDX file reader: the format of MNIST, Fashion-MNIST, KMNIST and similar datasets.

:func:`read_idx` reads one file, raw or gzip-compressed, as an array of its declared shape and
type; :func:`load_idx_dataset` reads an images/labels pair as training arrays. Every problem
with a file's *content* (bad header, truncated or over-long payload, corrupt gzip stream) is
a :class:`fastvae.errors.DataError`, a :class:`ValueError` subclass.

This module does not know MNIST: where its files are, their checksums and the download live
in mnist.py, which reads them with the helpers here that have no leading underscore
(``open_decompressed``, ``parse_stream``, ``parse_buffer``, ``images_labels``). Pure Python and
NumPy.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from ..errors import DataError

__all__ = ["load_idx_dataset", "read_idx"]

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

GZIP_MAGIC = b"\x1f\x8b"
#: Bytes per read: memory grows with the data really there, not with what a header claims.
CHUNK = 1 << 20
#: Longest possible IDX header: 4-byte magic + 255 four-byte dimensions.
_MAX_HEADER = 4 + 4 * 255
#: How far past the expected end we keep reading just to count extra bytes
#: (or hash them) for an error message.
OVERRUN_LIMIT = 64 << 20


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
        chunk = stream.read(min(remaining, CHUNK))
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


def parse_stream(stream: _Reader, label: str, raw_size: int | None) -> np.ndarray:
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
        chunk = stream.read(min(expected - len(payload), CHUNK))
        if not chunk:
            raise _size_error(label, header, len(payload), at_least=False)
        payload += chunk
    # Always read to end of stream: this also makes gzip check its CRC.
    extra = 0
    while extra <= OVERRUN_LIMIT:
        chunk = stream.read(CHUNK)
        if not chunk:
            break
        extra += len(chunk)
    else:
        raise _size_error(label, header, expected + extra, at_least=True)
    if extra:
        raise _size_error(label, header, expected + extra, at_least=False)
    return _to_array(payload, 0, header, label)


def parse_buffer(data: bytes | bytearray, label: str) -> np.ndarray:
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
def open_decompressed(path: Path, label: str) -> Iterator[tuple[_Reader, int | None]]:
    """Open ``path`` and yield ``(stream, raw_size)``.

    Gzip is detected by the magic bytes ``1f 8b``; ``raw_size`` is ``None``
    for gzip streams.  Gzip corruption is converted to :class:`DataError`.
    """
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
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
    with open_decompressed(path, label) as (stream, raw_size):
        return parse_stream(stream, label, raw_size)


# --------------------------------------------------------------------------
# Images and labels
# --------------------------------------------------------------------------


def images_labels(
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
    return images_labels(images, labels, str(images_path), str(labels_path))
