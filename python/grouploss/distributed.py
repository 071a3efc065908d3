"""Data-parallel training on ``torch.distributed``.

One process per device, each a *rank* of a process group: NCCL between
GPUs, gloo between CPU processes. Each rank draws its own P x K batches
(``ClassBalancedBatchSampler(num_replicas=world_size, rank=rank)``: the
ranks share the epoch's batches, disjoint and equal in number), computes the
Group Loss on them, and the gradients are averaged over the ranks before
every optimizer step, so all ranks keep the same weights. The global batch
is ``world_size x P x K`` (scale ``lr`` yourself if you want to).

The Rust training loop (``grouploss train`` and :func:`grouploss.train`)
runs data-parallel by itself when ``torchrun`` starts it::

    torchrun --nproc-per-node 4 -m grouploss.cli train --preset sop --data-root ...
    grouploss train --nproc-per-node 4 --preset sop --data-root ...   # the same, one machine

    # two machines of 8 GPUs; the same command on both, NODE = 0 and 1:
    torchrun --nnodes 2 --node-rank NODE --nproc-per-node 8 \\
        --master-addr HOST0 --master-port 29500 -m grouploss.cli train --preset sop ...

The loop calls the collectives of this module's :class:`ProcessGroup` from
Rust (gradients in flat buckets of up to 64 MiB, one call a step);
evaluation sets are embedded in shards and gathered on rank 0, which alone
evaluates and writes the run folder. Resuming needs the world size the run
was interrupted with.

In a plain PyTorch loop, wrap the model in ``DistributedDataParallel`` and
give the sampler the rank: see ``examples/ddp_train.py``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
import zlib
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "ProcessGroup",
    "RankZeroFailed",
    "abandon_gather",
    "broadcast_text",
    "gather_batches",
    "launched_by_torchrun",
    "local_rank",
    "process_group",
    "rank_device",
]

#: How long a rank waits in a collective before giving up: rank 0 evaluates
#: (k-means for NMI included) while the others wait, which takes minutes on
#: the large datasets; torchrun stops every rank as soon as one fails anyway.
TIMEOUT = datetime.timedelta(minutes=60)


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0 could not start the run; rank 0
    raises (and reports) the error itself."""


def launched_by_torchrun() -> bool:
    """Whether this process is a rank started by ``torchrun`` (its
    environment names the rank)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``, else 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str) -> str:
    """The device a rank trains on: ``auto`` and ``cuda`` become
    ``cuda:LOCAL_RANK`` when CUDA is present; anything else is kept."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank()}"
    return device


class ProcessGroup:
    """The collectives the Rust training loop calls, on a ``torch.distributed``
    process group. Tensors arrive from Rust sharing their memory; every
    method works in place or returns new tensors.

    Args:
        group: a process group; None: the default group.

    Attributes:
        rank: this process in the group.
        world_size: processes in the group.

    Example::

        >>> dist.init_process_group("gloo")                     # doctest: +SKIP
        >>> pg = ProcessGroup()                                  # doctest: +SKIP
        >>> grouploss._native.train_run(cfg, run_dir, pg)        # doctest: +SKIP
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.rank: int = dist.get_rank(group)
        self.world_size: int = dist.get_world_size(group)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replaces every (floating) tensor by its mean over the ranks; the
        reductions of all tensors are in flight together."""
        for t in tensors:
            if not t.is_floating_point():
                raise ValueError(f"all_reduce_mean: expected floating tensors, got {t.dtype}")
        works = [dist.all_reduce(t, group=self.group, async_op=True) for t in tensors]
        for w, t in zip(works, tensors):
            w.wait()
            t.div_(self.world_size)

    def all_gather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all), in rank order."""
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor, group=self.group)
        return out

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        """Overwrites every tensor with rank ``src``'s."""
        src = self._global(src)
        works = [dist.broadcast(t, src, group=self.group, async_op=True) for t in tensors]
        for w in works:
            w.wait()

    def barrier(self) -> None:
        """Returns once every rank of the group has called it."""
        dist.barrier(group=self.group)

    def __repr__(self) -> str:
        return f"ProcessGroup(rank={self.rank}, world_size={self.world_size})"


@contextlib.contextmanager
def process_group() -> Iterator[Optional[ProcessGroup]]:
    """The process group of a data-parallel run, or None in a single process.

    An already initialised default group (of more than one process) is used
    as it is. Otherwise, in a process that ``torchrun`` started with
    ``WORLD_SIZE > 1``, the default group is initialised from the
    environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
    ``WORLD_SIZE``): NCCL for CUDA tensors and gloo for CPU tensors when CUDA
    is present (the CUDA device is set to ``cuda:LOCAL_RANK``), gloo alone
    otherwise. A group initialised here is destroyed on leaving.
    """
    if dist.is_available() and dist.is_initialized():
        yield ProcessGroup() if dist.get_world_size() > 1 else None
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    try:
        yield ProcessGroup()
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_text(text: Optional[str]) -> str:
    """Rank 0's ``text`` on every rank of the default group (the others pass
    None). Sent as bytes, never pickled."""
    device = _comm_device()
    if dist.get_rank() == 0:
        if text is None:
            raise ValueError("broadcast_text: expected a string on rank 0, got None")
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    if dist.get_rank() != 0:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, 0)
    return bytes(data.cpu().tolist()).decode()


