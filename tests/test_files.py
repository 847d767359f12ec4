"""fastvae._files.atomic_write, the one atomic write of the Python side (pictures, metrics,
downloads): the file appears whole or not at all, a failed write leaves the old file and no
temporary file, and new files get the umask's permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from fastvae._files import atomic_write


def test_writes_and_returns_what_write_returns(tmp_path: Path) -> None:
    def write(f: BinaryIO) -> int:
        f.write(b"hello")
        f.flush()
        # The temporary file's name is readable, so the callback can check what it wrote.
        assert Path(f.name).read_bytes() == b"hello" and Path(f.name).parent == tmp_path
        return 42

    assert atomic_write(tmp_path / "a.txt", write) == 42
    assert (tmp_path / "a.txt").read_bytes() == b"hello"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "keep.txt"
    target.write_bytes(b"old")

    def write(f: BinaryIO) -> None:
        f.write(b"partial")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, write)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_new_files_honour_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "f", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640


def test_a_missing_folder_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no_dir" / "f", lambda f: f.write(b"x"))
    assert list(tmp_path.iterdir()) == []
