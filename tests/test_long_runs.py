"""Long runs: memory stays flat over 20,000 loss calls, thousands of metric
calls and a multi-epoch training run; threads and file handles are not
leaked; loaders dropped mid-epoch shut their threads down."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import torch
from data_fixtures import make_cub, make_glyph_like, tiny_run, tiny_run_script

from grouploss import GroupLoss
from grouploss import metrics as M
from grouploss.data import Loader, train_transform
from grouploss.datasets import CUB200

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


def rss(pid: str = "self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_20000_loss_calls_keep_memory_flat():
    torch.manual_seed(0)
    loss_fn = GroupLoss(10, embedding_size=16)
    opt = torch.optim.SGD(loss_fn.parameters(), lr=1e-3)
    emb = torch.randn(24, 16, requires_grad=True)
    labels = torch.arange(6).repeat_interleave(4)
    samples = []
    for i in range(20_000):
        loss = loss_fn(emb, labels)
        opt.zero_grad()
        emb.grad = None
        loss.backward()
        opt.step()
        if i % 2_000 == 1_999:
            samples.append(rss())
    assert torch.isfinite(loss)
    # After the first 2,000 calls (allocator caches warm), no growth: a leak
    # of even 100 bytes a call would show as 1.8 MB.
    growth = max(samples[1:]) - samples[0]
    assert growth < 1.5 * MiB, [s // 1024 for s in samples]


def test_thousands_of_metric_calls_keep_memory_flat():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    labels = rng.integers(0, 10, size=300)
    samples = []
    for i in range(1_500):
        out = M.evaluate(emb, labels, include=("recall", "map@r"))
        if i % 300 == 299:
            samples.append(rss())
    assert 0 <= out["recall@1"] <= 1
    growth = max(samples[1:]) - samples[0]
    assert growth < 1.5 * MiB, [s // 1024 for s in samples]


def test_loaders_dropped_mid_epoch_leak_no_threads_or_files(tmp_path):
    make_cub(tmp_path, classes=4, per_class=4)
    ds = CUB200(tmp_path, split="all")
    batches = [[i % len(ds) for i in range(j, j + 8)] for j in range(40)]
    gc.collect()
    t0, f0, r0 = threads(), fds(), None
    for round_ in range(60):
        loader = Loader(ds, batches, train_transform(32), num_threads=2, prefetch=3)
        it = iter(loader)
        next(it)
        if round_ % 2:
            it.close()
        del it, loader
        if round_ == 9:
            gc.collect()
            r0 = rss()
    gc.collect()
    deadline = time.time() + 5
    while (threads() > t0 or fds() > f0) and time.time() < deadline:
        time.sleep(0.01)
    assert threads() == t0
    assert fds() == f0
    assert rss() - r0 < 8 * MiB


def test_a_multi_epoch_run_keeps_memory_flat(tmp_path):
    root = make_glyph_like(tmp_path / "data", train_classes=8, test_classes=4, per=12)
    out = tmp_path / "run"
    epochs = 8
    code = tiny_run_script(epochs=epochs, num_workers=2)
    p = subprocess.Popen([sys.executable, "-c", code, str(root), str(out)])
    per_epoch: dict[int, int] = {}
    metrics = pathlib.Path(out / "metrics.jsonl")
    while p.poll() is None:
        try:
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            per_epoch[done] = max(per_epoch.get(done, 0), rss(str(p.pid)))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
        time.sleep(0.02)
    assert p.returncode == 0
    assert len(metrics.read_text().splitlines()) == epochs
    assert json.loads((out / "summary.json").read_text())["test"]
    # Peak RSS while training epochs 5-8 against epochs 2-4 (epoch 1 warms
    # up; after the last epoch the test evaluation of the best checkpoint
    # runs, once).
    early = max(v for k, v in per_epoch.items() if 1 <= k <= 3)
    late = max(v for k, v in per_epoch.items() if 4 <= k < epochs)
    assert late - early < 24 * MiB, {k: v // MiB for k, v in sorted(per_epoch.items())}


def test_an_in_process_run_leaves_no_threads_or_files(tmp_path):
    import grouploss

    root = make_glyph_like(tmp_path / "data", train_classes=6, test_classes=4, per=8)
    kw = tiny_run(data_root=root, epochs=1, num_workers=2, plots=False)
    grouploss.train("glyphs", out_dir=tmp_path / "warm", **kw)
    gc.collect()
    t0, f0 = threads(), fds()
    for i in range(2):
        grouploss.train("glyphs", out_dir=tmp_path / f"run{i}", **kw)
    gc.collect()
    assert fds() == f0
    assert threads() <= t0
