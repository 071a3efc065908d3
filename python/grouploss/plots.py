"""Figures of a run, shared by the CLI's run folder, the HTML report and the
notebooks. Every function returns a matplotlib ``Figure`` (and saves it as PNG
when given a path); none of them shows anything, so they work headless.
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence, Union

import numpy as np

PathLike = Union[str, pathlib.Path]

__all__ = [
    "embedding_map",
    "loss_curve",
    "metric_curves",
    "probability_heatmaps",
    "retrieval_gallery",
    "save",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Optional[PathLike]):
    """Writes ``fig`` as a PNG at ``path`` (if given) and returns it."""
    if path is not None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


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
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return save(fig, path)


def _as_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)
    return img


def embedding_map(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    images: Optional[np.ndarray] = None,
    class_names: Optional[Sequence[str]] = None,
    max_points: int = 2000,
    thumbnails: int = 40,
    seed: int = 0,
    path: Optional[PathLike] = None,
):
    """A 2-D t-SNE map of embeddings coloured by class, with a few image
    thumbnails placed at their points."""
    from sklearn.manifold import TSNE

    plt = _plt()
    rng = np.random.default_rng(seed)
    n = len(labels)
    idx = rng.choice(n, size=min(n, max_points), replace=False)
    emb = np.asarray(embeddings)[idx]
    lab = np.asarray(labels)[idx]
    xy = TSNE(
        n_components=2, init="pca", random_state=seed, perplexity=min(30, len(idx) - 1)
    ).fit_transform(emb)
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.scatter(xy[:, 0], xy[:, 1], c=lab % 20, cmap="tab20", s=6, alpha=0.7)
    if images is not None and thumbnails > 0:
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        for j in rng.choice(len(idx), size=min(thumbnails, len(idx)), replace=False):
            img = _as_image(images[idx[j]])
            box = OffsetImage(img, zoom=0.8, cmap="gray" if img.ndim == 2 else None)
            ax.add_artist(AnnotationBbox(box, xy[j], frameon=False))
    ax.set_title(f"t-SNE of {len(idx)} test embeddings, {len(np.unique(lab))} classes")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return save(fig, path)


def retrieval_gallery(
    query_index: Sequence[int],
    neighbours: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray,
    *,
    class_names: Optional[Sequence[str]] = None,
    title: str = "queries and their nearest neighbours",
    path: Optional[PathLike] = None,
):
    """One row per query: the query, then its neighbours framed green (same
    class) or red (other class)."""
    plt = _plt()
    rows, k = len(query_index), neighbours.shape[1]
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.2 * (k + 1), 1.3 * rows), squeeze=False)
    for r, q in enumerate(query_index):
        for c in range(k + 1):
            ax = axes[r][c]
            i = q if c == 0 else int(neighbours[r, c - 1])
            img = _as_image(images[i])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                color, width = "black", 2
                name = class_names[labels[q]] if class_names is not None else str(labels[q])
                ax.set_ylabel(name, fontsize=7)
            else:
                color = "tab:green" if labels[i] == labels[q] else "tab:red"
                width = 3
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(width)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def probability_heatmaps(
    before: np.ndarray,
    after: np.ndarray,
    labels: np.ndarray,
    *,
    path: Optional[PathLike] = None,
):
    """The class probabilities X of one batch before and after the
    replicator dynamics (rows: samples, columns: classes of the batch)."""
    plt = _plt()
    before, after, labels = np.asarray(before), np.asarray(after), np.asarray(labels)
    classes = np.unique(labels)
    if before.shape[1] != len(classes):
        before, after = before[:, classes], after[:, classes]
    order = np.argsort(labels, kind="stable")
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.5), sharey=True)
    for ax, x, name in (
        (axes[0], before, "prior softmax(logits / T)"),
        (axes[1], after, "refined X"),
    ):
        im = ax.imshow(x[order], aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("class (of the batch)")
    axes[0].set_ylabel("sample (sorted by label)")
    fig.colorbar(im, ax=list(axes), fraction=0.04)
    return save(fig, path)
