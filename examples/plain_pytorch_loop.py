"""GroupLoss in a plain PyTorch loop on Fashion-MNIST (zero-shot protocol).

Trains a small CNN on classes 0-4 of the train split with P x K batches and
reports Recall@1 on the unseen classes 5-9 of the test split.

    python examples/plain_pytorch_loop.py [--epochs 1] [--data DIR]
"""

from __future__ import annotations

import argparse
import gzip
import pathlib
import time

import numpy as np
import torch
from torch import nn

from grouploss import GroupLoss

DEFAULT_DATA = pathlib.Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: pathlib.Path) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[2] != 0x08:
        raise ValueError(f"{path}: expected unsigned-byte IDX data, got type code {data[2]:#x}")
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(root: pathlib.Path, split: str, classes: range):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    keep = np.isin(labels, list(classes))
    x = torch.from_numpy(images[keep].astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - 0.2860) / 0.3530
    return x, torch.from_numpy(labels[keep] - classes.start)


class ConvNet(nn.Module):
    """Three conv blocks, global average pooling, a linear embedding."""

    def __init__(self, embedding_size: int = 64, num_classes: int = 5):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(block(1, 32), block(32, 64), block(64, 128))
        self.embed = nn.Linear(128, embedding_size)
        self.classifier = nn.Linear(embedding_size, num_classes)

    def forward(self, x):
        e = self.embed(self.features(x).mean(dim=(2, 3)))
        return e, self.classifier(e)


def pk_batches(labels: torch.Tensor, p: int, k: int, generator: torch.Generator):
    """Batches of p distinct classes x k samples, each sample at most once per
    epoch; the epoch ends when fewer than p classes have k samples left."""
    queues = []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        queues.append([idx[i : i + k] for i in range(0, len(idx) - k + 1, k)])
    while True:
        alive = [q for q in queues if q]
        if len(alive) < p:
            return
        pick = torch.randperm(len(alive), generator=generator)[:p].tolist()
        yield torch.cat([alive[i].pop() for i in pick])


@torch.no_grad()
def recall_at_1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    emb = torch.cat([model(x[i : i + 1000])[0] for i in range(0, len(x), 1000)])
    emb = nn.functional.normalize(emb, dim=1)
    sim = emb @ emb.t()
    sim.fill_diagonal_(-float("inf"))
    return (y[sim.argmax(dim=1)] == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    x_train, y_train = load(args.data, "train", range(0, 5))
    x_test, y_test = load(args.data, "test", range(5, 10))
    model = ConvNet()
    loss_fn = GroupLoss(num_classes=5, temperature=10.0, num_anchors=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    print(f"train: {len(x_train)} images of classes 0-4; test: {len(x_test)} of classes 5-9")

    for epoch in range(args.epochs):
        model.train()
        start, seen, running = time.time(), 0, 0.0
        for step, idx in enumerate(pk_batches(y_train, p=5, k=12, generator=g)):
            emb, logits = model(x_train[idx])
            loss = loss_fn(emb, y_train[idx], logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(idx)
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            if step % 50 == 0:
                rate = seen / (time.time() - start)
                print(f"epoch {epoch} step {step:4d} loss {running:.4f} ({rate:.0f} img/s)")
        print(f"epoch {epoch}: test Recall@1 {recall_at_1(model, x_test, y_test):.4f}")


if __name__ == "__main__":
    main()
