"""Fault injection on data: broken image files, unreadable files, broken
annotation files and a dataset folder removed mid-epoch. Each gives the
documented error naming the file (and the annotation line), or, with
``on_error="skip"``, a warning and a replacement of the same class."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from data_fixtures import make_cub, make_folder

from grouploss.data import Loader, train_transform
from grouploss.datasets import CUB200, CsvDataset, ImageFolder


def _cub(tmp_path, classes=3, per_class=4):
    paths = make_cub(tmp_path, classes=classes, per_class=per_class)
    return tmp_path, paths


def _load(ds, batches, **kw):
    return [(x.clone(), y.clone()) for x, y in Loader(ds, batches, train_transform(16), 1, **kw)]


@pytest.mark.parametrize(
    "damage, error, match",
    [
        ("truncated", ValueError, "truncated JPEG|corrupt JPEG"),
        ("text", ValueError, "not a JPEG or PNG image"),
        ("zeros", ValueError, "not a JPEG or PNG image"),
        ("directory", OSError, "Bird_1_0002.jpg"),
        ("png_header_only", ValueError, "corrupt PNG"),
    ],
)
def test_broken_image_files_raise_naming_the_file_and_line(tmp_path, damage, error, match):
    root, paths = _cub(tmp_path)
    target = root / "images" / paths[2]
    data = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "text":
        target.write_text("this is not an image\n")
    elif damage == "zeros":
        target.write_bytes(bytes(4096))
    elif damage == "directory":
        target.unlink()
        target.mkdir()
    else:
        target.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    ds = CUB200(root)
    with pytest.raises(error, match=match) as info:
        _load(ds, [[0, 1], [2, 3]])
    assert "Bird_1_0002.jpg" in str(info.value)
    assert "line 3 of" in str(info.value)
    # Skip policy: a warning naming the file, the batch keeps its classes.
    with pytest.warns(RuntimeWarning, match="Bird_1_0002.jpg"):
        batches = _load(ds, [[0, 1], [2, 3]], on_error="skip")
    assert [y.tolist() for _, y in batches] == [[0, 0], [0, 0]]


def test_a_png_named_jpg_is_read_by_its_content(tmp_path):
    from PIL import Image

    root, paths = _cub(tmp_path)
    target = root / "images" / paths[0]
    Image.open(target).save(target, format="PNG")
    x, y = _load(CUB200(root), [[0]])[0]
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()


def _run_without_root_privileges(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a Python whose file permissions are enforced: as
    root, with the capabilities that bypass them dropped."""
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to test permissions as root"
        caps = "-dac_override,-dac_read_search"
        cmd = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_unreadable_files_raise_permission_errors_naming_them(tmp_path):
    root, paths = _cub(tmp_path)
    (root / "images" / paths[1]).chmod(0)
    code = textwrap.dedent(
        f"""
        import warnings
        from grouploss.datasets import CUB200
        from grouploss.data import Loader, train_transform
        ds = CUB200({str(root)!r})
        try:
            list(Loader(ds, [[0, 1]], train_transform(16), 1))
        except PermissionError as e:
            print("raised:", e)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = list(Loader(ds, [[0, 1]], train_transform(16), 1, on_error="skip"))
        print("skipped:", len(out), [str(x.message) for x in w])
        """
    )
    p = _run_without_root_privileges(code)
    assert p.returncode == 0, p.stderr
    assert "raised:" in p.stdout and "Bird_1_0001.jpg (line 2 of" in p.stdout, p.stdout
    assert "skipped: 1" in p.stdout and "Permission denied" in p.stdout, p.stdout
    # An unreadable annotation file is an error naming it.
    (root / "images" / paths[1]).chmod(0o644)
    (root / "images.txt").chmod(0)
    p = _run_without_root_privileges(
        f"from grouploss.datasets import CUB200\nCUB200({str(root)!r})"
    )
    assert p.returncode != 0
    assert "PermissionError" in p.stderr and "images.txt" in p.stderr, p.stderr


def test_annotation_files_in_other_encodings_name_the_line(tmp_path):
    root, _ = _cub(tmp_path)
    text = (root / "images.txt").read_text()
    lines = text.splitlines()
    lines[4] = lines[4].replace("Bird", "Bïrd")
    (root / "images.txt").write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(ValueError, match=r"images.txt, line 5: not UTF-8 text"):
        CUB200(root)
    # UTF-16 (as some Windows tools write it) is not UTF-8 either, line 1.
    (root / "images.txt").write_bytes(text.encode("utf-16"))
    with pytest.raises(ValueError, match=r"images.txt, line 1: not UTF-8 text"):
        CUB200(root)


def test_a_byte_order_mark_is_accepted(tmp_path):
    make_folder(tmp_path / "imgs")
    rows = ["label,path,split"]
    for i, cls in enumerate(sorted(os.listdir(tmp_path / "imgs"))):
        rows.append(f"{cls},imgs/{cls}/a.jpg,{'train' if i < 2 else 'test'}")
    (tmp_path / "dataset.csv").write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    ds = CsvDataset(tmp_path, split="train")
    assert len(ds) == 2 and list(ds.classes) == ["cat", "dog"]


@pytest.mark.parametrize(
    "rows, match",
    [
        (["path,split", "a.jpg,train"], "lacks one of the columns label, path, split"),
        (["label,path,split", "a,x.jpg"], "line 2"),
        (["label,path,split", "a,../../etc/passwd,train"], "line 2.*leaves the dataset root"),
        (["label;path;split", "a;x.jpg;train"], "lacks one of the columns"),
    ],
)
def test_csv_with_wrong_columns_names_file_and_line(tmp_path, rows, match):
    (tmp_path / "dataset.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=match) as info:
        CsvDataset(tmp_path, split="train")
    assert "dataset.csv" in str(info.value)


def test_dataset_folder_removed_mid_epoch(tmp_path):
    root = tmp_path / "data"
    make_folder(root)
    ds = ImageFolder(root, split="all")
    batches = [[i] for i in range(len(ds))]
    loader = Loader(ds, batches, train_transform(16), num_threads=1, prefetch=1)
    it = iter(loader)
    next(it)
    shutil.rmtree(root)
    with pytest.raises(FileNotFoundError, match=str(root)):
        for _ in it:
            pass
    # With the skip policy the loader cannot find any replacement either,
    # and says so instead of looping.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="could be read"):
            list(Loader(ds, batches, train_transform(16), 1, on_error="skip"))
