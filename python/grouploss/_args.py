"""Argument checks shared by the package's modules: each error names the
argument, says what it takes and shows what it got."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def integer(name: str, value: Any, minimum: Optional[int] = None) -> int:
    """``value`` as an ``int`` (Python or numpy integers; not a bool): a
    ``ValueError`` naming ``name`` for anything else or for a value below
    ``minimum``."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if ok and (minimum is None or value >= minimum):
        return int(value)
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    shown = int(value) if ok else value
    raise ValueError(f"{name}: expected {expected}, got {shown!r}")
