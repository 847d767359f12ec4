"""Tests for fastvae.datasets: IDX parsing (idx.py), MNIST loading, checksums and
downloads (mnist.py).

The real MNIST files come from conftest.py's ``mnist_dir`` and ``mnist`` fixtures
(``$FASTVAE_DATA`` or ``<repo>/../shared/data/mnist``); tests needing them fail if absent.
Download tests only talk to HTTP servers started on 127.0.0.1 by the tests.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import shutil
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastvae.datasets import idx, load_idx_dataset, load_mnist, read_idx
from fastvae.datasets import mnist as mnist_module
from fastvae.errors import DataError, InputError

FILE_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]

TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"

# IDX type code per numpy dtype.
CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


# --------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialise ``arr`` in IDX format (big-endian)."""
    arr = np.asarray(arr)
    header = bytes([0, 0, CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def real_raw(mnist_dir: Path, name: str) -> bytes:
    """Decompressed content of one of the real MNIST files."""
    return gzip.decompress((mnist_dir / f"{name}.gz").read_bytes())


def leftovers(directory: Path) -> list[str]:
    """Temporary files in directory: downloads are written to hidden ".NAME.XXXX.tmp" files."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never reach the real mirrors; let 127.0.0.1 bypass any configured proxy."""
    monkeypatch.setenv("FASTVAE_MNIST_MIRRORS", f"http://127.0.0.1:{closed_port()}/")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def closed_port() -> int:
    """A local TCP port with (almost certainly) nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def serve() -> Iterator[Callable[[Path], tuple[str, list[str]]]]:
    """Factory: serve a directory over HTTP, return (base URL, request log)."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(directory: Path) -> tuple[str, list[str]]:
        log: list[str] = []
        handler = type("Handler", (_Handler,), {"requests": log})

        def make(*args: object, **kwargs: object) -> _Handler:
            return handler(*args, directory=str(directory), **kwargs)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/", log

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def real_test_split(mnist: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return mnist["x_test"], mnist["y_test"]


# --------------------------------------------------------------------------
# real MNIST
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "n", "first", "counts"),
    [
        (
            "train",
            60000,
            [5, 0, 4, 1, 9, 2, 1, 3, 1, 4],
            [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        ),
        (
            "test",
            10000,
            [7, 2, 1, 0, 4, 1, 4, 9, 5, 9],
            [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
        ),
    ],
)
def test_load_mnist_real(
    mnist_dir: Path, split: str, n: int, first: list[int], counts: list[int]
) -> None:
    images, labels = load_mnist(split, root=mnist_dir, download=False)
    assert images.shape == (n, 784)
    assert images.dtype == np.float32
    assert images.flags.c_contiguous
    assert labels.shape == (n,)
    assert labels.dtype == np.int64
    assert images.min() == 0.0
    assert images.max() == 1.0
    # Exactly uint8 / 255 (checked on a subset to keep the test cheap).
    head = images[:2000]
    pixels = np.round(head * 255).astype(np.uint8)
    np.testing.assert_array_equal(head, pixels.astype(np.float32) / np.float32(255))
    assert labels.min() == 0
    assert labels.max() == 9
    assert labels[:10].tolist() == first
    assert np.bincount(labels).tolist() == counts


def test_hard_coded_checksums_match_sha256sums_file(mnist_dir: Path) -> None:
    sums_file = mnist_dir / "SHA256SUMS"
    if not sums_file.is_file():
        pytest.skip(f"{sums_file} not present")
    listed = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            listed[name.lstrip("*")] = digest
    assert {name: sha for name, (sha, _size) in mnist_module._MNIST_FILES.items()} == listed
    for name in FILE_NAMES:
        data = real_raw(mnist_dir, name)
        assert len(data) == mnist_module._MNIST_FILES[name][1]
        assert hashlib.sha256(data).hexdigest() == listed[name]


def test_read_idx_real_files(mnist_dir: Path) -> None:
    images = read_idx(mnist_dir / f"{TEST_IMAGES}.gz")
    labels = read_idx(mnist_dir / f"{TEST_LABELS}.gz")
    assert images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert labels.dtype == np.uint8


def test_fastvae_data_env_var(
    mnist_dir: Path, monkeypatch: pytest.MonkeyPatch, real_test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    monkeypatch.setenv("FASTVAE_DATA", str(mnist_dir))
    images, labels = load_mnist("test", download=False)
    np.testing.assert_array_equal(images, real_test_split[0])
    np.testing.assert_array_equal(labels, real_test_split[1])


def test_uncompressed_files_in_root(
    mnist_dir: Path, tmp_path: Path, real_test_split: tuple[np.ndarray, np.ndarray]
) -> None:
    for name in (TEST_IMAGES, TEST_LABELS):
        (tmp_path / name).write_bytes(real_raw(mnist_dir, name))
    images, labels = load_mnist("test", root=tmp_path, download=False)
    np.testing.assert_array_equal(images, real_test_split[0])
    np.testing.assert_array_equal(labels, real_test_split[1])
    raw = read_idx(tmp_path / TEST_LABELS)
    np.testing.assert_array_equal(raw, real_test_split[1])


@pytest.mark.parametrize("compress", [True, False])
def test_checksum_mismatch(mnist_dir: Path, tmp_path: Path, compress: bool) -> None:
    shutil.copy(mnist_dir / f"{TEST_IMAGES}.gz", tmp_path)
    data = bytearray(real_raw(mnist_dir, TEST_LABELS))
    data[8 + 123] = (data[8 + 123] + 1) % 10  # still a valid label file
    actual = hashlib.sha256(data).hexdigest()
    target = tmp_path / (f"{TEST_LABELS}.gz" if compress else TEST_LABELS)
    write(target, bytes(data), compress)

    with pytest.raises(DataError, match="checksum") as info:
        load_mnist("test", root=tmp_path, download=False)
    message = str(info.value)
    assert str(target) in message
    assert mnist_module._MNIST_FILES[TEST_LABELS][0] in message
    assert actual in message
    assert "verify=False" in message

    # The file is structurally fine, so it loads without verification.
    _, labels = load_mnist("test", root=tmp_path, download=False, verify=False)
    assert labels[123] == data[8 + 123]


def test_verified_file_with_trailing_bytes_is_rejected(mnist_dir: Path, tmp_path: Path) -> None:
    shutil.copy(mnist_dir / f"{TEST_IMAGES}.gz", tmp_path)
    write(tmp_path / f"{TEST_LABELS}.gz", real_raw(mnist_dir, TEST_LABELS) + b"\0", compress=True)
    with pytest.raises(DataError, match="checksum"):
        load_mnist("test", root=tmp_path, download=False)
    with pytest.raises(DataError, match="trailing"):
        load_mnist("test", root=tmp_path, download=False, verify=False)


# --------------------------------------------------------------------------
# IDX reader on synthetic files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", list(CODES))
def test_read_idx_roundtrip(tmp_path: Path, dtype: np.dtype, compress: bool) -> None:
    rng = np.random.default_rng(0)
    if dtype.kind == "f":
        arr = rng.standard_normal((3, 4, 5)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=(3, 4, 5), endpoint=True).astype(dtype)
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(arr), compress))
    assert out.dtype == dtype  # native byte order
    assert out.dtype.isnative
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("shape", [(7,), (2, 3), (2, 1, 3, 2), (0, 28, 28), (1,) * 9])
def test_read_idx_shapes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    arr = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(arr)))
    assert out.shape == shape
    np.testing.assert_array_equal(out, arr)


