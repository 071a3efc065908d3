"""Bigger groups on glyphs (issue 21): does a memory of earlier batches
(``memory_size``), or one group across ranks (``gather_ranks``), help the
Group Loss, and does a cross-batch memory help the triplet loss alike?

The protocol, network, data and budget are ``bench_quality.py``'s (3 full
epochs, the 3-block convnet, Adam 1e-3, validation classes carved with
``split_seed`` 0, the best epoch by validation MAP@R), and its runs are
booked the same way (``OUT/runs.jsonl``; a rerun skips what is there).

Stages:

1. ``select`` (seed 0, validation classes only): the ``glyphs`` preset's
   Group Loss (cosine head, T 10, 1 anchor, p 8, 20 x 3) with a memory of
   each of ``--memories`` samples (joining after ``--memory-warmup``
   steps) and without one;
2. ``final`` (``--seeds``, test classes): the best memory size on
   validation and no memory; the triplet loss with batch-hard mining
   (margin 0.1, 20 x 3) in the PyTorch loop, without and with
   pytorch-metric-learning's ``CrossBatchMemory`` of the chosen size;
3. ``ranks`` (``--seeds``): the Group Loss as 2 gloo processes of P x K
   each with ``gather_ranks`` (``grouploss train --nproc-per-node 2``),
   against 1 process of P x K and 1 of 2P x K (the same images per epoch).

    python benchmarks/bench_groups.py [--stages select,final,ranks]
        [--out benchmarks/results/groups] [--runs runs/groups]
        [--memories 300,1000,3000] [--memory-warmup 100] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import bench_quality as bq
import machine
import torch

import grouploss

PRESET = "gl-T10-A1-p8-P20K3"
TRIPLET = "triplet-m0.1-P20K3"


def memory_name(size: int) -> str:
    return PRESET if size == 0 else f"{PRESET}-M{size}"


def ranks_run(out: pathlib.Path, name: str, opts: dict, seed: int, args) -> dict:
    """The Group Loss in the trainer as 2 gloo processes (``grouploss train
    --nproc-per-node 2``), read back from its run folder."""
    run_dir = out / f"glyphs-{name}-s{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    options = {**bq.COMMON, **bq.GLYPHS_PK, **opts}
    options.update(
        epochs=args.budget[0],
        max_steps_per_epoch=args.budget[1],
        select_max_images=args.val_images,
        seed=seed,
        split_seed=bq.SPLIT_SEED,
    )
    if args.glyphs_root:
        options["data_root"] = str(args.glyphs_root)
    lines = ['preset = "glyphs"']
    for k, v in options.items():
        lines.append(f"{k} = {json.dumps(v)}")
    # The options go through a TOML file beside the run (its own
    # config.toml keeps them once it starts).
    out.mkdir(parents=True, exist_ok=True)
    config = out / f"glyphs-{name}-s{seed}.toml"
    config.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "grouploss.cli", "train", "--nproc-per-node", "2"]
    cmd += ["--config", str(config), "--out-dir", str(run_dir), "--quiet", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, env=env)
    finally:
        config.unlink()
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["best_epoch"]
    return {
        "best_epoch": best,
        "val": history[best - 1]["val"],
        "val_history": [h["val"]["map@r"] for h in history],
        "test": summary["test"],
        "train_s": time.perf_counter() - start,
        "images_per_s": sum(h["images_per_s"] for h in history) / len(history),
    }


def booked_ranks(book, args, name: str, opts: dict, seed: int) -> dict:
    got = book.get("glyphs", name, seed, args.budget)
    if got is not None:
        return got
    bq.log(f"ranks: {name} seed {seed}: {opts}")
    start = time.perf_counter()
    res = ranks_run(pathlib.Path(args.runs), name, opts, seed, args)
    row = dict(
        key=book.key("glyphs", name, seed, args.budget),
        stage="ranks",
        preset="glyphs",
        name=name,
        family="group-ranks",
        loop="rust x 2 processes",
        options=opts,
        seed=seed,
        budget=bq.budget_name(args.budget),
        wall_s=time.perf_counter() - start,
        date=time.strftime("%Y-%m-%d %H:%M"),
        **res,
    )
    book.add(row)
    bq.log(f"  -> val map@r {res['val']['map@r']:.4f}, test map@r {res['test']['map@r']:.4f}")
    return row


def table(book, names, seeds, budget) -> list:
    rows = []
    for name in names:
        got = [book.get("glyphs", name, s, budget) for s in seeds]
        got = [g for g in got if g is not None]
        if not got:
            continue
        maps = [g["test"]["map@r"] for g in got]
        rows.append(
            dict(
                name=name,
                loop=got[0]["loop"],
                seeds=[g["seed"] for g in got],
                val_map_r_seed0=next((g["val"]["map@r"] for g in got if g["seed"] == 0), None),
                test_map_r=bq.spread(maps),
                test_r1=bq.spread([g["test"]["recall@1"] for g in got]),
                per_seed=maps,
                train_s=bq.spread([g["train_s"] for g in got]),
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="select,final,ranks")
    ap.add_argument("--out", default="benchmarks/results/groups")
    ap.add_argument("--runs", default="runs/groups")
    ap.add_argument("--memories", default="300,1000,3000")
    ap.add_argument("--memory-warmup", type=int, default=100)
    ap.add_argument("--budget", type=bq.parse_budget, default=(3, 0))
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--glyphs-root", default=os.environ.get("GLYPHS_ROOT"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.fashion_root = None
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    book = bq.Book(out)
    stages = args.stages.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [0] + [int(m) for m in args.memories.split(",") if m]
    bq.log(machine.describe())
    bq.log(f"torch {torch.__version__}, grouploss {grouploss.__version__}, stages {stages}")
    preset_opts = bq.GROUP_SCREEN[PRESET]

    def group_opts(size: int) -> dict:
        if size == 0:
            return dict(preset_opts)
        return dict(preset_opts, memory_size=size, memory_warmup_steps=args.memory_warmup)

    run = bq.run_one
    for size in sizes if "select" in stages or "final" in stages else []:
        run(
            book,
            args,
            "select",
            "glyphs",
            memory_name(size),
            "group",
            group_opts(size),
            0,
            args.budget,
        )
    with_memory = [s for s in sizes if s]
    best = (
        max(
            with_memory,
            key=lambda s: book.get("glyphs", memory_name(s), 0, args.budget)["val"]["map@r"],
        )
        if with_memory and "final" in stages
        else None
    )
    if best is not None:
        bq.log(f"best memory on validation: {best}")
        for seed in seeds:
            for size in (0, best):
                run(
                    book,
                    args,
                    "final",
                    "glyphs",
                    memory_name(size),
                    "group",
                    group_opts(size),
                    seed,
                    args.budget,
                )
            triplet = bq.TRIPLET_SCREEN[TRIPLET]
            run(book, args, "final", "glyphs", TRIPLET, "triplet", triplet, seed, args.budget)
            xbm = dict(triplet, xbm=best)
            run(
                book,
                args,
                "final",
                "glyphs",
                f"{TRIPLET}-xbm{best}",
                "triplet",
                xbm,
                seed,
                args.budget,
            )
    if "ranks" in stages:
        doubled = dict(preset_opts, classes_per_batch=40, samples_per_class=3)
        for seed in seeds:
            run(book, args, "ranks", "glyphs", PRESET, "group", group_opts(0), seed, args.budget)
            run(book, args, "ranks", "glyphs", f"{PRESET}-P40", "group", doubled, seed, args.budget)
            booked_ranks(
                book, args, f"{PRESET}-2ranks-gather", dict(preset_opts, gather_ranks=True), seed
            )
    names = [memory_name(s) for s in sizes]
    if best is not None:
        names += [TRIPLET, f"{TRIPLET}-xbm{best}"]
    names += [f"{PRESET}-P40", f"{PRESET}-2ranks-gather"]
    summary = {
        "machine": machine.describe(),
        "best_memory": best,
        "rows": table(book, names, seeds, args.budget),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for r in summary["rows"]:
        t = r["test_map_r"]
        print(f"{r['name']:40} {r['loop']:20} val(s0) {r['val_map_r_seed0']}", end="  ")
        print(f"test map@r {t['mean']:.4f} +- {t['std']:.4f}  {r['per_seed']}")


if __name__ == "__main__":
    main()
