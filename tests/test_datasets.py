"""grouploss.datasets: every reader on fixtures written in its layout, the
real Fashion-MNIST and glyphs files, splits, and bad inputs."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch
from data_fixtures import (
    FASHION,
    GLYPHS,
    make_cars,
    make_cub,
    make_folder,
    make_idx_pair,
    make_inshop,
    make_sop,
    read_idx,
    write_image,
)
from PIL import Image
from torch.utils.data import DataLoader

from grouploss import ClassBalancedBatchSampler
from grouploss.data import eval_transform
from grouploss.datasets import (
    CUB200,
    Cars196,
    CsvDataset,
    FashionMNIST,
    Glyphs,
    ImageFiles,
    ImageFolder,
    InShop,
    StanfordOnlineProducts,
)


def pil_chw(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


# ------------------------------------------------------------------- CUB


def test_cub_zero_shot_splits_labels_and_images(tmp_path):
    paths = make_cub(tmp_path, classes=4, per_class=3)
    train, test = CUB200(tmp_path), CUB200(tmp_path, split="test")
    assert (len(train), len(test)) == (6, 6)
    assert train.classes == ["001.Bird_1", "002.Bird_2"]
    assert test.classes == ["003.Bird_3", "004.Bird_4"]
    assert train.labels.dtype == np.int64
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    image, label = test[4]
    assert label == 1 and image.dtype == torch.uint8 and image.shape == (3, 48, 64)
    # Decoded by libjpeg-turbo like PIL: the same pixels.
    assert torch.equal(image, pil_chw(tmp_path / "images" / paths[6 + 4]))
    assert test.path(4) == str(tmp_path / "images" / paths[10])
    assert test.describe(4).endswith(f"(line 11 of {tmp_path / 'images.txt'})")
    assert test[-1][1] == 1
    with pytest.raises(IndexError):
        test[6]
    assert len(CUB200(tmp_path, split="all")) == 12


def test_val_split_is_class_disjoint_seeded_and_carved_from_train(tmp_path):
    make_cub(tmp_path, classes=12, per_class=2)  # 6 training classes
    kw = dict(val_fraction=0.34, split_seed=5)
    train, val = CUB200(tmp_path, **kw), CUB200(tmp_path, split="val", **kw)
    assert len(val.classes) == 2 and len(train.classes) == 4
    assert not set(train.classes) & set(val.classes)
    assert sorted(train.classes + val.classes) == CUB200(tmp_path).classes
    assert val.labels.tolist() == [0, 0, 1, 1]  # renumbered from 0
    assert CUB200(tmp_path, split="val", **kw).classes == val.classes
    other = {
        tuple(CUB200(tmp_path, split="val", val_fraction=0.34, split_seed=s).classes)
        for s in range(6)
    }
    assert len(other) > 1
    assert len(CUB200(tmp_path, split="test", **kw)) == 12  # test untouched
    with pytest.raises(ValueError, match="val_fraction: expected a fraction > 0"):
        CUB200(tmp_path, split="val")
    with pytest.raises(ValueError, match="val_fraction: expected a number in"):
        CUB200(tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match='split: expected one of "train"'):
        CUB200(tmp_path, split="training")
    with pytest.raises(ValueError, match="no query/gallery"):
        CUB200(tmp_path, split="query")


def test_transform_and_dataloader(tmp_path):
    make_cub(tmp_path, classes=4, per_class=4)
    ds = CUB200(tmp_path, transform=eval_transform(32, resize=36))
    image, _ = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    loader = DataLoader(ds, batch_sampler=ClassBalancedBatchSampler(ds.labels, 2, 2))
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.tolist()[0] == labels.tolist()[1]
    ds.transform = lambda x: x.float().mean()  # any callable gets the uint8 tensor
    assert abs(ds[0][0].item() - pil_chw(ds.path(0)).float().mean().item()) < 1e-3
    # Pickling (DataLoader workers under spawn) reopens the dataset.
    clone = pickle.loads(pickle.dumps(CUB200(tmp_path, split="test")))
    assert clone.labels.tolist() == CUB200(tmp_path, split="test").labels.tolist()
    batches = list(
        DataLoader(
            CUB200(tmp_path, transform=eval_transform(16, resize=16)), batch_size=4, num_workers=2
        )
    )
    assert sum(len(b[1]) for b in batches) == 8


# ------------------------------------------------------------- Cars196


@pytest.mark.parametrize("compress", [True, False])
def test_cars_reads_the_mat_file(tmp_path, compress):
    entries = make_cars(tmp_path, classes=4, per_class=2, compress=compress)
    train, test = Cars196(tmp_path), Cars196(tmp_path, split="test")
    assert train.classes == ["Maker Model 1", "Maker Model 2"]
    assert test.classes == ["Maker Model 3", "Maker Model 4"]
    assert train.labels.tolist() == [0, 0, 1, 1]
    assert [test.path(i) for i in range(4)] == [str(tmp_path / r) for r, _ in entries[4:]]
    assert test[0][0].shape == (3, 50, 80)
    assert "annotation 5 of" in test.describe(0)


def test_cars_rejects_malformed_mat_files(tmp_path):
    (tmp_path / "cars_annos.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 20)
    with pytest.raises(ValueError, match="cars_annos.mat: not a MATLAB 5 MAT-file"):
        Cars196(tmp_path)
    make_cars(tmp_path)
    data = (tmp_path / "cars_annos.mat").read_bytes()
    (tmp_path / "cars_annos.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cars_annos.mat: (truncated|corrupt)"):
        Cars196(tmp_path)
    import scipy.io

    scipy.io.savemat(tmp_path / "cars_annos.mat", {"something": np.ones(3)})
    with pytest.raises(ValueError, match="no struct array 'annotations'"):
        Cars196(tmp_path)


# ------------------------------------------------------------------ SOP


def test_stanford_online_products(tmp_path):
    rows = make_sop(tmp_path)
    train, test = StanfordOnlineProducts(tmp_path), StanfordOnlineProducts(tmp_path, split="test")
    assert (len(train), len(test)) == (6, 4)
    assert train.classes == ["bicycle_final/1", "bicycle_final/2", "bicycle_final/3"]
    assert test.labels.tolist() == [0, 0, 1, 1]
    assert test.path(2) == str(tmp_path / rows["Ebay_test.txt"][2][1])
    assert "line 4 of" in test.describe(2) and "Ebay_test.txt" in test.describe(2)
    assert len(StanfordOnlineProducts(tmp_path, split="all").classes) == 5


# --------------------------------------------------------------- InShop


def test_inshop_query_and_gallery(tmp_path):
    make_inshop(tmp_path)
    train = InShop(tmp_path)
    assert len(train) == 4 and train.classes == ["id_00000001", "id_00000002"]
    assert train.is_query is None
    test = InShop(tmp_path, split="test")
    assert len(test) == 6 and test.classes == ["id_00000007", "id_00000009"]
    assert test.is_query.tolist() == [True, False, False, True, True, False]
    assert (test.is_query ^ test.is_gallery).all()
    q, g = InShop(tmp_path, split="query"), InShop(tmp_path, split="gallery")
    assert (len(q), len(g)) == (3, 3)
    assert q.classes == g.classes == test.classes


def test_inshop_malformed_lines(tmp_path):
    make_inshop(tmp_path)
    f = tmp_path / "Eval" / "list_eval_partition.txt"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:4] + [lines[4].replace("train", "holdout")] + lines[5:]))
    with pytest.raises(ValueError, match="list_eval_partition.txt, line 5: evaluation status"):
        InShop(tmp_path)
    f.write_text("\n".join(["99"] + lines[1:]))
    with pytest.raises(ValueError, match="line 1: announces 99 images, the file lists 10"):
        InShop(tmp_path)


# ---------------------------------------------------------- ImageFolder


def test_image_folder(tmp_path):
    make_folder(tmp_path)
    train = ImageFolder(tmp_path)
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0, 0, 1, 1]
    assert train.path(1).endswith("cat/sub/b.png")
    assert ImageFolder(tmp_path, split="test").classes == ["eel", "fox"]
    assert ImageFolder(tmp_path, split="all").classes == ["cat", "dog", "eel", "fox"]
    assert ImageFolder(tmp_path, train_fraction=0.75).classes == ["cat", "dog", "eel"]
    png, _ = train[1]
    assert torch.equal(png, pil_chw(train.path(1)))
    with pytest.raises(ValueError, match="train_fraction"):
        ImageFolder(tmp_path, train_fraction=0)
    with pytest.raises(FileNotFoundError, match="no such dataset folder"):
        ImageFolder(tmp_path / "nope")


def test_a_file_name_that_is_not_utf8_is_given_back_openable(tmp_path):
    """``path(i)`` of a file named in another encoding (Latin-1 here) is the
    name the OS has, with Python's surrogate escapes: once a replacement
    character, a path to no file."""
    import os

    (tmp_path / "d").mkdir()
    name = (os.fsencode(tmp_path / "d") + b"/caf\xe9.png").decode("utf-8", "surrogateescape")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(name, format="PNG")
    ds = ImageFolder(tmp_path, split="all")
    assert ds.path(0) == name and os.path.exists(ds.path(0))
    assert torch.equal(ds.load(0), pil_chw(name))


def test_folders_without_images_are_not_counted_as_classes(tmp_path):
    """An empty folder, or one of notes, is no class, nor counted in the
    train/test cut (it was: the train split of cat, dog and two such
    folders had no images and raised)."""
    make_folder(tmp_path)  # cat, dog, eel, fox
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "notes.txt").write_text("not an image")
    (tmp_path / "bird").mkdir()
    assert ImageFolder(tmp_path, split="all").classes == ["cat", "dog", "eel", "fox"]
    assert ImageFolder(tmp_path).classes == ["cat", "dog"]
    assert ImageFolder(tmp_path, split="test").classes == ["eel", "fox"]
    empty = tmp_path / "empty"
    (empty / "logs").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders with JPEG or PNG images"):
        ImageFolder(empty)


def test_image_files_in_the_order_given(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "cat" / ".hidden.png").write_bytes(
        (tmp_path / "cat" / "sub" / "b.png").read_bytes()
    )
    b = tmp_path / "cat" / "sub" / "b.png"
    fox = sorted((tmp_path / "fox").glob("*"))
    ds = ImageFiles([fox[0], b, tmp_path / "dog"])
    dog = [str(tmp_path / "dog" / "a.jpg"), str(tmp_path / "dog" / "sub" / "b.png")]
    assert [ds.path(i) for i in range(len(ds))] == [str(fox[0]), str(b), *dog]
    # Labels: the parent folders' names, sorted.
    assert ds.classes == ["dog", "fox", "sub"]
    assert ds.labels.tolist() == [1, 2, 0, 2]
    assert ds.split == "all" and ds.root == str(tmp_path)
    image, label = ds[1]
    assert torch.equal(image, pil_chw(b)) and label == 2
    assert pickle.loads(pickle.dumps(ds)).path(1) == str(b)
    assert len(ImageFiles(tmp_path / "cat")) == 2  # the hidden file left out
    with pytest.raises(FileNotFoundError, match="no such image file"):
        ImageFiles([tmp_path / "nope.png"])
    with pytest.raises(ValueError, match="paths"):
        ImageFiles([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="paths: .*empty holds no .jpg, .jpeg or .png files"):
        ImageFiles([tmp_path / "empty"])


# ------------------------------------------------------------------ CSV


def write_csv(root, rows, header="label,path,split,is_query,is_gallery"):
    (root / "dataset.csv").write_text("\n".join([header] + rows) + "\n")


def test_csv_dataset(tmp_path):
    for i in range(8):
        write_image(tmp_path / "im" / f"{i}.jpg", seed=i)
    write_csv(
        tmp_path,
        [
            "10,im/0.jpg,train,0,0",
            "10,im/1.jpg,train,0,0",
            "9,im/2.jpg,train,0,0",
            '"2","im/3.jpg",val,0,0',
            "7,im/4.jpg,test,1,0",
            "7,im/5.jpg,test,0,1",
            "8,im/6.jpg,TEST,true,false",
            "8,im/7.jpg,test,false,true",
        ],
    )
    train = CsvDataset(tmp_path)
    assert train.classes == ["9", "10"]  # integer labels sort as numbers
    assert train.labels.tolist() == [1, 1, 0]
    assert CsvDataset(tmp_path, split="val").classes == ["2"]
    test = CsvDataset(tmp_path / "dataset.csv", split="test")
    assert test.is_query.tolist() == [True, False, True, False]
    assert len(CsvDataset(tmp_path, split="gallery")) == 2
    with pytest.raises(ValueError, match="has its own val split"):
        CsvDataset(tmp_path, val_fraction=0.5)


@pytest.mark.parametrize(
    "row,match",
    [
        ("cat,im/0.jpg,holdout", 'line 3: split "holdout" is not train, val or test'),
        ("cat,im/0.jpg", "line 3: 2 fields, the header has 3"),
        ("cat,../secret.jpg,train", 'line 3: image path "../secret.jpg" leaves the dataset root'),
        ("cat,/etc/passwd,train", 'line 3: image path "/etc/passwd" is absolute'),
        (",im/0.jpg,train", "line 3: empty label"),
    ],
)
def test_csv_malformed_rows_name_the_line(tmp_path, row, match):
    write_csv(tmp_path, ["dog,im/1.jpg,train", row], header="label,path,split")
    with pytest.raises(ValueError, match=match):
        CsvDataset(tmp_path)


def test_csv_missing_column(tmp_path):
    write_csv(tmp_path, ["a,b"], header="label,file")
    with pytest.raises(ValueError, match="dataset.csv, line 1: header .* lacks one of the columns"):
        CsvDataset(tmp_path)


# ------------------------------------------------- annotation problems


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda t: t.replace("3 001.Bird_1/Bird_1_0002.jpg", "3"),
            "images.txt, line 3: expected '<image id> <path>'",
        ),
        (
            lambda t: t.replace("5 002.Bird_2/", "5 ../../"),
            r"images.txt, line 5: image path .* leaves",
        ),
        (
            lambda t: t.replace("6 002.Bird_2/", "6 /etc/"),
            r"images.txt, line 6: image path .* is absolute",
        ),
        (lambda t: t + "99 x.jpg\n", "images.txt, line 13: image id 99 has no class"),
        (lambda t: t + "1 x.jpg\n", "images.txt, line 13: image id 1 listed twice"),
    ],
)
def test_cub_malformed_annotations_name_the_line(tmp_path, edit, match):
    make_cub(tmp_path)
    f = tmp_path / "images.txt"
    f.write_text(edit(f.read_text()))
    with pytest.raises(ValueError, match=match):
        CUB200(tmp_path)


def test_missing_annotation_file_and_root(tmp_path, monkeypatch):
    make_cub(tmp_path)
    (tmp_path / "image_class_labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match="image_class_labels.txt"):
        CUB200(tmp_path)
    monkeypatch.delenv("GROUPLOSS_DATA", raising=False)
    with pytest.raises(
        FileNotFoundError, match=r"dataset not found; pass root=\.\.\. \(`--data-root` on the"
    ):
        CUB200()
    # A folder that is not the dataset's is named as such, not by the first
    # file found missing.
    other = tmp_path / "other"
    other.mkdir()
    (other / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(
        FileNotFoundError, match=r"other: no CUB200 dataset here \(none of images\.txt\)"
    ):
        CUB200(other)
    (tmp_path / "image_class_labels.txt").write_bytes(b"1 1\n2 \xff\n")
    with pytest.raises(ValueError, match="image_class_labels.txt, line 2: not UTF-8"):
        CUB200(tmp_path)


def test_bad_images_raise_naming_file_and_line(tmp_path):
    paths = make_cub(tmp_path)
    ds = CUB200(tmp_path)
    (tmp_path / "images" / paths[0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"Bird_1_0000.jpg \(line 1 of .*images.txt\)"):
        ds[0]
    (tmp_path / "images" / paths[1]).write_bytes(b"")
    with pytest.raises(ValueError, match=r"Bird_1_0001.jpg \(line 2 of .*\): empty file"):
        ds[1]
    (tmp_path / "images" / paths[2]).write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match=r"line 3 of .*: not a JPEG or PNG image"):
        ds[2]
    good = (tmp_path / "images" / paths[3]).read_bytes()
    (tmp_path / "images" / paths[3]).write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"line 4 of .*: truncated JPEG"):
        ds[3]
    corrupt = bytearray(good)
    corrupt[200:400] = bytes(200)
    corrupt[20:60] = b"\xff" * 40  # break the quantisation tables
    (tmp_path / "images" / paths[4]).write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"line 5 of .*: corrupt JPEG"):
        ds[4]


# ------------------------------------------------------------------ IDX


@pytest.mark.parametrize("gz,int32", [(True, False), (False, True)])
def test_idx_fixture_in_the_fashion_layout(tmp_path, gz, int32):
    rng = np.random.default_rng(0)
    tr_img, tr_lab = rng.integers(0, 256, (40, 28, 28)), np.arange(40) % 10
    te_img, te_lab = rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10
    make_idx_pair(tmp_path, "train", tr_img, tr_lab, gz=gz, int32=int32)
    make_idx_pair(tmp_path, "t10k", te_img, te_lab, gz=gz, int32=int32)
    train = FashionMNIST(tmp_path)
    assert len(train) == 20 and train.classes == [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
    ]
    first = np.flatnonzero(tr_lab < 5)
    image, label = train[3]
    assert image.shape == (1, 28, 28)
    assert np.array_equal(image[0].numpy(), tr_img[first[3]]) and label == tr_lab[first[3]]
    assert f"image {first[3]} of" in train.describe(3)
    test = FashionMNIST(tmp_path, split="test")
    assert test.labels.tolist() == (te_lab[te_lab >= 5] - 5).tolist()
    std = FashionMNIST(tmp_path, split="test", zero_shot=False)
    assert len(std) == 20 and len(std.classes) == 10


def test_idx_root_from_the_environment(tmp_path, monkeypatch):
    sub = tmp_path / "fashion-mnist"
    make_idx_pair(sub, "train", np.zeros((10, 28, 28)), np.arange(10))
    monkeypatch.setenv("GROUPLOSS_DATA", str(tmp_path))
    assert FashionMNIST().root == str(sub)


def test_idx_errors(tmp_path):
    make_idx_pair(tmp_path, "train", np.zeros((10, 28, 28)), np.arange(9))
    with pytest.raises(ValueError, match=r"\[9\] labels for 10 images"):
        FashionMNIST(tmp_path)
    make_idx_pair(tmp_path, "train", np.zeros((10, 28, 28)), np.arange(10) + 3)
    with pytest.raises(ValueError, match="label 10 of image 7 is not in 0..9"):
        FashionMNIST(tmp_path)
    lab = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(lab.read_bytes()))
    raw[2] = 0x0D
    lab.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="type code 0x0d is not supported"):
        FashionMNIST(tmp_path)
    lab.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ValueError, match="corrupt gzip data"):
        FashionMNIST(tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz: IDX file not found"):
        FashionMNIST(tmp_path, split="test")


# ------------------------------------------------------ the real files


def test_real_fashion_mnist():
    train = FashionMNIST(zero_shot=False)
    test = FashionMNIST(split="test", zero_shot=False)
    assert (len(train), len(test)) == (60_000, 10_000)
    raw = read_idx(FASHION / "train-labels-idx1-ubyte.gz").astype(np.int64)
    assert np.array_equal(train.labels, raw)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    images = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    assert np.array_equal(test[1234][0][0].numpy(), images[1234])
    zs_train, zs_test = FashionMNIST(), FashionMNIST(split="test")
    assert (len(zs_train), len(zs_test)) == (30_000, 5_000)
    assert zs_test.classes == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_real_glyphs_match_classes_tsv_and_files():
    rows = [line.split("\t") for line in (GLYPHS / "classes.tsv").read_text().splitlines()[1:]]
    for split, prefix, expected in (("train", "train", 56_800), ("test", "t10k", 7_100)):
        ds = Glyphs(GLYPHS, split=split)
        raw = read_idx(GLYPHS / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        tsv = [r for r in rows if r[4] == split]
        assert len(ds) == len(raw) == expected
        assert len(ds.classes) == len(tsv) == 142
        assert ds.classes == [r[2] for r in tsv]
        # Labels are renumbered 0..141 in classes.tsv order.
        ids = np.array([int(r[0]) for r in tsv])
        assert np.array_equal(ids[ds.labels], raw)
        assert ds[0][0].shape == (1, 32, 32)
    assert set(Glyphs(split="train").classes).isdisjoint(Glyphs(split="test").classes)


def test_a_colour_jpeg_wanted_grey_is_pils_luma_on_every_path(tmp_path):
    """Grey output of a colour JPEG: the dataset's path (``ds[i]``, the
    loader: decoded in Rust for the transform) equals the transform of the
    decoded image and PIL's ``convert("L")``. (It was libjpeg's own grey, the
    Y plane before RGB clipping: 41 grey levels off on saturated colours.)"""
    (tmp_path / "c").mkdir()
    rng = np.random.default_rng(0)
    rgb = (rng.integers(0, 2, (32, 32, 3)) * 255).astype(np.uint8)  # saturated colours
    Image.fromarray(rgb).save(tmp_path / "c" / "x.jpg", quality=90)
    ds = ImageFolder(tmp_path, split="all")
    t = eval_transform(32, resize=32, normalization="none", channels=1)
    pil_l = torch.from_numpy(np.asarray(Image.open(ds.path(0)).convert("L")).copy()).float() / 255
    ds.transform = t
    via_dataset, _ = ds[0]
    assert torch.equal(via_dataset, t(ds.load(0)))
    assert torch.equal(via_dataset[0], pil_l)


def test_grey_and_cmyk_jpegs_decode_like_pil(tmp_path):
    from data_fixtures import photo

    (tmp_path / "a").mkdir()
    Image.fromarray(photo(1, 40, 30)).convert("CMYK").save(tmp_path / "a" / "cmyk.jpg")
    Image.fromarray(photo(2, 40, 30, grey=True)).save(tmp_path / "a" / "grey.jpg")
    ds = ImageFolder(tmp_path, split="all")
    assert torch.equal(ds.load(0), pil_chw(ds.path(0)))  # Adobe CMYK -> RGB as PIL does
    grey = ds.load(1)
    assert grey.shape == (1, 30, 40)
    assert torch.equal(grey[0], pil_chw(ds.path(1))[0])
    ds.transform = eval_transform(24, resize=24, normalization="none")
    rgb, _ = ds[1]
    assert rgb.shape == (3, 24, 24) and torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