def test_read_idx_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "x.gz", idx_bytes(arr))), arr)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "x", idx_bytes(arr), True)), arr)


def test_read_idx_accepts_str_path(tmp_path: Path) -> None:
    arr = np.arange(4, dtype=np.uint8)
    path = write(tmp_path / "a.idx", idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(str(path)), arr)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


_VALID = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (b"", "truncated IDX header.*empty"),
        (b"\x00\x00\x08", "truncated IDX header"),
        (_VALID[:10], "truncated IDX header"),
        (_VALID[:-1], r"truncated IDX data.*24 payload bytes.*only 23 bytes"),
        (_VALID[:16], r"truncated IDX data.*only 0 bytes"),
        (_VALID + b"\x00", r"trailing bytes.*24 payload bytes.*25 bytes.*1 extra"),
        (_VALID + bytes(100), r"trailing bytes.*124 bytes"),
        (b"\x01" + _VALID[1:], "not an IDX file"),
        (b"\x00\x01" + _VALID[2:], "not an IDX file"),
        (_VALID[:2] + b"\x0a" + _VALID[3:], "unknown IDX data type code 0x0A"),
        (_VALID[:2] + b"\xff" + _VALID[3:], "unknown IDX data type code 0xFF"),
        (b"\x00\x00\x08\x00" + _VALID[4:], "0 dimensions"),
        (b"GIF89a garbage bytes here", "not an IDX file"),
        # Absurd declared sizes must fail before any large allocation.
        (b"\x00\x00\x0e\x03" + b"\xff" * 12 + b"abc", "truncated IDX data"),
        (b"\x00\x00\x08\xff" + b"\xff" * 1020, "truncated IDX data"),
        # Valid IDX that numpy cannot represent.
        (b"\x00\x00\x08\x41" + b"\x00\x00\x00\x01" * 65 + b"\x07", "cannot be represented"),
        (b"\x00\x00\x08\x03" + b"\x00" * 4 + b"\xff" * 8, "cannot be represented"),
    ],
)
def test_read_idx_malformed(tmp_path: Path, data: bytes, pattern: str, compress: bool) -> None:
    path = write(tmp_path / "bad.idx", data, compress)
    with pytest.raises(DataError, match=pattern) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def _corrupt_gzips() -> list[tuple[str, bytes]]:
    good = gzip.compress(_VALID)
    flipped = bytearray(good)
    flipped[12] ^= 0xFF  # inside the deflate stream
    bad_crc = bytearray(good)
    bad_crc[-8] ^= 0x01  # CRC32 trailer
    bad_len = bytearray(good)
    bad_len[-4] ^= 0x01  # ISIZE trailer
    bad_method = bytearray(good)
    bad_method[2] = 7  # compression method
    return [
        ("truncated", good[:-5]),
        ("header only", good[:10]),
        ("magic only", good[:2]),
        ("deflate flipped", bytes(flipped)),
        ("bad crc", bytes(bad_crc)),
        ("bad length", bytes(bad_len)),
        ("bad method", bytes(bad_method)),
        ("trailing garbage", good + b"garbage!"),
        ("garbage after magic", b"\x1f\x8b" + bytes(range(64))),
    ]


