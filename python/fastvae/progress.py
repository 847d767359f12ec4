"""Progress bars (tqdm), or a silent stand-in when progress is off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm  # type: ignore[import-untyped]

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it") -> Iterator[Any]:
    """A tqdm bar over `total` steps, disabled (no output at all) when not `enabled`."""
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
