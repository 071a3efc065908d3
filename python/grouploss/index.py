"""An exact cosine-similarity index for retrieval, in the Rust core.

>>> from grouploss import Index
>>> index = Index(256)                                   # float32 on the CPU
>>> index.add(gallery_emb, ids=gallery_ids, labels=gallery_labels)  # doctest: +SKIP
>>> scores, ids = index.search(query_emb, k=10)           # doctest: +SKIP
>>> index.save("gallery.safetensors")                     # doctest: +SKIP
>>> index = Index.load("gallery.safetensors")             # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from . import _native
from ._args import integer
from ._native_attribute import NativeAttribute
from .metrics import _as_tensor, _integers_as_tensor

__all__ = ["Index"]

PathLike = Union[str, os.PathLike]


def _int64(name: str, value: Any) -> Optional[torch.Tensor]:
    if value is None:
        return None
    t = _integers_as_tensor(name, value)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected integers, got dtype {t.dtype}")
    return t.to(torch.int64)


class Index:
    """Stored embeddings, L2-normalised, searched by exact cosine similarity.

    Vectors are kept as ``dtype`` (``"float32"``, or ``"float16"`` for half
    the memory) on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``).
    :meth:`search` runs in blocks of queries and of stored vectors
    (computed in float32): beyond the stored vectors, memory stays near one
    block of queries however many are stored (on a CPU with AVX2 and FMA the
    similarities are kept in cache, never written out). Results
    are exact and ordered by (-similarity, order of addition), ties
    included. :meth:`save` writes safetensors (nothing executable).

    Args:
        dim: the embeddings' width.
        dtype: storage dtype.
        device: where the vectors live and the search runs.
    """

    dim = NativeAttribute[int]("The embeddings' width.")
    dtype = NativeAttribute[str]("The storage dtype's name.")
    device = NativeAttribute[str]("The device of the stored vectors.")

    def __init__(self, dim: int, *, dtype: str = "float32", device: str = "cpu") -> None:
        if not isinstance(dtype, str):
            raise ValueError(f'dtype: expected "float32" or "float16", got {dtype!r}')
        if not isinstance(device, (str, torch.device)):
            raise ValueError(f"device: expected a device name or a torch.device, got {device!r}")
        self._native = _native.Index(integer("dim", dim), dtype=dtype, device=str(device))

    def add(self, embeddings: Any, ids: Any = None, labels: Any = None) -> None:
        """Adds ``embeddings`` ((n, dim), tensor or numpy, any floating dtype
        and device) under integer ``ids`` (default: the integers after the
        largest id so far), each naming one vector (an id given twice, or
        one the index holds, is a ``ValueError``), and integer ``labels``
        (given with every add, or never)."""
        self._native.add(
            _as_tensor("embeddings", embeddings), _int64("ids", ids), _int64("labels", labels)
        )

    def search(self, queries: Any, k: int, *, batch_size: Optional[int] = None) -> Tuple[Any, Any]:
        """The ``k`` nearest stored vectors of each query ((q, dim)):
        ``(similarities, ids)``, each (q, k), float32 and int64; numpy arrays
        for numpy queries, tensors on the index's device for tensors.
        ``batch_size``: queries per block (default: from the memory budget)."""
        scores, ids = self._native.search(
            _as_tensor("queries", queries),
            integer("k", k),
            batch_size=None if batch_size is None else integer("batch_size", batch_size),
        )
        if isinstance(queries, torch.Tensor):
            return scores, ids
        return scores.cpu().numpy(), ids.cpu().numpy()

    @property
    def ids(self) -> np.ndarray:
        """The stored ids, in order of addition."""
        return np.asarray(self._native.ids, dtype=np.int64)

    @property
    def labels(self) -> Optional[np.ndarray]:
        """The stored labels, or None for an index without labels."""
        labels = self._native.labels
        return None if labels is None else np.asarray(labels, dtype=np.int64)

    @property
    def info(self) -> Dict[str, str]:
        """Text saved with the index, as safetensors metadata (a copy; assign
        a dict to replace it). ``grouploss index`` records a digest of the
        weights that embedded the vectors (``grouploss.weights_sha256``:
        ``grouploss search`` refuses queries embedded by others) and the labels' names
        (``grouploss.class_names``, a JSON list)."""
        return dict(self._native.info)

    @info.setter
    def info(self, info: Dict[str, str]) -> None:
        if not isinstance(info, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in info.items()
        ):
            raise ValueError(f"info: expected a dict of str to str, got {info!r}")
        self._native.set_info(info)

    def save(self, path: PathLike) -> None:
        """Writes the index to ``path`` (safetensors, ``info`` as its
        metadata), atomically."""
        self._native.save(os.fspath(path))

    @classmethod
    def load(cls, path: PathLike, *, device: str = "cpu") -> Index:
        """Reads an index written by :meth:`save` onto ``device``."""
        index = cls.__new__(cls)
        index._native = _native.Index.load(os.fspath(path), device=str(device))
        return index

    def __len__(self) -> int:
        return len(self._native)

    def __repr__(self) -> str:
        return repr(self._native)
