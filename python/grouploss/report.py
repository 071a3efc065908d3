"""What a trained embedding learned: a run's test retrieval looked at, as a
self-contained HTML page or piece by piece in a notebook.

>>> import grouploss
>>> grouploss.report("runs/glyphs-...")          # doctest: +SKIP
PosixPath('runs/glyphs-.../report.html')

``report`` writes ``RUN_DIR/report.html`` (``grouploss report RUN_DIR`` on the
command line): the run's configuration, its loss and metric curves, the test
metrics, a t-SNE map of the test embeddings, a retrieval gallery, the worst
queries, the classes most often confused and the class probabilities of one
training batch before and after the replicator dynamics. Every figure is a PNG
embedded in the page, so the file can be mailed or archived alone.

:class:`RunInspection` holds what the page is made of (the model, the test
embeddings and their nearest neighbours, the images) and draws each figure
with :mod:`grouploss.plots`; the notebooks use it the same way.

Both need the ``report`` extra (``pip install 'grouploss[report]'``);
without it they raise ``ImportError`` saying so.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import pathlib
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import _extras, datasets, metrics, plots
from . import functional as F
from ._args import SEED_MAX, integer
from ._files import replaced
from .datasets import run_dataset
from .training import RunModel, load_run

PathLike = Union[str, pathlib.Path]

__all__ = [
    "BatchProbabilities",
    "Neighbours",
    "RunInspection",
    "batch_probabilities",
    "confused_classes",
    "nearest_neighbours",
    "random_queries",
    "report",
    "run_dataset",
    "worst_queries",
]


class Neighbours(NamedTuple):
    """The ``k`` nearest neighbours of every query (cosine similarity, ties
    by position), positions counted in the whole split.

    Attributes:
        queries: (q,) positions of the queries.
        indices: (q, k) positions of their neighbours, nearest first.
        similarities: (q, k) cosine similarities.
        correct: (q, k) whether each neighbour has the query's class.
        has_match: (q,) whether the gallery holds another item of the
            query's class (queries without one cannot be answered right).
    """

    queries: np.ndarray
    indices: np.ndarray
    similarities: np.ndarray
    correct: np.ndarray
    has_match: np.ndarray


#: The most queries or neighbours a report draws (rows and columns of
#: thumbnails).
MOST_THUMBNAILS = 100


def _mask(name: str, value: Any, n: int) -> np.ndarray:
    """The positions where a boolean mask of one entry per item is set."""
    mask = np.asarray(torch.as_tensor(value).cpu())
    if mask.dtype != np.bool_ or mask.shape != (n,):
        raise ValueError(
            f"{name}: expected a boolean mask of {n} entries (one per item), got "
            f"{mask.dtype} of shape {mask.shape}"
        )
    return np.flatnonzero(mask)


def nearest_neighbours(
    embeddings: Any,
    labels: Any,
    k: int = 8,
    *,
    is_query: Optional[np.ndarray] = None,
    is_gallery: Optional[np.ndarray] = None,
) -> Neighbours:
    """Every query's ``k`` nearest neighbours, by :func:`grouploss.metrics.knn`.

    Without ``is_query`` / ``is_gallery`` every item searches all the others
    (itself excluded), as in the evaluation of CUB, Cars196 and SOP; with them
    (In-Shop: boolean masks, one entry per item) the queries search the
    gallery. ``k`` is capped at the gallery
    size.
    """
    emb = torch.as_tensor(embeddings).float()
    labels = np.asarray(torch.as_tensor(labels).cpu())
    n = len(labels)
    if emb.dim() != 2 or emb.shape[0] != n:
        raise ValueError(
            f"embeddings: expected shape ({n}, d) (one row per label), got {list(emb.shape)}"
        )
    if (is_query is None) != (is_gallery is None):
        raise ValueError("is_gallery: expected both is_query and is_gallery, or neither")
    k = integer("k", k, 1)
    if is_query is None:
        queries, gallery = np.arange(n), np.arange(n)
        k = min(int(k), n - 1)
    else:
        queries, gallery = _mask("is_query", is_query, n), _mask("is_gallery", is_gallery, n)
        k = min(int(k), len(gallery))
        if len(queries) == 0:
            raise ValueError("is_query: expected at least one query, got none")
        if len(gallery) == 0:
            raise ValueError("is_gallery: expected at least one gallery item, got none")
    if k < 1:
        raise ValueError(f"embeddings: expected at least 2 items to search, got {n}")
    if is_query is None:
        sims, idx = metrics.knn(emb, k)
        counts = np.unique(labels, return_counts=True)
        per_class = dict(zip(counts[0].tolist(), counts[1].tolist()))
        has_match = np.array([per_class[int(c)] > 1 for c in labels])
    else:
        sims, idx = metrics.knn(
            emb[torch.as_tensor(gallery)], k, query_embeddings=emb[torch.as_tensor(queries)]
        )
        in_gallery = set(labels[gallery].tolist())
        has_match = np.array([int(c) in in_gallery for c in labels[queries]])
    indices = gallery[np.asarray(idx.cpu())]
    correct = labels[indices] == labels[queries][:, None]
    return Neighbours(queries, indices, np.asarray(sims.cpu()), correct, has_match)


def worst_queries(neighbours: Neighbours, count: int = 8) -> np.ndarray:
    """Rows of ``neighbours`` of the worst answered queries: fewest neighbours
    of their class among the ``k``, and among equals the most confident
    mistakes (highest similarity to the first neighbour) first. Queries that
    cannot be answered (``has_match`` false) are left out."""
    rows = np.flatnonzero(neighbours.has_match)
    right = neighbours.correct[rows].sum(axis=1)
    order = np.lexsort((-neighbours.similarities[rows, 0], right))
    return rows[order[:count]]


def random_queries(neighbours: Neighbours, count: int = 8, seed: int = 0) -> np.ndarray:
    """Rows of ``count`` queries drawn at random (among those with a match),
    in position order."""
    count = integer("count", count, 0)
    rows = np.flatnonzero(neighbours.has_match)
    rng = np.random.default_rng(integer("seed", seed, 0, SEED_MAX))
    return np.sort(rng.choice(rows, size=min(count, len(rows)), replace=False))


def confused_classes(
    neighbours: Neighbours, labels: Any, top: int = 10
) -> List[Tuple[int, int, int]]:
    """The class pairs most often confused at rank 1: ``(a, b, count)`` with
    ``a < b`` and ``count`` the queries of one class whose nearest neighbour
    is of the other, most frequent first (ties by class)."""
    labels = np.asarray(labels)
    wrong = ~neighbours.correct[:, 0]
    a = labels[neighbours.queries[wrong]]
    b = labels[neighbours.indices[wrong, 0]]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
    if len(pairs) == 0:
        return []
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    order = np.lexsort((uniq[:, 1], uniq[:, 0], -counts))[:top]
    return [(int(uniq[i, 0]), int(uniq[i, 1]), int(counts[i])) for i in order]


class BatchProbabilities(NamedTuple):
    """The Group Loss on one batch of a trained model.

    Attributes:
        before: (n, m) prior ``softmax(logits / T)`` with the anchors' rows
            one-hot (columns: the classes of ``classes``, else all training
            classes).
        after: (n, m) refined probabilities after the replicator dynamics.
        labels: (n,) training-split labels of the batch.
        anchors: (n,) boolean mask of the anchors.
        classes: with ``batch_classes_only``, the class of each column.
        indices: (n,) positions of the batch in the training split.
        embeddings: (n, d) the batch's embeddings (W is their similarity).
        class_names: the names of the training split's labels.
        loss: the batch's loss (NLL of ``after`` + CE of the logits).
    """

    before: np.ndarray
    after: np.ndarray
    labels: np.ndarray
    anchors: np.ndarray
    classes: Optional[np.ndarray]
    indices: np.ndarray
    embeddings: np.ndarray
    class_names: List[str]
    loss: float


def _embed_images(model: RunModel, ds: datasets.ImageDataset, idx: Sequence[int]):
    """Embeddings of samples ``idx`` through the run's evaluation transform."""
    cfg = model.config
    images = [ds.load(int(i)) for i in idx]
    if cfg["image_size"] > 0 and cfg["normalization"] != "mean_std":
        from .data import eval_transform

        size = cfg["image_size"]
        t = eval_transform(
            size,
            resize=max(cfg["resize_size"], size),
            normalization=cfg["normalization"],
            channels=3,
        )
        return model.embed(torch.stack([t(x) for x in images]))
    if len({tuple(x.shape) for x in images}) != 1:
        raise ValueError(
            "dataset: expected images of one size for a run with normalization "
            f"{cfg['normalization']!r} and image_size {cfg['image_size']}, got several"
        )
    # uint8: RunModel applies the run's own evaluation transform.
    return model.embed(torch.stack(images))


