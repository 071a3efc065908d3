"""Typed surface of the Rust extension ``grouploss._native``."""

import os
import pathlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union, final

import numpy as np
import torch

__version__: str

@final
class GroupLossResult:
    """The loss and, where asked for or computed, its parts and closed-form
    gradients."""

    @property
    def loss(self) -> torch.Tensor: ...
    @property
    def nll(self) -> Optional[torch.Tensor]: ...
    @property
    def ce(self) -> Optional[torch.Tensor]: ...
    @property
    def probs(self) -> Optional[torch.Tensor]: ...
    @property
    def classes(self) -> Optional[torch.Tensor]: ...
    @property
    def grad_embeddings(self) -> Optional[torch.Tensor]: ...
    @property
    def grad_logits(self) -> Optional[torch.Tensor]: ...

IMPLEMENTATIONS: List[str]
SPLITS: List[str]

@final
class GroupLossOptions:
    """The Group Loss's options as users write them, validated when built."""

    NAMES: List[str]
    def __new__(
        cls,
        *,
        temperature: float = 24.0,
        num_anchors: int = 2,
        num_iters: int = 1,
        gtg_weight: float = 1.0,
        ce_weight: float = 1.0,
        similarity: str = "correlation",
        sigma: float = 1.0,
        similarity_power: float = 1.0,
        zero_diagonal: bool = False,
        anchors: str = "first",
        seed: Optional[int] = None,
        batch_classes_only: bool = False,
    ) -> GroupLossOptions: ...
    @property
    def temperature(self) -> float: ...
    @property
    def num_anchors(self) -> int: ...
    @property
    def num_iters(self) -> int: ...
    @property
    def gtg_weight(self) -> float: ...
    @property
    def ce_weight(self) -> float: ...
    @property
    def similarity(self) -> str: ...
    @property
    def sigma(self) -> float: ...
    @property
    def similarity_power(self) -> float: ...
    @property
    def zero_diagonal(self) -> bool: ...
    @property
    def anchors(self) -> str: ...
    @property
    def seed(self) -> Optional[int]: ...
    @property
    def batch_classes_only(self) -> bool: ...
    def to_dict(self) -> Dict[str, Any]: ...
    def replace(self, **changes: Any) -> GroupLossOptions: ...
    def __getnewargs_ex__(self) -> Tuple[Tuple[()], Dict[str, Any]]: ...

def group_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    options: GroupLossOptions,
    *,
    seed: Optional[int] = None,
    num_classes: Optional[int] = None,
    want_grads: bool = True,
    want_probs: bool = False,
    implementation: str = "auto",
    memory_embeddings: Optional[torch.Tensor] = None,
    memory_labels: Optional[torch.Tensor] = None,
) -> GroupLossResult: ...
def memory_push(
    memory_embeddings: torch.Tensor,
    memory_labels: torch.Tensor,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    size: int,
) -> Tuple[torch.Tensor, torch.Tensor]: ...
def similarity(
    embeddings: torch.Tensor,
    similarity: str = "correlation",
    zero_diagonal: bool = False,
    sigma: float = 1.0,
    similarity_power: float = 1.0,
) -> torch.Tensor: ...
def anchor_mask(
    labels: torch.Tensor, num_anchors: int, anchors: str = "first", seed: int = 0
) -> torch.Tensor: ...
def refine(
    probs: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    anchor_mask: torch.Tensor,
    num_iters: int = 1,
) -> torch.Tensor: ...
def triplet_margin_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.1
) -> torch.Tensor:
    """pytorch-metric-learning's ``TripletMarginLoss(margin)`` over
    ``BatchHardMiner`` triplets (default ``LpDistance``, ``AvgNonZeroReducer``).

    ``embeddings``: (batch, dims) float32 or float64, finite; ``labels``:
    (batch,) integers; ``margin``: finite, >= 0. Returns a 0-d tensor whose
    autograd graph reaches ``embeddings``. Raises ValueError naming the
    argument for bad inputs.
    """

# ------------------------------------------------------------ sampler

