"""Argument checks shared by the package's modules: each error names the
argument, says what it takes and shows what it got."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

#: The largest integer the native core takes (int64), the default bound.
INT64_MAX = 2**63 - 1
#: Seeds are unsigned 64-bit integers.
SEED_MAX = 2**64 - 1
_SHOWN = {INT64_MAX: "2**63 - 1", SEED_MAX: "2**64 - 1"}


def integer(name: str, value: Any, minimum: Optional[int] = None, maximum: int = INT64_MAX) -> int:
    """``value`` as an ``int`` (Python or numpy integers; not a bool): a
    ``ValueError`` naming ``name`` for anything else or for a value below
    ``minimum`` or above ``maximum`` (int64's largest by default, which a
    native call would refuse with an anonymous OverflowError)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    # Compared as a Python int: numpy 1.x compares uint64 with an int via float64.
    v = int(value) if ok else None
    if v is not None and (minimum is None or v >= minimum) and v <= maximum:
        return v
    if v is not None and v > maximum:
        shown_max = _SHOWN.get(maximum, str(maximum))
        raise ValueError(f"{name}: expected an integer <= {shown_max}, got {v}")
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    shown = v if ok else value
    raise ValueError(f"{name}: expected {expected}, got {shown!r}")


def boolean(name: str, value: Any) -> bool:
    """``value`` as a ``bool`` (Python or numpy bools only, so that a string
    such as ``"no"`` is not taken for True): a ``ValueError`` naming
    ``name`` for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name}: expected True or False, got {value!r}")


def number(
    name: str, value: Any, minimum: Optional[float] = None, *, strict: bool = False
) -> float:
    """``value`` as a finite ``float`` (Python or numpy reals; not a bool):
    a ``ValueError`` naming ``name`` for anything else, for NaN or an
    infinity, or for a value below ``minimum`` (at or below it with
    ``strict``)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    x = _as_float(value) if ok else math.nan
    if math.isfinite(x) and (minimum is None or x > minimum or (x == minimum and not strict)):
        return x
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    raise ValueError(f"{name}: expected a finite number{bound}, got {value!r}")


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf
