"""Quality on glyphs: the Group Loss against normalised-softmax CE and a
triplet loss with batch-hard mining, same network, data and budget.

Every loss trains the same 3-block convnet (32/64/128 channels, global
average pooling, a 64-d linear embedding) on the same P x K batches with the
same augmentation (the Rust sampler and loader, seeded alike), Adam 1e-3, a
constant learning rate, for the same budget: EPOCHSxSTEPS, that many epochs
of at most STEPS batches each (a CPU-sized budget; 0 steps: whole epochs).
The best epoch is picked on validation classes (MAP@R over ``--val-images``
of them) and its test-class metrics are reported. Two loops:

* ``rust``: ``grouploss.train(preset=...)``, the library's trainer, for
  every loss: the Group Loss, ``loss="softmax"`` with the cosine classifier
  (normalised softmax) and ``loss="triplet"`` (batch-hard triplets, the
  ``-rust`` configurations);
* ``torch``: a plain PyTorch loop with the same convnet written in PyTorch
  (``torch.nn`` defaults, which the trainer's initialisation now equals),
  for pytorch-metric-learning's ``TripletMarginLoss`` + ``BatchHardMiner``
  and, as a calibration of the two loops, for each trainer winner's
  configuration: normalised-softmax CE, the Group Loss (the
  ``grouploss.GroupLoss`` module with its own classifier, as a user drops it
  into their loop) and the triplet loss.

The validation classes are carved from the training classes with a fixed
``split_seed`` (0) for every run, so the search never sees the test classes
(the test metrics of the screen are recorded in ``runs.jsonl`` but never
read by the selection).

Stages (each run is appended to ``OUT/runs.jsonl`` as it ends, and a rerun
skips the runs already there, so an interrupted search resumes):

1. ``screen``: every configuration of the tables below at
   ``--screen-budget``, seed 0, validation MAP@R;
2. ``select``: where a family has several candidates (``GROUP_SELECT`` > 1
   or ``SELECT_VARIANTS``), each at the full ``--budget``, seed 0;
3. ``final``: the winner of each loss over ``--seeds`` at ``--budget``:
   test-class Recall@1, MAP@R and NMI, mean and spread;
4. ``fashion``: the winners on fashion-mnist without retuning (its preset's
   P x K, ``--fashion-budget``);
5. ``calibration``: the trainer's winners in the torch loop too (the Group
   Loss as the ``GroupLoss`` module a user drops into their own loop), so
   that each loss is measured in both loops with the same settings.

``OUT/summary.json`` and ``OUT/summary.md`` hold the tables.

    python benchmarks/bench_quality.py [--stages screen,select,final,fashion,calibration]
        [--out benchmarks/results/quality] [--runs runs/quality]
        [--screen-budget 1x200] [--budget 3x0] [--fashion-budget 1x0]
        [--val-images 2000] [--seeds 0,1,2] [--fashion-seeds 0]
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
from typing import Any, Dict, List, Optional, Tuple

import machine
import numpy as np
import torch
from torch import nn

import grouploss
from grouploss import ClassBalancedBatchSampler, datasets, metrics
from grouploss.data import Loader, small_transform
from grouploss.training import LOSS_OPTIONS

SPLIT_SEED = 0

# The network and optimisation every run shares, and the release's loss
# settings that a configuration overrides: pinned here so that the search
# means the same after the glyphs preset takes its winner.
COMMON: Dict[str, Any] = dict(
    backbone="convnet",
    embedding_size=64,
    optimizer="adam",
    lr=1e-3,
    schedule="constant",
    pad_jitter=2,
    classifier="linear",
    classifier_scale=16.0,
    normalize_embeddings=False,
    temperature=10.0,
    num_anchors=2,
    num_iters=1,
    gtg_weight=1.0,
    ce_weight=1.0,
    similarity="correlation",
    similarity_power=1.0,
    gtg_warmup_epochs=0,
    gtg_ramp_epochs=0.0,
)
# The release's P x K on glyphs (fashion-mnist keeps its preset's: 3 x 20).
GLYPHS_PK = dict(classes_per_batch=10, samples_per_class=6)

# Group Loss configurations of the screen, chosen from the table
# (a cosine classifier is the big lever: it ties with normalised softmax) and
# what the Group Loss adds on top of a classifier: W's sharpness p, more
# anchors A per class, the prior's temperature T, a larger P x K at the same
# images per step. All on the cosine classifier (scale 16) but the release.
COS = dict(classifier="cosine", classifier_scale=16.0)


def gl(temperature: float, anchors: int, power: float, pk: Optional[Tuple[int, int]] = None):
    """A Group Loss configuration on the cosine classifier: T, anchors per
    class, W's power and, when given, the P x K of its batches."""
    opts: Dict[str, Any] = dict(
        COS, temperature=temperature, num_anchors=anchors, similarity_power=power
    )
    if pk is not None:
        opts.update(classes_per_batch=pk[0], samples_per_class=pk[1])
    return opts


