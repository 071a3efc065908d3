"""grouploss.Index against the brute-force definition and faiss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grouploss import Index

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def brute(gallery, queries, k):
    """Cosine similarities of every pair, ranked by (-similarity, position)."""
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    s = q.astype(np.float64) @ g.astype(np.float64).T
    order = np.stack([np.lexsort((np.arange(len(g)), -row))[:k] for row in s])
    return np.take_along_axis(s, order, 1), order


def halves(rng, n, d=4):
    """Rows of +-1/2 in 4 dimensions: unit vectors with exact products, so
    the ranking (ties included) does not depend on any summation order."""
    return (rng.integers(0, 2, size=(n, d)) - 0.5).astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_search_equals_the_brute_force_ranking_ties_included(device):
    rng = np.random.default_rng(0)
    gallery, queries = halves(rng, 500), halves(rng, 37)
    index = Index(4, device=device)
    index.add(gallery[:200], ids=np.arange(200) * 10)
    index.add(torch.from_numpy(gallery[200:]), ids=np.arange(200, 500) * 10)
    assert len(index) == 500 and index.device.startswith(device)
    want_s, want_pos = brute(gallery, queries, 9)
    for batch in (None, 1, 5):
        scores, ids = index.search(queries, 9, batch_size=batch)
        np.testing.assert_array_equal(ids, want_pos * 10)
        np.testing.assert_allclose(scores, want_s, atol=1e-6)
    t_scores, t_ids = index.search(torch.from_numpy(queries).to(device), 9)
    assert t_ids.device.type == device and t_ids.dtype == torch.int64
    np.testing.assert_array_equal(t_ids.cpu().numpy(), want_pos * 10)


def test_float16_storage_keeps_the_neighbours():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(3000, 64)).astype(np.float32)
    queries = gallery[:50] + 0.05 * rng.normal(size=(50, 64)).astype(np.float32)
    full, half = Index(64), Index(64, dtype="float16")
    full.add(gallery)
    half.add(gallery)
    assert half.dtype == "float16"
    s32, i32 = full.search(queries, 5)
    s16, i16 = half.search(queries, 5)
    np.testing.assert_array_equal(i16[:, 0], np.arange(50))
    np.testing.assert_allclose(s16, s32, atol=2e-3)
    assert (i16 == i32).mean() > 0.95


def test_save_refuses_a_folder_and_makes_missing_parents(tmp_path):
    index = Index(4)
    index.add(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="^path: expected a file to write"):
        index.save(tmp_path)
    index.save(tmp_path / "new" / "deeper" / "g.safetensors")
    assert len(Index.load(tmp_path / "new" / "deeper" / "g.safetensors")) == 4
    assert list((tmp_path / "new" / "deeper").iterdir()) == [tmp_path / "new/deeper/g.safetensors"]


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(100, 8)).astype(np.float32)
    index = Index(8, dtype="float16")
    index.add(gallery, labels=np.arange(100) % 7)
    index.add(gallery[:5], labels=np.zeros(5, dtype=np.int64))
    np.testing.assert_array_equal(index.ids, np.arange(105))  # default ids
    path = tmp_path / "gallery.safetensors"
    assert index.info == {}
    index.info = {"made by": "test", "names": '["a", "é"]'}
    index.save(path)
    back = Index.load(path)
    assert (len(back), back.dim, back.dtype) == (105, 8, "float16")
    assert back.info == {"made by": "test", "names": '["a", "é"]'}
    back.info["changed"] = "no"  # a copy
    assert "changed" not in back.info
    with pytest.raises(ValueError, match="^info: expected a dict of str to str"):
        back.info = {"n": 1}
    np.testing.assert_array_equal(back.labels, index.labels)
    q = rng.normal(size=(4, 8)).astype(np.float32)
    for a, b in zip(index.search(q, 6), back.search(q, 6)):
        np.testing.assert_array_equal(a, b)
    # Nothing executable: the file is plain safetensors.
    from safetensors.numpy import load_file

    assert sorted(load_file(str(path))) == ["ids", "labels", "vectors"]


def test_given_ids_then_default_ids_go_on_from_the_largest(tmp_path):
    rng = np.random.default_rng(4)
    gallery = rng.normal(size=(9, 8)).astype(np.float32)
    index = Index(8)
    index.add(gallery[:3])
    index.add(gallery[3:5], ids=[3, 4])  # following on: still positions
    index.add(gallery[5:7], ids=[40, 20])
    index.add(gallery[7:])
    want = [0, 1, 2, 3, 4, 40, 20, 41, 42]
    np.testing.assert_array_equal(index.ids, want)
    _, found = index.search(gallery, 1)
    np.testing.assert_array_equal(found[:, 0], want)
    path = tmp_path / "ids.safetensors"
    index.save(path)
    np.testing.assert_array_equal(Index.load(path).ids, want)


def test_arguments_are_checked(tmp_path):
    index = Index(3)
    with pytest.raises(ValueError, match=r"^index: expected vectors to search \(add some first\)"):
        index.search(np.eye(3, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="embeddings: expected 3 columns|embeddings: .* width"):
        index.add(np.ones((2, 4), np.float32))
    index.add(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="labels: expected labels with every add or none"):
        index.add(np.eye(3, dtype=np.float32), labels=[0, 1, 2])
    with pytest.raises(
        ValueError, match=r"^ids: expected one id per row of embeddings \(3\), got 2 ids"
    ):
        index.add(np.eye(3, dtype=np.float32), ids=[1, 2])
    # Ids name one vector each, as metrics.evaluate's gallery_ids do.
    with pytest.raises(ValueError, match="^ids: expected unique ids, got 5 twice"):
        index.add(np.eye(3, dtype=np.float32), ids=[5, 6, 5])
    with pytest.raises(ValueError, match="^ids: expected ids not in the index yet, got 1, an id"):
        index.add(np.eye(3, dtype=np.float32), ids=[7, 1, 8])
    index.add(np.eye(3, dtype=np.float32), ids=[7, 9, 8])
    with pytest.raises(ValueError, match="^ids: expected ids not in the index yet, got 9, an id"):
        index.add(np.eye(3, dtype=np.float32), ids=[10, 9, 11])
    np.testing.assert_array_equal(index.ids, [0, 1, 2, 7, 9, 8])
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= 6"):
        index.search(np.eye(3, dtype=np.float32), 7)
    with pytest.raises(ValueError, match='dtype: expected one of "float32", "float16"'):
        Index(3, dtype="bfloat16")
    with pytest.raises(ValueError, match="dim: expected an integer >= 1"):
        Index(0)
    with pytest.raises(FileNotFoundError):
        Index.load(tmp_path / "missing.safetensors")


def test_the_same_neighbours_as_faiss():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(20000, 32)).astype(np.float32)
    queries = rng.normal(size=(200, 32)).astype(np.float32)
    index = Index(32)
    index.add(gallery)
    scores, ids = index.search(queries, 10)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(32)
    flat.add(g)
    f_scores, f_ids = flat.search(q, 10)
    np.testing.assert_allclose(scores, f_scores, atol=1e-5)
    # The same neighbours, but where two similarities are within rounding.
    differ = ids != f_ids
    assert differ.mean() < 0.01
    assert np.all(np.abs(scores[differ] - f_scores[differ]) < 1e-5)


def test_search_block_size_and_foreign_files_are_named(tmp_path):
    index = Index(3)
    index.add(torch.randn(5, 3))
    for bad in (0, -1):
        want = rf"^batch_size: expected None or an integer >= 1, got {bad}"
        with pytest.raises(ValueError, match=want):
            index.search(torch.randn(2, 3), 2, batch_size=bad)
    (tmp_path / "notes.txt").write_text("not an index")
    with pytest.raises(ValueError, match=r"^path: .*notes\.txt: not a safetensors file"):
        Index.load(tmp_path / "notes.txt")


def test_integers_are_not_truncated():
    for bad, call in [
        (r"^dim: expected an integer, got 2.7", lambda: Index(2.7)),
        (r"^dim: expected an integer, got True", lambda: Index(True)),
        (r"^k: expected an integer, got 2.5", lambda: _three().search(torch.randn(1, 3), 2.5)),
        # Unsigned ids and labels beyond int64 are refused, not wrapped.
        (
            r"^labels: expected values below 2\*\*63, got 18446744073709551615$",
            lambda: Index(3).add(torch.randn(1, 3), labels=np.array([2**64 - 1], np.uint64)),
        ),
        (
            r"^ids: expected values below 2\*\*63, got 9223372036854775808$",
            lambda: Index(3).add(torch.randn(1, 3), ids=torch.tensor([2**63], dtype=torch.uint64)),
        ),
    ]:
        with pytest.raises(ValueError, match=bad):
            call()


def _three() -> Index:
    index = Index(3)
    index.add(torch.randn(4, 3))
    return index


@pytest.mark.parametrize(
    "scale, dtype",
    [
        (2.0**130, np.float64),  # beyond float32's range: once stored as NaN
        (2.0**-1000, np.float64),
        (2.0**70, np.float32),  # squares overflow: once stored as zero rows
        (2.0**-80, np.float32),  # squares underflow: once left unnormalised
    ],
)
def test_rows_of_any_size_keep_their_direction(scale, dtype):
    """Vectors and queries scaled by a power of two (exactly) are found as
    the unscaled ones are, whatever their size in their dtype."""
    rng = np.random.default_rng(4)
    gallery, queries = halves(rng, 60), halves(rng, 7)
    want_s, want_pos = brute(gallery, queries, 5)
    index = Index(4)
    index.add(gallery[:30])
    index.add((gallery[30:].astype(dtype) * scale).astype(dtype))
    for q in (queries, (queries.astype(dtype) * scale).astype(dtype)):
        scores, ids = index.search(q, 5)
        np.testing.assert_array_equal(ids, want_pos)
        np.testing.assert_allclose(scores, want_s, atol=1e-6)


def test_a_file_of_rows_that_add_would_not_store_is_refused(tmp_path):
    """Scores are cosines of unit rows: a crafted file of longer rows (once
    scored 3.0) or of no columns is refused."""
    from safetensors.torch import save_file

    ids = torch.arange(2)
    for name, vectors in [
        ("long", torch.full((2, 4), 1.5)),
        ("empty", torch.zeros((2, 0))),
    ]:
        path = tmp_path / f"{name}.safetensors"
        save_file({"vectors": vectors, "ids": ids}, str(path))
        with pytest.raises(ValueError, match=rf"^path: .*{name}\.safetensors"):
            Index.load(path)
    zero_and_unit = torch.tensor([[0.0, 0.0], [0.6, 0.8]])
    save_file({"vectors": zero_and_unit, "ids": ids}, str(tmp_path / "ok.safetensors"))
    assert len(Index.load(tmp_path / "ok.safetensors")) == 2


def test_an_empty_add_takes_empty_label_and_id_lists():
    index = Index(2)
    index.add(np.eye(2, dtype=np.float32), ids=[5, 6], labels=[0, 1])
    index.add(np.zeros((0, 2), np.float32), ids=[], labels=[])  # once "expected integers"
    assert len(index) == 2 and list(index.ids) == [5, 6]
