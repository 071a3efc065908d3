"""The triplet margin loss with batch-hard mining against pytorch-metric-learning:
``losses.TripletMarginLoss(margin)(emb, labels, miners.BatchHardMiner()(emb, labels))``
with their defaults (LpDistance, AvgNonZeroReducer). Values and gradients
with respect to the embeddings must agree."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grouploss
from grouploss import functional as F

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

CUDA = torch.cuda.is_available()


def pml(emb: torch.Tensor, labels: torch.Tensor, margin: float):
    """PML's loss and its gradient with respect to ``emb``."""
    x = emb.detach().clone().requires_grad_(True)
    loss_fn = pml_losses.TripletMarginLoss(margin=margin)
    miner = pml_miners.BatchHardMiner()
    loss = loss_fn(x, labels, miner(x, labels))
    loss.backward()
    return loss.detach(), x.grad


def ours(emb: torch.Tensor, labels: torch.Tensor, margin: float):
    x = emb.detach().clone().requires_grad_(True)
    loss = F.triplet_margin_loss(x, labels, margin=margin)
    assert loss.dim() == 0 and loss.dtype == emb.dtype and loss.device == emb.device
    loss.backward()
    return loss.detach(), x.grad


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance. Both sides run the same libtorch ops, so they agree
    to rounding at most: float64 1e-10, float32 a few dozen ulps of 1 (the
    distances are O(1), the gradients a sum over O(batch) terms)."""
    return 1e-10 if dtype == torch.float64 else 64 * torch.finfo(torch.float32).eps


def assert_matches_pml(emb, labels, margin):
    tol = tolerance(emb.dtype)
    want_loss, want_grad = pml(emb, labels, margin)
    got_loss, got_grad = ours(emb, labels, margin)
    assert abs(got_loss.item() - want_loss.item()) <= tol * max(abs(want_loss.item()), 1e-6), (
        got_loss.item(),
        want_loss.item(),
    )
    assert got_grad is not None and want_grad is not None
    scale = max(want_grad.abs().max().item(), 1e-6)
    diff = (got_grad - want_grad).abs().max().item()
    assert diff <= tol * scale, (diff, scale)
    return want_loss.item(), want_grad


def pk_batch(p: int, k: int, d: int, dtype, seed: int, device="cpu"):
    """P classes x K samples, shuffled; unnormalised embeddings around class
    centres (so that some, not all, triplets violate the margin)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(1000, generator=g)[:p].repeat_interleave(k)
    labels = labels[torch.randperm(p * k, generator=g)]
    centres = torch.randn(1000, d, generator=g, dtype=torch.float64)
    emb = 2.5 * (centres[labels] + 0.9 * torch.randn(p * k, d, generator=g, dtype=torch.float64))
    return emb.to(dtype=dtype, device=device), labels.to(device)


DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,k,d", [(20, 3, 16), (10, 6, 64), (4, 3, 8), (8, 2, 5)])
@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_pk_batches_match_pml(dtype, p, k, d, margin):
    for seed in range(3):
        emb, labels = pk_batch(p, k, d, dtype, seed=100 * p + 10 * k + seed)
        loss, grad = assert_matches_pml(emb, labels, margin)
        assert loss > 0 and grad.abs().max().item() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_classes_of_one_sample_are_no_anchors(dtype):
    emb, labels = pk_batch(10, 4, 12, dtype, seed=3)
    # Three singletons: they serve as negatives but are no anchors.
    extra = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    emb = torch.cat([emb, (3 * extra).to(dtype)])
    labels = torch.cat([labels, torch.tensor([5001, 5002, 5003])])
    assert_matches_pml(emb, labels, 0.2)
    # Only singletons and one pair: a single anchor pair.
    assert_matches_pml(emb[-5:], torch.tensor([7, 7, 1, 2, 3]), 0.2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows", [12, 40])  # cdist's direct and matmul forms
def test_duplicates_and_ties_match_pml(dtype, n_rows):
    g = torch.Generator().manual_seed(n_rows)
    base = torch.randn(n_rows // 4, 6, generator=g, dtype=torch.float64)
    # Every row four times: exact copies, positive multiples (the same after
    # normalisation: tied distances) and, for one, a zero row.
    emb = torch.cat([base, base, 2.0 * base, 0.5 * base])
    emb[0] = 0.0
    labels = torch.randint(0, 4, (emb.shape[0],), generator=g)
    assert_matches_pml(emb.to(dtype), labels, 0.1)
    # Copies that share a label and copies across labels.
    labels = torch.arange(emb.shape[0]) % (n_rows // 4)
    labels[1::3] = 99
    assert_matches_pml(emb.to(dtype), labels, 0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_triplets_satisfied_gives_zero_like_pml(dtype):
    # Tight clusters on orthogonal axes: positives ~0.03 apart, negatives ~1.4.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(4)
    emb = torch.eye(8, dtype=torch.float64)[labels] + 0.01 * torch.randn(24, 8, generator=g)
    emb = emb.to(dtype)
    loss, grad = assert_matches_pml(emb, labels, 0.5)
    assert loss == 0.0
    assert torch.count_nonzero(grad) == 0
    got_loss, got_grad = ours(emb, labels, 0.5)
    assert got_loss.item() == 0.0 and torch.count_nonzero(got_grad) == 0
    # A margin beyond the gap: every anchor counts again.
    assert assert_matches_pml(emb, labels, 2.0)[0] > 0.5


@pytest.mark.parametrize(
    "labels",
    [torch.arange(9), torch.zeros(9, dtype=torch.int64), torch.tensor([3])],
    ids=["no-positives", "no-negatives", "one-sample"],
)
def test_no_valid_anchor_gives_zero_like_pml(labels):
    emb = torch.randn(len(labels), 5, dtype=torch.float64)
    loss, grad = assert_matches_pml(emb, labels, 0.1)
    assert loss == 0.0 and torch.count_nonzero(grad) == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 40),
    d=st.integers(1, 10),
    classes=st.integers(1, 8),
    margin=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_random_batches_match_pml(n, d, classes, margin, seed, dtype, scale):
    g = torch.Generator().manual_seed(seed)
    emb = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    assert_matches_pml(emb.to(dtype), labels, margin)


def test_gradient_flows_through_the_callers_graph():
    emb, labels = pk_batch(6, 4, 8, torch.float32, seed=9)
    w = torch.randn(8, 8, requires_grad=True)
    out = emb @ w
    loss = F.triplet_margin_loss(out, labels, margin=0.2)
    assert loss.requires_grad
    loss.backward()
    assert w.grad is not None and w.grad.abs().max() > 0
    # No grad wanted: a plain value.
    with torch.no_grad():
        assert not F.triplet_margin_loss(out, labels).requires_grad


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64, torch.uint8, torch.int16])
def test_label_dtypes(label_dtype):
    emb, labels = pk_batch(5, 4, 6, torch.float64, seed=5)
    labels = (labels % 200).to(label_dtype)
    assert_matches_pml(emb, labels, 0.1)


def test_half_inputs_are_computed_in_float32():
    emb, labels = pk_batch(6, 3, 8, torch.float32, seed=11)
    half = emb.half()
    loss = F.triplet_margin_loss(half, labels)
    assert loss.dtype == torch.float32
    want, _ = pml(half.float(), labels, 0.1)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_native_default_margin_is_pmls_trainer_default():
    emb, labels = pk_batch(6, 3, 8, torch.float64, seed=12)
    a = grouploss._native.triplet_margin_loss(emb, labels)
    b = F.triplet_margin_loss(emb, labels, margin=0.1)
    assert a.item() == b.item()


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda e, y: F.triplet_margin_loss(e[0], y), "embeddings"),
        (lambda e, y: F.triplet_margin_loss(e.int(), y), "embeddings"),
        (lambda e, y: F.triplet_margin_loss(e[:0], y[:0]), "embeddings"),
        (lambda e, y: F.triplet_margin_loss(e * float("nan"), y), "embeddings"),
        (lambda e, y: F.triplet_margin_loss(e, y[:-1]), "labels"),
        (lambda e, y: F.triplet_margin_loss(e, y.float()), "labels"),
        (lambda e, y: F.triplet_margin_loss(e, y[:, None]), "labels"),
        (lambda e, y: F.triplet_margin_loss(e, y, margin=-0.1), "margin"),
        (lambda e, y: F.triplet_margin_loss(e, y, margin=float("inf")), "margin"),
        (lambda e, y: F.triplet_margin_loss(e, y, margin="big"), "margin"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, arg):
    emb, labels = pk_batch(4, 3, 5, torch.float32, seed=1)
    with pytest.raises(ValueError, match=f"^{arg}: expected"):
        call(emb, labels)


def test_non_tensors_raise_type_error():
    with pytest.raises(TypeError, match="^embeddings:"):
        F.triplet_margin_loss([[1.0, 2.0]], torch.tensor([0]))
    with pytest.raises(TypeError, match="^labels:"):
        F.triplet_margin_loss(torch.ones(1, 2), [0])


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_pml_on_cuda(dtype):
    for p, k in [(20, 3), (10, 6), (4, 3)]:
        emb, labels = pk_batch(p, k, 32, dtype, seed=p * k, device="cuda")
        loss, _ = assert_matches_pml(emb, labels, 0.1)
        assert loss > 0
    # Labels on the CPU are moved to the embeddings' device, as PML does.
    emb, labels = pk_batch(10, 6, 32, dtype, seed=1, device="cuda")
    assert_matches_pml(emb, labels.cpu(), 0.1)