GROUP_SCREEN: Dict[str, Dict[str, Any]] = {
    "gl-release": dict(classifier="linear", temperature=10.0, num_anchors=2),
    "gl-T2-A1-p1": dict(COS, temperature=2.0, num_anchors=1),
    "gl-T10-A3-p4": gl(10.0, 3, 4.0),
    "gl-T10-A3-p8": gl(10.0, 3, 8.0),
    "gl-T10-A2-p8-P15K4": gl(10.0, 2, 8.0, (15, 4)),
    "gl-T10-A1-p8-P20K3": gl(10.0, 1, 8.0, (20, 3)),
    "gl-T10-A1-p8-P30K2": gl(10.0, 1, 8.0, (30, 2)),
    "gl-T10-A1-p16-P20K3": gl(10.0, 1, 16.0, (20, 3)),
}
CE_SCREEN: Dict[str, Dict[str, Any]] = {
    "ce-s16": dict(COS, loss="softmax"),
}
TRIPLET_SCREEN: Dict[str, Dict[str, Any]] = {
    "triplet-m0.1": dict(margin=0.1),
    "triplet-m0.2": dict(margin=0.2),
    # The peer gets the Group Loss's larger P at the same images per step too.
    "triplet-m0.1-P15K4": dict(margin=0.1, classes_per_batch=15, samples_per_class=4),
    "triplet-m0.1-P20K3": dict(margin=0.1, classes_per_batch=20, samples_per_class=3),
}
# The same triplet configurations in the library's trainer (`loss="triplet"`).
RUST_SUFFIX = "-rust"
TRIPLET_RUST_SCREEN = {name + RUST_SUFFIX: opts for name, opts in TRIPLET_SCREEN.items()}
# Group Loss configurations of the screen taken to `select`, and variants of
# the best one added there, e.g. ``"warmup1": dict(gtg_warmup_epochs=1)`` (CE
# alone for the first epoch, the release's start from a CE-finetuned
# network). With one candidate per family `select` is skipped and the
# screen's best goes to `final`.
GROUP_SELECT = 3
# The peer's best configurations taken to `select` too, so that its P x K
# (the release's 10 x 6 among them) is chosen at the full budget as well.
TRIPLET_SELECT = 3
SELECT_VARIANTS: Dict[str, Dict[str, Any]] = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# A budget: `epochs` epochs of at most `steps` P x K batches each (0: the whole
# epoch), the best epoch picked on `val_images` validation images.
Budget = Tuple[int, int]


def budget_name(b: Budget) -> str:
    return f"e{b[0]}x{b[1]}"


# ---------------------------------------------------------------- rust loop


