"""GroupLoss forward + backward: ours against the spec's computation in plain
PyTorch (the authors' release: anchors picked in a Python loop, correlation,
softmax prior, replicator steps, NLL + CE), same device, dtype and threads.

    python benchmarks/bench_loss.py [--device cpu|cuda] [--shapes cub,sop,large]
    python benchmarks/bench_loss.py --memory 1000,10000   # with a memory (memory_size)

With ``--memory``, each shape is also timed with a memory of M earlier
embeddings joining the group (``memory_embeddings``), against the same
loss written from its definition in plain PyTorch: W over the concatenation
of memory and batch, the memory rows one-hot anchors.

Prints, per shape, the median time of one forward + backward of each, the
ratio, the peak memory of each, and the largest relative difference of the
loss and the gradients.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import machine  # noqa: E402

from grouploss import functional as F  # noqa: E402
from reference import (  # noqa: E402
    pk_batch,
    reference_group_loss,
    reference_group_loss_with_memory,
)

# (P, K, m, d, num_iters, num_anchors, temperature)
SHAPES = {
    "cub": (6, 9, 100, 1024, 1, 2, 24.0),
    "sop": (10, 6, 11318, 1024, 1, 2, 54.0),
    "large": (64, 16, 1000, 512, 3, 2, 24.0),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(fn, emb, labels, logits):
    emb.grad = None
    logits.grad = None
    loss = fn(emb, labels, logits)
    loss.backward()
    return loss


def _time(fn, emb, labels, logits, budget_s: float, device) -> list[float]:
    for _ in range(3):
        _step(fn, emb, labels, logits)
    _sync(device)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 5:
        t0 = time.perf_counter()
        _step(fn, emb, labels, logits)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _peak_bytes(fn, emb, labels, logits, device) -> int:
    """Peak of the tensor memory allocated during one forward + backward,
    inputs excluded (the gradients written to the leaves included)."""
    emb.grad = None
    logits.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(emb, labels, logits).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(emb, labels, logits).backward()
    allocs = []

    def walk(nodes):
        for node in nodes:
            if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
                allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    current = peak = 0
    for _, size in sorted(allocs):
        current += size
        peak = max(peak, current)
    return peak


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_shape(name: str, device: torch.device, budget_s: float, memory: int = 0) -> dict:
    p, k, m, d, iters, anchors, t = SHAPES[name]
    emb, labels, logits = pk_batch(p, k, m, d, dtype=torch.float32, seed=0, device=device)
    emb.requires_grad_(True)
    logits.requires_grad_(True)
    opts = dict(temperature=t, num_anchors=anchors, num_iters=iters)
    g = torch.Generator().manual_seed(1)
    mem = torch.randn(memory, d, generator=g).to(device)
    mem_labels = torch.randint(0, m, (memory,), generator=g).to(device)

    def ours(e, y, lg):
        if memory:
            return F.group_loss(e, y, lg, memory_embeddings=mem, memory_labels=mem_labels, **opts)
        return F.group_loss(e, y, lg, **opts)

    def peer(e, y, lg):
        if memory:
            return reference_group_loss_with_memory(e, y, lg, mem, mem_labels, **opts)
        return reference_group_loss(e, y, lg, **opts)[0]

    results = {}
    for label, fn in (("ours", ours), ("reference", peer)):
        loss = _step(fn, emb, labels, logits)
        results[label] = (loss.detach().clone(), emb.grad.clone(), logits.grad.clone())
    diffs = [_max_rel(a, b) for a, b in zip(results["ours"], results["reference"])]

    # Alternate short rounds so that drift in the machine's load hits both.
    t_ours, t_ref = [], []
    for _ in range(4):
        t_ours += _time(ours, emb, labels, logits, budget_s / 8, device)
        t_ref += _time(peer, emb, labels, logits, budget_s / 8, device)
    mem_ours = _peak_bytes(ours, emb, labels, logits, device)
    mem_ref = _peak_bytes(peer, emb, labels, logits, device)
    med_ours, med_ref = statistics.median(t_ours), statistics.median(t_ref)
    return {
        "shape": name,
        "memory": memory,
        "batch": f"{p}x{k}",
        "m": m,
        "d": d,
        "iters": iters,
        "ours_us": med_ours * 1e6,
        "reference_us": med_ref * 1e6,
        "speedup": med_ref / med_ours,
        "ours_peak_mib": mem_ours / 2**20,
        "reference_peak_mib": mem_ref / 2**20,
        "max_rel_diff_loss_emb_logits": diffs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="cub,sop,large")
    ap.add_argument("--seconds", type=float, default=4.0, help="timing budget per shape and side")
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    ap.add_argument(
        "--memory", default="", help="memory sizes M to time besides none, e.g. 1000,10000"
    )
    args = ap.parse_args()
    memories = [0] + [int(x) for x in args.memory.split(",") if x]
    device = torch.device(args.device)
    print(machine.describe())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )
    header = (
        f"{'shape':6} {'memory':>6} {'batch':6} {'m':>6} {'d':>5} {'it':>2} {'ours us':>10} "
        f"{'ref us':>10} {'speedup':>8} {'ours MiB':>9} {'ref MiB':>9}  max rel diff"
    )
    print(header)
    rows = []
    for name, memory in [(n, mem) for n in args.shapes.split(",") for mem in memories]:
        r = run_shape(name, device, args.seconds, memory)
        rows.append(r)
        diffs = ", ".join(f"{x:.1e}" for x in r["max_rel_diff_loss_emb_logits"])
        print(
            f"{r['shape']:6} {memory:>6} {r['batch']:6} {r['m']:>6} {r['d']:>5} {r['iters']:>2} "
            f"{r['ours_us']:>10.1f} {r['reference_us']:>10.1f} {r['speedup']:>7.2f}x "
            f"{r['ours_peak_mib']:>9.2f} {r['reference_peak_mib']:>9.2f}  {diffs}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
