"""Optional features and the packages they need, declared once.

``pip install grouploss`` gives everything a training run, evaluation and
embedding need. The figures (``grouploss.plots``, the run report, a run's
``loss.png`` / ``metrics.png``) and the glyph benchmark's builder need more;
each lives in an extra of ``pyproject.toml`` with the same name as here.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, List, Tuple

__all__ = ["EXTRAS", "MissingExtra", "hint", "missing", "require"]

#: extra name -> (what needs it, with its verb, ((import name, pip name), ...)); the pip
#: names are those of the extra in ``pyproject.toml``.
EXTRAS: Dict[str, Tuple[str, Tuple[Tuple[str, str], ...]]] = {
    "report": (
        "plots and the report need",
        (
            ("matplotlib", "matplotlib"),
            ("sklearn", "scikit-learn"),
            ("PIL", "pillow"),
            ("threadpoolctl", "threadpoolctl"),
        ),
    ),
    "glyphs": (
        "building the glyph benchmark needs",
        (("PIL", "pillow"), ("fontTools", "fonttools")),
    ),
}


class MissingExtra(ImportError):
    """A feature's optional packages are not installed; the message says
    which and how to install them."""


def missing(extra: str) -> List[str]:
    """The pip names of ``extra``'s packages that are not installed (found
    without importing them)."""
    out = []
    for module, pip_name in EXTRAS[extra][1]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(pip_name)
    return out


def hint(extra: str) -> str:
    """The one sentence that says what ``extra`` gives and how to get it."""
    what, packages = EXTRAS[extra]
    names = [pip_name for _, pip_name in packages]
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return f"{what} {listed}: pip install 'grouploss[{extra}]'"


def require(extra: str) -> None:
    """Raises :class:`MissingExtra` (an ``ImportError``) with :func:`hint`'s
    sentence if any package of ``extra`` is missing."""
    if missing(extra):
        raise MissingExtra(hint(extra))