def rust_run(
    out: pathlib.Path,
    preset: str,
    name: str,
    opts: dict,
    seed: int,
    budget: Budget,
    data_root,
    val_images: int,
) -> dict:
    run_dir = out / f"{preset}-{name}-s{seed}-{budget_name(budget)}"
    opts = dict(opts)
    if "margin" in opts:
        opts.update(loss="triplet", triplet_margin=opts.pop("margin"))
    common = dict(COMMON)
    # The options of the other losses leave (the trainer refuses them).
    own = set(LOSS_OPTIONS[opts.get("loss", "group")])
    for k in set().union(*LOSS_OPTIONS.values()) - own:
        common.pop(k, None)
    options = {**common, **(GLYPHS_PK if preset == "glyphs" else {}), **opts}
    if data_root:
        options["data_root"] = str(data_root)
    if run_dir.exists():  # a run cut short: start it again
        import shutil

        shutil.rmtree(run_dir)
    res = grouploss.train(
        preset=preset,
        out_dir=str(run_dir),
        epochs=budget[0],
        max_steps_per_epoch=budget[1],
        select_max_images=val_images,
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
    preset: str,
    loss_name: str,
    opts: dict,
    seed: int,
    budget: Budget,
    data_root,
    cfg: dict,
    val_images: int,
) -> dict:
    from pytorch_metric_learning import losses, miners

    torch.manual_seed(seed)
    train, val, test = open_splits(preset, data_root, cfg["val_fraction"])
    mean, std = grey_statistics(train)
    size = int(train.load(0).shape[-1])
    train_tf = small_transform(size, pad=COMMON["pad_jitter"], normalization=([mean], [std]))
    eval_tf = small_transform(size, pad=0, normalization=([mean], [std]))
    base = GLYPHS_PK if preset == "glyphs" else cfg
    p = opts.get("classes_per_batch", base["classes_per_batch"])
    k = opts.get("samples_per_class", base["samples_per_class"])
    sampler = ClassBalancedBatchSampler(train.labels, p, k, seed=seed)
    loader = Loader(train, sampler, train_tf, num_threads=2, seed=seed)
    model = ConvNet(1, COMMON["embedding_size"])
    params = list(model.parameters())
    group_fn = None
    xbm = None
    if loss_name == "triplet":
        loss_fn = losses.TripletMarginLoss(margin=opts["margin"])
        miner = miners.BatchHardMiner()
        head = None
        if opts.get("xbm"):
            # pytorch-metric-learning's cross-batch memory of the last
            # `xbm` embeddings, mined batch-hard against batch and memory.
            xbm = losses.CrossBatchMemory(
                loss_fn, COMMON["embedding_size"], memory_size=int(opts["xbm"]), miner=miner
            )
    elif loss_name == "group":
        # The library's module as a user drops it into their own loop: its
        # own classifier on the embeddings, the searched loss settings.
        loss_keys = (
            "classifier",
            "classifier_scale",
            "temperature",
            "num_anchors",
            "similarity_power",
            "num_iters",
            "normalize_embeddings",
        )
        group_fn = grouploss.GroupLoss(
            int(train.labels.max()) + 1,
            embedding_size=COMMON["embedding_size"],
            **{k: opts.get(k, COMMON[k]) for k in loss_keys},
        )
        params += list(group_fn.parameters())
        head = None
    else:
        classes = int(train.labels.max()) + 1
        head = CosineClassifier(COMMON["embedding_size"], classes, opts["classifier_scale"])
        params += list(head.parameters())
    opt = torch.optim.Adam(params, lr=COMMON["lr"])
    select_idx = None
    if val_images and val_images < len(val):
        rng = np.random.default_rng(seed)
        select_idx = np.sort(rng.permutation(len(val))[:val_images])
    best, best_state, history, train_s, seen = None, None, [], 0.0, 0
    epochs, max_steps = budget
    for epoch in range(epochs):
        model.train()
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for step, (images, y) in enumerate(loader):
            if max_steps and step >= max_steps:
                break
            e = model(images)
            if group_fn is not None:
                loss = group_fn(e, y)
            elif xbm is not None:
                loss = xbm(e, y)
            elif head is None:
                loss = loss_fn(e, y, miner(e, y))
            else:
                loss = nn.functional.cross_entropy(head(e), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        train_s += time.perf_counter() - start
        ve, vl = embed(model, val, eval_tf, select_idx)
        m = metrics.evaluate(ve, vl, include=("recall", "map@r", "r_precision"))
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
    def key(preset: str, name: str, seed: int, budget: Budget) -> str:
        return f"{preset}/{name}/s{seed}/{budget_name(budget)}"

    def get(self, preset: str, name: str, seed: int, budget: Budget) -> Optional[dict]:
        k = self.key(preset, name, seed, budget)
        for r in self.rows:
            if r["key"] == k:
                return r
        return None

    def all_seeds(self, preset: str, name: str, budget: Budget) -> List[dict]:
        return [
            r
            for r in self.rows
            if r["preset"] == preset and r["name"] == name and r["budget"] == budget_name(budget)
        ]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run_one(
    book: Book,
    args,
    stage: str,
    preset: str,
    name: str,
    family: str,
    opts: dict,
    seed: int,
    budget: Budget,
) -> dict:
    got = book.get(preset, name, seed, budget)
    if got is not None:
        return got
    log(f"{stage}: {preset} {name} seed {seed}, {budget_name(budget)}: {opts}")
    cfg = grouploss.training.resolve_config(preset)
    root = args.glyphs_root if preset == "glyphs" else args.fashion_root
    start = time.perf_counter()
    if family in ("triplet", "ce-torch", "group-torch"):
        loss = {"triplet": "triplet", "ce-torch": "ce", "group-torch": "group"}[family]
        res = torch_run(preset, loss, opts, seed, budget, root, cfg, args.val_images)
        loop = "torch"
    else:
        runs = pathlib.Path(args.runs)
        res = rust_run(runs, preset, name, opts, seed, budget, root, args.val_images)
        loop = "rust"
    row = dict(
        key=book.key(preset, name, seed, budget),
        stage=stage,
        preset=preset,
        name=name,
        family=family,
        loop=loop,
        options=opts,
        seed=seed,
        budget=budget_name(budget),
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


def ranked(book: Book, preset: str, names, seed: int, budget: Budget) -> List[dict]:
    rows = [book.get(preset, n, seed, budget) for n in names]
    rows = [r for r in rows if r is not None]
    return sorted(rows, key=lambda r: -r["val"]["map@r"])


def candidates(book: Book, screen: Budget) -> Dict[str, tuple]:
    """The configurations of `select`, chosen on the screen's validation MAP@R."""
    gl = ranked(book, "glyphs", GROUP_SCREEN, 0, screen)[:GROUP_SELECT]
    out = {r["name"]: ("group", r["options"]) for r in gl}
    if gl:
        for suffix, extra in SELECT_VARIANTS.items():
            out[f"{gl[0]['name']}-{suffix}"] = ("group", dict(gl[0]["options"], **extra))
    tables = (
        (CE_SCREEN, "ce", 1),
        (TRIPLET_SCREEN, "triplet", TRIPLET_SELECT),
        (TRIPLET_RUST_SCREEN, "triplet-rust", TRIPLET_SELECT),
    )
    for table, family, top in tables:
        for r in ranked(book, "glyphs", table, 0, screen)[:top]:
            out[r["name"]] = (family, r["options"])
    return out


def winners(book: Book, screen: Budget, full: Budget) -> Dict[str, dict]:
    """The configuration of each family taken to `final`: the only candidate
    of its family, else the best at the full budget (seed 0, val)."""
    by_family: Dict[str, List[tuple]] = {}
    for name, (family, opts) in candidates(book, screen).items():
        by_family.setdefault(family, []).append((name, opts))
    best: Dict[str, dict] = {}
    for family, entries in by_family.items():
        if len(entries) == 1:
            best[family] = dict(name=entries[0][0], options=entries[0][1])
            continue
        rows = [book.get("glyphs", name, 0, full) for name, _ in entries]
        rows = [r for r in rows if r is not None]
        if rows:
            best[family] = max(rows, key=lambda r: r["val"]["map@r"])
    return best


# The trainer's families run in the torch loop by `calibration`.
CALIBRATED = ("ce", "group", "triplet-rust")


def torch_twin(name: str, family: str) -> Tuple[str, str]:
    """The name and family of a trainer configuration run in the torch loop."""
    if family == "triplet-rust":
        return name[: -len(RUST_SUFFIX)], "triplet"
    return name + "-torch", family + "-torch"


def spread(values: List[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def seed_summary(rows: List[dict], family: str) -> dict:
    return dict(
        family=family,
        loop=rows[0]["loop"],
        seeds=[r["seed"] for r in rows],
        options=rows[0]["options"],
        **{m: spread([r["test"][m] for r in rows]) for m in ("recall@1", "map@r", "nmi")},
        val_map_r=spread([r["val"]["map@r"] for r in rows]),
        images_per_s=statistics.mean(r["images_per_s"] for r in rows),
    )


def summarise(book: Book, args) -> dict:
    screen, full = args.screen_budget, args.budget
    summary: Dict[str, Any] = {
        "screen_budget": budget_name(screen),
        "budget": budget_name(full),
        "fashion_budget": budget_name(args.fashion_budget),
        "val_images": args.val_images,
        "screen": [],
        "select": [],
        "final": {},
        "fashion": {},
        "calibration": {},
    }
    tables = {**GROUP_SCREEN, **CE_SCREEN, **TRIPLET_SCREEN, **TRIPLET_RUST_SCREEN}
    for r in ranked(book, "glyphs", tables, 0, screen):
        summary["screen"].append(
            dict(
                name=r["name"],
                loop=r["loop"],
                val_map_r=r["val"]["map@r"],
                val_r1=r["val"]["recall@1"],
                options=r["options"],
            )
        )
    for name in candidates(book, screen):
        r = book.get("glyphs", name, 0, full)
        if r is not None:
            summary["select"].append(
                dict(
                    name=name,
                    loop=r["loop"],
                    val_map_r=r["val"]["map@r"],
                    val_r1=r["val"]["recall@1"],
                    best_epoch=r["best_epoch"],
                    val_history=r["val_history"],
                )
            )
    summary["select"].sort(key=lambda x: -x["val_map_r"])
    for family, w in winners(book, screen, full).items():
        pairs = (("glyphs", "final", full), ("fashion-mnist", "fashion", args.fashion_budget))
        for preset, key, budget in pairs:
            rows = book.all_seeds(preset, w["name"], budget)
            if rows:
                summary[key][w["name"]] = seed_summary(rows, family)
        if family in CALIBRATED:
            name, fam = torch_twin(w["name"], family)
            rows = book.all_seeds("glyphs", name, full)
            if rows:
                summary["calibration"][name] = seed_summary(rows, fam)
    return summary


def write_summary(summary: dict, out: pathlib.Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"## screen ({summary['screen_budget']}, seed 0, validation classes)",
        "",
        "| config | loop | val MAP@R | val R@1 |",
        "|---|---|---|---|",
    ]
    for r in summary["screen"]:
        lines.append(f"| {r['name']} | {r['loop']} | {r['val_map_r']:.4f} | {r['val_r1']:.4f} |")
    lines += [
        "",
        f"## full budget ({summary['budget']}), seed 0, validation classes",
        "",
        "| config | loop | val MAP@R | val R@1 | best epoch |",
        "|---|---|---|---|---|",
    ]
    for r in summary["select"]:
        lines.append(
            f"| {r['name']} | {r['loop']} | {r['val_map_r']:.4f} | {r['val_r1']:.4f} "
            f"| {r['best_epoch']} |"
        )
    titles = (
        ("final", "glyphs test classes"),
        ("fashion", "fashion-mnist test classes, no retuning"),
        ("calibration", "glyphs test classes, the trainer's winners in the torch loop"),
    )
    for key, title in titles:
        lines += [
            "",
            f"## {title} ({summary['fashion_budget' if key == 'fashion' else 'budget']}, "
            "mean ± std over seeds)",
            "",
            "| config | loop | seeds | R@1 | MAP@R | NMI |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in summary[key].items():
            cells = " | ".join(
                f"{r[m]['mean']:.4f} ± {r[m]['std']:.4f}" for m in ("recall@1", "map@r", "nmi")
            )
            lines.append(f"| {name} | {r['loop']} | {len(r['seeds'])} | {cells} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def parse_budget(text: str) -> Budget:
    epochs, _, steps = text.partition("x")
    return int(epochs), int(steps or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="screen,select,final,fashion,calibration")
    ap.add_argument("--out", default="benchmarks/results/quality")
    ap.add_argument("--runs", default="runs/quality", help="run folders of the Rust trainer")
    ap.add_argument(
        "--screen-budget",
        type=parse_budget,
        default=(1, 200),
        help="EPOCHSxSTEPS of the screen (STEPS 0: whole epochs)",
    )
    ap.add_argument(
        "--budget", type=parse_budget, default=(3, 0), help="EPOCHSxSTEPS of a select or final run"
    )
    ap.add_argument(
        "--fashion-budget",
        type=parse_budget,
        default=(1, 0),
        help="EPOCHSxSTEPS on fashion-mnist",
    )
    ap.add_argument("--val-images", type=int, default=2000, help="validation images (0: all)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fashion-seeds", default="0")
    ap.add_argument(
        "--calibration-seeds",
        default="0",
        help="seeds of CE and the Group Loss in the torch loop (compares the two loops)",
    )
    ap.add_argument(
        "--glyphs-root",
        default=os.environ.get("GLYPHS_ROOT"),
        help="the glyph benchmark (default: where Glyphs() finds it, $GROUPLOSS_DATA/glyphs)",
    )
    ap.add_argument("--fashion-root", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    book = Book(out)
    stages = args.stages.split(",")
    screen, full = args.screen_budget, args.budget
    log(machine.describe())
    log(
        f"torch {torch.__version__}, grouploss {grouploss.__version__}, stages {stages}, "
        f"screen {budget_name(screen)}, budget {budget_name(full)}, {args.val_images} val images"
    )

    if "screen" in stages:
        families = [
            ("group", GROUP_SCREEN),
            ("ce", CE_SCREEN),
            ("triplet", TRIPLET_SCREEN),
            ("triplet-rust", TRIPLET_RUST_SCREEN),
        ]
        for family, table in families:
            for name, opts in table.items():
                run_one(book, args, "screen", "glyphs", name, family, opts, 0, screen)
        write_summary(summarise(book, args), out)
    if "select" in stages:
        chosen = candidates(book, screen)
        families = [family for family, _ in chosen.values()]
        for name, (family, opts) in chosen.items():
            if families.count(family) > 1:
                run_one(book, args, "select", "glyphs", name, family, opts, 0, full)
        write_summary(summarise(book, args), out)
    if "final" in stages:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for family, w in winners(book, screen, full).items():
                run_one(book, args, "final", "glyphs", w["name"], family, w["options"], seed, full)
            write_summary(summarise(book, args), out)
    if "fashion" in stages:
        for seed in [int(s) for s in args.fashion_seeds.split(",")]:
            for family, w in winners(book, screen, full).items():
                # The preset's own P x K; the loss settings carry over.
                opts = {
                    k: v
                    for k, v in w["options"].items()
                    if k not in ("classes_per_batch", "samples_per_class")
                }
                fb = args.fashion_budget
                run_one(book, args, "fashion", "fashion-mnist", w["name"], family, opts, seed, fb)
        write_summary(summarise(book, args), out)
    if "calibration" in stages:
        # CE and the Group Loss winners in the PyTorch loop too (the Group
        # Loss as the `GroupLoss` module): every loss in the same loop.
        best = winners(book, screen, full)
        for seed in [int(s) for s in args.calibration_seeds.split(",")]:
            for family in CALIBRATED:
                if family in best:
                    w = best[family]
                    name, fam = torch_twin(w["name"], family)
                    opts = w["options"]
                    run_one(book, args, "calibration", "glyphs", name, fam, opts, seed, full)
        write_summary(summarise(book, args), out)
    log("done")
    print((out / "summary.md").read_text() if (out / "summary.md").exists() else "", end="")


if __name__ == "__main__":
    sys.exit(main())
