"""Quality on glyphs: the Group Loss against normalised-softmax CE and a
triplet loss with batch-hard mining, same network, data and budget.

Every loss trains the same 3-block convnet (32/64/128 channels, global
average pooling, a 64-d linear embedding) on the same P x K batches with the
same augmentation (the Rust sampler and loader, seeded alike), Adam 1e-3, a
constant learning rate, for the same number of epochs; the best epoch is
picked on the validation classes (MAP@R) and its test-class metrics are
reported. Two loops:

* ``rust``: ``grouploss.train(preset=...)``, the library's trainer, for the
  Group Loss and for CE alone (``gtg_weight=0`` with the cosine classifier:
  normalised softmax);
* ``torch``: a plain PyTorch loop with the same convnet written in PyTorch,
  for pytorch-metric-learning's ``TripletMarginLoss`` + ``BatchHardMiner``
  and, as a calibration of the two loops, for normalised-softmax CE.

The validation classes are carved from the training classes with a fixed
``split_seed`` (0) for every run, so the search never sees the test classes.

Stages (each run is appended to ``OUT/runs.jsonl`` as it ends, and a rerun
skips the runs already there, so an interrupted search resumes):

1. ``screen``: one epoch per configuration, seed 0, validation MAP@R;
2. ``select``: the best Group Loss configurations of the screen and the
   best of each peer at the full budget (``--epochs``), seed 0, validation;
3. ``final``: the winner of each loss over ``--seeds`` seeds: test-class
   Recall@1, MAP@R and NMI, mean and spread (the seed-0 run of ``select``
   is reused);
4. ``fashion``: the chosen settings on fashion-mnist without retuning
   (its preset's P x K and epochs).

``OUT/summary.json`` and ``OUT/summary.md`` hold the tables.

    python benchmarks/bench_quality.py [--stages screen,select,final,fashion]
        [--out benchmarks/results/quality] [--runs runs/quality] [--epochs 3]
        [--seeds 0,1,2] [--fashion-seeds 0] [--calibration-seeds 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

import grouploss
from grouploss import ClassBalancedBatchSampler, datasets, metrics
from grouploss.data import Loader, small_transform

SPLIT_SEED = 0

# The network and optimisation every run shares (the glyphs preset's).
COMMON: Dict[str, Any] = dict(
    backbone="convnet",
    embedding_size=64,
    optimizer="adam",
    lr=1e-3,
    schedule="constant",
    pad_jitter=2,
)

# Group Loss configurations of the screen; all on the cosine classifier
# (scale 16) unless they say otherwise. A: anchors per class, p: W's power.
COS = dict(classifier="cosine", classifier_scale=16.0)
GROUP_SCREEN: Dict[str, Dict[str, Any]] = {
    "gl-release": dict(classifier="linear", temperature=10.0, num_anchors=2),
    "gl-linear-T10-A3-p8": dict(
        classifier="linear", temperature=10.0, num_anchors=3, similarity_power=8.0
    ),
    "gl-T2-A1-p1": dict(COS, temperature=2.0, num_anchors=1),
    "gl-T2-A1-p4": dict(COS, temperature=2.0, num_anchors=1, similarity_power=4.0),
    "gl-T2-A3-p4": dict(COS, temperature=2.0, num_anchors=3, similarity_power=4.0),
    "gl-T10-A1-p1": dict(COS, temperature=10.0, num_anchors=1),
    "gl-T10-A3-p1": dict(COS, temperature=10.0, num_anchors=3),
    "gl-T10-A3-p4": dict(COS, temperature=10.0, num_anchors=3, similarity_power=4.0),
    "gl-T10-A3-p8": dict(COS, temperature=10.0, num_anchors=3, similarity_power=8.0),
    "gl-T10-A5-p8": dict(COS, temperature=10.0, num_anchors=5, similarity_power=8.0),
    "gl-T24-A3-p8": dict(COS, temperature=24.0, num_anchors=3, similarity_power=8.0),
    "gl-T10-A3-p8-it2": dict(
        COS, temperature=10.0, num_anchors=3, similarity_power=8.0, num_iters=2
    ),
    "gl-T10-A3-p8-P20": dict(
        COS, temperature=10.0, num_anchors=3, similarity_power=8.0, classes_per_batch=20
    ),
    "gl-T10-A3-p8-w2": dict(
        COS, temperature=10.0, num_anchors=3, similarity_power=8.0, gtg_weight=2.0
    ),
}
CE_SCREEN: Dict[str, Dict[str, Any]] = {
    "ce-s16": dict(COS, gtg_weight=0.0),
    "ce-s32": dict(classifier="cosine", classifier_scale=32.0, gtg_weight=0.0),
}
TRIPLET_SCREEN: Dict[str, Dict[str, Any]] = {
    "triplet-m0.1": dict(margin=0.1),
    "triplet-m0.2": dict(margin=0.2),
}
# Configurations added to `select` around the best Group Loss of the screen.
SELECT_VARIANTS: Dict[str, Dict[str, Any]] = {
    "warmup1": dict(gtg_warmup_epochs=1),
}
GROUP_SELECT = 2  # Group Loss configurations of the screen taken to `select`


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- rust loop


def rust_run(
    out: pathlib.Path, preset: str, name: str, opts: dict, seed: int, epochs: int, data_root
) -> dict:
    run_dir = out / f"{preset}-{name}-s{seed}-e{epochs}"
    options = dict(COMMON, **opts)
    if data_root:
        options["data_root"] = str(data_root)
    if run_dir.exists():  # a run cut short: start it again
        import shutil

        shutil.rmtree(run_dir)
    res = grouploss.train(
        preset=preset,
        out_dir=str(run_dir),
        epochs=epochs,
        seed=seed,
        split_seed=SPLIT_SEED,
        progress=False,
        plots=False,
        **options,
    )
    best = res.history[res.best_epoch - 1]
    return {
        "best_epoch": res.best_epoch,
        "val": best["val"],
        "val_history": [h["val"]["map@r"] for h in res.history],
        "test": res.test,
        "train_s": sum(h["time_s"] for h in res.history),
        "images_per_s": statistics.mean(h["images_per_s"] for h in res.history),
    }


# --------------------------------------------------------------- torch loop


class ConvNet(nn.Module):
    """The Rust `convnet` backbone + embedding layer, in PyTorch."""

    def __init__(self, in_channels: int = 1, embedding_size: int = 64) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate((32, 64, 128)):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.backbone = nn.Sequential(*layers)
        self.embed = nn.Linear(128, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.backbone(x).mean(dim=(2, 3)))


class CosineClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, scale: float) -> None:
        super().__init__()
        bound = 1 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        self.scale = scale

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        w = nn.functional.normalize(self.weight, dim=1)
        return nn.functional.normalize(e, dim=1) @ w.T * self.scale


def grey_statistics(ds) -> tuple:
    """Mean and std of pixel / 255 over up to 2000 training images, as the
    Rust trainer's `mean_std` normalisation computes them."""
    n = len(ds)
    take = min(n, 2000)
    px = np.concatenate(
        [ds.load(j * n // take).numpy().astype(np.float64).ravel() / 255 for j in range(take)]
    )
    return float(px.mean()), float(px.std())


def open_splits(preset: str, data_root, val_fraction: float):
    cls = datasets.Glyphs if preset == "glyphs" else datasets.FashionMNIST
    kw = dict(val_fraction=val_fraction, split_seed=SPLIT_SEED)
    return (
        cls(data_root, "train", **kw),
        cls(data_root, "val", **kw),
        cls(data_root, "test", **kw),
    )


@torch.no_grad()
def embed(model: nn.Module, ds, transform, indices=None) -> tuple:
    model.eval()
    idx = list(range(len(ds))) if indices is None else list(indices)
    batches = [idx[i : i + 500] for i in range(0, len(idx), 500)]
    loader = Loader(ds, batches, transform, num_threads=2)
    embs, labels = [], []
    for images, y in loader:
        embs.append(model(images))
        labels.append(y)
    return torch.cat(embs), torch.cat(labels)


def torch_run(
    preset: str, loss_name: str, opts: dict, seed: int, epochs: int, data_root, cfg: dict
) -> dict:
    from pytorch_metric_learning import losses, miners

    torch.manual_seed(seed)
    train, val, test = open_splits(preset, data_root, cfg["val_fraction"])
    mean, std = grey_statistics(train)
    size = int(train.load(0).shape[-1])
    train_tf = small_transform(size, pad=cfg["pad_jitter"], normalize=([mean], [std]))
    eval_tf = small_transform(size, pad=0, normalize=([mean], [std]))
    p = opts.get("classes_per_batch", cfg["classes_per_batch"])
    k = opts.get("samples_per_class", cfg["samples_per_class"])
    sampler = ClassBalancedBatchSampler(train.labels, p, k, seed=seed)
    loader = Loader(train, sampler, train_tf, num_threads=2, seed=seed)
    model = ConvNet(1, COMMON["embedding_size"])
    params = list(model.parameters())
    if loss_name == "triplet":
        loss_fn = losses.TripletMarginLoss(margin=opts["margin"])
        miner = miners.BatchHardMiner()
        head = None
    else:
        classes = int(train.labels.max()) + 1
        head = CosineClassifier(COMMON["embedding_size"], classes, opts["classifier_scale"])
        params += list(head.parameters())
    opt = torch.optim.Adam(params, lr=COMMON["lr"])
    select_idx = None
    if cfg.get("select_max_images") and cfg["select_max_images"] < len(val):
        rng = np.random.default_rng(seed)
        select_idx = np.sort(rng.permutation(len(val))[: cfg["select_max_images"]])
    best, best_state, history, train_s, seen = None, None, [], 0.0, 0
    for epoch in range(epochs):
        model.train()
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for images, y in loader:
            e = model(images)
            if head is None:
                loss = loss_fn(e, y, miner(e, y))
            else:
                loss = nn.functional.cross_entropy(head(e), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        train_s += time.perf_counter() - start
        ve, vl = embed(model, val, eval_tf, select_idx)
        m = metrics.evaluate(ve, vl, include=("recall", "map_at_r", "r_precision"))
        history.append(m["map@r"])
        if best is None or m["map@r"] > best[1]["map@r"]:
            best = (epoch + 1, m)
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        log(f"  torch {loss_name} epoch {epoch + 1}: val map@r {m['map@r']:.4f}")
    assert best is not None and best_state is not None
    model.load_state_dict(best_state)
    te, tl = embed(model, test, eval_tf)
    test_m = metrics.evaluate(te, tl)
    return {
        "best_epoch": best[0],
        "val": best[1],
        "val_history": history,
        "test": test_m,
        "train_s": train_s,
        "images_per_s": seen / max(train_s, 1e-9),
    }


# ------------------------------------------------------------------ driver


class Book:
    """runs.jsonl: one line per finished run, keyed by its identity."""

    def __init__(self, out: pathlib.Path) -> None:
        self.path = out / "runs.jsonl"
        self.rows: List[dict] = []
        if self.path.exists():
            self.rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]

    @staticmethod
    def key(preset, name, seed, epochs) -> str:
        return f"{preset}/{name}/s{seed}/e{epochs}"

    def get(self, preset, name, seed, epochs) -> Optional[dict]:
        k = self.key(preset, name, seed, epochs)
        for r in self.rows:
            if r["key"] == k:
                return r
        return None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run_one(book: Book, args, stage: str, preset: str, name: str, family: str, opts: dict,
            seed: int, epochs: int) -> dict:
    got = book.get(preset, name, seed, epochs)
    if got is not None:
        return got
    log(f"{stage}: {preset} {name} seed {seed}, {epochs} epoch(s): {opts}")
    cfg = grouploss.training.resolve_config(preset)
    root = args.glyphs_root if preset == "glyphs" else args.fashion_root
    start = time.perf_counter()
    if family == "triplet" or (family == "ce-torch"):
        res = torch_run(
            preset, "triplet" if family == "triplet" else "ce", opts, seed, epochs, root, cfg
        )
        loop = "torch"
    else:
        res = rust_run(pathlib.Path(args.runs), preset, name, opts, seed, epochs, root)
        loop = "rust"
    row = dict(
        key=book.key(preset, name, seed, epochs),
        stage=stage,
        preset=preset,
        name=name,
        family=family,
        loop=loop,
        options=opts,
        seed=seed,
        epochs=epochs,
        wall_s=time.perf_counter() - start,
        date=time.strftime("%Y-%m-%d %H:%M"),
        **res,
    )
    book.add(row)
    log(
        f"  -> val map@r {res['val']['map@r']:.4f} r@1 {res['val']['recall@1']:.4f} "
        f"(best epoch {res['best_epoch']}, {row['wall_s']:.0f} s)"
    )
    return row


def ranked(book: Book, preset: str, names, seed: int, epochs: int) -> List[dict]:
    rows = [book.get(preset, n, seed, epochs) for n in names]
    rows = [r for r in rows if r is not None]
    return sorted(rows, key=lambda r: -r["val"]["map@r"])


def candidates(book: Book, epochs: int):
    """The configurations of `select`, chosen on the screen's validation MAP@R."""
    gl = ranked(book, "glyphs", GROUP_SCREEN, 0, 1)[:GROUP_SELECT]
    out = {r["name"]: ("group", r["options"]) for r in gl}
    if gl:
        for suffix, extra in SELECT_VARIANTS.items():
            out[f"{gl[0]['name']}-{suffix}"] = ("group", dict(gl[0]["options"], **extra))
    ce = ranked(book, "glyphs", CE_SCREEN, 0, 1)[:1]
    tr = ranked(book, "glyphs", TRIPLET_SCREEN, 0, 1)[:1]
    for r in ce:
        out[r["name"]] = ("ce", r["options"])
        out[r["name"] + "-torch"] = ("ce-torch", r["options"])
    for r in tr:
        out[r["name"]] = ("triplet", r["options"])
    return out


def winners(book: Book, epochs: int) -> Dict[str, dict]:
    """The best configuration of each family at the full budget (seed 0, val)."""
    best: Dict[str, dict] = {}
    for name, (family, opts) in candidates(book, epochs).items():
        r = book.get("glyphs", name, 0, epochs)
        if r is None:
            continue
        if family not in best or r["val"]["map@r"] > best[family]["val"]["map@r"]:
            best[family] = r
    return best


def spread(values: List[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(book: Book, args) -> dict:
    summary: Dict[str, Any] = {"screen": [], "select": [], "final": {}, "fashion": {}}
    for r in ranked(book, "glyphs", {**GROUP_SCREEN, **CE_SCREEN, **TRIPLET_SCREEN}, 0, 1):
        summary["screen"].append(
            dict(name=r["name"], loop=r["loop"], val_map_r=r["val"]["map@r"],
                 val_r1=r["val"]["recall@1"], options=r["options"])
        )
    for name in candidates(book, args.epochs):
        r = book.get("glyphs", name, 0, args.epochs)
        if r is not None:
            summary["select"].append(
                dict(name=name, loop=r["loop"], val_map_r=r["val"]["map@r"],
                     val_r1=r["val"]["recall@1"], best_epoch=r["best_epoch"],
                     val_history=r["val_history"])
            )
    summary["select"].sort(key=lambda x: -x["val_map_r"])
    for preset, key in (("glyphs", "final"), ("fashion-mnist", "fashion")):
        for family, w in winners(book, args.epochs).items():
            epochs = args.epochs if preset == "glyphs" else None
            rows = [r for r in book.rows if r["preset"] == preset and r["name"] == w["name"]
                    and (epochs is None or r["epochs"] == epochs)]
            if not rows:
                continue
            summary[key][w["name"]] = dict(
                family=family,
                loop=rows[0]["loop"],
                seeds=[r["seed"] for r in rows],
                options=w["options"],
                **{
                    m: spread([r["test"][m] for r in rows])
                    for m in ("recall@1", "map@r", "nmi", "r_precision")
                },
                val_map_r=spread([r["val"]["map@r"] for r in rows]),
                images_per_s=statistics.mean(r["images_per_s"] for r in rows),
            )
    return summary


def write_summary(summary: dict, out: pathlib.Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["## screen (1 epoch, seed 0, validation classes)", "",
             "| config | loop | val MAP@R | val R@1 |", "|---|---|---|---|"]
    for r in summary["screen"]:
        lines.append(f"| {r['name']} | {r['loop']} | {r['val_map_r']:.4f} | {r['val_r1']:.4f} |")
    lines += ["", "## select (full budget, seed 0, validation classes)", "",
              "| config | loop | val MAP@R | val R@1 | best epoch |", "|---|---|---|---|---|"]
    for r in summary["select"]:
        lines.append(
            f"| {r['name']} | {r['loop']} | {r['val_map_r']:.4f} | {r['val_r1']:.4f} "
            f"| {r['best_epoch']} |"
        )
    for key, title in (("final", "glyphs test classes"), ("fashion", "fashion-mnist test")):
        lines += ["", f"## {title} (mean ± std over seeds)", "",
                  "| config | loop | seeds | R@1 | MAP@R | NMI |", "|---|---|---|---|---|---|"]
        for name, r in summary[key].items():
            cell = lambda m: f"{r[m]['mean']:.4f} ± {r[m]['std']:.4f}"  # noqa: E731
            lines.append(
                f"| {name} | {r['loop']} | {len(r['seeds'])} | {cell('recall@1')} "
                f"| {cell('map@r')} | {cell('nmi')} |"
            )
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="screen,select,final,fashion")
    ap.add_argument("--out", default="benchmarks/results/quality")
    ap.add_argument("--runs", default="runs/quality", help="run folders of the Rust trainer")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fashion-seeds", default="0")
    ap.add_argument(
        "--calibration-seeds",
        default="0",
        help="seeds of normalised-softmax CE in the torch loop (compares the two loops)",
    )
    ap.add_argument("--glyphs-root", default=os.environ.get("GLYPHS_ROOT"))
    ap.add_argument("--fashion-root", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    book = Book(out)
    stages = args.stages.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    log(f"torch {torch.__version__}, grouploss {grouploss.__version__}, stages {stages}")

    if "screen" in stages:
        families = [("group", GROUP_SCREEN), ("ce", CE_SCREEN), ("triplet", TRIPLET_SCREEN)]
        for family, table in families:
            for name, opts in table.items():
                run_one(book, args, "screen", "glyphs", name, family, opts, 0, 1)
        write_summary(summarise(book, args), out)
    if "select" in stages:
        for name, (family, opts) in candidates(book, args.epochs).items():
            run_one(book, args, "select", "glyphs", name, family, opts, 0, args.epochs)
        write_summary(summarise(book, args), out)
    calibration = [int(s) for s in args.calibration_seeds.split(",")]
    if "final" in stages:
        for seed in seeds:
            for family, w in winners(book, args.epochs).items():
                if family == "ce-torch" and seed not in calibration:
                    continue
                run_one(book, args, "final", "glyphs", w["name"], family, w["options"], seed,
                        args.epochs)
            write_summary(summarise(book, args), out)
    if "fashion" in stages:
        fm = grouploss.training.resolve_config("fashion-mnist")
        for seed in [int(s) for s in args.fashion_seeds.split(",")]:
            for family, w in winners(book, args.epochs).items():
                if family == "ce-torch" and seed not in calibration:
                    continue
                # The preset's own P x K and epochs; the loss settings carry over.
                opts = {k: v for k, v in w["options"].items()
                        if k not in ("classes_per_batch", "samples_per_class")}
                run_one(book, args, "fashion", "fashion-mnist", w["name"], family, opts, seed,
                        fm["epochs"])
        write_summary(summarise(book, args), out)
    log("done")
    print((out / "summary.md").read_text() if (out / "summary.md").exists() else "", end="")


if __name__ == "__main__":
    sys.exit(main())