@pytest.mark.parametrize(("kind", "data"), _corrupt_gzips(), ids=[k for k, _ in _corrupt_gzips()])
def test_read_idx_corrupt_gzip(tmp_path: Path, kind: str, data: bytes) -> None:
    path = write(tmp_path / "bad.gz", data)
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    if kind != "deflate flipped":  # that one may also inflate to a wrong-sized payload
        assert "corrupt gzip" in str(info.value)
        assert isinstance(info.value.__cause__, gzip.BadGzipFile | EOFError | zlib.error)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------
# fuzzing
# --------------------------------------------------------------------------

_FUZZ_BASES = [
    idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
    idx_bytes(np.arange(-3, 3, dtype=np.int16)),
    idx_bytes(np.linspace(0, 1, 6).reshape(3, 2)),
]


@st.composite
def mutated_idx(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_FUZZ_BASES)))
    if draw(st.booleans()):
        data = bytearray(gzip.compress(bytes(data), mtime=0))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data += draw(st.binary(max_size=8))
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check_fuzz_result(result: np.ndarray) -> None:
    assert isinstance(result, np.ndarray)
    assert result.dtype.isnative
    assert result.ndim >= 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated_idx(), st.binary(max_size=64)))
def test_fuzz_read_idx_only_raises_data_error(fuzz_dir: Path, data: bytes) -> None:
    path = write(fuzz_dir / "fuzz.idx", data)
    try:
        result = read_idx(path)
    except DataError:
        return
    _check_fuzz_result(result)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(mutated_idx(), st.binary(max_size=64)))
def test_fuzz_parse_buffer_only_raises_data_error(data: bytes) -> None:
    # The in-memory parser used after checksum verification.
    if data[:2] == b"\x1f\x8b":
        return
    try:
        result = idx.parse_buffer(bytearray(data), "fuzz")
    except DataError:
        return
    _check_fuzz_result(result)


