"""Small helpers shared across the package and the benchmark scripts."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path`, renamed onto `path` when the block ends without error and removed
    otherwise, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON, atomically; numpy scalars are written as floats."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return Path(path)


__all__ = ["atomic_path", "write_json"]
