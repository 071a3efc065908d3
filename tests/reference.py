"""A brute-force Group Loss written from the spec
(../shared/spec/group-loss.md, beside the checkout), the way the authors'
release computes it: anchors picked in a Python loop,
the Pearson correlation from its definition, plain tensor ops throughout.

Tests compare the Rust op against it; benchmarks time it as the peer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_similarity(
    emb: torch.Tensor,
    zero_diagonal: bool = False,
    kind: str = "correlation",
    sigma: float = 1.0,
    power: float = 1.0,
) -> torch.Tensor:
    """W from its definition: relu(Pearson correlation) (the release), relu
    of the cosine, or the gaussian kernel; every entry to `power`."""
    if kind == "gaussian":
        d2 = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
        w = torch.exp(-d2 / (2 * sigma**2))
    else:
        x = emb - emb.mean(dim=1, keepdim=True) if kind == "correlation" else emb
        norms = x.norm(dim=1)
        w = (x @ x.t()) / (norms[:, None] * norms[None, :])
        w = torch.relu(w)
    eye = torch.eye(w.shape[0], dtype=torch.bool, device=w.device)
    w = w.masked_fill(eye, 0.0 if zero_diagonal else 1.0)
    return w**power


def reference_anchors(labels: torch.Tensor, num_anchors: int) -> list[int]:
    """The first `num_anchors` indices of every class, in batch order."""
    taken: dict[int, int] = {}
    out = []
    for i, y in enumerate(labels.tolist()):
        if taken.get(y, 0) < num_anchors:
            taken[y] = taken.get(y, 0) + 1
            out.append(i)
    return out


def reference_group_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    temperature: float = 24.0,
    num_anchors: int = 2,
    num_iters: int = 1,
    gtg_weight: float = 1.0,
    ce_weight: float = 1.0,
    zero_diagonal: bool = False,
    similarity: str = "correlation",
    sigma: float = 1.0,
    similarity_power: float = 1.0,
):
    """Returns (loss, X, nll, ce) exactly as the spec computes them."""
    w = reference_similarity(emb, zero_diagonal, similarity, sigma, similarity_power)
    x = F.softmax(logits / temperature, dim=1)
    anchors = reference_anchors(labels, num_anchors)
    if anchors:
        x = x.clone()
        idx = torch.tensor(anchors, device=emb.device)
        x[idx] = F.one_hot(labels[idx], logits.shape[1]).to(x.dtype)
    for _ in range(num_iters):
        x = x * (w @ x)
        x = x / x.sum(dim=1, keepdim=True)
    nll = F.nll_loss(torch.log(x + 1e-12), labels)
    ce = F.cross_entropy(logits, labels)
    return gtg_weight * nll + ce_weight * ce, x, nll, ce


def pk_batch(p: int, k: int, m: int, d: int, *, dtype=torch.float64, seed=0, device="cpu"):
    """A random P x K batch: embeddings, labels (P distinct classes of m, in
    shuffled order as a sampler would give them) and logits."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(m, generator=g)[:p]
    labels = classes.repeat_interleave(k)
    labels = labels[torch.randperm(p * k, generator=g)]
    centres = torch.randn(m, d, generator=g, dtype=torch.float64)
    emb = centres[labels] + 0.8 * torch.randn(p * k, d, generator=g, dtype=torch.float64)
    logits = 2.0 * torch.randn(p * k, m, generator=g, dtype=torch.float64)
    return (
        emb.to(dtype=dtype, device=device),
        labels.to(device),
        logits.to(dtype=dtype, device=device),
    )


def reference_group_loss_with_memory(
    emb,
    labels,
    logits,
    mem,
    mem_labels,
    *,
    temperature=24.0,
    num_anchors=2,
    num_iters=1,
    similarity="correlation",
    sigma=1.0,
    similarity_power=1.0,
    zero_diagonal=False,
    batch_classes_only=False,
):
    """The Group Loss over [memory; batch] from the definition: W of all
    rows, memory rows one-hot anchors, the batch's first ``num_anchors``
    per class too, replicator steps over all rows, NLL over the batch rows,
    CE over the batch's logits."""
    m = len(mem_labels)
    z = torch.cat([mem, emb])
    w = reference_similarity(z, zero_diagonal, similarity, sigma, similarity_power)
    y_all = torch.cat([mem_labels, labels])
    prior = F.softmax(logits / temperature, dim=1)
    targets = y_all
    if batch_classes_only:
        classes, targets = torch.unique(y_all, sorted=True, return_inverse=True)
        prior = prior[:, classes]
        prior = prior / prior.sum(1, keepdim=True)
    cols = prior.shape[1]
    x = torch.cat([torch.zeros(m, cols, dtype=prior.dtype), prior])
    anchors = list(range(m)) + [m + i for i in reference_anchors(labels, num_anchors)]
    idx = torch.tensor(anchors)
    x = x.clone()
    x[idx] = F.one_hot(targets[idx], cols).to(x.dtype)
    for _ in range(num_iters):
        x = x * (w @ x)
        x = x / x.sum(dim=1, keepdim=True)
    nll = F.nll_loss(torch.log(x[m:] + 1e-12), targets[m:])
    return nll + F.cross_entropy(logits, labels)
