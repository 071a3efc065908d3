"""Old spellings of keywords, accepted for one release with a warning."""

from __future__ import annotations

import warnings


def renamed_keywords(func: str, given: dict, renames: dict, *, stacklevel: int = 3) -> dict:
    """The keywords of ``func`` that 0.x spelled differently (``renames``:
    old name to new), under their new names, each with a FutureWarning
    (``stacklevel``: that of the user's call, seen from here); any other
    keyword is a TypeError as usual."""
    out = {}
    for old, value in given.items():
        if old not in renames:
            raise TypeError(f"{func}() got an unexpected keyword argument {old!r}")
        new = renames[old]
        warnings.warn(
            f"{func}: {old}= is deprecated, use {new}= (the name used throughout grouploss: "
            "Python, the trainer's TOML and the command line); the old name goes in the "
            "next release",
            FutureWarning,
            stacklevel=stacklevel,
        )
        out[new] = value
    return out