def batch_probabilities(
    model: RunModel,
    *,
    seed: int = 0,
    split: str = "train",
    data_root: Optional[PathLike] = None,
) -> BatchProbabilities:
    """The class probabilities of one P x K batch of ``split`` (the run's
    ``classes_per_batch`` x ``samples_per_class``, drawn by the sampler with
    ``seed``) before and after the replicator dynamics, with the run's loss
    options and its trained classifier (evaluation mode: no augmentation,
    BatchNorm statistics frozen). The labels must be training classes, so
    ``split`` is ``"train"`` in practice."""
    from .sampler import ClassBalancedBatchSampler

    cfg = model.config
    ds = run_dataset(cfg, split, root=data_root)
    p = min(cfg["classes_per_batch"], len(np.unique(ds.labels)))
    sampler = ClassBalancedBatchSampler(ds.labels, p, cfg["samples_per_class"], seed=seed)
    idx = np.asarray(next(iter(sampler)))
    labels = torch.as_tensor(ds.labels[idx])
    emb = _embed_images(model, ds, idx).float().cpu()
    logits = model.logits(emb).float().cpu()
    # The run's own loss; the CE-only baseline (gtg_weight 0) has no
    # refinement to show, so the Group Loss term is weighted 1 there.
    opts = model.loss_options
    anchor_seed = seed if opts.anchors == "random" else None
    opts = opts.replace(gtg_weight=opts.gtg_weight or 1.0, seed=anchor_seed)
    out = F.group_loss(emb, labels, logits, opts, return_details=True)
    prior = torch.softmax(logits / opts.temperature, dim=1)
    classes = None
    if out.classes is not None:
        classes = out.classes.cpu()
        prior = prior[:, classes]
        prior = prior / prior.sum(dim=1, keepdim=True)
        cols = torch.searchsorted(classes, labels)
    else:
        cols = labels
    mask = F.anchor_mask(labels, opts.num_anchors, opts.anchors, seed=anchor_seed)
    prior[mask] = 0.0
    prior[mask, cols[mask]] = 1.0
    return BatchProbabilities(
        before=prior.numpy(),
        after=out.probs.cpu().numpy(),
        labels=labels.numpy(),
        anchors=mask.cpu().numpy(),
        classes=None if classes is None else classes.numpy(),
        indices=idx,
        embeddings=emb.numpy(),
        class_names=list(ds.classes),
        loss=float(out.loss),
    )


