"""Data-parallel scaling: training images per second with 1 and N processes.

Runs ``grouploss train`` (the Rust loop; ranks averaging their gradients
through torch.distributed) on the same generated data with 1 process and
then with ``--nproc-per-node N``, each rank on its own P x K batches, and
prints the images per second of the whole run (all ranks) and the ratio
N-process / 1-process. The peer is PyTorch's own DistributedDataParallel in
a plain loop (``examples/ddp_train.py``, same data and batch shape) with as
many processes; it runs on the small workload only (it is written for grey
32 x 32 images).

Workloads (generated in a temporary folder, nothing downloaded):

- ``small`` (default on CPU): glyphs layout, 32 x 32 grey, the ``glyphs``
  preset (3-layer convnet, 64-d embedding), P x K = 10 x 6.
- ``sop`` (default on CUDA): Stanford Online Products layout, JPEGs of
  320 x 320, the ``sop`` preset at the paper's resolution (BN-Inception,
  227 px crops, P x K = 10 x 6 per rank, bf16 off).

Images per second are those of the last epoch's training steps
(``images_per_s`` of metrics.jsonl: images of every rank over rank 0's
training time; the first epoch is warm-up; evaluation excluded). On the
CPU three runs: 1 process with every core as torch threads (1xC), 1
process of 1 thread (1x1), and N processes of C/N threads (NxC/N); the
ratios are N processes over each 1-process run. On CUDA each rank has its
own GPU (``cuda:LOCAL_RANK``) and N defaults to the GPUs present, at most 2
(with 1 GPU only the 1-process figure is measured).

    python benchmarks/bench_ddp.py [--device cpu|cuda] [--nproc N] \\
        [--workload small|sop] [--steps 30] [--json figures.json]
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import tempfile

import numpy as np
from machine import describe as describe_machine

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "ddp_train.py"


def _idx(path: pathlib.Path, array: np.ndarray, code: int) -> None:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    dtype = ">i4" if code == 0x0C else np.uint8
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.astype(dtype).tobytes())


def make_glyphs(root: pathlib.Path, train_classes=40, test_classes=20, per=60) -> None:
    """Glyphs layout (gzipped IDX, int32 labels): every class a fixed random
    32 x 32 pattern plus noise and jitter."""
    rng = np.random.default_rng(0)
    n = train_classes + test_classes
    protos = rng.integers(0, 256, size=(n, 8, 8)).repeat(4, 1).repeat(4, 2)
    rows = ["label\tcodepoint\tchar\tname\tsplit"]
    for c in range(n):
        split = "train" if c < train_classes else "test"
        rows.append(f"{c}\tU+{0x100 + c:04X}\t{chr(0x100 + c)}\tGLYPH {c}\t{split}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.tsv").write_text("\n".join(rows) + "\n")
    for prefix, classes in (("train", range(train_classes)), ("t10k", range(train_classes, n))):
        labels = np.array([c for c in classes for _ in range(per)])
        images = np.stack(
            [
                np.clip(
                    np.roll(protos[c], (k % 3 - 1, k % 2), (0, 1)) + rng.normal(0, 40, (32, 32)),
                    0,
                    255,
                )
                for c in classes
                for k in range(per)
            ]
        )
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", images, 0x08)
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, 0x0C)


def make_sop(root: pathlib.Path, train_classes=60, test_classes=20, per=6, size=320) -> None:
    """Stanford Online Products layout: smooth random colour JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img_id = 0
    for fname, classes in (
        ("Ebay_train.txt", range(1, train_classes + 1)),
        ("Ebay_test.txt", range(1000, 1000 + test_classes)),
    ):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            base = rng.integers(0, 256, (8, 8, 3))
            for j in range(per):
                img_id += 1
                small = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
                rel = f"bench_final/{c}_{j}.JPG"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                img.save(root / rel, quality=90)
                lines.append(f"{img_id} {c} 1 {rel}")
        (root / fname).write_text("\n".join(lines) + "\n")


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "python"), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(cmd: list, env: dict) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p.stdout


def ours(args, data: pathlib.Path, out: pathlib.Path, nproc: int, threads: int) -> float:
    """grouploss train: images per second of the last epoch."""
    preset = "glyphs" if args.workload == "small" else "sop"
    cmd = [sys.executable, "-m", "grouploss.cli", "train", "--preset", preset, "--quiet"]
    cmd += ["--nproc-per-node", str(nproc), "--data-root", str(data), "--out-dir", str(out)]
    cmd += ["--device", args.device, "--epochs", str(args.epochs)]
    cmd += ["--max-steps-per-epoch", str(args.steps), "--seed", "0"]
    cmd += ["--classes-per-batch", str(args.p), "--samples-per-class", str(args.k)]
    cmd += ["--num-workers", str(args.workers), "--val-fraction", "0.2"]
    if args.workload == "sop":
        cmd += ["--backbone", args.backbone, "--recall-ks", "1,10"]
    _run(cmd, _env(threads))
    last = (out / "metrics.jsonl").read_text().splitlines()[-1]
    return float(json.loads(last)["images_per_s"])


