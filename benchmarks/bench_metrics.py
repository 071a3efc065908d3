"""Evaluation at Stanford Online Products' scale: grouploss.metrics against
pytorch-metric-learning's AccuracyCalculator (faiss-cpu) on the same arrays.

Synthetic embeddings with SOP's test-set shape: 60,502 x 512 float32 in
11,316 classes of 2 to 12 items (mean 5.35), each item its class centre
plus Gaussian noise, scaled so that Recall@1 is near the published ~0.76,
L2-normalised. Both sides get the same array from a .npy file and compute
Recall@1/10/100/1000 and MAP@R on the CPU. Each side runs in a subprocess of
its own, so that its peak memory (ru_maxrss) is its alone; the figure above
"loaded" is the peak minus the RSS after loading torch and the data. NMI
(k-means with k = 11,316) is timed separately: ours seeds in rounds
(batched k-means++ with 2 trials a centre, at this size) then runs Lloyd to
convergence with Hamerly's bounds; pytorch-metric-learning's default is
faiss k-means with random seeding and at most 20 iterations. The goal is
no more time for an NMI at least as high.

    python benchmarks/bench_metrics.py               # retrieval, twice each
    python benchmarks/bench_metrics.py --nmi         # plus the NMI timings
    python benchmarks/bench_metrics.py --nmi --repeats 0  # the NMI timings alone
    python benchmarks/bench_metrics.py --nmi --repeats 0 --nmi-rounds 3  # alternating 3 times
    python benchmarks/bench_metrics.py --n 20000     # a smaller problem
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import machine
import numpy as np

N, CLASSES, DIM = 60_502, 11_316, 512
KS = (1, 10, 100, 1000)


# ----------------------------------------------------------------- data


def make_data(n: int, classes: int, dim: int, seed: int = 0):
    """Class sizes 2..12 (every class starts at 2, the rest is spread
    uniformly over the classes with room), centres + noise, normalised."""
    rng = np.random.default_rng(seed)
    sizes = np.full(classes, 2)
    for _ in range(n - 2 * classes):
        while True:
            c = rng.integers(classes)
            if sizes[c] < 12:
                sizes[c] += 1
                break
    labels = np.repeat(np.arange(classes), sizes)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    x = centres[labels]
    x += 2.2 * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return np.ascontiguousarray(x[perm]), labels[perm].astype(np.int64)


# -------------------------------------------------------------- workers


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind: str, data: str) -> dict:
    import torch  # noqa: F401  (both sides load it; it is part of the baseline)

    if kind.startswith("ours"):
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
        from grouploss import metrics
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x = np.load(os.path.join(data, "x.npy"))
    y = np.load(os.path.join(data, "y.npy"))
    loaded = rss_mb()
    start = time.perf_counter()
    if kind == "ours":
        out = metrics.evaluate(x, y, ks=KS, include=("recall", "map@r"))
        out.pop("left_out")
    elif kind == "ours-nmi":
        out = metrics.evaluate(x, y, include=("nmi",))
    elif kind == "pml":

        def recall(k):
            def calc(self, knn_labels, query_labels, **kwargs):
                hit = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1)
                return hit.float().mean().item()

            return calc

        class Calc(AccuracyCalculator):
            calculate_recall_at_10 = recall(10)
            calculate_recall_at_100 = recall(100)
            calculate_recall_at_1000 = recall(1000)

            def requires_knn(self):
                return [*super().requires_knn(), "recall_at_10", "recall_at_100", "recall_at_1000"]

        calc = Calc(
            include=(
                "precision_at_1",
                "recall_at_10",
                "recall_at_100",
                "recall_at_1000",
                "mean_average_precision_at_r",
            ),
            k=max(KS),
            device=torch.device("cpu"),
        )
        res = calc.get_accuracy(x, y)
        out = {
            "recall@1": res["precision_at_1"],
            **{f"recall@{k}": res[f"recall_at_{k}"] for k in KS[1:]},
            "map@r": res["mean_average_precision_at_r"],
        }
    elif kind == "pml-nmi":
        calc = AccuracyCalculator(include=("NMI",), device=torch.device("cpu"))
        out = {"nmi": calc.get_accuracy(x, y)["NMI"]}
    else:
        raise ValueError(f"--worker: expected ours, ours-nmi, pml or pml-nmi, got {kind}")
    seconds = time.perf_counter() - start
    return {
        "metrics": {k: float(v) for k, v in out.items()},
        "seconds": seconds,
        "loaded_mb": loaded,
        "peak_mb": peak_mb(),
    }


def run(kind: str, data: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", data]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- main


def show(name: str, r: dict) -> None:
    figures = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
    print(
        f"  {name:9s} {r['seconds']:8.1f} s   peak RSS {r['peak_mb']:7.0f} MB "
        f"({r['peak_mb'] - r['loaded_mb']:6.0f} MB above loaded)   {figures}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=N, help="samples (default: SOP's 60,502)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--nmi", action="store_true", help="also time NMI (k-means, minutes)")
    ap.add_argument("--nmi-rounds", type=int, default=1, help="alternations of the NMI sides")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data)))
        return

    import torch

    classes = round(args.n * CLASSES / N)
    x, y = make_data(args.n, classes, DIM)
    print(machine.describe())
    print(
        f"{args.n} x {DIM} float32, {classes} classes of {np.bincount(y).min()}-"
        f"{np.bincount(y).max()} items; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as data:
        np.save(os.path.join(data, "x.npy"), x)
        np.save(os.path.join(data, "y.npy"), y)
        del x, y
        if args.repeats > 0:
            retrieval(data, args.repeats)
        if args.nmi:
            nmi(data, args.nmi_rounds)


def nmi(data: str, rounds: int) -> None:
    """NMI's time, the two sides alternating ``rounds`` times (on a shared
    machine the speed drifts over minutes), and the ratio of the medians."""
    print("NMI (k-means with k = number of classes)", flush=True)
    ours, peer = [], []
    for _ in range(rounds):
        ours.append(run("ours-nmi", data))
        show("grouploss", ours[-1])
        peer.append(run("pml-nmi", data))
        show("PML+faiss", peer[-1])
    t_ours = float(np.median([r["seconds"] for r in ours]))
    t_peer = float(np.median([r["seconds"] for r in peer]))
    print(
        f"  median over {rounds}: grouploss {t_ours:.1f} s, PML+faiss {t_peer:.1f} s, "
        f"PML+faiss / grouploss {t_peer / t_ours:.2f}x",
        flush=True,
    )


def retrieval(data: str, repeats: int) -> None:
    """Recall@K and MAP@R, ``repeats`` times each side, and the ratio."""
    ours, peer = [], []
    for rep in range(repeats):
        print(f"run {rep + 1}: Recall@{'/'.join(map(str, KS))} and MAP@R", flush=True)
        ours.append(run("ours", data))
        show("grouploss", ours[-1])
        peer.append(run("pml", data))
        show("PML+faiss", peer[-1])
    worst = max(
        abs(a - b)
        for o, p in zip(ours, peer)
        for a, b in zip(o["metrics"].values(), p["metrics"].values())
    )
    best_ours = min(r["seconds"] for r in ours)
    best_peer = min(r["seconds"] for r in peer)
    print(
        f"best of {repeats}: grouploss {best_ours:.1f} s, PML+faiss {best_peer:.1f} s: "
        f"{best_peer / best_ours:.2f}x faster; peak RSS {max(r['peak_mb'] for r in ours):.0f} "
        f"vs {max(r['peak_mb'] for r in peer):.0f} MB; largest metric difference {worst:.2e}"
    )


if __name__ == "__main__":
    main()
