"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from typing import Iterator, List, Sequence, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def replaced(path: PathLike) -> Iterator[pathlib.Path]:
    """A temporary name beside ``path`` (its folder made) to write in the
    block; renamed to ``path`` when the block ends, removed when it raises:
    a reader sees the old file or the new one, never a partial one (a
    killed process may leave its ``.NAME.tmp-PID-XXXXXXXX`` beside it)."""
    with replaced_together([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def replaced_together(paths: Sequence[PathLike]) -> Iterator[List[pathlib.Path]]:
    """:func:`replaced` for files that go together (embeddings and their
    labels): none is renamed until every one is written, so a failed write
    leaves the old set whole."""
    paths = [pathlib.Path(p) for p in paths]
    tmps: List[pathlib.Path] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(_reserve(path))
        # The mode the umask gives a new file: a writer that replaces the
        # temporary file instead of writing into it (safetensors' save_file
        # makes it 0600) must not make the result unreadable to others.
        modes = [tmp.stat().st_mode & 0o777 for tmp in tmps]
        yield list(tmps)
        for tmp, path, mode in zip(tmps, paths, modes):
            if tmp.stat().st_mode & 0o777 != mode:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _reserve(path: pathlib.Path) -> pathlib.Path:
    """A temporary name beside ``path`` that no other writer has: created
    empty here, so two threads, or two processes of the same pid (two
    containers on one volume), never write into one file."""
    while True:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
