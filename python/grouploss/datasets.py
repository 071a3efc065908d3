"""Datasets read by the Rust readers, in their published layouts.

Every class is constructed as ``Name(root=None, split="train",
transform=None, ...)`` and is a ``torch.utils.data.Dataset``:
``dataset[i]`` is ``(image, label)``, ``dataset.labels`` the int64 label of
every sample (``0..len(classes)-1``), ``dataset.classes`` the class names.

Splits follow each dataset's zero-shot protocol: the test classes are never
seen in training. ``split="val"`` is a class-disjoint validation split carved
out of the training classes (``val_fraction`` of them, chosen by
``split_seed``); give the same ``val_fraction`` and ``split_seed`` to the
train split, which then leaves those classes out. ``split="all"`` is every
image.

Without ``transform`` an image is a uint8 tensor ``(C, H, W)`` (C = 1 for
grey images, 3 for colour). A :class:`grouploss.data.Transform` is run in
Rust together with decoding; any other callable gets the uint8 tensor.

The glyph benchmark is rendered from installed typefaces by
:func:`build_glyphs` (``grouploss datasets build glyphs``).

Paths read from annotation files must stay inside the dataset root: a path
with ``..`` or an absolute path is an error naming the file and line.
"""

from __future__ import annotations

import operator
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from . import _native
from ._args import SEED_MAX, boolean, integer, number
from ._glyphs_build import build_glyphs
from ._native_attribute import NativeAttribute
from .data import Transform, _draw_seed

__all__ = [
    "CUB200",
    "Cars196",
    "CsvDataset",
    "FashionMNIST",
    "Glyphs",
    "ImageDataset",
    "ImageFiles",
    "ImageFolder",
    "InShop",
    "StanfordOnlineProducts",
    "build_glyphs",
    "run_dataset",
]

PathLike = Union[str, "os.PathLike[str]"]


