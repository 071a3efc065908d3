"""Small datasets written by the tests in each published layout, and the
options of the tiny training runs the tests make on them."""

from __future__ import annotations

import gzip
import os
import pathlib
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
# The shared glyphs data: $GROUPLOSS_DATA (the Makefile sets it for a clone
# made away from the checkout), else beside the repository.
GLYPHS = (
    pathlib.Path(os.environ["GROUPLOSS_DATA"]) / "glyphs"
    if os.environ.get("GROUPLOSS_DATA")
    else REPO.parent / "shared" / "data" / "glyphs"
)
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


def photo(seed: int, w: int = 64, h: int = 48, grey: bool = False) -> np.ndarray:
    """A smooth random picture (JPEG-friendly), uint8 (h, w, 3) or (h, w)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    phase = rng.uniform(0, 6, 3)
    freq = rng.uniform(2, 9, 3)
    img = np.stack(
        [127 + 100 * np.sin(freq[c] * x + phase[c]) * np.cos(freq[2 - c] * y) for c in range(3)],
        axis=-1,
    )
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return img.mean(axis=-1).astype(np.uint8) if grey else img


def write_image(path: pathlib.Path, seed: int, w: int = 64, h: int = 48, grey=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(photo(seed, w, h, grey))
    if path.suffix.lower() == ".png":
        img.save(path)
    else:
        img.save(path, quality=90)


def make_cub(root: pathlib.Path, classes: int = 4, per_class: int = 3) -> List[str]:
    """CUB_200_2011 layout; returns the relative image paths in id order."""
    paths, lines_img, lines_lab, lines_cls = [], [], [], []
    i = 0
    for c in range(1, classes + 1):
        name = f"{c:03d}.Bird_{c}"
        lines_cls.append(f"{c} {name}")
        for j in range(per_class):
            i += 1
            rel = f"{name}/Bird_{c}_{j:04d}.jpg"
            write_image(root / "images" / rel, seed=i)
            paths.append(rel)
            lines_img.append(f"{i} {rel}")
            lines_lab.append(f"{i} {c}")
    (root / "images.txt").write_text("\n".join(lines_img) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines_lab) + "\n")
    (root / "classes.txt").write_text("\n".join(lines_cls) + "\n")
    return paths


def make_cars(
    root: pathlib.Path, classes: int = 4, per_class: int = 2, compress: bool = True
) -> List[Tuple[str, int]]:
    """cars_annos.mat written by scipy (MATLAB 5), as the published file."""
    import scipy.io

    entries = []
    for c in range(1, classes + 1):
        for _ in range(per_class):
            rel = f"car_ims/{len(entries) + 1:06d}.jpg"
            write_image(root / rel, seed=100 + len(entries), w=80, h=50)
            entries.append((rel, c))
    fields = [
        ("relative_im_path", "O"),
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("test", "O"),
    ]
    annos = np.zeros((1, len(entries)), dtype=fields)
    for i, (rel, c) in enumerate(entries):
        annos[0, i] = (
            np.array([rel]),
            np.array([[1]], np.uint8),
            np.array([[2]], np.uint8),
            np.array([[70]], np.uint8),
            np.array([[45]], np.uint8),
            np.array([[c]], np.uint8),
            np.array([[i % 2]], np.uint8),
        )
    names = np.empty((1, classes), dtype=object)
    for c in range(classes):
        names[0, c] = np.array([f"Maker Model {c + 1}"])
    scipy.io.savemat(
        root / "cars_annos.mat",
        {"annotations": annos, "class_names": names},
        do_compression=compress,
    )
    return entries


def make_sop(
    root: pathlib.Path,
    train_classes: Sequence[int] = (1, 2, 3),
    test_classes: Sequence[int] = (11, 12),
    per: int = 2,
) -> Dict[str, List[Tuple[int, str]]]:
    """Ebay_train.txt / Ebay_test.txt with `per` images of each product
    (3 + 2 products by default)."""
    out = {}
    img_id = 0
    for fname, classes in (("Ebay_train.txt", train_classes), ("Ebay_test.txt", test_classes)):
        lines = ["image_id class_id super_class_id path"]
        rows = []
        for c in classes:
            for j in range(per):
                img_id += 1
                rel = f"bicycle_final/{c}00{j}_{j}.JPG"
                write_image(root / rel, seed=200 + img_id)
                lines.append(f"{img_id} {c} 1 {rel}")
                rows.append((c, rel))
        (root / fname).write_text("\n".join(lines) + "\n")
        out[fname] = rows
    return out


INSHOP_SPEC = [
    ("id_00000001", "train", 2),
    ("id_00000002", "train", 2),
    ("id_00000007", "query", 1),
    ("id_00000007", "gallery", 2),
    ("id_00000009", "query", 2),
    ("id_00000009", "gallery", 1),
]


def make_inshop(
    root: pathlib.Path, spec: Sequence[Tuple[str, str, int]] = INSHOP_SPEC
) -> List[Tuple[str, str, str]]:
    """Eval/list_eval_partition.txt: `spec` lists (item, status, images)."""
    rows = []
    for item, status, n in spec:
        for _ in range(n):
            rel = f"img/WOMEN/Dresses/{item}/{len(rows):02d}_1_front.jpg"
            write_image(root / rel, seed=300 + len(rows))
            rows.append((rel, item, status))
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    text = [str(len(rows)), "image_name item_id evaluation_status"]
    text += [f"{r}  {i}  {s}" for r, i, s in rows]
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(text) + "\n")
    return rows


def make_folder(root: pathlib.Path, classes: Sequence[str] = ("cat", "dog", "eel", "fox")):
    for k, c in enumerate(classes):
        write_image(root / c / "a.jpg", seed=400 + k)
        write_image(root / c / "sub" / "b.png", seed=450 + k)
        (root / c / "notes.txt").write_text("not an image")


def write_idx(path: pathlib.Path, array: np.ndarray, gz: bool) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    head = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = head + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_idx_pair(root, prefix, images, labels, gz=True, int32=False):
    write_idx(root / f"{prefix}-images-idx3-ubyte", images.astype(np.uint8), gz)
    lab = labels.astype(">i4") if int32 else labels.astype(np.uint8)
    write_idx(root / f"{prefix}-labels-idx1-ubyte", lab, gz)


def read_idx(path: pathlib.Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    code, ndim = data[2], data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.uint8 if code == 0x08 else np.dtype(">i4")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)


def make_glyph_like(root: pathlib.Path, train_classes=10, test_classes=6, per=16, seed=0):
    """A tiny dataset in the glyphs layout whose classes are learnable:
    every class is a fixed random 32 x 32 pattern plus noise and jitter."""
    rng = np.random.default_rng(seed)
    n_cls = train_classes + test_classes
    protos = rng.integers(0, 256, size=(n_cls, 8, 8)).repeat(4, 1).repeat(4, 2)

    def draw(c, k):
        img = np.roll(protos[c], shift=(k % 3 - 1, k % 2), axis=(0, 1)).astype(float)
        return np.clip(img + rng.normal(0, 40, img.shape), 0, 255)

    rows = ["label\tcodepoint\tchar\tname\tsplit"]
    for c in range(n_cls):
        split = "train" if c < train_classes else "test"
        rows.append(f"{c}\tU+{0x41 + c:04X}\t{chr(0x41 + c)}\tLETTER {c}\t{split}")
    (root / "classes.tsv").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.tsv").write_text("\n".join(rows) + "\n")
    for prefix, classes in (("train", range(train_classes)), ("t10k", range(train_classes, n_cls))):
        labels = np.array([c for c in classes for _ in range(per)])
        images = np.stack([draw(c, k) for c in classes for k in range(per)])
        make_idx_pair(root, prefix, images, labels, gz=True, int32=True)
    return root


# A tiny CPU training run: two epochs of 3 x 4 batches, one loader thread,
# quiet, 30% of the training classes held out for validation.
TINY_RUN: Dict[str, object] = dict(
    epochs=2,
    classes_per_batch=3,
    samples_per_class=4,
    num_workers=1,
    eval_batch_size=16,
    progress=False,
    device="cpu",
    val_fraction=0.3,
)


def tiny_run(**overrides) -> Dict[str, object]:
    """The options of `grouploss.train` for a tiny run (TINY_RUN) with
    `overrides`; an override of None leaves that option out (the default)."""
    opts = dict(TINY_RUN, **overrides)
    return {k: v for k, v in opts.items() if v is not None}


def tiny_run_script(**overrides) -> str:
    """A Python program that trains glyphs with `tiny_run(plots=False,
    **overrides)`, the data root and run folder its two arguments: a run in
    a child process."""
    opts = tiny_run(plots=False, **overrides)
    return (
        "import sys, grouploss\n"
        "grouploss.train('glyphs', data_root=sys.argv[1], out_dir=sys.argv[2], "
        f"**{opts!r})\n"
    )
