"""grouploss.datasets.build_glyphs (``grouploss datasets build glyphs``): the
glyph benchmark rendered from installed typefaces, its drawing rules against
the published images, the typefaces it leaves out, and a training step on a
small set built from the fonts of a fresh machine."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from data_fixtures import GLYPHS, read_idx, tiny_run

import grouploss
from grouploss import _glyphs_build as gb
from grouploss import _native
from grouploss.datasets import Glyphs, build_glyphs

FILES = [
    "classes.tsv",
    "fonts.tsv",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
]


def _make_font(path: pathlib.Path, name: str, chars: str, *, panose_family=2, empty="") -> str:
    """A TrueType font named ``name`` mapping ``chars`` to filled boxes
    (the characters of ``empty`` to glyphs without outlines)."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def box(w):
        pen = TTGlyphPen(None)
        pen.moveTo((50, 0))
        pen.lineTo((50, 700))
        pen.lineTo((w - 50, 700))
        pen.lineTo((w - 50, 0))
        pen.closePath()
        return pen.glyph()

    names = [".notdef"] + [f"g{ord(c):04X}" for c in chars]
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({ord(c): f"g{ord(c):04X}" for c in chars})
    glyphs = {".notdef": box(500)}
    for i, c in enumerate(chars):
        glyphs[f"g{ord(c):04X}"] = TTGlyphPen(None).glyph() if c in empty else box(300 + 10 * i)
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({n: (600, 50) for n in names})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    family, _, style = name.rpartition(" ")
    fb.setupNameTable({"familyName": family, "styleName": style, "fullName": name})
    fb.setupOS2(panose=_panose(panose_family))
    fb.setupPost()
    fb.save(str(path))
    return str(path)


def _panose(family: int):
    from fontTools.ttLib.tables.O_S_2f_2 import Panose

    p = Panose()
    for field in (
        "bSerifStyle", "bWeight", "bProportion", "bContrast", "bStrokeVariation",
        "bArmStyle", "bLetterForm", "bMidline", "bXHeight",
    ):  # fmt: skip
        setattr(p, field, 0)
    p.bFamilyType = family
    return p


def _system_typefaces(count: int):
    """The first ``count`` usable typefaces of the system's font folders,
    each from a font file of its own (not a collection). .ci/setup installs
    fonts-dejavu-core and fonts-liberation, so a fresh machine has them."""
    files = [f for f in gb.find_fonts() if f.suffix.lower() in (".ttf", ".otf")]
    faces, _ = gb.load_typefaces(files)
    if len(faces) < count:
        pytest.fail(f"expected {count} typefaces in {gb.FONT_DIRS}, found {len(faces)}")
    return faces[:count]


def test_the_class_table_is_the_benchmarks():
    classes = gb.class_table()
    assert [c.label for c in classes] == list(range(284))
    assert sum(c.split == "train" for c in classes) == sum(c.split == "test" for c in classes)
    assert all(chr(c.codepoint) == c.char for c in classes)
    if (GLYPHS / "classes.tsv").exists():
        assert gb.CLASSES_FILE.read_bytes() == (GLYPHS / "classes.tsv").read_bytes()


def _published_faces() -> list:
    """This machine's typefaces that drew the published benchmark (none
    without it); read once, at collection."""
    if not (GLYPHS / "fonts.tsv").exists():
        return []
    published = {line.split("\t")[1] for line in (GLYPHS / "fonts.tsv").read_text().splitlines()}
    return [f for f in gb.load_typefaces(gb.find_fonts())[0] if f.name in published]


PUBLISHED_FACES = _published_faces()


@pytest.mark.skipif(
    not PUBLISHED_FACES,
    reason="the published glyphs benchmark, or any of its typefaces, is not here",
)
def test_the_drawing_rules_reproduce_the_published_images():
    """Typefaces of this machine that drew the published benchmark draw,
    with the builder's rules, images found pixel for pixel in it."""
    faces = PUBLISHED_FACES
    images = read_idx(GLYPHS / "train-images-idx3-ubyte.gz")
    labels = read_idx(GLYPHS / "train-labels-idx1-ubyte.gz").astype(int)
    stored = {(int(y), x.tobytes()) for x, y in zip(images, labels)}
    train = [c for c in gb.class_table() if c.split == "train"]
    found = drawn = 0
    for face in faces[:6]:
        classes = [c for c in train if c.codepoint in face.codepoints]
        for c, img in zip(classes, gb._render(face, [c.char for c in classes])):
            drawn += 1
            found += (c.label, img.tobytes()) in stored
    # Each published class holds 400 of ~1,400 typefaces: about a quarter
    # of these drawings are in it, and none would be if a rule differed.
    assert found >= 0.1 * drawn, (found, drawn)


def test_typefaces_that_are_not_text_are_left_out(tmp_path):
    text = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    _make_font(fonts / "a.ttf", "Boxes Regular", text + "é", empty="é")
    _make_font(fonts / "b.ttf", "Boxes Regular", text)  # the same name again
    _make_font(fonts / "c.ttf", "Boxes Dingbats Regular", text)
    _make_font(fonts / "d.ttf", "Pictures Regular", text, panose_family=5)
    _make_font(fonts / "e.ttf", "Capitals Regular", text[:26])
    (fonts / "f.ttf").write_bytes(b"not a font")
    faces, skipped = gb.load_typefaces(gb.find_fonts([fonts]))
    assert [(f.name, pathlib.Path(f.path).name) for f in faces] == [("Boxes Regular", "a.ttf")]
    assert skipped == {
        "a typeface already found": 1,
        "a symbol or dingbat name": 1,
        "a pictorial (PANOSE) family": 1,
        "not every ASCII letter and digit": 1,
        "unreadable": 1,
    }
    # A glyph without outlines draws nothing: the class goes without it.
    out = build_glyphs(tmp_path / "set", fonts=[fonts / "a.ttf"], progress=False)
    labels = read_idx(out / "train-labels-idx1-ubyte.gz")
    by_char = {c.char: c for c in gb.class_table()}
    assert by_char["A"].label in labels
    e_acute = by_char["é"]
    split = "train" if e_acute.split == "train" else "t10k"
    assert e_acute.label not in read_idx(out / f"{split}-labels-idx1-ubyte.gz")


