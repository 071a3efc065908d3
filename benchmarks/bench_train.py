"""Training throughput: ``grouploss train`` (the Rust loop) against a plain
PyTorch loop with the same network, loss, batches and augmentation, on the
same CPU, in one run.

    python benchmarks/bench_train.py [--steps 150] [--rounds 2]

The peer is what a user would write: torchvision's ``RandomCrop`` with
padding in a ``Dataset``, a ``DataLoader`` (``--workers`` worker processes)
over ``ClassBalancedBatchSampler`` batches, the same 3-block CNN in PyTorch,
and the spec's Group Loss in plain PyTorch (the authors' release computation,
tests/reference.py), Adam. Images per second of training steps only (no
evaluation), after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import machine  # noqa: E402

import grouploss  # noqa: E402
from grouploss.datasets import FashionMNIST  # noqa: E402
from reference import reference_group_loss  # noqa: E402

P, K, T = 3, 20, 10.0


class ConvNet(nn.Module):
    """The Rust `convnet` backbone, written in PyTorch: three conv (no bias)
    + BN + ReLU blocks of 32, 64, 128 channels, 2x2 max pooling after the
    first two, global average pooling; then the embedding and classifier."""

    def __init__(self, classes: int, emb: int = 64):
        super().__init__()
        layers, c_in = [], 1
        for i, c in enumerate((32, 64, 128)):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.embed = nn.Linear(128, emb)
        self.classifier = nn.Linear(emb, classes)

    def forward(self, x):
        e = self.embed(self.features(x).mean(dim=(2, 3)))
        return e, self.classifier(e)


class Images(torch.utils.data.Dataset):
    def __init__(self, ds, mean, std):
        from torchvision import transforms

        self.x = torch.stack([ds.load(i) for i in range(len(ds))])
        self.y = torch.as_tensor(np.array(ds.labels))
        self.t = transforms.Compose(
            [
                transforms.RandomCrop(28, padding=2),
                transforms.ConvertImageDtype(torch.float32),
                transforms.Normalize([mean], [std]),
            ]
        )

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.t(self.x[i]), self.y[i]


def peer(steps: int, workers: int) -> float:
    torch.manual_seed(0)
    ds = FashionMNIST(split="train", val_fraction=0.4)
    data = Images(ds, 0.2860, 0.3530)
    sampler = grouploss.ClassBalancedBatchSampler(ds.labels, P, K, seed=0)
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0
    )
    net = ConvNet(len(ds.classes))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    seen, start, warm = 0, None, 10
    it = iter(loader)
    for step in range(steps + warm):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        if step == warm:
            start, seen = time.perf_counter(), 0
        emb, logits = net(x)
        loss = reference_group_loss(emb, y, logits, temperature=T, num_anchors=2)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def ours(steps: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        r = grouploss.train(
            "fashion-mnist",
            epochs=2,
            max_steps_per_epoch=steps,
            num_workers=max(workers, 1),
            out_dir=pathlib.Path(d) / "run",
            select_max_images=200,
            progress=False,
            plots=False,
            device="cpu",
        )
    # The second epoch: warm caches, like the peer's warm-up.
    return r.history[1]["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the peer")
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args()
    print(machine.describe())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; P x K = {P} x {K}")
    rows = []
    for r in range(args.rounds):
        a = ours(args.steps, 1)
        b = peer(args.steps, args.workers)
        rows.append((a, b))
        print(
            f"round {r}: grouploss train {a:.0f} img/s, plain PyTorch {b:.0f} img/s, {a / b:.2f}x"
        )
    ratio = statistics.median(a / b for a, b in rows)
    print(f"median ratio {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rows, "ratio": ratio}))


if __name__ == "__main__":
    main()
