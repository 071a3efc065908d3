"""Property tests over random shapes, label layouts, dtypes and extreme
values: the loss, the sampler and the metrics give finite results wherever
the math is defined and a ValueError naming the argument elsewhere; never a
crash, a panic (RuntimeError from Rust) or a NaN."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from grouploss import ClassBalancedBatchSampler, GroupLoss
from grouploss import functional as F
from grouploss import metrics as M
from reference import reference_group_loss

IMPLEMENTATIONS = ["auto", "fused_cpu", "libtorch", "autograd"]
# `make stress` raises the number of examples.
EXAMPLES = int(os.environ.get("GROUPLOSS_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def loss_inputs(draw):
    """A batch with any label layout (classes of any size, singletons
    included), any number of classes m, an embedding scale from tiny to huge
    and logits from flat to saturated."""
    m = draw(st.integers(1, 12))
    n = draw(st.integers(2, 24))
    labels = draw(st.lists(st.integers(0, m - 1), min_size=n, max_size=n))
    d = draw(st.integers(1, 16))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    emb_scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3, 1e6]))
    logit_scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 30.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64) * emb_scale
    logits = torch.randn(n, m, generator=g, dtype=torch.float64) * logit_scale
    return emb.to(dtype), torch.tensor(labels), logits.to(dtype)


@SETTINGS
@given(
    data=loss_inputs(),
    implementation=st.sampled_from(IMPLEMENTATIONS),
    temperature=st.sampled_from([0.5, 1.0, 24.0, 80.0]),
    num_anchors=st.integers(0, 3),
    num_iters=st.integers(1, 4),
    zero_diagonal=st.booleans(),
    stretch=st.sampled_from([None, 0.5, 0.9, 0.99]),
    similarity=st.sampled_from(["correlation", "cosine"]),
)
def test_loss_and_gradients_are_finite_and_match_the_reference(
    data, implementation, temperature, num_anchors, num_iters, zero_diagonal, stretch, similarity
):
    emb, labels, logits = data
    # Where even the largest prior ratio of a row, exp(spread / T), leaves
    # the float range, every label probability can be exactly 0 and the
    # release's computation is NaN in the loss itself; finite gradients are
    # promised only where the prior is representable (RELIABILITY.md).
    bound = 80.0 if emb.dtype == torch.float32 else 700.0
    spread = (logits.max(dim=1).values - logits.min(dim=1).values).max().item()
    if stretch is not None and spread > 0:
        # Up to the edge of the promise, where products of priors leave the
        # float range (label probabilities of exactly 0, row sums of 1e-30).
        logits = logits * (stretch * bound * temperature / spread)
        spread = stretch * bound * temperature
    assume(spread / temperature < bound)
    emb = emb.clone().requires_grad_()
    logits = logits.clone().requires_grad_()
    kw = dict(
        temperature=temperature,
        num_anchors=num_anchors,
        num_iters=num_iters,
        zero_diagonal=zero_diagonal,
        similarity=similarity,
    )
    loss = F.group_loss(emb, labels, logits, implementation=implementation, **kw)
    loss.backward()
    assert loss.dtype == emb.dtype
    assert torch.isfinite(loss), loss
    assert torch.isfinite(emb.grad).all()
    assert torch.isfinite(logits.grad).all()
    # The loss value against the spec's computation in the same dtype,
    # wherever that computation is defined (it divides 0 by 0 for a sample
    # similar to nothing; the library keeps that row as it is).
    want = reference_group_loss(emb.detach(), labels, logits.detach(), **kw)[0]
    if torch.isfinite(want):
        tol = 1e-4 if emb.dtype == torch.float32 else 1e-9
        assert math.isclose(loss.item(), want.item(), rel_tol=tol, abs_tol=tol), (loss, want)


@SETTINGS
@given(
    n=st.integers(2, 6),
    d=st.integers(1, 4),
    m=st.integers(1, 5),
    bad=st.sampled_from(["nan_emb", "inf_logits", "label_high", "label_negative", "rows"]),
)
def test_bad_values_raise_a_value_error_naming_the_argument(n, d, m, bad):
    emb = torch.randn(n, d)
    labels = torch.zeros(n, dtype=torch.long)
    logits = torch.randn(n, m)
    arg = {"nan_emb": "embeddings", "inf_logits": "logits", "rows": "labels"}.get(bad, "labels")
    if bad == "nan_emb":
        emb[0, 0] = float("nan")
    elif bad == "inf_logits":
        logits[0, 0] = float("inf")
    elif bad == "label_high":
        labels[0] = m
    elif bad == "label_negative":
        labels[0] = -1
    else:
        labels = torch.zeros(n + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=arg):
        F.group_loss(emb, labels, logits)


@SETTINGS
@given(
    scale=st.sampled_from([1e-30, 1e-8, 1.0, 1e8, 1e30]),
    cosine=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_module_with_its_own_classifier_survives_extreme_embeddings(scale, cosine, seed):
    torch.manual_seed(seed)
    kwargs = dict(classifier="cosine") if cosine else {}
    loss_fn = GroupLoss(4, embedding_size=8, **kwargs)
    emb = (torch.randn(12, 8) * scale).requires_grad_()
    labels = torch.arange(4).repeat_interleave(3)
    loss = loss_fn(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()


@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=10),
    p=st.integers(-1, 12),
    k=st.integers(-1, 5),
)
def test_sampler_plans_or_refuses_any_layout(sizes, p, k):
    labels = np.repeat(np.arange(len(sizes)) * 7, sizes).astype(np.int64)
    classes = int((np.asarray(sizes) > 0).sum())
    if p < 1 or k < 1 or p > classes:
        with pytest.raises(ValueError):
            ClassBalancedBatchSampler(labels, p, k)
        return
    sampler = ClassBalancedBatchSampler(labels, p, k, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = set()
    for b in batches:
        assert len(b) == p * k
        assert len(set(labels[b].tolist())) == p
        seen.update(b)
    assert seen == set(range(len(labels)))


@SETTINGS
@given(
    n=st.integers(2, 30),
    d=st.integers(1, 8),
    classes=st.integers(1, 5),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]),
    duplicate=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_metrics_stay_in_range_for_extreme_and_duplicate_embeddings(
    n, d, classes, scale, duplicate, seed
):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)) * scale
    if duplicate:
        emb[1:] = emb[0]
    labels = rng.integers(0, classes, size=n)
    ks = [k for k in (1, 2, 4) if k < n]
    out = M.evaluate(
        emb.astype(np.float32), labels, ks=ks, include=("recall", "map@r", "r_precision")
    )
    counts = np.bincount(labels)
    singletons = int((counts[labels] == 1).sum())
    assert out["left_out"] == singletons
    for key, value in out.items():
        if key in ("map@r", "r_precision") and singletons == n:
            # No query has another item of its class: documented NaN.
            assert math.isnan(value)
        elif key.startswith(("recall", "map", "r_precision")):
            assert 0.0 <= value <= 1.0, (key, value)
    # Recall@K by brute force on float64 cosine similarity, ties by index.
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-300)
    if scale >= 1e-6 and not duplicate:
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        order = np.argsort(-sim, axis=1, kind="stable")
        for k in ks:
            hit = (labels[order[:, :k]] == labels[:, None]).any(axis=1).mean()
            # float32 rounding can reorder near-ties; allow one query.
            assert abs(out[f"recall@{k}"] - hit) <= 1.0 / n + 1e-9


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_metrics_refuse_non_finite_embeddings(value):
    emb = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    emb[3, 1] = value
    with pytest.raises(ValueError, match="embeddings"):
        M.evaluate(emb, np.arange(10) % 2)
