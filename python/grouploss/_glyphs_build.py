"""The glyph benchmark, rendered from the typefaces installed on a machine.

The published benchmark (284 classes of printable characters, 142 training
and 142 unseen test classes) was drawn from about 1,400 typefaces of
Debian's font packages. :func:`build_glyphs` draws the same classes, with
the same split, image size and drawing rules, from whatever typefaces this
machine has:

* a class is one character of ``glyphs_classes.tsv`` (label, code point,
  character, Unicode name, split), shipped with the package;
* an image is that character drawn by one typeface, white on black, 32 x 32
  grey, at 22 pixels per em, horizontally centred on its advance width at
  x = 16 and on the baseline y = 24 (so case, size and accents are kept);
* a typeface is used for a class only if its character map has the
  character; a training class takes at most ``max_train`` typefaces (400),
  a test class ``max_test`` (50), drawn at random (``seed``);
* a typeface is one font file (or one face of a collection) with a Unicode
  character map covering ASCII letters and digits, outlines, and a full
  name not seen before; symbol and dingbat typefaces (a symbol character
  map, a pictorial PANOSE family, or such a name) are left out.

Files: ``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz`` and
``t10k-*`` (MNIST's IDX format; labels as unsigned bytes when they fit,
else big-endian int32), ``classes.tsv``, and ``fonts.tsv`` (``font_id``,
``name``, ``path``: the typefaces used). ``classes.tsv`` is written last, so
an interrupted build is never taken for a dataset.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import pathlib
import shutil
import struct
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _extras, _native
from ._args import SEED_MAX, integer

PathLike = Union[str, pathlib.Path]

__all__ = ["FONT_DIRS", "GlyphClass", "Typeface", "build_glyphs", "class_table", "find_fonts"]

#: Where typefaces are looked for when ``fonts`` is not given.
FONT_DIRS: Tuple[str, ...] = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
    "/System/Library/Fonts",
    "/Library/Fonts",
    "~/Library/Fonts",
    "C:/Windows/Fonts",
)

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")

#: Drawing rules of the published benchmark (checked against its images:
#: Liberation Sans drawn this way reproduces them pixel for pixel).
IMAGE_SIZE = 32
PIXELS_PER_EM = 22
ORIGIN = (16, 24)  # centre of the advance width, baseline

#: Every typeface must map these (text typefaces do).
REQUIRED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

#: Names of typefaces that put pictures at letter code points.
PICTORIAL_WORDS = ("dingbat", "wingding", "webding", "symbol", "emoji", "icon", "ornament")

CLASSES_FILE = pathlib.Path(__file__).with_name("glyphs_classes.tsv")


@dataclasses.dataclass(frozen=True)
class GlyphClass:
    """One row of ``classes.tsv``."""

    label: int
    codepoint: int
    char: str
    name: str
    split: str  # "train" or "test"


@dataclasses.dataclass(frozen=True)
class Typeface:
    """A usable typeface: a font file, its face index in a collection, its
    full name and the code points it maps."""

    path: str
    index: int
    name: str
    codepoints: frozenset


def class_table() -> List[GlyphClass]:
    """The benchmark's 284 classes, in label order."""
    rows = CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    out = []
    for line in rows[1:]:
        if not line.strip():
            continue
        label, codepoint, char, name, split = line.split("\t")
        out.append(GlyphClass(int(label), int(codepoint[2:], 16), char, name, split))
    return out


def find_fonts(fonts: Union[PathLike, Sequence[PathLike], None] = None) -> List[pathlib.Path]:
    """The font files (``.ttf``, ``.otf``, ``.ttc``, ``.otc``) of ``fonts``
    (a file or folder, or several; folders are searched recursively), else
    of :data:`FONT_DIRS`; sorted, so that a machine's typefaces always come
    in the same order."""
    explicit = fonts is not None
    found = set()
    for root in _font_roots(fonts):
        if root.is_file():
            found.add(root.resolve())
        elif root.is_dir():
            found.update(_walk(root))
        elif explicit:
            raise FileNotFoundError(f"fonts: {root}: no such file or folder")
    return sorted(found)


