"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Iterator, Union


@contextlib.contextmanager
def replaced(path: Union[str, os.PathLike]) -> Iterator[pathlib.Path]:
    """A temporary name beside ``path`` (its folder made) to write in the
    block; renamed to ``path`` when the block ends, removed when it raises:
    a reader sees the old file or the new one, never a partial one (a
    killed process may leave its ``.NAME.tmp-PID`` beside it)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
