"""The map in ARCHITECTURE.md stays in step with the code: every file it
names exists, and every function or type it names is defined where it says."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAP = (ROOT / "ARCHITECTURE.md").read_text()
CODE_DIRS = ("src", "python/grouploss", "tests", "benchmarks", "examples", "notebooks")


def _quoted() -> list:
    return re.findall(r"`([^`\n]+)`", MAP)


def test_every_file_named_in_the_map_exists():
    missing, checked = [], 0
    for name in _quoted():
        if not re.fullmatch(r"[\w./-]+\.(rs|py|md|pyi|toml)", name):
            continue
        if name.startswith("shared/"):
            continue  # the spec beside the checkout
        if "/" in name:
            found = any((ROOT / base / name).exists() for base in ("", "src", "python/grouploss"))
        else:
            found = any(any((ROOT / d).rglob(name)) for d in CODE_DIRS) or (ROOT / name).exists()
        checked += 1
        if not found:
            missing.append(name)
    assert missing == []
    assert checked > 20


def test_every_rust_item_named_in_the_map_is_defined():
    """Names written as `module::item` or `Type::method` are defined in the
    crate (a renamed function makes the map lie)."""
    rust = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.rs"))
    missing, checked = [], 0
    for name in _quoted():
        m = re.fullmatch(r"(?:[a-z_]+::)*(\w+)(?:\(\))?", name)
        if "::" not in name or not m:
            continue
        item = m.group(1)
        checked += 1
        if not re.search(rf"\b(fn|struct|enum|trait|type|mod)\s+{item}\b", rust):
            missing.append(name)
    assert missing == []
    assert checked > 5
