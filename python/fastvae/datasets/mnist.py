"""MNIST: where its four files are looked for, their checksums, and the download.

:func:`load_mnist` finds, verifies and (optionally) downloads the files and reads them with
the IDX reader of idx.py; this module does not parse IDX itself. Every problem with a file
(missing without ``download``, checksum mismatch, malformed, failed download) is a
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

import hashlib
import http.client
import logging
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .._files import atomic_write
from ..errors import DataError, InputError
from .idx import (
    CHUNK,
    GZIP_MAGIC,
    OVERRUN_LIMIT,
    images_labels,
    open_decompressed,
    parse_buffer,
    parse_stream,
)

__all__ = ["load_mnist"]

_log = logging.getLogger(__name__)

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
    is hashed but not kept (``OVERRUN_LIMIT`` bytes at most); ``complete`` is
    ``False`` if even that was exceeded, in which case the digest is partial.
    """
    data = bytearray()
    hasher = hashlib.sha256()
    with open_decompressed(path, label) as (stream, _raw_size):
        while len(data) < limit:
            chunk = stream.read(min(limit - len(data), CHUNK))
            if not chunk:
                break
            data += chunk
        hasher.update(data)
        extra = 0
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                return data, hasher.hexdigest(), True
            hasher.update(chunk)
            extra += len(chunk)
            if extra > OVERRUN_LIMIT:
                return data, hasher.hexdigest(), False


def _load_file(path: Path, name: str, verify: bool, label: str) -> np.ndarray:
    """Load one MNIST file, checking its SHA256 first if ``verify``."""
    if not verify:
        with open_decompressed(path, label) as (stream, raw_size):
            return parse_stream(stream, label, raw_size)
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
    return parse_buffer(data, label)


def _body(url: str, response: http.client.HTTPResponse) -> Iterator[bytes]:
    """The body of ``response`` in chunks; raise on short or oversized bodies."""
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header else None
    if length is not None and length > _MAX_DOWNLOAD_BYTES:
        raise DataError(f"{url}: refusing to download {length} bytes")
    total = 0
    while chunk := response.read(CHUNK):
        total += len(chunk)
        if total > _MAX_DOWNLOAD_BYTES:
            raise DataError(f"{url}: refusing to download more than {_MAX_DOWNLOAD_BYTES} bytes")
        yield chunk
    if length is not None and total != length:
        raise DataError(f"{url}: incomplete download, got {total} of {length} bytes")


def _download_from(url: str, root: Path, name: str, verify: bool) -> np.ndarray:
    """Download ``url`` into ``root`` as ``name.gz``, or as ``name`` when it is not gzip data.

    The download is written to a temporary file and checked there (checksum if ``verify``,
    otherwise IDX structure), so only a file that passes replaces anything. Returns the
    loaded array.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "fastvae"})
    with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT) as response:
        chunks = _body(url, response)
        # The first bytes tell the file's name: gzip or not.
        head = b""
        for chunk in chunks:
            head += chunk
            if len(head) >= len(GZIP_MAGIC):
                break
        compressed = head.startswith(GZIP_MAGIC)

        def write(f: BinaryIO) -> np.ndarray:
            f.write(head)
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            return _load_file(Path(f.name), name, verify, label=url)

        return atomic_write(root / (f"{name}.gz" if compressed else name), write)


def _download(root: Path, name: str, verify: bool) -> np.ndarray:
    """Download ``name`` into ``root`` from the first mirror that works; the loaded array."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data directory {root}: {exc}. {_OFFLINE_HINT}") from exc
    filename = f"{name}.gz"
    failures: list[str] = []
    for base in _mirrors():
        url = f"{base.rstrip('/')}/{filename}"
        try:
            _log.info("downloading %s", url)
            return _download_from(url, root, name, verify)
        except DataError as exc:  # messages already start with the URL
            failures.append(str(exc))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failures.append(f"{url}: {type(exc).__name__}: {exc}")
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
    return images_labels(arrays[0], arrays[1], images_label, labels_label)