class _GatherRows(torch.autograd.Function):
    """The rows of every rank's tensor, in rank order; backward hands each
    rank the gradient of its own rows only (each rank computes the same
    loss of the whole, so nothing is summed over the ranks)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: List[int], rank: int):
        ctx.rows = (sum(sizes[:rank]), sizes[rank])
        most = max(sizes)
        padded = local
        if local.shape[0] < most:
            pad = local.new_zeros((most - local.shape[0], *local.shape[1:]))
            padded = torch.cat([local, pad])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start, n = ctx.rows
        return grad[start : start + n], None, None


def gather_batches(
    *tensors: torch.Tensor, names: Optional[Sequence[str]] = None
) -> List[torch.Tensor]:
    """Every rank's ``tensors`` concatenated along the first dimension, in
    rank order, on every rank of the default process group (the batches may
    differ in size between ranks; all tensors of a call share it).

    Gradients flow back to the calling rank's own rows only: each rank
    computes the same loss of the global batch, and the gradient of its
    inputs is that loss's gradient with respect to its own rows, as one
    process computing the loss of the concatenated batch would find.
    ``GroupLoss(gather_ranks=True)`` uses it. Without an initialised
    process group (or with one rank) the tensors come back as they are.

    The ranks first exchange each tensor's row count and a checksum of its
    other dimensions and dtype, so a tensor whose rows do not match the
    first's on some rank, or whose shape beyond the rows or dtype differs
    between ranks, is a ``ValueError`` on every rank (none is left waiting
    in the gather), naming it by ``names`` (default ``tensors[i]``).
    """
    if not tensors:
        raise ValueError("tensors: expected at least one tensor, got none")
    names = [f"tensors[{i}]" for i in range(len(tensors))] if names is None else list(names)
    if len(names) != len(tensors):
        raise ValueError(f"names: expected {len(tensors)} names, got {len(names)}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors)
    table = _exchange_keys([_row_key(t) for t in tensors])
    _check_rows(table, names)
    counts = [r[0][0] for r in table]
    device = _comm_device()
    rank = dist.get_rank()
    out = []
    for t in tensors:
        moved = t.to(device)
        gathered = _GatherRows.apply(moved, counts, rank)
        out.append(gathered.to(t.device))
    return out


#: A row count that says the rank failed before its gather.
_FAILED = -2


def abandon_gather(count: int) -> None:
    """Called instead of :func:`gather_batches` (of ``count`` tensors) by a
    rank that failed before it: the other ranks, waiting there, raise a
    ``RuntimeError`` naming this rank instead of waiting for ever. A no-op
    without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _exchange_keys([[_FAILED, 0]] * count)


def _exchange_keys(keys: List[List[int]]) -> List[List[List[int]]]:
    """Every rank's ``keys`` (the same number on each), in rank order."""
    mine = torch.tensor(keys, dtype=torch.int64, device=_comm_device())
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [r.tolist() for r in every]


def _row_key(t: torch.Tensor) -> List[int]:
    """What the ranks must agree on for one tensor, as integers: its rows
    (-1 for a 0-d tensor), and a checksum of its shape beyond the rows and
    its dtype (the gather's buffers must match on every rank)."""
    rest = f"{tuple(t.shape[1:])} {t.dtype}".encode()
    return [t.shape[0] if t.dim() else -1, zlib.crc32(rest)]


def _check_rows(table: List[List[List[int]]], names: List[str]) -> None:
    """Every rank's keys (``table[rank][i]``, :func:`_row_key` of tensor i)
    agree: the rows within each rank, the rest between the ranks. Raises on
    every rank alike otherwise."""
    for rank, keys in enumerate(table):
        if keys[0][0] == _FAILED:
            raise RuntimeError(
                f"rank {rank} failed before gathering the batches (its own error says why)"
            )
    for rank, keys in enumerate(table):
        for name, (n, _) in zip(names, keys):
            if n < 0:
                raise ValueError(f"{name}: expected rows, got a 0-d tensor on rank {rank}")
        first = keys[0][0]
        for name, (n, _) in zip(names[1:], keys[1:]):
            if n != first:
                raise ValueError(
                    f"{name}: expected one row per row of {names[0]} on every rank, got "
                    f"{n} rows for {first} on rank {rank}"
                )
        for name, (_, rest), (_, rest0) in zip(names, keys, table[0]):
            if rest != rest0:
                raise ValueError(
                    f"{name}: expected the same shape beyond the rows and the same dtype on "
                    f"every rank, got another on rank {rank} than on rank 0"
                )


@contextlib.contextmanager
def deferred_keyboard_interrupt() -> Iterator[None]:
    """Keeps Ctrl-C from raising ``KeyboardInterrupt`` inside a collective
    (which would leave the other ranks waiting in it). The training loop
    sees the signal itself, agrees with the other ranks on the step to stop
    at, saves ``last`` and raises ``KeyboardInterrupt`` then."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