def test_a_small_set_from_a_fresh_machines_fonts_trains(tmp_path):
    faces = _system_typefaces(3)
    root = tmp_path / "glyphs"
    cmd = [sys.executable, "-m", "grouploss.cli", "datasets", "build", "glyphs"]
    cmd += ["--root", str(root), "--max-train", "3", "--max-test", "2", "--seed", "7"]
    for f in faces:
        cmd += ["--fonts", f.path]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "3 typefaces from 3 font files" in run.stderr
    assert sorted(p.name for p in root.iterdir()) == FILES

    classes = gb.class_table()
    for prefix, split, cap in (("train", "train", 3), ("t10k", "test", 2)):
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(int)
        assert images.shape == (len(labels), 32, 32) and images.dtype == np.uint8
        counts = np.bincount(labels, minlength=len(classes))
        for c in classes:
            covered = sum(c.codepoint in f.codepoints for f in faces)
            want = min(cap, covered) if c.split == split else 0
            assert counts[c.label] == want, (c, counts[c.label])
        assert all(img.any() for img in images)
    # The baseline is row 24: a letter without descender ends on row 23.
    images = read_idx(root / "train-images-idx3-ubyte.gz")
    labels = read_idx(root / "train-labels-idx1-ubyte.gz").astype(int)
    x = next(c.label for c in classes if c.char in "xzAH" and c.split == "train")
    for img in images[labels == x]:
        assert np.flatnonzero((img > 64).any(axis=1)).max() == 23

    rows = [r.split("\t") for r in (root / "fonts.tsv").read_text().splitlines()]
    assert rows[0] == ["font_id", "name", "path"]
    assert sorted(r[1] for r in rows[1:]) == sorted(f.name for f in faces)

    # Again over it: refused, then the same bytes with --force.
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1
    assert again.stderr.startswith("grouploss: error: root: ") and "--force" in again.stderr
    forced = subprocess.run(cmd + ["--force", "--quiet"], capture_output=True, text=True)
    assert forced.returncode == 0 and forced.stderr == "", forced.stderr
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before

    train, test = Glyphs(root, split="train"), Glyphs(root, split="test")
    assert len(train.classes) == 142 and len(test.classes) == 142
    options = tiny_run(
        epochs=1,
        max_steps_per_epoch=1,
        classes_per_batch=4,
        samples_per_class=3,
        val_fraction=0.1,
        eval_batch_size=None,
        plots=False,
    )
    result = grouploss.train("glyphs", data_root=root, out_dir=tmp_path / "run", **options)
    assert np.isfinite(result.history[0]["train_loss"])
    assert 0.0 <= result.test["recall@1"] <= 1.0


def test_without_data_glyphs_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPLOSS_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    with pytest.raises(FileNotFoundError, match="grouploss datasets build glyphs"):
        Glyphs()
    assert _native.default_build_dir("glyphs") == tmp_path / "data" / "glyphs"
    monkeypatch.delenv("GROUPLOSS_DATA")
    user = tmp_path / "home" / ".local" / "share" / "grouploss" / "glyphs"
    assert _native.default_build_dir("glyphs") == user
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert _native.default_build_dir("glyphs") == tmp_path / "xdg" / "grouploss" / "glyphs"
    # What the builder writes there by default is found without a root.
    faces = _system_typefaces(1)
    build_glyphs(fonts=[faces[0].path], max_train=2, max_test=2, progress=False)
    assert Glyphs(split="test").root == str(tmp_path / "xdg" / "grouploss" / "glyphs")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_train=0), r"^max_train: expected an integer >= 1, got 0"),
        (dict(max_test=2.5), r"^max_test: expected an integer >= 1, got 2.5"),
        (dict(seed=-1), r"^seed: expected an integer >= 0, got -1"),
    ],
)
def test_arguments_are_checked(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_glyphs(tmp_path, **kwargs)


def test_fonts_may_be_one_path_and_links_are_followed_once(tmp_path):
    text = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    fonts = tmp_path / "fonts"
    (fonts / "sub").mkdir(parents=True)
    _make_font(fonts / "sub" / "a.ttf", "Boxes Regular", text)
    (fonts / "sub" / "loop").symlink_to(fonts, target_is_directory=True)
    assert gb.find_fonts(str(fonts)) == [(fonts / "sub" / "a.ttf").resolve()]
    assert gb.find_fonts(fonts / "sub" / "a.ttf") == gb.find_fonts([fonts])


def test_missing_fonts_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="^fonts: .*nowhere: no such file or folder"):
        build_glyphs(tmp_path, fonts=[tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="^fonts: expected text typefaces"):
        build_glyphs(tmp_path / "out", fonts=[tmp_path / "empty"])
    assert not (tmp_path / "out").exists()
