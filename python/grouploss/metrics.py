"""Retrieval and clustering metrics of embeddings, computed in Rust.

Every function accepts torch tensors (on any device) and numpy arrays, and
runs in blocks with the GIL released: memory stays O(batch_size x n), never
n x n, so the 60,502 images of Stanford Online Products evaluate in under
a gigabyte.

Definitions:

* Embeddings are L2-normalised unless ``normalize=False``. Neighbours are
  ranked by inner product (cosine similarity), larger first; ties are broken
  by index: of two equally similar gallery items the one with the smaller
  index comes first.
* Without a query set, every sample queries all the others (itself
  excluded). With ``query_embeddings``/``query_labels`` (e.g. In-Shop), the
  queries search ``embeddings``, the gallery. A query set that is the
  gallery itself (the same array, or equal values and labels) is the first
  case: each query leaves itself out. Queries that are gallery items are
  named by ``query_ids``/``gallery_ids``: each query leaves out the gallery
  item with its id.
* **Recall@K**: the fraction of queries with at least one same-class item
  among their K nearest neighbours. A query whose class has no other item
  counts as a miss.
* **MAP@R** and **R-Precision** ("A Metric Learning Reality Check", Musgrave
  et al. 2020): R is the number of same-class items in the gallery;
  ``R-Precision = (same-class items among the first R) / R`` and
  ``MAP@R = (1/R) * sum over the first R places i holding a same-class item
  of precision@i``. Queries with R = 0 are left out of both; ``evaluate``
  reports how many under ``"left_out"``.
* **Precision@K** and **mAP@K** (open-metric-learning's definitions,
  ``oml.functional.metrics.calc_precision`` and ``calc_map``): with
  ``g_i = 1`` when the i-th neighbour is same-class and R as above,
  ``Precision@K = (1/min(K, R)) * sum_{i<=K} g_i`` and
  ``mAP@K = (1/min(K, R)) * sum_{i<=K} g_i * precision@i``, where
  ``precision@i`` is the plain fraction of same-class items among the first
  i. Queries with R = 0 are left out, as for MAP@R.
* Every retrieval metric is a mean over the queries, or with
  ``average="class"`` a mean over the classes of the mean over their
  queries (classes weigh the same whatever their number of queries).
* **NMI**: k-means of the query embeddings (see :func:`kmeans`) with k = the
  number of their classes, then the normalised mutual information of
  classes and clusters, ``I(U; V) / ((H(U) + H(V)) / 2)`` (scikit-learn's
  default arithmetic normalisation).

Embeddings are prepared (normalised) in float64 when the embeddings or the
queries are float64, and in float32 otherwise. Each similarity is the inner
product of two prepared rows summed in a fixed order in float64 (the
products of float32 values are exact): a function of the two rows alone.
So the metrics do not depend on ``batch_size``, on the scan, or on torch's
float32 matmul precision, and equal embeddings (duplicates of different
classes, a collapsed model's) are equal similarities, ranked by index. The
blocked matrix products only find the candidates; an item their rounding
could move is ranked by that sum. (On another device or CPU, the
normalisation itself may round differently in the last bit.)

Example:

>>> import torch
>>> from grouploss import metrics
>>> emb, labels = torch.randn(1000, 64), torch.randint(0, 100, (1000,))
>>> m = metrics.evaluate(emb, labels, ks=(1, 10))
>>> sorted(m)
['left_out', 'map@r', 'nmi', 'r_precision', 'recall@1', 'recall@10']
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from . import _native
from ._args import SEED_MAX, boolean, integer

__all__ = [
    "KMeansResult",
    "evaluate",
    "kmeans",
    "knn",
    "map_at_r",
    "nmi",
    "r_precision",
    "recall_at_k",
]

ArrayLike = Union[torch.Tensor, np.ndarray]

METRICS = ("recall", "map@r", "r_precision", "nmi")
#: Every metric ``include`` may name (``"precision"`` and ``"map"`` give
#: ``precision@K`` and ``map@K`` for every K of ``ks``).
ALL_METRICS = ("recall", "precision", "map", "map@r", "r_precision", "nmi")


class KMeansResult(NamedTuple):
    """A k-means clustering.

    Attributes:
        assignments: cluster index of every sample (int64, n).
        centroids: cluster centres (k x d, float32 or float64).
        inertia: sum of squared distances of the samples to their centres.
    """

    assignments: ArrayLike
    centroids: ArrayLike
    inertia: float


def _as_tensor(name: str, value) -> torch.Tensor:
    """A torch view of `value` (tensor kept as is, numpy array shared; a
    read-only array, such as a memory-mapped ``.npy``, too: nothing here
    writes to it)."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.uint64:
            return value
        value = value.cpu().numpy()  # checked below, as numpy's are
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf" or (arr.dtype.kind == "f" and arr.dtype.itemsize > 8):
        raise ValueError(f"{name}: expected a numeric array or tensor, got dtype {arr.dtype}")
    if not arr.dtype.isnative:  # torch takes the machine's byte order only
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        # int64 holds every value below 2**63; larger ones would wrap.
        if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{name}: expected values below 2**63, got {int(arr.max())}")
        arr = arr.astype(np.int64)
    arr = np.ascontiguousarray(arr)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def _integers_as_tensor(name: str, value) -> torch.Tensor:
    """:func:`_as_tensor` of integers (labels, ids): an empty list is int64,
    where numpy reads ``[]`` as float64."""
    if isinstance(value, (list, tuple)) and len(value) == 0:
        value = np.zeros(0, np.int64)
    return _as_tensor(name, value)


