"""The figures shared by the run folder, the HTML report and the notebooks."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from grouploss import plots


def _images(n, seed=0, shape=(1, 12, 10)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_retrieval_gallery_frames_right_and_wrong_neighbours():
    labels = np.array([0, 0, 1, 1, 2, 2, 0])
    queries = [0, 2]
    neighbours = np.array([[1, 2, 6], [4, 3, 0]])
    sims = np.array([[0.9, 0.5, 0.4], [0.8, 0.7, 0.1]])
    fig = plots.retrieval_gallery(
        queries,
        neighbours,
        labels,
        _images(len(labels)),
        similarities=sims,
        class_names=["zero", "one", "two"],
    )
    axes = np.array(fig.axes).reshape(2, 4)
    for r, q in enumerate(queries):
        assert axes[r, 0].get_ylabel() == ["zero", "one"][r]
        assert axes[r, 0].spines["top"].get_edgecolor() == to_rgba("black")
        for c in range(3):
            ax = axes[r, c + 1]
            right = labels[neighbours[r, c]] == labels[q]
            want = plots.RIGHT if right else plots.WRONG
            assert ax.spines["left"].get_edgecolor() == to_rgba(want)
            assert ax.get_title() == f"{sims[r, c]:.2f}"
            # Wrong neighbours are named.
            name = ["zero", "one", "two"][labels[neighbours[r, c]]]
            assert ax.get_xlabel() == ("" if right else name)
    # The images are drawn as given (CHW grey -> HW).
    drawn = axes[1, 2].get_images()[0].get_array()
    np.testing.assert_array_equal(drawn, _images(len(labels))[3][0])
    with pytest.raises(ValueError, match="^neighbours: expected shape \\(2, k\\)"):
        plots.retrieval_gallery(queries, neighbours[:1], labels, _images(7))
    # Too few names, a negative label, an empty image: named, not an
    # IndexError or ZeroDivisionError from inside the plot.
    with pytest.raises(ValueError, match="^class_names: expected a name for each label, 0 to 2, "):
        plots.retrieval_gallery(queries, neighbours, labels, _images(7), class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"^class_names: .* \(and a label of -1\)"):
        plots.retrieval_gallery(
            queries, neighbours, labels - 1, _images(7), class_names=["a", "b", "c"]
        )
    empty = [np.zeros((0, 0), np.uint8)] * 7
    with pytest.raises(ValueError, match=r"^images: expected .* got shape \[0, 0\]"):
        plots.retrieval_gallery(queries, neighbours, labels, empty)


def test_probability_heatmaps_show_the_batch_classes_sorted_with_anchors():
    rng = np.random.default_rng(1)
    labels = np.array([3, 1, 3, 1, 5, 5])
    before = rng.dirichlet(np.ones(7), size=6)
    after = rng.dirichlet(np.ones(7), size=6)
    anchors = np.array([True, True, False, False, True, False])
    fig = plots.probability_heatmaps(before, after, labels, anchors=anchors)
    ax0, ax1 = fig.axes[:2]
    order = np.argsort(labels, kind="stable")
    np.testing.assert_allclose(ax0.get_images()[0].get_array(), before[order][:, [1, 3, 5]])
    np.testing.assert_allclose(ax1.get_images()[0].get_array(), after[order][:, [1, 3, 5]])
    # Anchor markers: one per anchor, at the anchors' sorted rows.
    markers = [c for c in ax0.collections if len(c.get_offsets()) == anchors.sum()]
    rows = sorted(markers[-1].get_offsets()[:, 1])
    assert rows == sorted(np.flatnonzero(anchors[order]).tolist())
    # Columns already restricted to the batch's classes.
    fig = plots.probability_heatmaps(before[:, :3], after[:, :3], labels, classes=[1, 3, 5])
    np.testing.assert_allclose(fig.axes[0].get_images()[0].get_array(), before[order][:, :3])
    with pytest.raises(ValueError, match="^classes: expected 3 classes"):
        plots.probability_heatmaps(before[:, :3], after[:, :3], labels, classes=[1, 3])
    with pytest.raises(ValueError, match="^after: expected the shape of before"):
        plots.probability_heatmaps(before, after[:, :3], labels)
    with pytest.raises(ValueError, match="^labels: expected one label per row of before"):
        plots.probability_heatmaps(before, after, labels[:-1])
    with pytest.raises(ValueError, match="^class_names: expected a name for each label, 0 to 5"):
        plots.probability_heatmaps(before, after, labels, class_names=list("abc"))
    # Beyond 20 columns the classes are not named, so names are not needed.
    wide = rng.dirichlet(np.ones(25), size=6)
    plots.probability_heatmaps(wide, wide, labels, classes=range(25), class_names=["a"])


def test_embedding_map_subsamples_and_draws_thumbnails():
    from matplotlib.offsetbox import AnnotationBbox

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(5), 12)
    emb = rng.normal(size=(60, 8)) + 4 * np.eye(8)[labels]
    fig = plots.embedding_map(
        emb,
        labels,
        images=_images(60, shape=(3, 40, 30)),
        class_names=list("abcde"),
        max_points=50,
        thumbnails=7,
    )
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 50
    boxes = [a for a in ax.artists if isinstance(a, AnnotationBbox)]
    assert len(boxes) == 7
    # Large images are shrunk to thumbnails.
    assert max(boxes[0].offsetbox.get_data().shape[:2]) <= 64
    assert "50 embeddings, 5 classes" in ax.get_title()
    with pytest.raises(ValueError, match="^embeddings: expected shape \\(60, d\\)"):
        plots.embedding_map(emb[:10], labels)
    for kw, name in [(dict(normalize="no"), "normalize"), (dict(max_points=0), "max_points")]:
        with pytest.raises(ValueError, match=f"^{name}: expected "):
            plots.embedding_map(emb, labels, **kw)


def test_curves_and_png_bytes():
    history = [
        {
            "epoch": e,
            "train_loss": 3.0 / e,
            "train_nll": 1.0 / e,
            "train_ce": 2.0 / e,
            "val": {"recall@2": 0.2 * e, "recall@1": 0.1 * e, "map@r": 0.05 * e},
        }
        for e in (1, 2, 3)
    ]
    fig = plots.loss_curve(history)
    lines = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["loss"], [3.0, 1.5, 1.0])
    np.testing.assert_allclose(lines["ce"], [2.0, 1.0, 2.0 / 3])
    fig = plots.metric_curves(history, "val")
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert labels == ["recall@1", "recall@2", "map@r"]
    png = plots.png_bytes(fig, dpi=50)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = Image.open(io.BytesIO(png)).size
    assert 200 < w < 400 and 100 < h < 300


def test_a_backend_chosen_by_the_user_is_kept():
    code = (
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "import matplotlib.pyplot as plt\n"
        "from grouploss import plots\n"
        "plots.loss_curve([{'epoch': 1, 'train_loss': 1.0}])\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "svg"
    code = (
        "import matplotlib\n"
        "from grouploss import plots\n"
        "plots._plt()\n"
        "print(matplotlib.get_backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip().lower() == "agg"
