"""The map in ARCHITECTURE.md stays in step with the code: every file it
names exists, and every function or type it names as `module::item`,
`Type::method` or `module.function` is defined where it says."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
CODE_DIRS = ("src", "python/grouploss", "tests", "benchmarks", "examples", "notebooks")


def _quoted() -> list:
    """The map's code spans (a span may wrap; `a::{b, c}` is `a::b` and
    `a::c`), and the `a::b` paths of its fenced blocks (the diagram)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    fenced = re.findall(r"```.*?```", text, flags=re.DOTALL)
    spans = [
        " ".join(s.split())
        for s in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    ]
    spans += [m for block in fenced for m in re.findall(r"\b\w+(?:::\w+)+", block)]
    out = []
    for span in spans:
        m = re.fullmatch(r"((?:\w+::)+)\{([^}]*)\}", span)
        out += [m.group(1) + part.strip() for part in m.group(2).split(",")] if m else [span]
    return out


def _rust_files() -> dict:
    return {p: p.read_text() for p in (ROOT / "src").rglob("*.rs")}


def _defines(text: str, item: str) -> bool:
    return re.search(rf"\b(fn|struct|enum|trait|type|mod|const)\s+{item}\b", text) is not None


#: Files of a run folder (written by the trainer, not in the checkout).
RUN_FOLDER_FILES = {"config.toml"}


def test_every_file_named_in_the_map_exists():
    missing, checked = [], 0
    for name in _quoted():
        if not re.fullmatch(r"[\w./-]+\.(rs|py|md|pyi|toml)", name):
            continue
        if "shared/" in name or name in RUN_FOLDER_FILES:
            continue  # the spec beside the checkout; a run folder's files
        if "/" in name:
            found = any((ROOT / base / name).exists() for base in ("", "src", "python/grouploss"))
        else:
            found = any(any((ROOT / d).rglob(name)) for d in CODE_DIRS) or (ROOT / name).exists()
        checked += 1
        if not found:
            missing.append(name)
    assert missing == []
    assert checked > 20


def test_every_rust_item_named_in_the_map_is_defined_where_it_says():
    """`a::b::item`: defined in module b's file (anywhere in the crate when
    b has no file of its own, as `crate`); `Type::method`: a `fn method`
    (or an enum variant) in a file that defines Type."""
    files = _rust_files()
    missing, checked = [], 0
    for name in _quoted():
        m = re.fullmatch(r"((?:\w+::)*)(\w+)(?:\(\))?", name)
        if "::" not in name or not m:
            continue
        owner, item = m.group(1).rstrip(":").split("::")[-1], m.group(2)
        checked += 1
        if owner[:1].isupper():
            where = [t for t in files.values() if _defines(t, owner)]
        else:
            where = [
                t
                for p, t in files.items()
                if p.stem == owner or (p.stem == "mod" and p.parent.name == owner)
            ] or list(files.values())
        # A method, or a variant of an enum (a line starting with its name).
        variant = re.compile(rf"^\s*{item}\b", re.MULTILINE)
        if not any(_defines(t, item) or (owner[:1].isupper() and variant.search(t)) for t in where):
            missing.append(name)
    assert missing == []
    assert checked > 5


#: Outside packages and file extensions the map writes as `a.b`.
NOT_OURS = {
    "torch",
    "np",
    "numpy",
    "py",
    "pyi",
    "rs",
    "cpp",
    "md",
    "json",
    "jsonl",
    "toml",
    "tsv",
    "html",
}


def test_every_python_function_named_in_the_map_is_defined_in_its_module():
    """`module.function`: defined in python/grouploss/module.py (a module
    that does not exist is reported too)."""
    missing, checked = [], 0
    for name in _quoted():
        m = re.fullmatch(r"([a-z_]+)\.([A-Za-z_]\w*)", name)
        if m is None or m.group(1) in NOT_OURS or m.group(2) in NOT_OURS:
            continue
        path = ROOT / "python" / "grouploss" / f"{m.group(1)}.py"
        if not path.exists():
            missing.append(name)
            continue
        checked += 1
        tree = ast.parse(path.read_text())
        names = {
            n.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        }
        if m.group(2) not in names:
            missing.append(name)
    assert missing == []
    assert checked >= 2