class _Images:
    """The images of a dataset, decoded when drawn."""

    def __init__(self, dataset: datasets.ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.load(int(i))


class RunInspection:
    """A trained run's test embeddings, their neighbours and the figures made
    of them (each a matplotlib ``Figure`` from :mod:`grouploss.plots`).

    Args:
        run_dir: the run folder.
        split: the split to look at (``"test"``: unseen classes).
        checkpoint: ``"best"`` or ``"last"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        data_root: the dataset's files, if they moved since the run.
        k: neighbours per query in the galleries.
        trust_torchscript: load a run on a TorchScript backbone (see
            :func:`grouploss.load_run`).

    Example::

        >>> from grouploss.report import RunInspection
        >>> run = RunInspection("runs/glyphs-...")          # doctest: +SKIP
        >>> run.gallery_figure(count=6)                      # doctest: +SKIP
        >>> run.worst_queries_figure()                       # doctest: +SKIP
    """

    def __init__(
        self,
        run_dir: PathLike,
        *,
        split: str = "test",
        checkpoint: str = "best",
        device: str = "auto",
        data_root: Optional[PathLike] = None,
        k: int = 8,
        trust_torchscript: bool = False,
    ) -> None:
        _extras.require("report")
        self.run_dir = pathlib.Path(run_dir)
        self.split = split
        self.checkpoint = checkpoint
        self.data_root = data_root
        self.model = load_run(
            self.run_dir, checkpoint=checkpoint, device=device, trust_torchscript=trust_torchscript
        )
        self.config: dict = self.model.config
        self.dataset = run_dataset(self.config, split, root=data_root)
        emb, labels = self.model.embed_dataset(self.dataset)
        self.embeddings: np.ndarray = emb.float().cpu().numpy()
        self.labels: np.ndarray = labels.cpu().numpy()
        self.images = _Images(self.dataset)
        self.class_names: List[str] = list(self.dataset.classes)
        self.neighbours = nearest_neighbours(
            emb,
            labels,
            k,
            is_query=self.dataset.is_query,
            is_gallery=self.dataset.is_gallery,
        )

    @property
    def history(self) -> list:
        """The per-epoch records (empty before the first epoch ended)."""
        try:
            return self.model.history
        except FileNotFoundError:
            return []

    @property
    def summary(self) -> Optional[dict]:
        """``summary.json`` (None for an interrupted run)."""
        try:
            return self.model.summary
        except FileNotFoundError:
            return None

    def metrics(self) -> dict:
        """Metrics of the loaded checkpoint on the inspected split, computed
        from its embeddings with the run's Recall@K values."""
        emb, lab = torch.from_numpy(self.embeddings), torch.from_numpy(self.labels)
        ks = tuple(self.config["recall_ks"])
        q, g = self.dataset.is_query, self.dataset.is_gallery
        if q is not None:
            qi, gi = torch.from_numpy(np.flatnonzero(q)), torch.from_numpy(np.flatnonzero(g))
            return metrics.evaluate(
                emb[gi], lab[gi], ks=ks, query_embeddings=emb[qi], query_labels=lab[qi]
            )
        return metrics.evaluate(emb, lab, ks=ks)

    def loss_figure(self, path: Optional[PathLike] = None):
        """The training loss per epoch (saved to ``path`` when given)."""
        return plots.loss_curve(self.history, path)

    def metrics_figure(self, path: Optional[PathLike] = None):
        """The selection split's metrics per epoch."""
        split = "test" if self.config.get("select_on") == "test" else "val"
        return plots.metric_curves(self.history, split, path)

    def embedding_figure(
        self,
        *,
        max_points: int = 1000,
        thumbnails: int = 40,
        seed: int = 0,
        path: Optional[PathLike] = None,
    ):
        """A t-SNE map of at most ``max_points`` embeddings, ``thumbnails``
        of them drawn as their images."""
        return plots.embedding_map(
            self.embeddings,
            self.labels,
            images=self.images,
            class_names=self.class_names,
            max_points=max_points,
            thumbnails=thumbnails,
            seed=seed,
            title=f"t-SNE of {self.split} embeddings ({min(max_points, len(self.labels))} "
            f"of {len(self.labels)}, {len(np.unique(self.labels))} classes)",
            path=path,
        )

    def _gallery(self, rows: np.ndarray, title: str, path: Optional[PathLike]):
        nb = self.neighbours
        return plots.retrieval_gallery(
            nb.queries[rows],
            nb.indices[rows],
            self.labels,
            self.images,
            similarities=nb.similarities[rows],
            class_names=self.class_names,
            title=title,
            path=path,
        )

    def gallery_figure(self, *, count: int = 8, seed: int = 0, path: Optional[PathLike] = None):
        """``count`` random queries (drawn with ``seed``) and their nearest
        neighbours."""
        k = self.neighbours.indices.shape[1]
        rows = random_queries(self.neighbours, count, seed)
        return self._gallery(
            rows, f"{len(rows)} random queries and their top {k} (green: same class)", path
        )

    def worst_queries_figure(self, *, count: int = 8, path: Optional[PathLike] = None):
        """The ``count`` queries with the fewest neighbours of their class."""
        k = self.neighbours.indices.shape[1]
        rows = worst_queries(self.neighbours, count)
        return self._gallery(
            rows, f"the {len(rows)} worst queries: fewest right in the top {k}", path
        )

    def confused_classes(self, top: int = 10) -> List[Tuple[str, str, int]]:
        """The class pairs most often confused at rank 1, by name."""
        names = self.class_names
        return [
            (names[a], names[b], n)
            for a, b, n in confused_classes(self.neighbours, self.labels, top)
        ]

    def batch_probabilities(self, *, seed: int = 0) -> BatchProbabilities:
        """One training batch (drawn with ``seed``) through the model: the
        prior and refined class probabilities."""
        return batch_probabilities(self.model, seed=seed, data_root=self.data_root)

    def probability_figure(self, *, seed: int = 0, path: Optional[PathLike] = None):
        """:meth:`batch_probabilities` drawn as two heat maps."""
        b = self.batch_probabilities(seed=seed)
        return plots.probability_heatmaps(
            b.before,
            b.after,
            b.labels,
            anchors=b.anchors,
            classes=b.classes,
            class_names=b.class_names,
            path=path,
        )


# --- the HTML page ---------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #222; background: #fafafa; }
header { background: #24425f; color: white; padding: 1em 2em; }
header h1 { margin: 0 0 .2em 0; font-size: 1.5em; }
header p { margin: 0; opacity: .85; }
main { max-width: 1100px; margin: 0 auto; padding: 1em 2em 3em 2em; }
section { background: white; border: 1px solid #ddd; border-radius: 6px;
          padding: .5em 1.5em 1.2em 1.5em; margin: 1.2em 0; }
h2 { font-size: 1.2em; border-bottom: 1px solid #eee; padding-bottom: .3em; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .7em; text-align: left; }
th { background: #f0f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
img { max-width: 100%; height: auto; }
.note { color: #666; font-size: .9em; }
.columns { columns: 2; column-gap: 2em; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    data = base64.b64encode(plots.png_bytes(fig)).decode("ascii")
    plt.close(fig)
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return _esc(v)


def _metrics_table(columns: List[Tuple[str, dict]]) -> str:
    keys: List[str] = []
    for _, m in columns:
        keys += [k for k in m if k not in keys and k != "left_out"]
    head = "".join(f"<th>{_esc(name)}</th>" for name, _ in columns)
    rows = []
    for k in keys:
        cells = "".join(f'<td class="num">{_fmt(m[k]) if k in m else ""}</td>' for _, m in columns)
        rows.append(f"<tr><th>{_esc(k)}</th>{cells}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _kv_table(items: Sequence[Tuple[str, Any]]) -> str:
    rows = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(json.dumps(v) if isinstance(v, list) else v)}</td></tr>"
        for k, v in items
    )
    return f"<table>{rows}</table>"


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>\n{body}\n</section>'


def _build(run: RunInspection, *, max_points: int, queries: int, seed: int) -> str:
    """The report's HTML page: one section per view of the run."""
    parts = [_metrics_section(run), _curves_section(run)]
    if len(run.labels) >= 3:
        parts.append(_map_section(run, max_points=max_points, seed=seed))
    parts += _gallery_sections(run, queries=queries, seed=seed)
    parts += [_confused_section(run), _loss_section(run, seed=seed), _config_section(run)]
    return _page(run, parts)


def _metrics_section(run: RunInspection) -> str:
    """Test metrics (from summary.json, else computed now) and the run's facts."""
    cfg, summary = run.config, run.summary
    if summary is not None and summary.get("test"):
        cols = [(f"best epoch ({summary.get('best_epoch')})", summary["test"])]
        if summary.get("ensemble_test"):
            cols.append((f"ensemble of {cfg.get('ensemble')}", summary["ensemble_test"]))
        facts = [
            ("best epoch", summary.get("best_epoch")),
            ("selected on", summary.get("selected_on")),
            ("selection metric", summary.get("select_metric")),
            ("training classes", summary.get("train_classes")),
            ("training images", summary.get("train_images")),
            ("device", summary.get("device")),
        ]
        note = "Test metrics recorded at the end of the run (summary.json)."
    else:
        cols = [(f"checkpoint {run.checkpoint}", run.metrics())]
        facts = [("epochs recorded", len(run.history))]
        note = (
            "No summary.json (an interrupted run?): metrics computed now from "
            f"checkpoint {run.checkpoint!r}."
        )
    n_cls = len(np.unique(run.labels))
    facts.append((f"{run.split} split", f"{len(run.labels)} images, {n_cls} classes"))
    return _section(
        f"{run.split.capitalize()} metrics",
        f'<p class="note">{_esc(note)}</p><div class="figures">'
        f"{_metrics_table(cols)}{_kv_table(facts)}</div>",
        "metrics",
    )


def _curves_section(run: RunInspection) -> str:
    if run.history:
        body = (
            '<div class="figures">'
            + _img(run.loss_figure(), "training loss per epoch")
            + _img(run.metrics_figure(), "selection-split metrics per epoch")
            + "</div>"
        )
    else:
        body = '<p class="note">No epoch finished yet.</p>'
    return _section("Training curves", body, "curves")


def _map_section(run: RunInspection, *, max_points: int, seed: int) -> str:
    fig = run.embedding_figure(max_points=max_points, seed=seed)
    body = (
        '<p class="note">Nearby points have similar embeddings; colours are classes '
        "(cycled), thumbnails framed in their class's colour.</p>"
        + _img(fig, "t-SNE map of the embeddings")
    )
    return _section("Embedding map", body, "map")


def _gallery_sections(run: RunInspection, *, queries: int, seed: int) -> List[str]:
    """Random queries with their neighbours, then the worst queries."""
    k = run.neighbours.indices.shape[1]
    intro = (
        f'<p class="note">Each row: a query (black frame, its class on the left) and '
        f"its {k} nearest neighbours by cosine similarity (above each), framed green "
        "when of the query's class and red otherwise (their class below).</p>"
    )
    return [
        _section(
            "Retrieval gallery",
            intro
            + _img(run.gallery_figure(count=queries, seed=seed), "random queries and neighbours"),
            "gallery",
        ),
        _section(
            "Worst queries",
            '<p class="note">Fewest neighbours of their class among the top '
            f"{k}; among equals the most confident mistakes first.</p>"
            + _img(run.worst_queries_figure(count=queries), "worst queries"),
            "worst",
        ),
    ]


def _confused_section(run: RunInspection) -> str:
    pairs = run.confused_classes(10)
    if pairs:
        rows = "".join(
            f'<tr><td>{_esc(a)}</td><td>{_esc(b)}</td><td class="num">{n}</td></tr>'
            for a, b, n in pairs
        )
        body = (
            '<p class="note">Pairs of classes whose queries most often have the other '
            "class as nearest neighbour.</p><table><tr><th>class</th><th>class</th>"
            f"<th>queries</th></tr>{rows}</table>"
        )
    else:
        body = '<p class="note">No query has a nearest neighbour of another class.</p>'
    return _section("Classes most often confused", body, "confused")


def _loss_section(run: RunInspection, *, seed: int) -> str:
    """The loss on one training batch: prior and refined probabilities."""
    try:
        fig = run.probability_figure(seed=seed)
        body = (
            '<p class="note">One training batch through the trained model (evaluation '
            "mode): the prior class probabilities softmax(logits / T) with the anchors' "
            "rows one-hot, and the probabilities after the replicator dynamics propagated "
            "them along the embedding similarities. White dots: the true class.</p>"
            + _img(fig, "class probabilities of a batch before and after refinement")
        )
    except ValueError as e:
        body = f'<p class="note">Not drawn: {_esc(e)}</p>'
    return _section("What the loss does on one batch", body, "loss")


def _config_section(run: RunInspection) -> str:
    items = sorted(run.config.items())
    return _section("Configuration", f'<div class="columns">{_kv_table(items)}</div>', "config")


def _page(run: RunInspection, parts: List[str]) -> str:
    """The whole page: title, the run's line, the sections."""
    from . import __version__

    cfg = run.config
    title = f"grouploss report: {run.run_dir.name}"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sub = (
        f"{_esc(cfg.get('dataset'))} &middot; {_esc(cfg.get('backbone'))} &middot; "
        f"checkpoint {_esc(run.checkpoint)} &middot; {_esc(run.run_dir)} &middot; "
        f"grouploss {_esc(__version__)} &middot; {when}"
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style></head>\n"
        f"<body><header><h1>{_esc(title)}</h1><p>{sub}</p></header>\n<main>\n"
        + "\n".join(parts)
        + "\n</main></body></html>\n"
    )


def report(
    run_dir: PathLike,
    *,
    out: Optional[PathLike] = None,
    split: str = "test",
    checkpoint: str = "best",
    device: str = "auto",
    data_root: Optional[PathLike] = None,
    max_points: int = 1000,
    queries: int = 8,
    k: int = 8,
    seed: int = 0,
    trust_torchscript: bool = False,
) -> pathlib.Path:
    """Writes an HTML report of a run and returns its path.

    The page is self-contained (figures are embedded PNGs, no scripts, no
    links to fetch): the test metrics, the loss and metric curves, a t-SNE
    map of the test embeddings with thumbnails, ``queries`` random queries
    with their top ``k``, the ``queries`` worst queries, the classes most
    often confused, one training batch's probabilities before and after the
    replicator dynamics, and the configuration.

    Args:
        run_dir: a run folder written by :func:`grouploss.train`.
        out: where to write (default ``run_dir/report.html``).
        split: the split inspected (``"test"``: the unseen classes).
        checkpoint: ``"best"`` or ``"last"`` (an interrupted run).
        device: where to embed: ``"auto"``, ``"cpu"``, ``"cuda"``.
        data_root: the dataset's files, if they moved since the run.
        max_points: t-SNE runs on a random subset of this many embeddings.
        queries: rows of the retrieval gallery and of the worst queries
            (at most 100: each is a row of thumbnails).
        k: neighbours shown per query (at most 100).
        seed: the random queries, the t-SNE subset and the batch.
        trust_torchscript: load a run on a TorchScript backbone (a program
            that runs as it loads; see :func:`grouploss.load_run`).
    """
    _extras.require("report")
    for name, value in (("queries", queries), ("k", k)):
        if integer(name, value, 1) > MOST_THUMBNAILS:
            raise ValueError(
                f"{name}: expected at most {MOST_THUMBNAILS} (a figure of thumbnails), got {value}"
            )
    integer("max_points", max_points, 3)
    integer("seed", seed, 0, plots.TSNE_SEED_MAX)
    run = RunInspection(
        run_dir,
        split=split,
        checkpoint=checkpoint,
        device=device,
        data_root=data_root,
        k=k,
        trust_torchscript=trust_torchscript,
    )
    page = _build(run, max_points=max_points, queries=queries, seed=seed)
    out = pathlib.Path(out) if out is not None else run.run_dir / "report.html"
    with replaced(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
