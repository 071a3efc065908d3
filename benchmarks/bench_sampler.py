"""Planning one epoch of P x K batches: grouploss vs pytorch-metric-learning.

1,000,000 labels in 100,000 classes (10 samples each, shuffled), P=16, K=4.
Ours: ClassBalancedBatchSampler (planned in Rust), constructed and iterated
to Python lists. Peer: pytorch_metric_learning.samplers.MPerClassSampler
(m=K, batch_size=P*K, length_before_new_iter=len(labels)), constructed and
iterated. Same labels, one process; the best of --repeats runs is reported.

    python benchmarks/bench_sampler.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import machine
import numpy as np
import torch

from grouploss import ClassBalancedBatchSampler


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from pytorch_metric_learning.samplers import MPerClassSampler

    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(args.labels) % args.classes)
    p, k = args.p, args.k

    def ours():
        s = ClassBalancedBatchSampler(labels, p, k, seed=0)
        return [b for b in s]

    def ours_array():
        return ClassBalancedBatchSampler(labels, p, k, seed=0).plan()

    def peer():
        s = MPerClassSampler(labels, m=k, batch_size=p * k, length_before_new_iter=len(labels))
        return list(iter(s))

    t_ours, batches = best(ours, args.repeats)
    t_arr, _ = best(ours_array, args.repeats)
    t_peer, flat = best(peer, max(1, args.repeats - 1))
    n_ours = sum(len(b) for b in batches)
    print(machine.describe())
    print(f"{args.labels:,} labels, {args.classes:,} classes, P={p}, K={k}")
    print(
        f"grouploss ClassBalancedBatchSampler: {t_ours:.3f} s "
        f"({len(batches)} batches, {n_ours:,} indices, as lists); plan() array: {t_arr:.3f} s"
    )
    print(f"pml MPerClassSampler:                {t_peer:.3f} s ({len(flat):,} indices)")
    print(f"speed-up: {t_peer / t_ours:.1f}x (lists), {t_peer / t_arr:.1f}x (array)")


if __name__ == "__main__":
    main()