def peer(args, data: pathlib.Path, nproc: int, threads: int) -> float:
    """examples/ddp_train.py under torchrun: rank 0's last epoch rate."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", str(EXAMPLE), "--dataset", "glyphs", "--data", str(data)]
    cmd += ["--epochs", str(args.epochs), "--max-steps", str(args.steps)]
    cmd += ["--classes-per-batch", str(args.p), "--samples-per-class", str(args.k)]
    out = _run(cmd, _env(threads))
    rates = re.findall(r"([0-9.]+) img/s", out)
    return float(rates[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--nproc", type=int, default=None, help="processes of the parallel run")
    ap.add_argument("--workload", choices=("small", "sop"), default=None)
    ap.add_argument("--backbone", default="bn_inception", help="sop workload's backbone")
    ap.add_argument("--steps", type=int, default=30, help="training steps per epoch and rank")
    ap.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    ap.add_argument("--p", type=int, default=10, help="classes per batch (P)")
    ap.add_argument("--k", type=int, default=6, help="images per class (K)")
    ap.add_argument("--workers", type=int, default=None, help="loader threads per rank")
    ap.add_argument("--no-peer", action="store_true", help="skip examples/ddp_train.py")
    ap.add_argument("--json", type=pathlib.Path, help="write the figures here")
    args = ap.parse_args()

    import torch

    cores = len(os.sched_getaffinity(0))
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and gpus == 0:
        sys.exit("--device cuda: no CUDA device")
    if args.nproc is None:
        args.nproc = min(2, gpus) if args.device == "cuda" else 2
    if args.device == "cuda" and args.nproc > gpus:
        sys.exit(f"--nproc {args.nproc}: only {gpus} GPU(s)")
    args.workload = args.workload or ("sop" if args.device == "cuda" else "small")
    if args.workers is None:
        args.workers = 1 if args.device == "cpu" else max(1, min(8, cores // args.nproc))

    # (processes, torch threads per process); on the CPU the 1-process run
    # gets every core, and runs with one thread a process show the scaling
    # without OpenMP (whose spinning threads suffer most from other load).
    if args.device == "cpu":
        runs = [(1, cores), (1, 1), (args.nproc, max(1, cores // args.nproc))]
    else:
        runs = [(1, 1), (args.nproc, 1)]
    runs = list(dict.fromkeys(runs))
    key = "{}x{}".format
    figures = {"ours": {}, "peer": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data = tmp / "data"
        (make_glyphs if args.workload == "small" else make_sop)(data)
        for n, threads in runs:
            k = key(n, threads)
            figures["ours"][k] = ours(args, data, tmp / f"run{k}", n, threads)
            print(
                f"grouploss train, {n} process(es) x {threads} thread(s): "
                f"{figures['ours'][k]:.0f} img/s",
                flush=True,
            )
            if args.workload == "small" and not args.no_peer:
                figures["peer"][k] = peer(args, data, n, threads)
                print(
                    f"PyTorch DDP loop, {n} process(es) x {threads} thread(s): "
                    f"{figures['peer'][k]:.0f} img/s",
                    flush=True,
                )

    gpu_name = torch.cuda.get_device_name(0) if gpus else None
    machine = f"{describe_machine()}" + (f", {gpus} x {gpu_name}" if gpus else "")
    # The ratios: N processes over 1 process on the same cores (or 1 GPU),
    # and on the CPU over 1 process of 1 thread (one core a process).
    top = key(*runs[-1])
    bases = [key(*r) for r in runs[:-1]] or [top]
    print(
        f"\n{args.workload} workload on {args.device} ({machine}), P x K = {args.p} x {args.k}"
        f" per rank, {args.steps} steps an epoch"
    )
    print(
        f"{'img/s (processes x threads)':30}"
        + "".join(f"{key(*r):>10}" for r in runs)
        + "".join(f"{top + ' / ' + b:>12}" for b in bases)
    )
    ratios = {}
    for name, label in (("ours", "grouploss train"), ("peer", "PyTorch DDP (example)")):
        if not figures[name]:
            continue
        row = figures[name]
        ratios[name] = {f"{top} / {b}": row[top] / row[b] for b in bases}
        print(
            f"{label:30}"
            + "".join(f"{row[key(*r)]:>10.0f}" for r in runs)
            + "".join(f"{v:>11.2f}x" for v in ratios[name].values())
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "command": " ".join(sys.argv),
                    "device": args.device,
                    "machine": machine,
                    "workload": args.workload,
                    "backbone": "convnet" if args.workload == "small" else args.backbone,
                    "batch_per_rank": [args.p, args.k],
                    "steps_per_epoch": args.steps,
                    "images_per_s": figures,
                    "ratio": ratios,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