@final
class ClassBalancedSampler:
    def __init__(
        self,
        labels: np.ndarray,
        classes_per_batch: int,
        samples_per_class: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None: ...
    def set_epoch(self, epoch: int) -> None: ...
    @property
    def epoch(self) -> int: ...
    def __len__(self) -> int: ...
    @property
    def classes_per_batch(self) -> int: ...
    @property
    def samples_per_class(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def num_replicas(self) -> int: ...
    @property
    def rank(self) -> int: ...
    def plan(self) -> np.ndarray: ...

# ------------------------------------------------------------ data

@final
class Dataset:
    def __len__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def root(self) -> str: ...
    @property
    def split(self) -> str: ...
    @property
    def labels(self) -> np.ndarray: ...
    @property
    def classes(self) -> List[str]: ...
    @property
    def is_query(self) -> Optional[np.ndarray]: ...
    @property
    def is_gallery(self) -> Optional[np.ndarray]: ...
    def describe(self, index: int) -> str: ...
    def path(self, index: int) -> Optional[str]: ...
    def load(self, index: int) -> np.ndarray: ...
    def load_transformed(self, index: int, transform: Transform, seed: int) -> torch.Tensor: ...

def open_dataset(
    kind: str,
    root: Optional[str] = None,
    split: str = "train",
    *,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    zero_shot: bool = True,
    train_fraction: float = 0.5,
    csv_file: Optional[str] = None,
) -> Dataset: ...
def open_image_files(paths: Sequence[Union[str, os.PathLike[str]]]) -> Dataset: ...
def default_build_dir(kind: str) -> pathlib.Path: ...

@final
class Transform:
    def __call__(self, image: np.ndarray, seed: int = 0) -> torch.Tensor: ...
    @property
    def size(self) -> int: ...
    @property
    def channels(self) -> int: ...
    @property
    def output_shape(self) -> Tuple[int, int, int]: ...

def random_resized_crop(
    size: int,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (0.75, 4.0 / 3.0),
    flip: bool = True,
    normalization: str = "imagenet",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channels: int = 3,
) -> Transform: ...
def resize_center_crop(
    size: int,
    resize: int,
    normalization: str = "imagenet",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channels: int = 3,
) -> Transform: ...
def pad_crop(
    size: int,
    pad: int = 0,
    flip: bool = False,
    normalization: str = "none",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    channels: int = 1,
) -> Transform: ...

@final
class Loader:
    def __init__(
        self,
        dataset: Dataset,
        transform: Transform,
        *,
        num_threads: int,
        prefetch: int,
        seed: int = 0,
        on_error: str = "raise",
    ) -> None: ...
    def epoch(
        self, batches: Union[np.ndarray, Sequence[Sequence[int]]], epoch: int
    ) -> LoaderEpoch: ...
    def load_batch(
        self, batch: Sequence[int], epoch: int, batch_index: int
    ) -> Tuple[torch.Tensor, torch.Tensor, List[int]]: ...
    def take_skipped(self) -> List[Tuple[int, str]]: ...

@final
class LoaderEpoch:
    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, List[int]]]: ...
    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor, List[int]]: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...

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
    query_own: Optional[torch.Tensor] = None,
    average: str = "query",
) -> Tuple[List[Tuple[str, float]], int]: ...
def kmeans(
    x: torch.Tensor, k: int, *, n_init: int = 1, max_iter: int = 300, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, float]: ...
def kmeans_seeds_in_rounds(n: int, k: int) -> bool: ...
def nmi(labels: torch.Tensor, assignments: torch.Tensor) -> float: ...
def knn(
    embeddings: torch.Tensor,
    k: int,
    query_embeddings: Optional[torch.Tensor] = None,
    *,
    normalize: bool = True,
    batch_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]: ...

# ---- training (grouploss.training wraps these)

def resolve_config(
    preset: Optional[str] = None,
    config_file: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]: ...
def group_loss_options(config: Dict[str, Any]) -> GroupLossOptions: ...
def presets() -> List[str]: ...
def loss_options() -> List[Tuple[str, List[str]]]: ...
def option_docs() -> List[Tuple[str, str]]: ...
def default_run_dir(config: Dict[str, Any]) -> str: ...
def train_run(
    config: Dict[str, Any],
    run_dir: str,
    collective: Optional[Any] = None,
    device: Optional[str] = None,
) -> Dict[str, Any]: ...
def initial_state_dict(
    config: Dict[str, Any], in_channels: int, num_classes: int, member: int = 0
) -> Dict[str, torch.Tensor]:
    """Every variable (parameters and BatchNorm running statistics) of the
    network that ensemble member ``member`` of a configuration (a dict) starts
    from, before any pretrained weights: torch seeded with ``seed + member``,
    then the network built on the CPU. Copies, keyed ``backbone.*``,
    ``embed.*`` and ``classifier.*``."""

@final
class RunModel:
    def __init__(
        self,
        run_dir: str,
        checkpoint: str = "best",
        device: str = "auto",
        trust_torchscript: bool = False,
    ) -> None: ...
    @property
    def config(self) -> Dict[str, Any]: ...
    @property
    def loss_options(self) -> GroupLossOptions: ...
    @property
    def input_spec(self) -> Dict[str, Any]: ...
    def state_dict(self) -> Dict[str, torch.Tensor]: ...
    def embed(self, images: torch.Tensor) -> torch.Tensor: ...
    def logits(self, embeddings: torch.Tensor) -> torch.Tensor: ...
    def embed_split(
        self, split: str = "test", root: Optional[str] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]: ...
    def embed_dataset(self, dataset: Dataset) -> Tuple[torch.Tensor, torch.Tensor]: ...
    def evaluate(self, split: str = "test") -> Dict[str, float]: ...

# ---- retrieval index (grouploss.Index wraps it)

@final
class Index:
    def __init__(self, dim: int, *, dtype: str = "float32", device: str = "cpu") -> None: ...
    def add(
        self,
        embeddings: torch.Tensor,
        ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> None: ...
    def search(
        self, queries: torch.Tensor, k: int, *, batch_size: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]: ...
    def save(self, path: str) -> None: ...
    @staticmethod
    def load(path: str, *, device: str = "cpu") -> Index: ...
    def __len__(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def ids(self) -> List[int]: ...
    @property
    def labels(self) -> Optional[List[int]]: ...
    @property
    def info(self) -> Dict[str, str]: ...
    def set_info(self, info: Dict[str, str]) -> None: ...
