"""GroupLoss in a plain PyTorch loop under DistributedDataParallel.

Every process (rank) holds the same network and trains on its own P x K
batches: ``ClassBalancedBatchSampler(num_replicas=world_size, rank=rank)``
shares out each epoch's batches, disjoint and equal in number, and
``DistributedDataParallel`` averages the gradients during ``backward``.
The loss needs nothing special: each rank computes GroupLoss on its own
batch. With ``--loss-classifier`` the classifier is GroupLoss's own
(``GroupLoss(embedding_size=...)``): the loss module then has parameters, and
it is wrapped in ``DistributedDataParallel`` like the network, so that its
classifier's gradients are averaged too and every rank keeps the same
classifier. Rank 0 reports Recall@1 on the unseen test classes and saves the
weights. Data: Fashion-MNIST (zero-shot: classes 0-4 train, 5-9 test) or
the glyphs benchmark.

One machine, 2 processes (gloo between CPU processes, NCCL between GPUs,
one GPU per process):

    torchrun --nproc-per-node 2 examples/ddp_train.py --epochs 1

Two machines of 8 GPUs each; the same command on both, NODE = 0 and 1,
HOST0 the address of node 0:

    torchrun --nnodes 2 --node-rank NODE --nproc-per-node 8 \\
        --master-addr HOST0 --master-port 29500 examples/ddp_train.py --epochs 10
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from grouploss import ClassBalancedBatchSampler, GroupLoss, datasets, metrics

DATASETS = {"fashion-mnist": datasets.FashionMNIST, "glyphs": datasets.Glyphs}


def load(
    dataset: str, root: Optional[pathlib.Path], split: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A split as one float tensor (N, 1, H, W) in [0, 1] and its labels."""
    ds = DATASETS[dataset](root, split=split)
    x = torch.stack([ds.load(i) for i in range(len(ds))]).float() / 255.0
    return x, torch.from_numpy(ds.labels.copy())


class ConvNet(nn.Module):
    """Three conv blocks, global average pooling, a linear embedding and a
    linear classifier (GroupLoss's prior). The convolutions have no bias:
    the BatchNorm after each removes it (its gradient would be zero)."""

    def __init__(self, num_classes: int, embedding_size: int = 64, classifier: bool = True):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(1, 32), block(32, 64), block(64, 128))
        self.embed = nn.Linear(128, embedding_size)
        self.classifier = nn.Linear(embedding_size, num_classes) if classifier else None

    def forward(self, x):
        e = self.embed(self.features(x).mean(dim=(2, 3)))
        return e, None if self.classifier is None else self.classifier(e)


def make_model(num_classes: int, seed: int, classifier: bool = True) -> ConvNet:
    """The network, initialised from ``seed`` (DDP copies rank 0's weights to
    the other ranks anyway); without ``classifier`` it returns embeddings
    only (the loss owns the classifier)."""
    torch.manual_seed(seed)
    return ConvNet(num_classes, classifier=classifier)


def make_loss(num_classes: int, embedding_size: Optional[int] = None) -> GroupLoss:
    """GroupLoss; with ``embedding_size`` it owns the classifier."""
    return GroupLoss(
        num_classes=num_classes, embedding_size=embedding_size, temperature=10.0, num_anchors=2
    )


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def recall_at_1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, dtype) -> float:
    model.eval()
    emb = torch.cat([model(x[i : i + 1000].to(device, dtype))[0] for i in range(0, len(x), 1000)])
    return metrics.recall_at_k(emb, y.to(device), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="fashion-mnist")
    ap.add_argument("--data", type=pathlib.Path, default=None, help="dataset root")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=0, help="steps per epoch (0: all)")
    ap.add_argument("--classes-per-batch", type=int, default=5)
    ap.add_argument("--samples-per-class", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--save", type=pathlib.Path, help="rank 0 writes the weights here")
    ap.add_argument(
        "--loss-classifier",
        action="store_true",
        help="GroupLoss owns the classifier (wrapped in DistributedDataParallel too)",
    )
    args = ap.parse_args()

    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)

    x_train, y_train = load(args.dataset, args.data, "train")
    x_test, y_test = load(args.dataset, args.data, "test")
    num_classes = int(y_train.max()) + 1
    devices = [local_rank] if cuda else None
    model = make_model(num_classes, args.seed, classifier=not args.loss_classifier)
    ddp = DistributedDataParallel(model.to(device, dtype), device_ids=devices)
    loss_fn = make_loss(num_classes, 64 if args.loss_classifier else None).to(device, dtype)
    params = list(ddp.parameters())
    if args.loss_classifier:
        # A loss with parameters is wrapped like the network: DDP averages
        # its classifier's gradients over the ranks in the same backward.
        loss_fn = DistributedDataParallel(loss_fn, device_ids=devices)
        params += list(loss_fn.parameters())
    opt = make_optimizer(params, args.lr)
    sampler = ClassBalancedBatchSampler(
        y_train,
        args.classes_per_batch,
        args.samples_per_class,
        seed=args.seed,
        num_replicas=world,
        rank=rank,
    )
    if rank == 0:
        steps = min(len(sampler), args.max_steps) if args.max_steps else len(sampler)
        print(
            f"{world} processes on {device.type}: {len(x_train)} training images, "
            f"{steps} batches of {sampler.batch_size} per rank and epoch"
        )

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        start, seen = time.time(), 0
        for step, idx in enumerate(sampler):
            if args.max_steps and step >= args.max_steps:
                break
            emb, logits = ddp(x_train[idx].to(device, dtype))
            loss = loss_fn(emb, y_train[idx].to(device), logits)
            opt.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks here
            opt.step()
            seen += len(idx) * world
        rate = seen / (time.time() - start)
        if rank == 0:
            r1 = recall_at_1(model, x_test, y_test, device, dtype)
            print(f"epoch {epoch}: loss {loss.item():.4f}, {rate:.0f} img/s, test R@1 {r1:.4f}")
        dist.barrier()

    if rank == 0 and args.save is not None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(args.save))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
