"""Typed surface of the Rust extension ``grouploss._native``."""

from typing import List, Optional, Sequence, Tuple

import torch

__version__: str

def group_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    *,
    temperature: float = 24.0,
    num_anchors: int = 2,
    num_iters: int = 1,
    gtg_weight: float = 1.0,
    ce_weight: float = 1.0,
    similarity: str = "correlation",
    sigma: float = 1.0,
    zero_diagonal: bool = False,
    anchors: str = "first",
    seed: int = 0,
    batch_classes_only: bool = False,
    num_classes: Optional[int] = None,
) -> Tuple[
    torch.Tensor,
    Optional[torch.Tensor],
    Optional[torch.Tensor],
    Optional[torch.Tensor],
    Optional[torch.Tensor],
]: ...
def similarity(
    embeddings: torch.Tensor,
    kind: str = "correlation",
    zero_diagonal: bool = False,
    sigma: float = 1.0,
) -> torch.Tensor: ...
def anchor_mask(
    labels: torch.Tensor, num_anchors: int, mode: str = "first", seed: int = 0
) -> torch.Tensor: ...
def refine(
    probs: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    anchor_mask: torch.Tensor,
    num_iters: int = 1,
) -> torch.Tensor: ...

# ---- eval (grouploss.metrics wraps these)

def evaluate(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    query_embeddings: Optional[torch.Tensor] = None,
    query_labels: Optional[torch.Tensor] = None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    include: Optional[Sequence[str]] = None,
    normalize: bool = True,
    batch_size: Optional[int] = None,
    seed: int = 0,
    kmeans_n_init: int = 1,
    kmeans_max_iter: int = 300,
) -> Tuple[List[Tuple[str, float]], int]: ...
def kmeans(
    x: torch.Tensor, k: int, *, n_init: int = 1, max_iter: int = 300, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, float]: ...
def nmi(labels: torch.Tensor, assignments: torch.Tensor) -> float: ...
def knn(
    embeddings: torch.Tensor,
    k: int,
    query_embeddings: Optional[torch.Tensor] = None,
    *,
    normalize: bool = True,
    batch_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]: ...