class ImageDataset(Dataset):
    """Base of the datasets: one split read by a Rust reader.

    Attributes:
        labels: int64 numpy array, the label of every sample.
        classes: class names; ``classes[label]``.
        is_query, is_gallery: boolean arrays on test splits that define
            queries and a gallery (InShop, CSV with those columns); else None.
        transform: applied by ``__getitem__``.
    """

    _kind = ""

    def __init__(
        self,
        root: Optional[PathLike] = None,
        split: str = "train",
        transform: Optional[Callable[..., Any]] = None,
        *,
        val_fraction: float = 0.0,
        split_seed: int = 0,
        **extra: Any,
    ) -> None:
        self._args = dict(
            root=None if root is None else os.fspath(root),
            split=split,
            val_fraction=number("val_fraction", val_fraction),
            split_seed=integer("split_seed", split_seed, 0, SEED_MAX),
            **extra,
        )
        self.transform = transform
        self._open()

    def _open(self) -> None:
        a = dict(self._args)
        root, split = a.pop("root"), a.pop("split")
        self._native = _native.open_dataset(self._kind, root, split, **a)
        self.labels: np.ndarray = self._native.labels
        self.labels.flags.writeable = False
        self.classes: List[str] = self._native.classes
        self.is_query: Optional[np.ndarray] = self._native.is_query
        self.is_gallery: Optional[np.ndarray] = self._native.is_gallery

    root = NativeAttribute[str]("The dataset's folder.")
    split = NativeAttribute[str]("``train``, ``val`` or ``test``.")

    def __len__(self) -> int:
        return len(self._native)

    def _index(self, index: Any) -> int:
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n}")
        return i + n if i < 0 else i

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        i = self._index(index)
        if isinstance(self.transform, Transform):
            image = self._native.load_transformed(i, self.transform._native, _draw_seed(None))
        else:
            image = self.load(i)
            if self.transform is not None:
                image = self.transform(image)
        return image, int(self.labels[i])

    def load(self, index: int) -> torch.Tensor:
        """Sample ``index`` decoded, uint8 ``(C, H, W)``, untransformed."""
        arr = self._native.load(self._index(index))
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from: its file and annotation line."""
        return self._native.describe(self._index(index))

    def path(self, index: int) -> Optional[str]:
        """The image file of sample ``index`` (None for IDX datasets)."""
        return self._native.path(self._index(index))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_native", "labels", "classes", "is_query", "is_gallery"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, "
            f"images={len(self)}, classes={len(self.classes)})"
        )


class FashionMNIST(ImageDataset):
    """Fashion-MNIST from its IDX files (gzipped or not).

    Found at ``root``, else ``$GROUPLOSS_DATA`` (or its ``fashion-mnist``
    folder), else ``/usr/share/datasets/fashion-mnist`` (Debian's
    ``dataset-fashion-mnist``). Zero-shot (default): ``train`` is classes 0-4
    of the train file (30,000 images), ``test`` classes 5-9 of the test file
    (5,000). ``zero_shot=False``: the standard 60,000 / 10,000 split over all
    ten classes. Images are 28 x 28 grey.
    """

    _kind = "fashion_mnist"

    def __init__(
        self,
        root: Optional[PathLike] = None,
        split: str = "train",
        transform: Optional[Callable[..., Any]] = None,
        *,
        zero_shot: bool = True,
        val_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(
            root,
            split,
            transform,
            val_fraction=val_fraction,
            split_seed=split_seed,
            zero_shot=boolean("zero_shot", zero_shot),
        )


class Glyphs(ImageDataset):
    """The glyphs benchmark: 32 x 32 grey characters drawn by ~1,400 typefaces.

    IDX files whose train and test (``t10k``) halves hold disjoint classes
    (142 each), named in ``classes.tsv`` by their character. Found at
    ``root``, else ``$GROUPLOSS_DATA/glyphs`` (or ``$GROUPLOSS_DATA``), else
    ``$XDG_DATA_HOME/grouploss/glyphs`` (``~/.local/share/grouploss/glyphs``).
    Build it from the typefaces of your machine with :func:`build_glyphs`
    (``grouploss datasets build glyphs``), which writes to that last place
    by default.
    """

    _kind = "glyphs"

    def __init__(
        self,
        root: Optional[PathLike] = None,
        split: str = "train",
        transform: Optional[Callable[..., Any]] = None,
        *,
        val_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(root, split, transform, val_fraction=val_fraction, split_seed=split_seed)


class _Published(ImageDataset):
    def __init__(
        self,
        root: Optional[PathLike] = None,
        split: str = "train",
        transform: Optional[Callable[..., Any]] = None,
        *,
        val_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(root, split, transform, val_fraction=val_fraction, split_seed=split_seed)


class CUB200(_Published):
    """Caltech-UCSD Birds-200-2011: ``root/images.txt`` (``<id> <path>``),
    ``root/image_class_labels.txt`` (``<id> <class>``), optional
    ``root/classes.txt``, images under ``root/images/``. Classes 1-100 train,
    101-200 test (5,864 / 5,924 images). ``root`` defaults to
    ``$GROUPLOSS_DATA/CUB_200_2011``."""

    _kind = "cub200"


class Cars196(_Published):
    """Stanford Cars: ``root/cars_annos.mat`` (struct array ``annotations``
    with ``relative_im_path`` and ``class``, cell array ``class_names``),
    images at ``root/<relative_im_path>``. Classes 1-98 train, 99-196 test
    (8,054 / 8,131 images). ``root`` defaults to ``$GROUPLOSS_DATA/cars196``."""

    _kind = "cars196"


class StanfordOnlineProducts(_Published):
    """Stanford Online Products: ``root/Ebay_train.txt`` and
    ``root/Ebay_test.txt`` (``image_id class_id super_class_id path``):
    11,318 training products (59,551 images), 11,316 test products (60,502).
    ``root`` defaults to ``$GROUPLOSS_DATA/Stanford_Online_Products``."""

    _kind = "sop"


class InShop(_Published):
    """In-Shop Clothes Retrieval: ``list_eval_partition.txt`` (at ``root`` or
    ``root/Eval``; ``image_name item_id evaluation_status``), images at
    ``root/<image_name>``. 3,997 training items; ``split="test"`` holds the
    query and gallery images of the 3,985 test items with ``is_query`` /
    ``is_gallery`` flags, ``"query"`` and ``"gallery"`` each part alone.
    ``root`` defaults to ``$GROUPLOSS_DATA/InShop``."""

    _kind = "inshop"


class ImageFolder(ImageDataset):
    """``root/<class>/**/*.jpg|jpeg|png``, classes sorted by folder name; the
    first ``train_fraction`` of them are the training classes, the rest the
    test classes (zero-shot). ``split="all"`` takes every class. Folders
    without images (notes, logs, empty ones) are not classes, and are not
    counted in the split."""

    _kind = "image_folder"

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: Optional[Callable[..., Any]] = None,
        *,
        train_fraction: float = 0.5,
        val_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(
            root,
            split,
            transform,
            val_fraction=val_fraction,
            split_seed=split_seed,
            train_fraction=number("train_fraction", train_fraction),
        )


class ImageFiles(ImageDataset):
    """Image files (JPEG or PNG) in the order given, for inference on new
    images: ``run.embed_dataset(ImageFiles(paths))``. A folder among
    ``paths`` stands for its images (``*.jpg|jpeg|png`` below it, sorted).
    A file's label is its parent folder's name (``classes[label]``); the
    split is ``"all"``."""

    def __init__(
        self, paths: Sequence[PathLike], transform: Optional[Callable[..., Any]] = None
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self._args = dict(paths=[os.fspath(p) for p in paths])
        self.transform = transform
        self._open()

    def _open(self) -> None:
        self._native = _native.open_image_files(self._args["paths"])
        self.labels = self._native.labels
        self.labels.flags.writeable = False
        self.classes = self._native.classes
        self.is_query = None
        self.is_gallery = None


def run_dataset(
    config: dict, split: str = "test", *, root: Optional[PathLike] = None
) -> ImageDataset:
    """The ``split`` of a run's dataset, opened as the run opened it (same
    root, ``val_fraction`` and split seed), so its order and labels are those
    of the run's embeddings and classifier.

    Args:
        config: a run's configuration (``RunModel.config``).
        split: ``"train"``, ``"val"``, ``"test"``, ``"query"``, ``"gallery"``.
        root: the dataset's files, if they moved since the run.
    """
    kind = config["dataset"].replace("-", "_")
    classes = [
        c
        for c in globals().values()
        if isinstance(c, type) and issubclass(c, ImageDataset) and c._kind == kind
    ]
    if not classes:
        raise ValueError(f"config: expected a dataset of grouploss.datasets, got {kind!r}")
    root = root if root is not None else config.get("data_root") or None
    split_seed = config.get("split_seed")
    if split_seed is None:  # the trainer's default: the run's seed
        split_seed = config["seed"]
    return classes[0](root, split=split, val_fraction=config["val_fraction"], split_seed=split_seed)


class CsvDataset(ImageDataset):
    """A CSV file with a header and the columns ``label`` (any text; integer
    labels sort numerically), ``path`` (relative to ``root``), ``split``
    (``train``, ``val`` or ``test``) and optionally ``is_query`` and
    ``is_gallery`` (0/1 or true/false) for the test rows.

    ``root`` is the folder holding ``csv_file`` (default ``dataset.csv``) or
    the CSV file itself. When the file has ``val`` rows they are the val
    split (``val_fraction`` must then be 0).
    """

    _kind = "csv"

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        transform: Optional[Callable[..., Any]] = None,
        *,
        csv_file: Optional[PathLike] = None,
        val_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        super().__init__(
            root,
            split,
            transform,
            val_fraction=val_fraction,
            split_seed=split_seed,
            csv_file=None if csv_file is None else os.fspath(csv_file),
        )
