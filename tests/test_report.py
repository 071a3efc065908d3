"""The HTML report of a run and the pieces it is made of: nearest neighbours,
worst queries, confused classes, one batch's probabilities; the page opened
in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from data_fixtures import make_cub, make_glyph_like
from headless_chromium import open_page
from PIL import Image
from safetensors.torch import load_file
from test_training import PAPER, TINY

import grouploss
from grouploss import functional as F
from grouploss.report import (
    Neighbours,
    batch_probabilities,
    confused_classes,
    nearest_neighbours,
    random_queries,
    run_dataset,
    worst_queries,
)
from reference import reference_group_loss


@pytest.fixture(scope="module")
def glyph_run(tmp_path_factory):
    root = make_glyph_like(tmp_path_factory.mktemp("glyphs"))
    out = tmp_path_factory.mktemp("runs") / "run"
    # The release's head and similarity, so the batch figure can be checked
    # against the spec's computation.
    grouploss.train(
        "glyphs", data_root=root, out_dir=out, classifier="linear", similarity_power=1.0, **TINY
    )
    return out


@pytest.fixture(scope="module")
def glyph_report(glyph_run):
    return grouploss.report(glyph_run, device="cpu")


def _pngs(page: str):
    return re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)


def test_the_report_is_one_self_contained_page(glyph_run, glyph_report):
    assert glyph_report == glyph_run / "report.html"
    page = glyph_report.read_text()
    for title in (
        "Test metrics",
        "Training curves",
        "Embedding map",
        "Retrieval gallery",
        "Worst queries",
        "Classes most often confused",
        "What the loss does on one batch",
        "Configuration",
    ):
        assert f"<h2>{title}</h2>" in page, title
    # Loss, metrics, map, gallery, worst queries, heatmaps: embedded PNGs,
    # and nothing else to fetch.
    pngs = _pngs(page)
    assert len(pngs) == 6
    sizes = [Image.open(io.BytesIO(base64.b64decode(p))).size for p in pngs]
    assert all(w > 200 and h > 150 for w, h in sizes), sizes
    assert len(re.findall(r"\bsrc=", page)) == 6
    assert not re.search(r"<script|<link|https?://|url\(", page)
    # The test metrics of summary.json, the configuration.
    summary = json.loads((glyph_run / "summary.json").read_text())
    for k, v in summary["test"].items():
        if k != "left_out":
            assert f'<th>{k}</th><td class="num">{v:.4f}</td>' in page, k
    assert "<tr><th>temperature</th><td>10.0</td></tr>" in page
    assert "96 images, 6 classes" in page


def test_the_report_opens_in_headless_chromium_without_errors(glyph_report, tmp_path):
    page = open_page(glyph_report)
    assert page.errors == []
    # The page itself, then its six embedded figures: nothing from elsewhere.
    assert page.requests[0] == glyph_report.resolve().as_uri()
    assert len(page.requests) == 7
    assert all(r.startswith("data:image/png;base64,") for r in page.requests[1:])
    shot = Image.open(io.BytesIO(page.screenshot)).convert("RGB")
    (tmp_path / "report.png").write_bytes(page.screenshot)
    pixels = np.asarray(shot, dtype=np.float64)
    assert shot.size == page.size and page.size[1] > 2000
    # Not blank: text and figures vary the pixels; many distinct colours
    # (figures), not just text on a background.
    assert pixels.std() > 30
    rgb = np.asarray(shot, dtype=np.uint32).reshape(-1, 3)
    colours = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2])
    assert len(colours) > 1000


def test_the_browser_check_sees_errors_and_blank_pages(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><img src="missing.png">'
        "<script>console.error('boom'); null.x;</script></body></html>"
    )
    page = open_page(bad)
    text = "\n".join(page.errors)
    assert "console.error: boom" in text
    assert "TypeError" in text
    assert "ERR_FILE_NOT_FOUND" in text
    blank = tmp_path / "blank.html"
    blank.write_text('<!DOCTYPE html><html><body style="background:#fff"></body></html>')
    page = open_page(blank)
    assert page.errors == []
    assert np.asarray(Image.open(io.BytesIO(page.screenshot)).convert("L")).std() == 0


def test_cli_report(glyph_run, glyph_report, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(glyph_run, run)
    (run / "report.html").unlink(missing_ok=True)
    cli = [sys.executable, "-m", "grouploss.cli", "report", str(run), "--device", "cpu"]
    p = subprocess.run(cli + ["--queries", "3"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(run / "report.html")
    page = (run / "report.html").read_text()
    assert len(_pngs(page)) == 6
    # --queries 3: three rows in each gallery.
    gallery = re.search(r'<section id="gallery">.*?base64,([^"]+)"', page, re.S).group(1)
    three = Image.open(io.BytesIO(base64.b64decode(gallery))).size
    default = re.search(r'<section id="gallery">.*?base64,([^"]+)"', glyph_report.read_text(), re.S)
    eight = Image.open(io.BytesIO(base64.b64decode(default.group(1)))).size
    assert three[0] == eight[0] and three[1] < eight[1] / 2


def test_a_run_without_summary_is_reported_from_its_checkpoint(glyph_run, tmp_path):
    run = tmp_path / "interrupted"
    shutil.copytree(glyph_run, run)
    (run / "summary.json").unlink()
    out = grouploss.report(
        run, device="cpu", checkpoint="last", out=tmp_path / "r.html", queries=2, max_points=50
    )
    page = out.read_text()
    assert "No summary.json" in page
    want = grouploss.load_run(run, checkpoint="last", device="cpu").evaluate("test")
    assert f'<th>recall@1</th><td class="num">{want["recall@1"]:.4f}</td>' in page
    assert f'<th>map@r</th><td class="num">{want["map@r"]:.4f}</td>' in page


def test_report_arguments_are_checked(glyph_run):
    with pytest.raises(ValueError, match="^queries: expected an integer >= 1, got 0"):
        grouploss.report(glyph_run, queries=0)
    with pytest.raises(ValueError, match="^k: expected"):
        grouploss.report(glyph_run, k=0)
    with pytest.raises(ValueError, match="^k: expected at most 100 .*, got 10000000000"):
        grouploss.report(glyph_run, k=10**10)
    with pytest.raises(ValueError, match="^queries: expected at most 100"):
        grouploss.report(glyph_run, queries=101)
    with pytest.raises(ValueError, match="^seed: expected an integer >= 0, got 1.5"):
        grouploss.report(glyph_run, seed=1.5)
    with pytest.raises(FileNotFoundError):
        grouploss.report(glyph_run / "nowhere")


def _brute_force_neighbours(emb, k, query=None, gallery=None):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = np.arange(len(e)) if query is None else np.flatnonzero(query)
    g = np.arange(len(e)) if gallery is None else np.flatnonzero(gallery)
    sims = e[q] @ e[g].T
    if query is None:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return q, g[order], np.take_along_axis(sims, order, axis=1)


def test_nearest_neighbours_against_brute_force():
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    emb = rng.normal(size=(10, 5))
    nb = nearest_neighbours(torch.from_numpy(emb), torch.from_numpy(labels), 4)
    q, idx, sims = _brute_force_neighbours(emb, 4)
    np.testing.assert_array_equal(nb.queries, q)
    np.testing.assert_array_equal(nb.indices, idx)
    np.testing.assert_allclose(nb.similarities, sims, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(nb.correct, labels[idx] == labels[:, None])
    # Class 3 has a single image: its query has no answer.
    np.testing.assert_array_equal(nb.has_match, labels != 3)
    # k is capped by the gallery.
    assert nearest_neighbours(emb, labels, 50).indices.shape == (10, 9)
    # Queries searching a gallery (In-Shop).
    query = np.array([1, 0, 1, 0, 1, 0, 1, 0, 0, 1], bool)
    nb = nearest_neighbours(emb, labels, 3, is_query=query, is_gallery=~query)
    q, idx, sims = _brute_force_neighbours(emb, 3, query, ~query)
    np.testing.assert_array_equal(nb.queries, q)
    np.testing.assert_array_equal(nb.indices, idx)
    np.testing.assert_array_equal(nb.has_match, [True, True, True, True, False])
    with pytest.raises(ValueError, match="^is_gallery"):
        nearest_neighbours(emb, labels, 3, is_query=query)
    with pytest.raises(ValueError, match="^k: expected an integer >= 1, got 0"):
        nearest_neighbours(emb, labels, 0)
    with pytest.raises(ValueError, match="^is_query: expected at least one query"):
        nearest_neighbours(emb, labels, 3, is_query=np.zeros(10, bool), is_gallery=~query)
    with pytest.raises(ValueError, match="^is_gallery: expected at least one gallery item"):
        nearest_neighbours(emb, labels, 3, is_query=query, is_gallery=np.zeros(10, bool))
    with pytest.raises(ValueError, match=r"^k: expected an integer >= 1, got 0$"):
        nearest_neighbours(emb, labels, np.int64(0))
    # Positions are not masks (they were read as ones: [0, 1] gave query 1).
    with pytest.raises(ValueError, match=r"^is_query: expected a boolean mask of 10 entries"):
        nearest_neighbours(emb, labels, 3, is_query=[0, 1], is_gallery=~query)


def test_worst_queries_and_confused_classes():
    correct = np.array(
        [
            [True, True, True],
            [False, True, False],
            [False, False, False],
            [False, True, True],
            [False, False, False],
            [True, False, False],
        ]
    )
    sims = np.array([[0.9] * 3, [0.8] * 3, [0.3] * 3, [0.95] * 3, [0.7] * 3, [0.5] * 3])
    has_match = np.array([True, True, True, True, False, True])
    labels = np.array([0, 0, 1, 1, 2, 2])
    idx = np.array([[1, 1, 1], [2, 0, 3], [4, 0, 0], [0, 2, 2], [0, 0, 0], [4, 0, 1]])
    nb = Neighbours(np.arange(6), idx, sims, correct, has_match)
    # Fewest right first; among equals the most confident mistakes; query 4
    # has no match.
    np.testing.assert_array_equal(worst_queries(nb, 10), [2, 1, 5, 3, 0])
    np.testing.assert_array_equal(worst_queries(nb, 2), [2, 1])
    picked = random_queries(nb, 3, seed=1)
    assert len(picked) == 3 and set(picked) <= {0, 1, 2, 3, 5}
    np.testing.assert_array_equal(picked, np.sort(picked))
    # Rank-1 mistakes: 1 (class 0) -> 2 (1), 2 (1) -> 4 (2), 3 (1) -> 0 (0),
    # 4 (2) -> 0 (0).
    assert confused_classes(nb, labels) == [(0, 1, 2), (0, 2, 1), (1, 2, 1)]
    assert confused_classes(nb, labels, top=1) == [(0, 1, 2)]


def test_batch_probabilities_follow_the_spec(glyph_run):
    model = grouploss.load_run(glyph_run, device="cpu")
    cfg = model.config
    b = batch_probabilities(model, seed=3)
    n = cfg["classes_per_batch"] * cfg["samples_per_class"]
    train = run_dataset(cfg, "train")
    m = len(train.classes)
    assert b.before.shape == b.after.shape == (n, m) and b.classes is None
    np.testing.assert_array_equal(b.labels, train.labels[b.indices])
    assert b.class_names == train.classes
    # The embeddings are the model's; the logits its checkpoint's classifier.
    emb = model.embed(torch.stack([train.load(int(i)) for i in b.indices]))
    np.testing.assert_allclose(b.embeddings, emb.numpy(), rtol=1e-5, atol=1e-6)
    ck = load_file(str(glyph_run / "checkpoints" / "best.safetensors"))
    w = ck["model.classifier.weight"].double()
    bias = ck["model.classifier.bias"].double()
    e = torch.from_numpy(b.embeddings).double()
    logits = e @ w.T + bias
    torch.testing.assert_close(model.logits(emb).double(), logits, rtol=1e-4, atol=1e-4)
    loss, x, _, _ = reference_group_loss(
        e, torch.from_numpy(b.labels), logits, cfg["temperature"], cfg["num_anchors"]
    )
    np.testing.assert_allclose(b.after, x.numpy(), rtol=1e-4, atol=1e-5)
    assert b.loss == pytest.approx(float(loss), rel=1e-4)
    # The prior: softmax(logits / T), the first anchors of each class one-hot.
    prior = torch.softmax(logits / cfg["temperature"], dim=1).numpy()
    firsts = {}
    for i, y in enumerate(b.labels):
        firsts.setdefault(y, []).append(i)
    anchors = [i for rows in firsts.values() for i in rows[: cfg["num_anchors"]]]
    np.testing.assert_array_equal(np.flatnonzero(b.anchors), sorted(anchors))
    prior[anchors] = np.eye(m)[b.labels[anchors]]
    np.testing.assert_allclose(b.before, prior, rtol=1e-4, atol=1e-6)
    # Refining the prior with the stateless pieces gives the loss's X.
    refined = F.refine(
        torch.from_numpy(b.before),
        F.similarity(torch.from_numpy(b.embeddings)),
        torch.from_numpy(b.labels),
        torch.from_numpy(b.anchors),
    )
    np.testing.assert_allclose(refined.numpy(), b.after, rtol=1e-4, atol=1e-5)


def test_batch_probabilities_refine_with_the_loss_the_run_trained(tmp_path):
    """The glyphs preset's own loss (a cosine classifier, W to the power 8):
    the figure's refinement is that loss's, power included."""
    root = make_glyph_like(tmp_path / "glyphs")
    out = tmp_path / "run"
    grouploss.train("glyphs", data_root=root, out_dir=out, **TINY)
    model = grouploss.load_run(out, device="cpu")
    cfg = model.config
    assert cfg["classifier"] == "cosine" and cfg["similarity_power"] == 8.0
    assert model.loss_options == grouploss.training.group_loss_options(cfg)
    b = batch_probabilities(model, seed=3)
    ck = load_file(str(out / "checkpoints" / "best.safetensors"))
    w = torch.nn.functional.normalize(ck["model.classifier.weight"].double(), dim=1)
    e = torch.from_numpy(b.embeddings).double()
    logits = cfg["classifier_scale"] * torch.nn.functional.normalize(e, dim=1) @ w.T
    labels = torch.from_numpy(b.labels)
    t, a = cfg["temperature"], cfg["num_anchors"]
    loss, x, _, _ = reference_group_loss(e, labels, logits, t, a, similarity_power=8.0)
    np.testing.assert_allclose(b.after, x.numpy(), rtol=1e-4, atol=1e-5)
    assert b.loss == pytest.approx(float(loss), rel=1e-4)
    # The power matters here: the release's W refines otherwise.
    _, x1, _, _ = reference_group_loss(e, labels, logits, t, a, similarity_power=1.0)
    assert np.abs(x1.numpy() - b.after).max() > 1e-3


def test_run_model_logits_check_their_input(glyph_run):
    model = grouploss.load_run(glyph_run, device="cpu")
    with pytest.raises(ValueError, match=r"^embeddings: expected a 2-D tensor \(N x 64\)"):
        model.logits(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="^embeddings: expected a torch.Tensor"):
        model.logits(np.zeros((3, 64)))


def test_a_colour_run_with_the_release_transform(tmp_path):
    """CUB on fixtures: colour thumbnails, and batches embedded through the
    release's Resize + CenterCrop re-created in Python (on the small convnet:
    the backbone is not the point here)."""
    root = tmp_path / "cub"
    make_cub(root, classes=12, per_class=3)
    run = tmp_path / "run"
    grouploss.train("cub200", data_root=root, out_dir=run, plots=False, backbone="convnet", **PAPER)
    model = grouploss.load_run(run, device="cpu")
    from grouploss.report import _embed_images

    train = run_dataset(model.config, "train")
    idx = [0, 1, 4]
    # Same-size images: the run's own uint8 path agrees with the Python one.
    own = model.embed(torch.stack([train.load(i) for i in idx]))
    torch.testing.assert_close(_embed_images(model, train, idx), own, rtol=1e-4, atol=1e-4)
    b = batch_probabilities(model)
    assert b.before.shape == (4, len(train.classes))
    out = grouploss.report(run, device="cpu")
    page = open_page(out)
    assert page.errors == []
    assert len(_pngs(out.read_text())) == 6
