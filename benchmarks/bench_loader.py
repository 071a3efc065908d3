"""Loader throughput, training transform at 227 px: grouploss vs torchvision.

Writes a folder of CUB-like JPEGs (500 x 375, quality 90, photo-like
content) and loads the same batches of 64 with RandomResizedCrop(227) +
horizontal flip + ImageNet normalisation into float32 NCHW batches:

- ours: grouploss.data.Loader (Rust threads: libjpeg-turbo decoding of the
  crop only, SIMD resize, fused normalisation), ``num_threads = workers``;
- peer: torchvision.datasets.ImageFolder + transforms (PIL) in a
  torch DataLoader with ``num_workers = workers``.

Both run in this process on the same cores; the clock starts when the first
batch arrives (start-up excluded for both) and stops at the last.

    python benchmarks/bench_loader.py [--workers 2] [--batches 30] [--images 320]
        [--size 500x375] [--transform train|eval]

``--transform eval`` times Resize(256) + CenterCrop(227) instead; a large
``--size`` (1600x1200) times the decoding of big photos (cars196's).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import machine
import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader

from grouploss.data import Loader, eval_transform, train_transform
from grouploss.datasets import ImageFolder


def cub_like(seed: int, w: int = 500, h: int = 375) -> np.ndarray:
    """Smooth background, a few textured blobs, sensor noise: JPEG sizes like
    CUB's (roughly 40-90 KB at quality 90)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    base = rng.uniform(40, 200, 3)
    for c in range(3):
        img[..., c] = base[c] + 40 * np.sin(x / rng.uniform(40, 120) + rng.uniform(0, 6)) * np.cos(
            y / rng.uniform(40, 120)
        )
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 110)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
        tex = 30 * np.sin(x / rng.uniform(2, 6)) * np.sin(y / rng.uniform(2, 6))
        img[mask] = rng.uniform(0, 255, 3) + tex[mask, None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root: pathlib.Path, images: int, size=(500, 375), classes: int = 16) -> None:
    for i in range(images):
        d = root / f"class_{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cub_like(i, *size)).save(d / f"img_{i:05d}.jpg", quality=90)


def timed(iterable) -> tuple:
    """(images per second after the first batch, images, seconds)."""
    it = iter(iterable)
    next(it)
    start, n = time.perf_counter(), 0
    for images, _ in it:
        n += len(images)
    elapsed = time.perf_counter() - start
    return n / elapsed, n, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--data", type=pathlib.Path, default=None, help="reuse/keep the JPEG folder")
    ap.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the generated JPEGs")
    ap.add_argument("--transform", choices=("train", "eval"), default="train")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.workers)

    tmp = None
    root = args.data
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = pathlib.Path(tmp.name)
    if not any(root.glob("*/*.jpg")):
        make_folder(root, args.images, size)
    sizes = [p.stat().st_size for p in root.glob("*/*.jpg")]
    rng = np.random.default_rng(0)
    n = len(sizes)
    batches = [rng.integers(0, n, args.batch_size).tolist() for _ in range(args.batches)]

    ours_ds = ImageFolder(root, split="all")
    train = args.transform == "train"
    transform = train_transform(227) if train else eval_transform(227, resize=256)
    ours = Loader(ours_ds, batches, transform, num_threads=args.workers, seed=0)
    geometry = (
        [T.RandomResizedCrop(227), T.RandomHorizontalFlip()]
        if train
        else [T.Resize(256), T.CenterCrop(227)]
    )
    peer_tf = T.Compose(
        [*geometry, T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )
    peer_ds = torchvision.datasets.ImageFolder(str(root), transform=peer_tf)
    peer = DataLoader(peer_ds, batch_sampler=batches, num_workers=args.workers)

    print(machine.describe())
    print(
        f"{n} JPEGs {args.size} q90 (mean {np.mean(sizes) / 1024:.0f} KB), {args.batches} "
        f"batches of {args.batch_size}, {args.transform} transform 227 px, "
        f"{args.workers} workers/threads, "
        f"{os.cpu_count()} CPUs"
    )
    r_ours, n_ours, t_ours = timed(ours)
    r_peer, n_peer, t_peer = timed(peer)
    print(
        f"grouploss Loader:                   {r_ours:7.0f} images/s ({n_ours} in {t_ours:.2f} s)"
    )
    print(
        f"torchvision + PIL in a DataLoader:  {r_peer:7.0f} images/s ({n_peer} in {t_peer:.2f} s)"
    )
    print(f"speed-up: {r_ours / r_peer:.2f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
