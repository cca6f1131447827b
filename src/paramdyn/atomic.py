"""Atomic writes: a file is written under a temporary name next to it, then renamed onto its
name, so no half-written file ever looks complete (a full disk, a killed job)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary(path: Path | str, *, keep_suffix: bool = False) -> Path:
    """The temporary name of ``path``: ``<name>.tmp``, or ``<stem>.tmp<suffix>`` with
    ``keep_suffix`` (for writers that pick the format by the suffix, e.g. matplotlib)."""
    path = Path(path)
    if keep_suffix:
        return path.with_name(path.stem + ".tmp" + path.suffix)
    return path.with_name(path.name + ".tmp")


@contextmanager
def replacing(path: Path | str, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write; when the block ends without an error, rename it
    onto ``path`` (an error leaves ``path`` as it was)."""
    tmp = temporary(path, keep_suffix=keep_suffix)
    yield tmp
    os.replace(tmp, path)


def write_text(path: Path | str, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)
