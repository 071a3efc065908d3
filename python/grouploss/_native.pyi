"""Typed surface of the Rust extension ``grouploss._native``."""

from typing import Optional, Tuple

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
def group_loss_with_grads(
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
    want_grads: bool = True,
    want_probs: bool = False,
    implementation: str = "auto",
) -> Tuple[
    torch.Tensor,
    Optional[torch.Tensor],
    Optional[torch.Tensor],
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