def _font_roots(fonts: Union[PathLike, Sequence[PathLike], None]) -> List[pathlib.Path]:
    """``fonts`` as a list of paths (:data:`FONT_DIRS` for None)."""
    if fonts is None:
        fonts = FONT_DIRS
    elif isinstance(fonts, (str, os.PathLike)):
        fonts = [fonts]
    return [pathlib.Path(f).expanduser() for f in fonts]


def _walk(root: pathlib.Path) -> List[pathlib.Path]:
    """Font files below ``root``, following links to folders once each."""
    out, seen = [], set()
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        out += [
            pathlib.Path(dirpath, f).resolve() for f in files if f.lower().endswith(FONT_SUFFIXES)
        ]
    return out


def _full_name(font) -> str:
    name = font["name"]
    full = name.getDebugName(4)
    if not full:
        family, style = name.getDebugName(1) or "", name.getDebugName(2) or ""
        full = f"{family} {style}".strip()
    return " ".join(full.split()) if full else ""


def _why_unusable(font, name: str) -> Optional[str]:
    """None for a usable text typeface, else the reason it is left out."""
    if not any(t in font for t in ("glyf", "CFF ", "CFF2")):
        return "no outlines"
    # getBestCmap reads Unicode maps only, not the symbol map (3, 0).
    if "cmap" not in font or font["cmap"].getBestCmap() is None:
        return "no Unicode character map"
    if "OS/2" in font and getattr(font["OS/2"], "panose", None) is not None:
        if font["OS/2"].panose.bFamilyType == 5:
            return "a pictorial (PANOSE) family"
    low = name.lower()
    if any(w in low for w in PICTORIAL_WORDS):
        return "a symbol or dingbat name"
    cmap = font["cmap"].getBestCmap()
    if any(ord(c) not in cmap for c in REQUIRED):
        return "not every ASCII letter and digit"
    if not name:
        return "no name"
    return None


def _open(path: pathlib.Path):
    """The faces of a font file and the object to close when done."""
    from fontTools.ttLib import TTCollection, TTFont

    if path.suffix.lower() in (".ttc", ".otc"):
        collection = TTCollection(str(path), lazy=True)
        return list(collection.fonts), collection
    font = TTFont(str(path), lazy=True)
    return [font], font


def load_typefaces(files: Iterable[pathlib.Path]) -> Tuple[List[Typeface], Dict[str, int]]:
    """The usable typefaces of ``files`` (the first file of each full name
    wins) and how many faces were left out, by reason."""
    # fontTools logs every oddity of a font's tables; the reasons that
    # matter are counted instead.
    logger = logging.getLogger("fontTools")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return _load_typefaces(files)
    finally:
        logger.setLevel(level)


def _load_typefaces(files: Iterable[pathlib.Path]) -> Tuple[List[Typeface], Dict[str, int]]:
    seen = set()
    usable: List[Typeface] = []
    skipped: Dict[str, int] = {}

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for path in files:
        try:
            faces, handle = _open(path)
        except Exception:  # noqa: BLE001  any unreadable file is left out
            skip("unreadable")
            continue
        try:
            for index, font in enumerate(faces):
                try:
                    name = _full_name(font)
                    why = _why_unusable(font, name)
                    if why is None and name.casefold() in seen:
                        why = "a typeface already found"
                    if why is None:
                        seen.add(name.casefold())
                        cps = frozenset(font["cmap"].getBestCmap())
                        usable.append(Typeface(str(path), index, name, cps))
                except Exception:  # noqa: BLE001
                    why = "unreadable"
                if why is not None:
                    skip(why)
        finally:
            handle.close()
    return usable, skipped


