"""Figures of a run, shared by the CLI's run folder, the HTML report and the
notebooks. Every function returns a matplotlib ``Figure`` (and saves it as PNG
when given a path); none of them shows anything, so they work headless.

They need the ``report`` extra (matplotlib, scikit-learn, pillow:
``pip install 'grouploss[report]'``); without it each raises
``ImportError`` saying so.

Images may be given as any sequence indexable by position (a numpy array, a
list, or a lazy wrapper around ``dataset.load``) of uint8 or float images,
``(C, H, W)`` or ``(H, W, C)`` or ``(H, W)``, numpy arrays or CPU tensors.

>>> from grouploss import plots
>>> fig = plots.loss_curve(run.history, "loss.png")   # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import pathlib
import sys
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import _extras
from ._args import boolean, integer
from ._files import replaced

PathLike = Union[str, pathlib.Path]

#: The largest seed of a t-SNE map (scikit-learn's random_state).
TSNE_SEED_MAX = 2**32 - 1

__all__ = [
    "embedding_map",
    "loss_curve",
    "metric_curves",
    "png_bytes",
    "probability_heatmaps",
    "retrieval_gallery",
    "save",
]

# Frame colours of the galleries: a neighbour of the query's class, or not.
RIGHT = "tab:green"
WRONG = "tab:red"


def _plt():
    _extras.require("report")
    import matplotlib

    # Headless unless a backend was chosen already (a notebook's inline one,
    # MPLBACKEND, or pyplot imported by the user): switching would close the
    # user's figures.
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Optional[PathLike]):
    """Writes ``fig`` at ``path`` (if given; PNG, or the format its suffix
    names) and returns it."""
    if path is not None:
        path = pathlib.Path(path)
        with replaced(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:] or "png", dpi=110, bbox_inches="tight")
    return fig


def png_bytes(fig, dpi: int = 110) -> bytes:
    """``fig`` encoded as PNG (what the HTML report embeds)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def loss_curve(history: Sequence[dict], path: Optional[PathLike] = None):
    """Training loss per epoch (and its parts when recorded)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="loss")
    for part in ("train_nll", "train_ce"):
        if history and part in history[0]:
            ax.plot(epochs, [h[part] for h in history], marker=".", ls="--", label=part[6:])
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save(fig, path)


def metric_curves(history: Sequence[dict], split: str = "val", path: Optional[PathLike] = None):
    """Recall@K, MAP@R and NMI per epoch on ``split`` (``history[i][split]``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    rows = [h for h in history if h.get(split)]
    if rows:
        epochs = [h["epoch"] for h in rows]
        keys = sorted(
            (k for k in rows[0][split] if k.startswith("recall@")),
            key=lambda k: int(k.split("@")[1]),
        )
        keys += [k for k in ("map@r", "nmi") if k in rows[0][split]]
        for k in keys:
            ax.plot(epochs, [h[split][k] for h in rows], marker="o", label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{split} metric")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return save(fig, path)


def _as_image(img: Any, size: Optional[int] = None) -> np.ndarray:
    """A displayable uint8 image (H, W) or (H, W, 3), shrunk so that its
    longer side is at most ``size`` pixels."""
    if hasattr(img, "detach"):
        img = img.detach().cpu().numpy()
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or 0 in img.shape[:2]:
        raise ValueError(
            "images: expected (H, W), (H, W, C) or (C, H, W) images of at least one pixel, "
            f"got shape {list(img.shape)}"
        )
    if img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)
    if size is not None and max(img.shape[:2]) > size:
        from PIL import Image

        h, w = img.shape[:2]
        scale = size / max(h, w)
        shape = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = np.asarray(Image.fromarray(img).resize(shape, Image.BILINEAR))
    return img


def _class_name(class_names: Optional[Sequence[str]], label: int) -> str:
    return str(class_names[label]) if class_names is not None else str(label)


def _check_class_names(class_names: Optional[Sequence[str]], labels: Any) -> None:
    """A name for each of ``labels`` (a ``ValueError`` naming
    ``class_names``; indexing would fail deep in the plot, or take a
    negative label's name from the end)."""
    labels = np.asarray(labels)
    if class_names is None or labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= len(class_names):
        raise ValueError(
            f"class_names: expected a name for each label, 0 to {hi}, got {len(class_names)} "
            f"names" + (f" (and a label of {lo})" if lo < 0 else "")
        )


def _class_colours(labels: np.ndarray):
    """One colour per class (tab20 cycled), as an (n, 4) RGBA array."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    _, codes = np.unique(labels, return_inverse=True)
    return cmap(codes % 20)


def embedding_map(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    images: Optional[Sequence[Any]] = None,
    class_names: Optional[Sequence[str]] = None,
    max_points: int = 2000,
    thumbnails: int = 40,
    thumbnail_size: float = 26.0,
    normalize: bool = True,
    seed: int = 0,
    title: Optional[str] = None,
    path: Optional[PathLike] = None,
):
    """A 2-D t-SNE map of embeddings coloured by class, with a few image
    thumbnails framed in their class's colour and placed at their points.

    Args:
        embeddings: (n, d) array.
        labels: (n,) class labels.
        images: the n images (only the ``thumbnails`` drawn are read).
        class_names: names of the labels; the classes of the thumbnails are
            written next to them when given.
        max_points: t-SNE runs on a random subset of this many points (its
            cost grows with n log n; 2,000 points take seconds).
        thumbnails: how many images to draw.
        thumbnail_size: their size in points.
        normalize: L2-normalise the embeddings first (the geometry retrieval
            uses).
        seed: the subset, the thumbnails and t-SNE's initialisation.
    """
    plt = _plt()  # first: a missing extra is named with its install hint
    from sklearn.manifold import TSNE

    max_points = integer("max_points", max_points, 3)
    thumbnails = integer("thumbnails", thumbnails, 0)
    seed = integer("seed", seed, 0, TSNE_SEED_MAX)
    normalize = boolean("normalize", normalize)
    labels = np.asarray(labels)
    emb = np.asarray(embeddings, dtype=np.float32)
    n = len(labels)
    if emb.ndim != 2 or len(emb) != n:
        raise ValueError(
            f"embeddings: expected shape ({n}, d) (one row per label), got {list(emb.shape)}"
        )
    if n < 3:
        raise ValueError(f"embeddings: expected at least 3 points for a map, got {n}")
    _check_class_names(class_names, labels)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, max_points), replace=False))
    emb, lab = emb[idx], labels[idx]
    if normalize:
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    from threadpoolctl import threadpool_limits

    # One OpenMP thread: Barnes-Hut's threads spin-wait, and on cores shared
    # with other work (a training run, a notebook kernel, a build) the map
    # took ten times longer with two threads than with one.
    with threadpool_limits(limits=1, user_api="openmp"):
        xy = TSNE(
            n_components=2,
            init="pca",
            random_state=seed,
            perplexity=float(min(30, len(idx) - 1)),
        ).fit_transform(emb)
    colours = _class_colours(lab)
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=7, alpha=0.75, linewidths=0)
    if images is not None and thumbnails > 0:
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        for j in rng.choice(len(idx), size=min(thumbnails, len(idx)), replace=False):
            img = _as_image(images[int(idx[j])], size=64)
            zoom = thumbnail_size / max(img.shape[:2])
            box = OffsetImage(img, zoom=zoom, cmap="gray" if img.ndim == 2 else None)
            frame = dict(edgecolor=colours[j], linewidth=1.5)
            ax.add_artist(AnnotationBbox(box, xy[j], frameon=True, pad=0.1, bboxprops=frame))
            if class_names is not None:
                ax.annotate(
                    _class_name(class_names, int(lab[j])),
                    xy[j],
                    xytext=(0, -thumbnail_size / 2 - 7),
                    textcoords="offset points",
                    ha="center",
                    fontsize=6,
                )
    ax.set_title(
        title or f"t-SNE of {len(idx)} embeddings, {len(np.unique(lab))} classes", fontsize=10
    )
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return save(fig, path)


def retrieval_gallery(
    query_index: Sequence[int],
    neighbours: np.ndarray,
    labels: np.ndarray,
    images: Sequence[Any],
    *,
    similarities: Optional[np.ndarray] = None,
    class_names: Optional[Sequence[str]] = None,
    title: str = "queries and their nearest neighbours",
    path: Optional[PathLike] = None,
):
    """One row per query: the query (black frame, its class on the left),
    then its neighbours in rank order framed green (the query's class) or red
    (another class, whose name is written below).

    Args:
        query_index: positions of the queries in ``labels`` / ``images``.
        neighbours: (queries, k) positions of their neighbours, nearest first.
        labels: the class of every position.
        images: the image of every position (only those drawn are read).
        similarities: (queries, k) similarities, written above the neighbours.
        class_names: names of the labels.
    """
    plt = _plt()
    labels = np.asarray(labels)
    neighbours = np.asarray(neighbours)
    query_index = [int(q) for q in query_index]
    if neighbours.ndim != 2 or len(neighbours) != len(query_index):
        raise ValueError(
            f"neighbours: expected shape ({len(query_index)}, k) (a row per query), "
            f"got {list(neighbours.shape)}"
        )
    if not query_index:
        raise ValueError("query_index: expected at least one query, got none")
    _check_class_names(class_names, labels)
    rows, k = len(query_index), neighbours.shape[1]
    fig, axes = plt.subplots(
        rows, k + 1, figsize=(1.15 * (k + 1), 1.35 * rows + 0.4), squeeze=False
    )
    for r, q in enumerate(query_index):
        for c in range(k + 1):
            ax = axes[r][c]
            i = q if c == 0 else int(neighbours[r, c - 1])
            img = _as_image(images[i], size=96)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                colour, width = "black", 2
                ax.set_ylabel(_class_name(class_names, int(labels[q])), fontsize=7)
            else:
                right = labels[i] == labels[q]
                colour, width = (RIGHT if right else WRONG), 3
                if not right:
                    ax.set_xlabel(_class_name(class_names, int(labels[i])), fontsize=6)
                if similarities is not None:
                    ax.set_title(f"{float(similarities[r, c - 1]):.2f}", fontsize=6, pad=2)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(width)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def probability_heatmaps(
    before: np.ndarray,
    after: np.ndarray,
    labels: np.ndarray,
    *,
    anchors: Optional[np.ndarray] = None,
    classes: Optional[Sequence[int]] = None,
    class_names: Optional[Sequence[str]] = None,
    path: Optional[PathLike] = None,
):
    """The class probabilities X of one batch before and after the
    replicator dynamics (rows: samples sorted by label, columns: the classes
    of the batch), with the anchors marked.

    Args:
        before: (n, m) prior ``softmax(logits / T)`` with the anchors' rows
            one-hot.
        after: (n, m) refined probabilities.
        labels: (n,) labels of the batch.
        anchors: (n,) boolean mask of the anchors.
        classes: the class of each column when the columns are only the
            batch's classes (``batch_classes_only``); otherwise column ``c``
            is class ``c`` and the batch's classes are picked out.
        class_names: names of the labels, for the column ticks.
    """
    plt = _plt()
    before, after, labels = np.asarray(before), np.asarray(after), np.asarray(labels)
    if before.ndim != 2:
        raise ValueError(f"before: expected a (n, m) array, got shape {list(before.shape)}")
    if after.shape != before.shape:
        raise ValueError(
            f"after: expected the shape of before, {list(before.shape)}, got {list(after.shape)}"
        )
    if labels.shape != (len(before),):
        raise ValueError(
            f"labels: expected one label per row of before ({len(before)}), "
            f"got shape {list(labels.shape)}"
        )
    batch_classes = np.unique(labels)
    if classes is None:
        cols = batch_classes
        before, after = before[:, cols], after[:, cols]
    else:
        cols = np.asarray(classes)
        if len(cols) != before.shape[1]:
            raise ValueError(
                f"classes: expected {before.shape[1]} classes (one per column), got {len(cols)}"
            )
    named = len(cols) <= 20  # the columns are named up to 20 classes
    if named:
        _check_class_names(class_names, cols)
    order = np.argsort(labels, kind="stable")
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4.8), sharey=True)
    im = None
    for ax, x, name in (
        (axes[0], before, "prior softmax(logits / T), anchors one-hot"),
        (axes[1], after, "refined X after the replicator dynamics"),
    ):
        im = ax.imshow(x[order], aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("class (of the batch)")
        if named:
            ax.set_xticks(range(len(cols)))
            ax.set_xticklabels(
                [_class_name(class_names, int(c)) for c in cols], fontsize=7, rotation=90
            )
        # The true class of every row: white dots.
        col_of = {int(c): j for j, c in enumerate(cols)}
        ys = [r for r, i in enumerate(order) if int(labels[i]) in col_of]
        xs = [col_of[int(labels[order[r]])] for r in ys]
        ax.scatter(xs, ys, s=6, c="white", marker="o", linewidths=0)
    axes[0].set_yticks([])
    if anchors is None:
        axes[0].set_ylabel("sample (sorted by label)")
    else:
        anchors = np.asarray(anchors, dtype=bool)[order]
        rows = np.flatnonzero(anchors)
        # Outside the image, left of its first column.
        axes[0].scatter(
            np.full(len(rows), -0.5 - 0.03 * len(cols)),
            rows,
            marker=">",
            c="tab:red",
            s=14,
            clip_on=False,
        )
        axes[0].set_xlim(-0.5, len(cols) - 0.5)
        axes[0].set_ylabel("sample (sorted by label); red: anchors", labelpad=10)
    fig.colorbar(im, ax=list(axes), fraction=0.04)
    return save(fig, path)