def _labels(name: str, value) -> torch.Tensor:
    t = _integers_as_tensor(name, value)
    if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
        t = t.long()
    return t


def _batch_size(value) -> Optional[int]:
    return None if value is None else integer("batch_size", value, 1)


def _both(a: str, av, b: str, bv) -> None:
    """``a`` and ``b`` are given together or not at all."""
    if (av is None) != (bv is None):
        missing, given = (b, a) if bv is None else (a, b)
        raise ValueError(f"{missing}: expected a value since {given} is given, got None")


def _query(query_embeddings, query_labels):
    _both("query_embeddings", query_embeddings, "query_labels", query_labels)
    if query_embeddings is None:
        return None, None
    return _as_tensor("query_embeddings", query_embeddings), _labels("query_labels", query_labels)


def _same_set(qe, ql, e, y) -> bool:
    """Whether the query set is the gallery itself (the same values, in any
    dtypes: a float32 gallery and its float64 copy are one set)."""
    if qe is e and ql is y:
        return True
    if qe.shape != e.shape or ql.shape != y.shape or qe.device != e.device:
        return False
    return _equal(qe, e) and _equal(ql.to(y.device), y)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, compared in the dtype both widen to."""
    wide = torch.promote_types(a.dtype, b.dtype)
    return bool(torch.equal(a.to(wide), b.to(wide)))


def _own_entries(query_ids, gallery_ids, m: int, n: int) -> torch.Tensor:
    """For each query, the gallery index of the item with its id, or -1."""
    qids = np.asarray(query_ids.cpu() if isinstance(query_ids, torch.Tensor) else query_ids)
    gids = np.asarray(gallery_ids.cpu() if isinstance(gallery_ids, torch.Tensor) else gallery_ids)
    for name, ids, size, of in (
        ("query_ids", qids, m, "query_embeddings"),
        ("gallery_ids", gids, n, "embeddings"),
    ):
        if ids.ndim != 1 or len(ids) != size:
            raise ValueError(
                f"{name}: expected one id per row of {of} ({size}), got shape {list(ids.shape)}"
            )
    index = {}
    for j, g in enumerate(gids.tolist()):
        if index.setdefault(g, j) != j:
            raise ValueError(f"gallery_ids: expected unique ids, got {g!r} twice")
    return torch.tensor([index.get(q, -1) for q in qids.tolist()], dtype=torch.int64)


def evaluate(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    query_embeddings: Optional[ArrayLike] = None,
    query_labels: Optional[ArrayLike] = None,
    query_ids: Optional[ArrayLike] = None,
    gallery_ids: Optional[ArrayLike] = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    include: Sequence[str] = METRICS,
    normalize: bool = True,
    average: str = "query",
    batch_size: Optional[int] = None,
    seed: int = 0,
) -> dict:
    """Retrieval and clustering metrics of ``embeddings`` (see the module
    docstring for the definitions).

    Args:
        embeddings: (n, d) floating embeddings; the gallery when a query set
            is given.
        labels: (n,) integer class labels (any values).
        query_embeddings: optional (m, d) queries that search ``embeddings``.
        query_labels: (m,) labels of the queries; given with
            ``query_embeddings``. Passing the gallery itself (the same
            arrays, or equal ones) evaluates it against itself, each query
            leaving itself out.
        query_ids, gallery_ids: ids (integers or strings) of the queries and
            of the gallery items, given together with a query set: a query
            leaves out the gallery item with its id (queries that are also
            gallery items, as in a set split into queries and a gallery that
            holds everything). Gallery ids are unique; an item and its
            query must have the same label.
        ks: the K of Recall@K, Precision@K and mAP@K, each in ``1..gallery
            size`` (n - 1 without a query set, or with queries in it).
        include: any of ``"recall"``, ``"precision"``, ``"map"`` (mAP@K),
            ``"map@r"``, ``"r_precision"``, ``"nmi"``; the result's keys are
            ``recall@K``, ``precision@K``, ``map@K`` and the other names
            (``"map_at_r"``, the spelling of 0.x, still works with a
            ``FutureWarning``).
        normalize: L2-normalise the embeddings first (cosine similarity).
        average: ``"query"``, the mean over the queries, or ``"class"``, the
            mean over the classes of their queries' mean (NMI is not an
            average).
        batch_size: rows per block of similarities (the side of a square
            tile on CPU) and of k-means distances; None picks them from a
            memory budget (2048 x 2048 float32 tiles on CPU, blocks near
            128 MiB elsewhere).
        seed: seed of k-means (one k-means++ run of at most 300 Lloyd
            iterations).

    Returns:
        ``{"recall@K": ..., "precision@K": ..., "map@K": ..., "map@r": ...,
        "r_precision": ..., "nmi": ...}`` in that order, for what ``include``
        asks, plus ``"left_out"``: the number of queries left out of the
        metrics other than Recall@K and NMI (no other item of their class)
        when one of them is included. A metric with no query to average over
        is NaN.

    Raises:
        ValueError: naming the argument, for embeddings that are not 2-D,
            floating and finite, fewer than 2 samples, labels of another
            length, a query set of another width or device, K outside
            ``1..gallery size``, an unknown metric name.

    Example:
        >>> evaluate(emb, labels, ks=(1, 10, 100, 1000), include=("recall", "map@r"))
        ... # doctest: +SKIP
        {'recall@1': 0.78, 'recall@10': 0.95, ..., 'map@r': 0.43, 'left_out': 0}
    """
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    if isinstance(include, str):
        include = (include,)
    ks = [integer("ks", k, 1) for k in ks]
    include = [_metric_name(str(m)) for m in include]
    e, y = _as_tensor("embeddings", embeddings), _labels("labels", labels)
    qe, ql = _query(query_embeddings, query_labels)
    _both("query_ids", query_ids, "gallery_ids", gallery_ids)
    own = None
    if query_ids is not None:
        if qe is None:
            raise ValueError(
                "query_ids: expected a query set (query_embeddings, query_labels) with them, "
                "got none"
            )
        own = _own_entries(query_ids, gallery_ids, len(qe), len(e))
    elif qe is not None and _same_set(qe, ql, e, y):
        qe = ql = None
    pairs, left_out = _native.evaluate(
        e,
        y,
        qe,
        ql,
        ks=ks,
        include=include,
        normalize=boolean("normalize", normalize),
        batch_size=_batch_size(batch_size),
        seed=integer("seed", seed, 0, SEED_MAX),
        query_own=own,
        average=average,
    )
    out = dict(pairs)
    if {"map@r", "r_precision", "precision", "map"} & set(include):
        out["left_out"] = left_out
    return out


def _metric_name(name: str) -> str:
    if name == "map_at_r":
        warnings.warn(
            'include: "map_at_r" is deprecated, use "map@r" (the key of its value in the '
            "result); the old name goes in the next release",
            FutureWarning,
            stacklevel=3,
        )
        return "map@r"
    return name


def recall_at_k(
    embeddings: ArrayLike,
    labels: ArrayLike,
    k: Union[int, Sequence[int]] = 1,
    *,
    query_embeddings: Optional[ArrayLike] = None,
    query_labels: Optional[ArrayLike] = None,
    normalize: bool = True,
    batch_size: Optional[int] = None,
):
    """Recall@K: the fraction of queries with a same-class item among their
    K nearest neighbours (see :func:`evaluate` for the arguments).

    Returns a float for an integer ``k``, a list of floats (in the order
    given) for a sequence: one pass over the similarities serves every K.

    >>> recall_at_k(emb, labels, k=(1, 2, 4, 8))  # doctest: +SKIP
    [0.61, 0.73, 0.82, 0.89]
    """
    return _at_k(
        "recall", embeddings, labels, k, query_embeddings, query_labels, normalize, batch_size
    )


def _at_k(metric, embeddings, labels, k, query_embeddings, query_labels, normalize, batch_size):
    """``metric@K`` for one K (a float) or several (a list, in order)."""
    single = isinstance(k, (int, np.integer))
    ks = [k] if single else list(k)
    m = evaluate(
        embeddings,
        labels,
        query_embeddings=query_embeddings,
        query_labels=query_labels,
        ks=ks,
        include=(metric,),
        normalize=normalize,
        batch_size=batch_size,
    )
    values = [m[f"{metric}@{int(x)}"] for x in ks]
    return values[0] if single else values


def _single(metric: str, embeddings, labels, query_embeddings, query_labels, normalize, batch_size):
    """The value of one metric (its ``include`` name is its key)."""
    return evaluate(
        embeddings,
        labels,
        query_embeddings=query_embeddings,
        query_labels=query_labels,
        include=(metric,),
        normalize=normalize,
        batch_size=batch_size,
    )[metric]


def map_at_r(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    query_embeddings: Optional[ArrayLike] = None,
    query_labels: Optional[ArrayLike] = None,
    normalize: bool = True,
    batch_size: Optional[int] = None,
) -> float:
    """MAP@R (Musgrave et al. 2020): per query with R same-class gallery
    items, ``(1/R) * sum of precision@i over the first R places i that hold
    a same-class item``, averaged over the queries with R >= 1 (see
    :func:`evaluate` for the arguments).

    >>> map_at_r(emb, labels)  # doctest: +SKIP
    0.43
    """
    args = (query_embeddings, query_labels, normalize, batch_size)
    return _single("map@r", embeddings, labels, *args)


def r_precision(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    query_embeddings: Optional[ArrayLike] = None,
    query_labels: Optional[ArrayLike] = None,
    normalize: bool = True,
    batch_size: Optional[int] = None,
) -> float:
    """R-Precision: per query with R same-class gallery items, the fraction
    of its R nearest neighbours that are same-class, averaged over the
    queries with R >= 1 (see :func:`evaluate` for the arguments).

    >>> r_precision(emb, labels)  # doctest: +SKIP
    0.48
    """
    args = (query_embeddings, query_labels, normalize, batch_size)
    return _single("r_precision", embeddings, labels, *args)


def nmi(labels: ArrayLike, assignments: ArrayLike) -> float:
    """Normalised mutual information ``I(U; V) / ((H(U) + H(V)) / 2)`` of two
    integer labellings of the same samples (natural logarithms; equal to
    scikit-learn's ``normalized_mutual_info_score``, whose limit cases it
    keeps: two single-class labellings score 1, independent ones 0).

    >>> nmi([0, 0, 1, 1], [5, 5, 7, 7])
    1.0
    """
    return _native.nmi(_labels("labels", labels), _labels("assignments", assignments))


def kmeans(
    x: ArrayLike,
    k: int,
    *,
    n_init: int = 1,
    max_iter: int = 300,
    seed: int = 0,
) -> KMeansResult:
    """k-means of the rows of ``x`` into ``k`` clusters, on ``x``'s device.

    scikit-learn's ``KMeans(init="k-means++", algorithm="lloyd", tol=1e-4)``:
    greedy k-means++ seeding (``2 + floor(ln k)`` candidates per centre,
    drawn with probability proportional to the squared distance to the
    nearest centre, the one lowering the potential most kept), then Lloyd
    iterations until the assignments repeat or the centres move by at most
    1e-4 times the mean per-feature variance; an empty cluster takes the
    point farthest from its centre. The best of ``n_init`` runs by inertia
    wins. For k >= 512 with n x k > 2^26 (Stanford Online Products' test
    set, say) the seeding goes in about 256 rounds of k / 256 centres
    at once ("batched k-means++": 2 candidates per centre drawn by the same
    law, the better kept), so that it costs about two Lloyd iterations
    instead of k passes over the data; Lloyd skips the points that Hamerly's
    bounds show cannot change cluster (the same assignments, up to ties
    within rounding). Run r draws from the crate's generator seeded by ``(seed, r)``, so
    results are fixed by ``seed`` (up to the device's float rounding).
    float64 input is computed in float64, other dtypes in float32.

    Returns:
        :class:`KMeansResult` ``(assignments, centroids, inertia)``: numpy
        arrays for numpy input, tensors on ``x``'s device for tensors.

    >>> assignments, centroids, inertia = kmeans(x, 10, n_init=3)  # doctest: +SKIP
    """
    xt = _as_tensor("x", x)
    assignments, centroids, inertia = _native.kmeans(
        xt,
        integer("k", k, 1),
        n_init=integer("n_init", n_init, 1),
        max_iter=integer("max_iter", max_iter, 1),
        seed=integer("seed", seed, 0, SEED_MAX),
    )
    if not isinstance(x, torch.Tensor):
        assignments, centroids = assignments.numpy(), centroids.numpy()
    return KMeansResult(assignments, centroids, inertia)


def knn(
    embeddings: ArrayLike,
    k: int,
    *,
    query_embeddings: Optional[ArrayLike] = None,
    normalize: bool = True,
    batch_size: Optional[int] = None,
):
    """The ``k`` nearest neighbours of every query by cosine similarity (inner
    product with ``normalize=False``), ordered by (-similarity, index).

    Without ``query_embeddings`` every row of ``embeddings`` searches the
    others (itself excluded); with them, the queries search ``embeddings``.
    Similarities are those of :func:`evaluate` (a fixed-order float64 sum,
    see the module's docstring) rounded to the compute dtype, so equal
    embeddings tie, ranked by index, whatever ``batch_size``.

    Returns:
        ``(similarities, indices)``, each (queries x k): numpy arrays for
        numpy input, tensors on the input's device for tensors.

    >>> sims, idx = knn(emb, 4)  # doctest: +SKIP
    """
    q = None if query_embeddings is None else _as_tensor("query_embeddings", query_embeddings)
    sims, idx = _native.knn(
        _as_tensor("embeddings", embeddings),
        integer("k", k, 1),
        q,
        normalize=boolean("normalize", normalize),
        batch_size=_batch_size(batch_size),
    )
    source = embeddings if query_embeddings is None else query_embeddings
    if not isinstance(source, torch.Tensor):
        return sims.numpy(), idx.numpy()
    return sims, idx