def _render(face: Typeface, chars: Sequence[str]) -> List[Optional[np.ndarray]]:
    """``chars`` drawn by ``face``; None where FreeType fails on the
    typeface (a broken hinting program, say)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.truetype(face.path, PIXELS_PER_EM, index=face.index)
    except OSError:
        return [None] * len(chars)
    out: List[Optional[np.ndarray]] = []
    for ch in chars:
        img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        try:
            ImageDraw.Draw(img).text(ORIGIN, ch, fill=255, font=font, anchor="ms")
        except OSError:
            out.append(None)
            continue
        out.append(np.asarray(img, dtype=np.uint8))
    return out


def _write_idx(path: pathlib.Path, images: np.ndarray, labels: np.ndarray, prefix: str) -> None:
    """``prefix``-images-idx3-ubyte.gz and -labels-idx1-ubyte.gz in ``path``
    (gzip without a time stamp: the same input gives the same bytes)."""
    n = len(labels)
    img_header = struct.pack(">4B3I", 0, 0, 0x08, 3, n, IMAGE_SIZE, IMAGE_SIZE)
    if n == 0 or labels.max() < 256:
        lab_header, lab_bytes = struct.pack(">4BI", 0, 0, 0x08, 1, n), labels.astype(np.uint8)
    else:
        lab_header, lab_bytes = struct.pack(">4BI", 0, 0, 0x0C, 1, n), labels.astype(">i4")
    for name, header, body in (
        (f"{prefix}-images-idx3-ubyte.gz", img_header, images.astype(np.uint8)),
        (f"{prefix}-labels-idx1-ubyte.gz", lab_header, lab_bytes),
    ):
        with open(path / name, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as f:
            f.write(header)
            f.write(body.tobytes())


class _Log:
    """Progress lines on stderr: what was found and written, and within the
    drawing at most one line every ``every`` seconds (as training logs)."""

    def __init__(self, enabled: bool, every: float = 30.0):
        self.enabled, self.every, self.last = enabled, every, time.monotonic()

    def __call__(self, text: str, *, force: bool = True) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= self.every):
            self.last = now
            print(f"glyphs: {text}", file=sys.stderr, flush=True)


def _choose(
    classes: List[GlyphClass],
    faces: List[Typeface],
    caps: Dict[str, int],
    rng: np.random.Generator,
    log: _Log,
) -> Dict[int, List[Tuple[int, np.ndarray]]]:
    """For every class, up to its cap of (face id, image) pairs: typefaces
    that map the character, in a random order, blank drawings passed over."""
    order = {
        c.label: [int(i) for i in rng.permutation(len(faces)) if c.codepoint in faces[i].codepoints]
        for c in classes
    }
    taken: Dict[int, List[Tuple[int, np.ndarray]]] = {c.label: [] for c in classes}
    cursor = {c.label: 0 for c in classes}
    rendered = 0
    while True:
        # The next candidates of every class short of its cap, by typeface.
        wanted: Dict[int, List[GlyphClass]] = {}
        for c in classes:
            need = caps[c.split] - len(taken[c.label])
            batch = order[c.label][cursor[c.label] : cursor[c.label] + need]
            cursor[c.label] += len(batch)
            for f in batch:
                wanted.setdefault(f, []).append(c)
        if not wanted:
            return taken
        drawn: Dict[Tuple[int, int], Optional[np.ndarray]] = {}
        for f in sorted(wanted):
            for c, img in zip(wanted[f], _render(faces[f], [c.char for c in wanted[f]])):
                drawn[(c.label, f)] = img
            rendered += len(wanted[f])
            log(f"{rendered:,} images drawn", force=False)
        # Accepted in each class's random order.
        for c in classes:
            for f in order[c.label][: cursor[c.label]]:
                img = drawn.get((c.label, f))
                if img is not None and img.any() and len(taken[c.label]) < caps[c.split]:
                    taken[c.label].append((f, img))


def build_glyphs(
    root: Optional[PathLike] = None,
    *,
    fonts: Union[PathLike, Sequence[PathLike], None] = None,
    seed: int = 0,
    max_train: int = 400,
    max_test: int = 50,
    force: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """Renders the glyph benchmark from this machine's typefaces into
    ``root`` and returns it (``grouploss datasets build glyphs``).

    Args:
        root: the output folder; default ``$GROUPLOSS_DATA/glyphs``, else
            ``$XDG_DATA_HOME/grouploss/glyphs`` (``~/.local/share/grouploss/
            glyphs``): where :class:`Glyphs` and ``--preset glyphs`` look
            without a root.
        fonts: a font file or folder, or several (folders are searched
            recursively); default the
            system's font folders (:data:`FONT_DIRS`). On Debian, the
            ``fonts-*`` packages listed in the README give about the
            published benchmark's variety.
        seed: which typefaces draw each class, and the images' order.
        max_train: typefaces per training class (the benchmark's 400).
        max_test: typefaces per test class (50).
        force: replace a dataset already in ``root``.
        progress: progress lines on stderr.

    Needs the ``glyphs`` extra (``pip install 'grouploss[glyphs]'``). See
    the module's documentation for the drawing rules.
    """
    _extras.require("glyphs")
    integer("max_train", max_train, 1)
    integer("max_test", max_test, 1)
    integer("seed", seed, 0, SEED_MAX)
    root = (
        pathlib.Path(root)
        if root is not None
        else pathlib.Path(_native.default_build_dir("glyphs"))
    )
    if (root / "classes.tsv").exists() and not force:
        raise FileExistsError(
            f"root: {root} already holds a glyphs dataset; pass force=True (--force) to replace it"
        )
    log = _Log(progress)
    files = find_fonts(fonts)
    faces, skipped = load_typefaces(files)
    left_out = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    log(
        f"{len(faces)} typefaces from {len(files)} font files"
        + (f" (left out: {left_out})" if left_out else "")
    )
    if not faces:
        searched = ", ".join(str(f) for f in _font_roots(fonts)) or "nothing (fonts is empty)"
        raise ValueError(
            f"fonts: expected text typefaces (TrueType or OpenType), found none in {searched}; "
            "on Debian, apt-get install fonts-dejavu-core fonts-liberation (more in the README)"
        )
    classes = class_table()
    rng = np.random.default_rng(seed)
    taken = _choose(classes, faces, {"train": max_train, "test": max_test}, rng, log)
    empty = [c.char for c in classes if not taken[c.label]]
    if empty:
        log(f"{len(empty)} classes have no typeface: {' '.join(empty)}")

    counts = _write_dataset(root, classes, taken, faces, rng)
    log(
        f"{counts['train']:,} training images ({sum(1 for c in classes if c.split == 'train')} "
        f"classes), {counts['test']:,} test images, {counts['typefaces']} typefaces -> {root}"
    )
    return root


def _write_dataset(
    root: pathlib.Path,
    classes: List[GlyphClass],
    taken: Dict[int, List[Tuple[int, np.ndarray]]],
    faces: List[Typeface],
    rng: np.random.Generator,
) -> Dict[str, int]:
    """The dataset's files in ``root``, written in a work folder and moved
    in, ``classes.tsv`` last; returns the counts of images and typefaces."""
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    counts = {}
    try:
        for prefix, split in (("train", "train"), ("t10k", "test")):
            pairs = [
                (c.label, img) for c in classes if c.split == split for _, img in taken[c.label]
            ]
            perm = rng.permutation(len(pairs))
            labels = np.array([pairs[i][0] for i in perm], dtype=np.int64)
            empty = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
            images = np.stack([pairs[i][1] for i in perm]) if pairs else empty
            _write_idx(work, images, labels, prefix)
            counts[split] = len(pairs)
        used = sorted({f for c in classes for f, _ in taken[c.label]})
        rows = ["font_id\tname\tpath"] + [f"{f}\t{faces[f].name}\t{faces[f].path}" for f in used]
        (work / "fonts.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        counts["typefaces"] = len(used)
        (root / "classes.tsv").unlink(missing_ok=True)
        for f in sorted(work.iterdir()):
            os.replace(f, root / f.name)
        # Last: the file that marks the folder as a dataset.
        shutil.copyfile(CLASSES_FILE, work / "classes.tsv")
        os.replace(work / "classes.tsv", root / "classes.tsv")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return counts
