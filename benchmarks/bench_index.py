"""grouploss.Index against faiss-cpu's IndexFlatIP: exact cosine top-k.

    python benchmarks/bench_index.py [--n 500000] [--dim 256] [--queries 10000] [--k 10]
                                     [--repeats 3] [--rounds 1]

Both sides get the same L2-normalised float32 vectors (seeded) and search
the same queries. Each side runs in a child process of its own, so that its
peak memory (ru_maxrss) is its own: the figure printed is the peak minus
the memory in use once the data are made and the library has added and
searched a few vectors (its start-up, e.g. libtorch's and OpenMP's thread
pools, is not the index's), i.e. what the index adds (its stored copy,
search buffers). Times: adding the vectors, and searching (median of
--repeats; with --rounds R the two sides alternate R times and the
medians are reported). Then the neighbours are compared: the same ids, but where two
similarities are within float32 rounding of each other.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import machine  # noqa: E402


def data(n: int, dim: int, queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, dim), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return g, q


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Memory in use now (the peak may be a freed temporary's)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(side: str, args) -> None:
    g, q = data(args.n, args.dim, args.queries)
    if side == "ours":
        import torch

        from grouploss import Index

        torch.set_num_threads(args.threads)
        warm = Index(args.dim)  # the library's own start-up, outside the figure
        warm.add(g[:64])
        warm.search(q[:8], args.k)
        del warm
        base = rss_mib()
        t0 = time.perf_counter()
        index = Index(args.dim)
        index.add(g)
        add_s = time.perf_counter() - t0

        def search():
            return index.search(q, args.k)
    else:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        warm = faiss.IndexFlatIP(args.dim)  # as for ours
        warm.add(g[:64])
        warm.search(q[:8], args.k)
        del warm
        base = rss_mib()
        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(args.dim)
        index.add(g)
        add_s = time.perf_counter() - t0

        def search():
            s, i = index.search(q, args.k)
            return s, i

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        scores, ids = search()
        times.append(time.perf_counter() - t0)
    np.save(args.out + f".{side}.npy", np.asarray(ids))
    np.save(args.out + f".{side}.scores.npy", np.asarray(scores))
    print(
        json.dumps(dict(add_s=add_s, search_s=float(np.median(times)), peak_mib=peak_mib() - base))
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the two sides")
    ap.add_argument("--side", choices=("ours", "faiss"), help=argparse.SUPPRESS)
    # Where a side writes its neighbours (given by the parent).
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        child(args.side, args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_index-") as work:
        args.out = str(pathlib.Path(work) / "neighbours")
        compare(args)


def compare(args) -> None:
    """Runs the two sides alternately and prints their figures and how
    far their neighbours agree."""
    print(machine.describe())
    shape = f"{args.n} x {args.dim} stored, {args.queries} queries, k = {args.k}"
    print(f"{shape}, {args.threads} threads")
    # The sides alternate, `--rounds` times: on a shared machine the speed
    # drifts over minutes, and a single run of each can land on either side
    # of a drift.
    runs = {"ours": [], "faiss": []}
    for r in range(args.rounds):
        for side in ("ours", "faiss"):
            cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:], "--out", args.out]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
        ratio = runs["faiss"][-1]["search_s"] / runs["ours"][-1]["search_s"]
        print(
            f"round {r + 1}: search s ours {runs['ours'][-1]['search_s']:.2f}, "
            f"faiss {runs['faiss'][-1]['search_s']:.2f}, faiss / ours {ratio:.2f}x"
        )
    median = {
        side: {key: float(np.median([r[key] for r in rs])) for key in rs[0]}
        for side, rs in runs.items()
    }
    ours, peer = median["ours"], median["faiss"]
    print(f"medians over {args.rounds} round(s):")
    print(f"{'':8}{'add s':>10}{'search s':>10}{'peak MiB':>10}")
    for name, r in (("ours", ours), ("faiss", peer)):
        print(f"{name:8}{r['add_s']:10.2f}{r['search_s']:10.2f}{r['peak_mib']:10.0f}")
    print(f"search time ratio faiss / ours: {peer['search_s'] / ours['search_s']:.2f}x")
    ids_o, ids_f = (np.load(args.out + f".{s}.npy") for s in ("ours", "faiss"))
    s_o, s_f = (np.load(args.out + f".{s}.scores.npy") for s in ("ours", "faiss"))
    differ = ids_o != ids_f
    gap = float(np.abs(s_o - s_f).max())
    near = bool(np.all(np.abs(s_o[differ] - s_f[differ]) < 1e-5))
    print(
        f"neighbours: {differ.sum()} of {differ.size} ids differ, all within 1e-5 in "
        f"similarity: {near}; largest similarity difference {gap:.1e}"
    )


if __name__ == "__main__":
    main()
