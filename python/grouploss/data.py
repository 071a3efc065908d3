"""The Rust image pipeline: transforms and the threaded batch ``Loader``.

>>> from grouploss.data import Loader, train_transform
>>> from grouploss.datasets import CUB200
>>> from grouploss import ClassBalancedBatchSampler
>>> ds = CUB200("data/CUB_200_2011", split="train")                # doctest: +SKIP
>>> sampler = ClassBalancedBatchSampler(ds.labels, 8, 4)          # doctest: +SKIP
>>> loader = Loader(ds, sampler, train_transform(227, normalization="caffe_bgr"))  # doctest: +SKIP
>>> for images, labels in loader: ...                             # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _native
from ._args import SEED_MAX, integer
from ._deprecation import renamed_keywords
from ._native_attribute import NativeAttribute

__all__ = ["Loader", "Transform", "eval_transform", "small_transform", "train_transform"]

Normalization = Union[str, Tuple[Sequence[float], Sequence[float]]]
Normalize = Normalization  # the 0.x name of the type


def _normalization_args(func: str, normalization: Normalization, renamed: dict) -> dict:
    """The native keywords of ``normalization`` (0.x's ``normalize=`` in
    ``renamed`` still accepted, with a FutureWarning)."""
    new = renamed_keywords(func, renamed, {"normalize": "normalization"}, stacklevel=4)
    normalization = new.get("normalization", normalization)
    if isinstance(normalization, str):
        return {"normalization": normalization}
    try:
        mean, std = normalization
        return {
            "normalization": "mean_std",
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
        }
    except (TypeError, ValueError):
        raise ValueError(
            "normalization: expected 'imagenet', 'caffe_bgr', 'none' or (mean, std), "
            f"got {normalization!r}"
        ) from None


class Transform:
    """A decode + geometry + flip + normalisation pipeline run in Rust.

    Made by :func:`train_transform`, :func:`eval_transform` or
    :func:`small_transform`. Its output is float32 ``(channels, size, size)``.
    Given as a dataset's ``transform``, images are decoded and transformed in
    Rust in one step (a JPEG is decoded only over the crop); it is also the
    transform of :class:`Loader`. Calling it on an image (uint8 tensor
    ``(C, H, W)`` or ``(H, W)``, numpy ``(H, W[, C])`` or a PIL image)
    applies it with the random draws of ``seed`` (default: drawn from
    torch's generator, so ``torch.manual_seed`` and DataLoader workers seed
    it).
    """

    def __init__(self, native: Any) -> None:
        self._native = native

    size = NativeAttribute[int]("Side of the output images.")
    channels = NativeAttribute[int]("Channels of the output images.")
    output_shape = NativeAttribute[Tuple[int, int, int]]("``(channels, size, size)``.")

    def __call__(self, image: Any, seed: Optional[int] = None) -> torch.Tensor:
        """The transformed float32 ``(C, H, W)`` tensor of a uint8 image: a
        ``(C, H, W)`` or ``(H, W)`` tensor, an ``(H, W, C)`` or ``(H, W)``
        numpy array, or a PIL image. ``seed`` fixes the random augmentation
        (None: one drawn from torch's generator)."""
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8:
                raise ValueError(f"image: expected a uint8 tensor, got {image.dtype}")
            arr = image.detach().cpu()
            arr = arr.permute(1, 2, 0) if arr.dim() == 3 else arr
            arr = arr.contiguous().numpy()
        elif isinstance(image, np.ndarray):
            arr = image
        else:
            arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if arr.dtype != np.uint8:
            raise ValueError(f"image: expected uint8 values, got {arr.dtype}")
        return self._native(np.ascontiguousarray(arr), seed=_draw_seed(seed))

    def __repr__(self) -> str:
        return repr(self._native)


def _draw_seed(seed: Optional[int]) -> int:
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return integer("seed", seed, 0, SEED_MAX)


def train_transform(
    size: int = 227,
    *,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    normalization: Normalization = "imagenet",
    channels: int = 3,
    **renamed: Any,
) -> Transform:
    """RandomResizedCrop(size, scale, ratio) + random horizontal flip.

    The crop box is drawn as in torchvision (area ``scale`` times the image's,
    log-uniform aspect ratio in ``ratio``, ten tries then a centre crop) and
    resized with Pillow's antialiased bilinear filter.

    Args:
        size: output side in pixels (the paper's BN-Inception: 227).
        scale: range of the crop's area relative to the image.
        ratio: range of the crop's aspect ratio (width / height).
        flip: mirror half of the images.
        normalization: ``"imagenet"`` ((x/255 - mean) / std, RGB),
            ``"caffe_bgr"`` (x in 0..255 in BGR order minus [104, 117, 128],
            the paper's BN-Inception), ``"none"`` (x/255) or ``(mean, std)``
            applied to x/255 (the trainer's option of the same name;
            0.x's ``normalize=`` still works, with a ``FutureWarning``).
        channels: 3 (grey images are repeated) or 1 (colour images become luma).
    """
    return Transform(
        _native.random_resized_crop(
            size,
            scale=tuple(scale),
            ratio=tuple(ratio),
            flip=flip,
            channels=channels,
            **_normalization_args("train_transform", normalization, renamed),
        )
    )


def eval_transform(
    size: int = 227,
    *,
    resize: int = 256,
    normalization: Normalization = "imagenet",
    channels: int = 3,
    **renamed: Any,
) -> Transform:
    """Resize of the short side to ``resize``, then the central ``size`` square
    (torchvision's ``Resize(resize)`` + ``CenterCrop(size)``). Arguments as in
    :func:`train_transform`."""
    kw = _normalization_args("eval_transform", normalization, renamed)
    return Transform(_native.resize_center_crop(size, resize, channels=channels, **kw))


def small_transform(
    size: int = 28,
    *,
    pad: int = 0,
    flip: bool = False,
    normalization: Normalization = "none",
    channels: int = 1,
    **renamed: Any,
) -> Transform:
    """Small images (28/32 px grey): resized to ``size`` if they differ, then
    padded by ``pad`` zero pixels on each side and cropped back to ``size`` at
    a random offset (``pad=0``: unchanged), optionally flipped. E.g.
    Fashion-MNIST: ``small_transform(28, normalization=([0.286], [0.353]))``."""
    kw = _normalization_args("small_transform", normalization, renamed)
    return Transform(_native.pad_crop(size, pad=pad, flip=flip, channels=channels, **kw))


class Loader:
    """Batches of float32 NCHW images and int64 labels, built by Rust threads.

    A pool of ``num_threads`` threads reads, decodes and transforms the
    batches of ``batch_sampler`` into a queue at most ``prefetch`` batches
    ahead of the consumer, with the GIL released. Iterating yields
    ``(images, labels)`` in the sampler's order. The augmentation of the
    sample at position ``i`` of batch ``j`` of epoch ``e`` is a function of
    ``(seed, e, j, i)``: the same for any number of threads.

    Each ``iter(loader)`` is one epoch: the loader's epoch counter (see
    :meth:`set_epoch`, starting at 0) is given to the sampler's
    ``set_epoch`` if it has one, then advanced. Stopping mid-epoch is fine:
    the threads stop when the iterator is closed or collected.

    Bad files (missing, empty, corrupt): with ``on_error="raise"`` iteration
    raises an error naming the file and its annotation line (``OSError`` /
    ``FileNotFoundError`` or ``ValueError``); with ``on_error="skip"`` the
    sample is reported once (a ``RuntimeWarning``) and replaced by another
    sample of the same class, so batches keep their P x K shape.

    Args:
        dataset: a :mod:`grouploss.datasets` dataset.
        batch_sampler: an iterable of batches of indices, e.g. a
            :class:`~grouploss.ClassBalancedBatchSampler`.
        transform: a :class:`Transform`; default: the dataset's transform.
        num_threads: threads (default: the CPUs this process may use).
        prefetch: batches built ahead (default: 2 x ``num_threads``).
        seed: seed of the augmentation.
        on_error: ``"raise"`` or ``"skip"``.

    Example::

        loader = Loader(ds, ClassBalancedBatchSampler(ds.labels, 8, 4),
                        train_transform(227), num_threads=4)
        for epoch in range(epochs):
            for images, labels in loader:
                ...
    """

    def __init__(
        self,
        dataset: Any,
        batch_sampler: Iterable[Sequence[int]],
        transform: Optional[Transform] = None,
        num_threads: Optional[int] = None,
        prefetch: Optional[int] = None,
        seed: int = 0,
        *,
        on_error: str = "raise",
    ) -> None:
        from .datasets import ImageDataset

        if not isinstance(dataset, ImageDataset):
            raise ValueError(
                f"dataset: expected a grouploss.datasets dataset, got {type(dataset).__name__}"
            )
        transform = transform if transform is not None else dataset.transform
        if not isinstance(transform, Transform):
            raise ValueError(
                "transform: expected a grouploss.data.Transform (train_transform, "
                f"eval_transform, small_transform), got {type(transform).__name__}"
            )
        if num_threads is None:
            num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        if prefetch is None:
            prefetch = 2 * num_threads
        for name, v in (("num_threads", num_threads), ("prefetch", prefetch)):
            integer(name, v)
        integer("seed", seed, 0, SEED_MAX)
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.transform = transform
        self.num_threads = int(num_threads)
        self.prefetch = int(prefetch)
        self.seed = int(seed)
        self.epoch = 0
        self._native = _native.Loader(
            dataset._native,
            transform._native,
            num_threads=self.num_threads,
            prefetch=self.prefetch,
            seed=self.seed,
            on_error=on_error,
        )

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next iteration (also given to the sampler)."""
        self.epoch = integer("epoch", epoch, 0)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> LoaderIterator:
        epoch = self.epoch
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        plan = getattr(self.batch_sampler, "plan", None)
        batches: Any
        if callable(plan):
            batches = plan()
        else:
            batches = [[int(i) for i in b] for b in self.batch_sampler]
        native = self._native.epoch(batches, epoch)
        self.epoch = epoch + 1
        return LoaderIterator(native, self)

    def load_batch(
        self, indices: Sequence[int], *, epoch: int = 0, batch_index: int = 0
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One batch loaded in the calling thread, with the augmentation it
        gets as batch ``batch_index`` of ``epoch``."""
        indices = [integer("indices", i, 0) for i in indices]
        images, labels, _ = self._native.load_batch(indices, epoch, batch_index)
        self._warn_skipped()
        return images, labels

    def _warn_skipped(self) -> None:
        for index, message in self._native.take_skipped():
            warnings.warn(
                f"grouploss: skipping sample {index} ({message}); "
                "a sample of the same class replaces it",
                RuntimeWarning,
                stacklevel=3,
            )


class LoaderIterator:
    """One epoch of a :class:`Loader`; yields ``(images, labels)``.

    ``indices`` holds the dataset indices of the last batch (a skipped
    sample's replacement included). ``close()`` stops the threads now.
    """

    def __init__(self, native: Any, loader: Loader) -> None:
        self._native = native
        self._loader = loader
        self.indices: List[int] = []

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        try:
            images, labels, self.indices = next(self._native)
        finally:
            self._loader._warn_skipped()
        return images, labels

    def __len__(self) -> int:
        return len(self._native)

    def close(self) -> None:
        self._native.close()