@settings(max_examples=100, deadline=None)
@given(
    code_dtype=st.sampled_from(list(CODES)),
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=4).map(tuple),
    compress=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_roundtrip(
    fuzz_dir: Path, code_dtype: np.dtype, shape: tuple[int, ...], compress: bool, seed: int
) -> None:
    raw = np.random.default_rng(seed).bytes(int(np.prod(shape)) * code_dtype.itemsize)
    arr = np.frombuffer(raw, dtype=code_dtype).reshape(shape)
    if code_dtype.kind == "f":
        arr = np.nan_to_num(arr)
    out = read_idx(write(fuzz_dir / "rt.idx", idx_bytes(arr), compress))
    assert out.shape == shape
    assert out.dtype == code_dtype
    np.testing.assert_array_equal(out, arr)


# --------------------------------------------------------------------------
# load_idx_dataset / load_mnist on small fake datasets
# --------------------------------------------------------------------------


def fake_pair(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def write_fake_split(root: Path, split: str, n: int = 5, compress: bool = True) -> tuple:
    images, labels = fake_pair(n)
    img_name, lbl_name = mnist_module._SPLITS[split]
    suffix = ".gz" if compress else ""
    write(root / f"{img_name}{suffix}", idx_bytes(images), compress)
    write(root / f"{lbl_name}{suffix}", idx_bytes(labels), compress)
    return images, labels


def test_load_idx_dataset(tmp_path: Path) -> None:
    images, labels = fake_pair(6)
    ip = write(tmp_path / "img.gz", idx_bytes(images), compress=True)
    lp = write(tmp_path / "lbl", idx_bytes(labels))
    x, y = load_idx_dataset(ip, lp)
    assert x.shape == (6, 784)
    assert x.dtype == np.float32
    assert x.flags.c_contiguous
    assert y.dtype == np.int64
    assert x[0, 0] == 0.0
    assert x[0, 1] == 1.0
    np.testing.assert_array_equal(x, images.reshape(6, -1).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y, labels)


def test_load_idx_dataset_non_square_and_non_uint8(tmp_path: Path) -> None:
    images = np.linspace(-1, 2, 4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5)
    labels = np.array([0, 3, -1, 7], dtype=np.int16)
    x, y = load_idx_dataset(
        write(tmp_path / "i", idx_bytes(images)), write(tmp_path / "l", idx_bytes(labels))
    )
    assert x.shape == (4, 15)
    np.testing.assert_array_equal(x, images.reshape(4, 15))  # not rescaled
    assert y.dtype == np.int64
    assert y.tolist() == [0, 3, -1, 7]


@pytest.mark.parametrize(
    ("images", "labels", "pattern"),
    [
        (
            np.zeros((5, 2, 2), np.uint8),
            np.zeros(4, np.uint8),
            "count mismatch.*5 images.*4 labels",
        ),
        (np.zeros(5, np.uint8), np.zeros(5, np.uint8), "at least 2 dimensions"),
        (np.zeros((5, 2), np.uint8), np.zeros((5, 1), np.uint8), "1 dimension"),
        (np.zeros((5, 2), np.uint8), np.zeros(5, np.float32), "integers"),
    ],
)
def test_load_idx_dataset_bad_pairs(
    tmp_path: Path, images: np.ndarray, labels: np.ndarray, pattern: str
) -> None:
    ip = write(tmp_path / "i", idx_bytes(images))
    lp = write(tmp_path / "l", idx_bytes(labels))
    with pytest.raises(DataError, match=pattern):
        load_idx_dataset(ip, lp)


@pytest.mark.parametrize("compress", [True, False])
def test_load_mnist_verify_false_other_dataset(tmp_path: Path, compress: bool) -> None:
    images, labels = write_fake_split(tmp_path, "train", n=7, compress=compress)
    x, y = load_mnist("train", root=tmp_path, download=False, verify=False)
    assert x.shape == (7, 784)
    np.testing.assert_array_equal(x, images.reshape(7, -1) / np.float32(255))
    np.testing.assert_array_equal(y, labels)
    with pytest.raises(DataError, match="checksum.*verify=False"):
        load_mnist("train", root=tmp_path, download=False)


def test_load_mnist_count_mismatch(tmp_path: Path) -> None:
    write(tmp_path / f"{TEST_IMAGES}.gz", idx_bytes(fake_pair(3)[0]), True)
    write(tmp_path / f"{TEST_LABELS}.gz", idx_bytes(fake_pair(4)[1]), True)
    with pytest.raises(DataError, match="count mismatch"):
        load_mnist("test", root=tmp_path, download=False, verify=False)


@pytest.mark.parametrize("split", ["validation", "TRAIN", "", None, 1])
def test_load_mnist_bad_split(split: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'test'.*'train'"):
        load_mnist(split, root=tmp_path, download=False)  # type: ignore[arg-type]


def test_missing_files_without_download(tmp_path: Path) -> None:
    root = tmp_path / "does" / "not" / "exist"
    with pytest.raises(DataError) as info:
        load_mnist("train", root=root, download=False)
    message = str(info.value)
    assert str(root) in message
    assert "train-images-idx3-ubyte.gz" in message
    assert "train-labels-idx1-ubyte.gz" in message
    assert not root.exists()  # nothing created when not downloading


def test_missing_one_file_names_it(tmp_path: Path) -> None:
    write_fake_split(tmp_path, "test")
    (tmp_path / f"{TEST_LABELS}.gz").unlink()
    with pytest.raises(DataError, match=f"missing {TEST_LABELS}.gz"):
        load_mnist("test", root=tmp_path, download=False, verify=False)


# --------------------------------------------------------------------------
# root resolution
# --------------------------------------------------------------------------


def _root_in_error(**kwargs: object) -> str:
    with pytest.raises(DataError) as info:
        load_mnist("test", download=False, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_root_argument_beats_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTVAE_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert str(tmp_path / "arg") in _root_in_error(root=tmp_path / "arg")
    assert str(tmp_path / "arg") in _root_in_error(root=str(tmp_path / "arg"))


def test_env_beats_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTVAE_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert str(tmp_path / "env") in _root_in_error()


def test_xdg_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FASTVAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert str(tmp_path / "xdg" / "fastvae" / "mnist") in _root_in_error()


@pytest.mark.parametrize("xdg", [None, "", "relative/ignored"])
def test_home_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdg: str | None) -> None:
    monkeypatch.delenv("FASTVAE_DATA", raising=False)
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert str(tmp_path / "home" / ".cache" / "fastvae" / "mnist") in _root_in_error()


def test_cache_dir_used_for_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FASTVAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = tmp_path / "fastvae" / "mnist"
    root.mkdir(parents=True)
    images, labels = write_fake_split(root, "test")
    x, y = load_mnist("test", download=False, verify=False)
    np.testing.assert_array_equal(x, images.reshape(len(images), -1) / np.float32(255))
    np.testing.assert_array_equal(y, labels)


# --------------------------------------------------------------------------
# downloads (local HTTP servers only)
# --------------------------------------------------------------------------


def mirror_dir(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    for filename, content in files.items():
        (directory / filename).write_bytes(content)
    return directory


def real_gz(mnist_dir: Path, name: str) -> bytes:
    return (mnist_dir / f"{name}.gz").read_bytes()


def test_download_into_empty_root(
    mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable,
    real_test_split: tuple[np.ndarray, np.ndarray],
) -> None:
    files = {f"{n}.gz": real_gz(mnist_dir, n) for n in (TEST_IMAGES, TEST_LABELS)}
    url, log = serve(mirror_dir(tmp_path, "mirror", files))
    monkeypatch.setenv("FASTVAE_MNIST_MIRRORS", url.rstrip("/"))  # no trailing slash
    root = tmp_path / "cache" / "nested"  # does not exist yet

    images, labels = load_mnist("test", root=root, download=True)
    np.testing.assert_array_equal(images, real_test_split[0])
    np.testing.assert_array_equal(labels, real_test_split[1])
    assert sorted(p.name for p in root.iterdir()) == sorted(files)
    for filename, content in files.items():
        assert (root / filename).read_bytes() == content
    assert sorted(log) == sorted(f"/{f}" for f in files)

    # Second load uses the cache: no further requests, works offline.
    log.clear()
    images2, _ = load_mnist("test", root=root, download=False)
    np.testing.assert_array_equal(images2, images)
    assert log == []


def test_download_only_missing_file(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable
) -> None:
    files = {f"{n}.gz": real_gz(mnist_dir, n) for n in (TEST_IMAGES, TEST_LABELS)}
    url, log = serve(mirror_dir(tmp_path, "mirror", files))
    monkeypatch.setenv("FASTVAE_MNIST_MIRRORS", url)
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(mnist_dir / f"{TEST_IMAGES}.gz", root)
    _, labels = load_mnist("test", root=root)
    assert log == [f"/{TEST_LABELS}.gz"]
    assert labels.shape == (10000,)


def test_download_falls_back_to_next_mirror(
    mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable,
    real_test_split: tuple[np.ndarray, np.ndarray],
) -> None:
    corrupted = bytearray(real_raw(mnist_dir, TEST_LABELS))
    corrupted[500] = (corrupted[500] + 1) % 10
    good = {f"{n}.gz": real_gz(mnist_dir, n) for n in (TEST_IMAGES, TEST_LABELS)}
    empty_url, empty_log = serve(mirror_dir(tmp_path, "empty", {}))  # 404s
    bad_sum_url, bad_sum_log = serve(
        mirror_dir(tmp_path, "badsum", {f"{TEST_LABELS}.gz": gzip.compress(bytes(corrupted))})
    )
    trunc_url, _ = serve(
        mirror_dir(tmp_path, "trunc", {f"{TEST_LABELS}.gz": real_gz(mnist_dir, TEST_LABELS)[:-100]})
    )
    good_url, good_log = serve(mirror_dir(tmp_path, "good", good))
    dead_url = f"http://127.0.0.1:{closed_port()}/"
    mirrors = [dead_url, empty_url, bad_sum_url, trunc_url, good_url]
    monkeypatch.setenv("FASTVAE_MNIST_MIRRORS", " , ".join(mirrors))

    root = tmp_path / "root"
    images, labels = load_mnist("test", root=root)
    np.testing.assert_array_equal(images, real_test_split[0])
    np.testing.assert_array_equal(labels, real_test_split[1])
    assert (root / f"{TEST_LABELS}.gz").read_bytes() == real_gz(mnist_dir, TEST_LABELS)
    assert sorted(p.name for p in root.iterdir()) == sorted(good)
    assert f"/{TEST_LABELS}.gz" in empty_log
    assert bad_sum_log == [f"/{TEST_IMAGES}.gz", f"/{TEST_LABELS}.gz"]  # 404, bad checksum
    assert sorted(good_log) == sorted(f"/{f}" for f in good)


def test_download_all_mirrors_bad(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable
) -> None:
    corrupted = bytearray(real_raw(mnist_dir, TEST_IMAGES))
    corrupted[1000] ^= 0xFF
    bad_sum_url, _ = serve(
        mirror_dir(tmp_path, "badsum", {f"{TEST_IMAGES}.gz": gzip.compress(bytes(corrupted), 1)})
    )
    garbage_url, _ = serve(mirror_dir(tmp_path, "garbage", {f"{TEST_IMAGES}.gz": b"<html>"}))
    empty_url, _ = serve(mirror_dir(tmp_path, "empty", {}))
    dead_url = f"http://127.0.0.1:{closed_port()}/"
    mirrors = [bad_sum_url, garbage_url, empty_url, dead_url]
    monkeypatch.setenv("FASTVAE_MNIST_MIRRORS", ",".join(mirrors))

    root = tmp_path / "root"
    with pytest.raises(DataError) as info:
        load_mnist("test", root=root)
    message = str(info.value)
    for mirror in mirrors:
        assert f"{mirror}{TEST_IMAGES}.gz" in message
    assert "checksum" in message
    assert "404" in message
    assert "root=" in message
    assert "FASTVAE_DATA" in message
    assert list(root.iterdir()) == []  # no temp files or partial downloads left


def test_download_network_failure_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = [f"http://127.0.0.1:{closed_port()}/", f"http://127.0.0.1:{closed_port()}/m/"]
    monkeypatch.setenv("FASTVAE_MNIST_MIRRORS", ",".join(dead))
    root = tmp_path / "root"
    with pytest.raises(DataError, match="FASTVAE_DATA") as info:
        load_mnist("train", root=root)
    assert f"{dead[0]}train-images-idx3-ubyte.gz" in str(info.value)
    assert f"{dead[1]}train-images-idx3-ubyte.gz" in str(info.value)
    assert leftovers(root) == []
    assert list(root.iterdir()) == []


def test_download_tiny_fakes_with_patched_checksums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable
) -> None:
    images, labels = fake_pair(4)
    img_raw, lbl_raw = idx_bytes(images), idx_bytes(labels)
    for name, raw in ((TEST_IMAGES, img_raw), (TEST_LABELS, lbl_raw)):
        monkeypatch.setitem(
            mnist_module._MNIST_FILES, name, (hashlib.sha256(raw).hexdigest(), len(raw))
        )
    bad_lbl = bytearray(lbl_raw)
    bad_lbl[-1] ^= 1
    bad_url, _ = serve(
        mirror_dir(tmp_path, "bad", {f"{TEST_LABELS}.gz": gzip.compress(bytes(bad_lbl))})
    )
    good_url, _ = serve(
        mirror_dir(
            tmp_path,
            "good",
            {
                f"{TEST_IMAGES}.gz": gzip.compress(img_raw),
                f"{TEST_LABELS}.gz": gzip.compress(lbl_raw),
            },
        )
    )
    monkeypatch.setenv("FASTVAE_MNIST_MIRRORS", f"{bad_url},{good_url}")
    root = tmp_path / "root"
    x, y = load_mnist("test", root=root)
    np.testing.assert_array_equal(y, labels)
    assert x.shape == (4, 784)
    assert leftovers(root) == []


def test_download_verify_false_other_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable
) -> None:
    images, labels = fake_pair(3)
    # First mirror serves a malformed labels file, second a good uncompressed one.
    bad_url, _ = serve(
        mirror_dir(
            tmp_path,
            "bad",
            {
                f"{TEST_IMAGES}.gz": gzip.compress(idx_bytes(images)),
                f"{TEST_LABELS}.gz": gzip.compress(idx_bytes(labels)[:-1]),
            },
        )
    )
    good_url, _ = serve(mirror_dir(tmp_path, "good", {f"{TEST_LABELS}.gz": idx_bytes(labels)}))
    monkeypatch.setenv("FASTVAE_MNIST_MIRRORS", f"{bad_url},{good_url}")
    root = tmp_path / "root"
    x, y = load_mnist("test", root=root, verify=False)
    np.testing.assert_array_equal(y, labels)
    # The uncompressed download is stored under the uncompressed name.
    assert sorted(p.name for p in root.iterdir()) == sorted([f"{TEST_IMAGES}.gz", TEST_LABELS])
    x2, y2 = load_mnist("test", root=root, download=False, verify=False)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def test_download_refuses_when_directory_cannot_be_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(DataError, match="cannot create data directory"):
        load_mnist("test", root=blocker / "sub")


# ---------------------------------------------------------------------------
# binarize: the fixed Bernoulli draw models trained with dynamic binarization are scored on
# ---------------------------------------------------------------------------


def test_binarize_is_a_fixed_bernoulli_draw() -> None:
    from fastvae.datasets import binarize

    rng = np.random.default_rng(0)
    p = rng.random((400, 250)).astype(np.float32)
    p[:, 0], p[:, 1] = 0.0, 1.0
    b = binarize(p)
    assert b.dtype == np.float32 and b.shape == p.shape
    assert set(np.unique(b)) <= {0.0, 1.0}
    assert np.all(b[:, 0] == 0.0) and np.all(b[:, 1] == 1.0)
    # Same seed, same draw (float64 input too); another seed, another draw.
    np.testing.assert_array_equal(binarize(p.astype(np.float64)), b)
    assert not np.array_equal(binarize(p, seed=1), b)
    # Bernoulli(p): per-pixel frequencies over 400 rows track p within a few standard errors.
    q = rng.random(250).astype(np.float32)
    draws = binarize(np.tile(q, (4000, 1)))
    se = np.sqrt(q * (1 - q) / 4000) + 1e-3
    assert np.all(np.abs(draws.mean(axis=0) - q) < 5 * se)
    # Shapes other than 2-D keep their shape.
    assert binarize(p[0]).shape == (250,)
    assert binarize(np.zeros((0, 3), np.float32)).shape == (0, 3)
    with pytest.raises(InputError, match=r"x\[3, 7\] is 1.5, outside \[0, 1\]"):
        bad = p.copy()
        bad[3, 7] = 1.5
        binarize(bad)
