"""The Rust trainer learns exactly as a plain PyTorch loop does.

Each case runs ``grouploss.train`` and, beside it, the loop a PyTorch user
writes: ``torch.nn`` modules with the trainer's initial weights
(``grouploss.models.initial_state_dict``), ``torch.optim`` and its
schedulers, ``grouploss.functional.group_loss`` on the classifier's logits,
fed the same batches (the library's sampler and loader with the run's seed).
The losses of every step (the trainer's ``steps.tsv``) and the weights at
the end (``checkpoints/last.safetensors``) must agree within float32
rounding, for every optimizer with and without weight decay and for every
schedule, the release's reload of the best weights included.
"""

from __future__ import annotations

import csv
import pathlib
from typing import Dict, List, Optional

import pytest
import torch
from data_fixtures import make_glyph_like, tiny_run
from safetensors.torch import load_file
from torch import nn

import grouploss
from grouploss import ClassBalancedBatchSampler, datasets, metrics
from grouploss import functional as F
from grouploss.data import Loader, small_transform
from grouploss.models import initial_state_dict
from grouploss.training import group_loss_options

EPOCHS, STEPS = 3, 8  # 24 optimizer steps a case
BASE = tiny_run(
    preset="glyphs",
    epochs=EPOCHS,
    max_steps_per_epoch=STEPS,
    embedding_size=16,
    normalization="none",
    pad_jitter=2,
    split_seed=0,
    select_max_images=0,
    select_metric="map@r",
    eval_batch_size=64,
    seed=3,
    lr=1e-3,
    backbone_lr=5e-4,
    weight_decay=0.0,
    schedule="constant",
)
# The Group Loss's settings in the group cases (the other losses refuse them).
GROUP = dict(classifier="linear", temperature=10.0, num_anchors=1, similarity_power=2.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_glyph_like(tmp_path_factory.mktemp("glyphs"), train_classes=10, per=16)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, momentum: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out, momentum=momentum)


class ConvNet(nn.Module):
    """The trainer's ``convnet`` in ``torch.nn``, under the trainer's names."""

    def __init__(self, momentum: float) -> None:
        super().__init__()
        widths = (1, 32, 64, 128)
        self.blocks = nn.ModuleList(Block(widths[i], widths[i + 1], momentum) for i in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = torch.relu(block.bn(block.conv(x)))
            if i < 2:
                x = nn.functional.max_pool2d(x, 2)
        return x.mean(dim=(2, 3))


class CosineClassifier(nn.Module):
    """Normalised softmax's classifier: ``scale * cos(e, w_c)``."""

    def __init__(self, dim: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.scale = scale

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        norm = nn.functional.normalize
        return norm(e, dim=1) @ norm(self.weight, dim=1).T * self.scale


class Net(nn.Module):
    def __init__(self, cfg: dict, num_classes: int) -> None:
        super().__init__()
        dim = cfg["embedding_size"]
        self.backbone = ConvNet(cfg["bn_momentum"])
        self.embed = nn.Linear(128, dim)
        if cfg["classifier"] == "cosine":
            self.classifier = CosineClassifier(dim, num_classes, cfg["classifier_scale"])
        else:
            self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor):
        e = self.embed(self.backbone(x))
        return e, self.classifier(e)


def torch_optimizer(cfg: dict, model: Net) -> torch.optim.Optimizer:
    backbone = list(model.backbone.parameters())
    head = list(model.embed.parameters()) + list(model.classifier.parameters())
    groups = [
        {"params": backbone, "lr": cfg["backbone_lr"] or cfg["lr"]},
        {"params": head, "lr": cfg["lr"]},
    ]
    wd = cfg["weight_decay"]
    kind = cfg["optimizer"]
    if kind == "adam":
        return torch.optim.Adam(groups, weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(groups, weight_decay=wd)
    if kind == "radam":
        return torch.optim.RAdam(groups, weight_decay=wd, decoupled_weight_decay=True)
    return torch.optim.SGD(groups, momentum=cfg["momentum"], weight_decay=wd)


def torch_scheduler(cfg: dict, opt: torch.optim.Optimizer):
    """The schedule as a per-step ``torch.optim.lr_scheduler``; None for
    ``step``, which the loop carries out itself (the release's reload)."""
    kind, steps = cfg["schedule"], cfg["max_steps_per_epoch"]
    total = cfg["epochs"] * steps
    if kind == "multistep":
        milestones = [(e - 1) * steps for e in cfg["lr_decay_epochs"]]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=cfg["lr_decay"])
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg["warmup_epochs"] > 0:
        warm = cfg["warmup_epochs"] * steps
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: max(s / warm, 1e-3) if s < warm else 1
        )
    return None


def validation_map_at_r(model: Net, val, transform) -> float:
    model.eval()
    with torch.no_grad():
        batches = [list(range(len(val)))]
        ((images, labels),) = list(Loader(val, batches, transform, num_threads=1))
        m = metrics.evaluate(model(images)[0], labels, include=("map@r",))
    model.train()
    return m["map@r"]


def nudge_by_one_ulp(model: nn.Module, g: torch.Generator) -> None:
    """Every floating-point weight and buffer moved by one float32 ulp,
    up or down (signs drawn from ``g``)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                sign = torch.randint(0, 2, t.shape, generator=g).to(t.dtype) * 2 - 1
                t.mul_(1 + sign * torch.finfo(torch.float32).eps)


def torch_setup(cfg: dict, root: pathlib.Path, state: Dict[str, torch.Tensor]):
    """The model with ``state`` loaded, the loader of the trainer's batches
    (the library's sampler and loader, the run's seed), the validation split
    and its transform."""
    kw = dict(val_fraction=cfg["val_fraction"], split_seed=cfg["split_seed"])
    train = datasets.Glyphs(root, "train", **kw)
    val = datasets.Glyphs(root, "val", **kw)
    model = Net(cfg, int(train.labels.max()) + 1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    size = int(train.load(0).shape[-1])
    sampler = ClassBalancedBatchSampler(
        train.labels, cfg["classes_per_batch"], cfg["samples_per_class"], seed=cfg["seed"]
    )
    train_tf = small_transform(size, pad=cfg["pad_jitter"])
    loader = Loader(train, sampler, train_tf, num_threads=1, seed=cfg["seed"])
    return model, loader, val, small_transform(size)


def initial_state(cfg: dict, root: pathlib.Path) -> Dict[str, torch.Tensor]:
    kw = dict(val_fraction=cfg["val_fraction"], split_seed=cfg["split_seed"])
    num_classes = int(datasets.Glyphs(root, "train", **kw).labels.max()) + 1
    return initial_state_dict(**cfg, in_channels=1, num_classes=num_classes)


def batch_loss(cfg: dict, model: Net, images, labels) -> torch.Tensor:
    emb, logits = model(images)
    if cfg["loss"] == "group":
        return F.group_loss(emb, labels, logits, group_loss_options(cfg))
    if cfg["loss"] == "softmax":
        return nn.functional.cross_entropy(logits, labels)
    return F.triplet_margin_loss(emb, labels, margin=cfg["triplet_margin"])


def torch_loop(cfg: dict, root: pathlib.Path, nudge: int = 0) -> dict:
    """The loop a PyTorch user writes, from the trainer's first weights
    (``nudge`` > 0: every weight moved by one ulp at the start and after
    every step, signs drawn with that seed: a loop that rounds differently,
    to measure how much the trajectory itself amplifies rounding)."""
    model, loader, val, val_tf = torch_setup(cfg, root, initial_state(cfg, root))
    noise = torch.Generator().manual_seed(nudge) if nudge else None
    if noise is not None:
        nudge_by_one_ulp(model, noise)
    opt = torch_optimizer(cfg, model)
    sched = torch_scheduler(cfg, opt)
    losses: List[float] = []
    best: Optional[tuple] = None
    reloads: Dict[int, int] = {}
    for epoch in range(cfg["epochs"]):
        if cfg["schedule"] == "step" and epoch + 1 in cfg["lr_decay_epochs"]:
            # The release: the best weights so far, lr0 * decay, the
            # optimizer's state kept.
            assert best is not None
            model.load_state_dict(best[2])
            reloads[epoch + 1] = best[0]
            for group, base in zip(opt.param_groups, (cfg["backbone_lr"], cfg["lr"])):
                group["lr"] = base * cfg["lr_decay"]
        loader.set_epoch(epoch)
        for step, (images, labels) in enumerate(loader):
            if step >= cfg["max_steps_per_epoch"]:
                break
            loss = batch_loss(cfg, model, images, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if noise is not None:
                nudge_by_one_ulp(model, noise)
            losses.append(loss.item())
        value = validation_map_at_r(model, val, val_tf)
        if best is None or value > best[1]:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = (epoch + 1, value, state)
    return {"losses": losses, "state": model.state_dict(), "reloads": reloads}


def first_batch_loss(cfg: dict, root: pathlib.Path, state: dict, epoch: int) -> float:
    """The loss of weights ``state`` on the first batch of ``epoch`` (1-based)."""
    model, loader, _, _ = torch_setup(cfg, root, state)
    loader.set_epoch(epoch - 1)
    images, labels = next(iter(loader))
    with torch.no_grad():
        return batch_loss(cfg, model, images, labels).item()


def trainer_run(cfg: dict, out: pathlib.Path) -> dict:
    res = grouploss.train(out_dir=str(out), plots=False, **cfg)
    with open(out / "steps.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    last = load_file(str(out / "checkpoints" / "last.safetensors"))
    state = {k[len("model.") :]: v for k, v in last.items() if k.startswith("model.")}
    reloads = {
        h["epoch"]: h["reloaded_best_epoch"]
        for h in res.history
        if h.get("reloaded_best_epoch") is not None
    }
    return {"rows": rows, "state": state, "reloads": reloads}


CASES = {
    "adam": dict(optimizer="adam"),
    "adam-wd": dict(optimizer="adam", weight_decay=1e-2),
    "adamw": dict(optimizer="adamw"),
    "adamw-wd": dict(optimizer="adamw", weight_decay=1e-2),
    "radam": dict(optimizer="radam"),
    "radam-wd": dict(optimizer="radam", weight_decay=1e-2),
    "sgd": dict(optimizer="sgd", lr=1e-2, backbone_lr=5e-3),
    "sgd-wd": dict(optimizer="sgd", lr=1e-2, backbone_lr=5e-3, weight_decay=1e-2),
    "multistep": dict(optimizer="adam", schedule="multistep", lr_decay_epochs=[2, 3]),
    "cosine": dict(optimizer="adam", schedule="cosine"),
    "warmup": dict(optimizer="adam", warmup_epochs=1.5),
    # 4 epochs, reloads at 3 and 4: the best epoch is 2 both times, so the
    # reload at 4 throws epoch 3's training away (seed 4 on this data).
    "release-step": dict(
        optimizer="radam",
        lr=1e-2,
        backbone_lr=5e-3,
        weight_decay=1e-2,
        schedule="step",
        lr_decay_epochs=[3, 4],
        epochs=4,
        seed=4,
    ),
    "softmax": dict(optimizer="adam", loss="softmax", classifier="cosine"),
    "triplet": dict(optimizer="adam", loss="triplet", triplet_margin=0.1),
}


def resolved(case: dict) -> dict:
    opts = {**BASE, **case}
    preset = opts.pop("preset")
    full = grouploss.training.resolve_config(preset, **opts)
    return {**full, "preset": preset}


def relative_weight_differences(a: dict, b: dict) -> Dict[str, float]:
    """Per tensor: max |a - b| over max |b| (at least 1e-3)."""
    out = {}
    for key, t in b.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert a[key].shape == t.shape, key
        out[key] = (a[key] - t).abs().max().item() / max(t.abs().max().item(), 1e-3)
    return out


# Float32 tolerance on a trajectory. The two loops round differently (tch's
# Linear is a matmul plus a bias, torch's an addmm; the Group Loss's backward
# is closed form here, autograd there; the optimizers' formulas are the same
# but not fused the same): a few ulps a step. Where a trajectory is stable
# that is all (FLOOR); where it is not (Adam turning a near-zero gradient's
# rounding into a full lr step, a ReLU or max-pool switching), any rounding
# grows, in PyTorch itself. So each case also runs the torch loop with every
# weight moved by one ulp at the start and after every step (four draws: a
# trajectory near a branch takes it in some draws and not others), and the
# trainer may differ from the torch loop by at most GROWTH times what those
# runs differ by, up to that step for the losses.
LOSS_FLOOR_ABS, LOSS_FLOOR_REL, WEIGHT_FLOOR, GROWTH = 1e-6, 4e-6, 2e-5, 3.0
NUDGE_SEEDS = (1, 2, 3, 4)


@pytest.mark.parametrize("name", list(CASES))
def test_the_trainer_steps_as_a_plain_pytorch_loop(name, root, tmp_path):
    case = CASES[name]
    group = GROUP if case.get("loss", "group") == "group" else {}
    opts = {**BASE, **group, **case, "data_root": str(root)}
    cfg = resolved(opts)
    ours = trainer_run(opts, tmp_path / "run")
    theirs = torch_loop(cfg, root)
    nudged = [torch_loop(cfg, root, nudge=s) for s in NUDGE_SEEDS]

    got = [float(r["loss"]) for r in ours["rows"]]
    want = theirs["losses"]
    assert len(got) == cfg["epochs"] * STEPS == len(want)
    envelope = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        envelope = max([envelope] + [abs(n["losses"][i] - b) for n in nudged])
        tol = LOSS_FLOOR_ABS + LOSS_FLOOR_REL * abs(b) + GROWTH * envelope
        assert abs(a - b) <= tol, f"step {i + 1}: {a} vs torch {b} (tolerance {tol:.2e})"

    # Per tensor: the noisiest tensor (a BatchNorm bias, 10% in some cases)
    # must not set the tolerance of the others (~1e-3 typically), though a
    # tensor whose own draws happened to agree gets a tenth of the largest.
    spreads = [relative_weight_differences(n["state"], theirs["state"]) for n in nudged]
    largest = max(max(s.values()) for s in spreads)
    for key, diff in relative_weight_differences(ours["state"], theirs["state"]).items():
        tol = WEIGHT_FLOOR + GROWTH * max(max(s[key] for s in spreads), largest / 10)
        assert diff <= tol, f"{key}: relative difference {diff:.2e} (tolerance {tol:.2e})"
    # The release's reloads chose the same epochs in both loops.
    assert ours["reloads"] == theirs["reloads"]


def test_the_release_schedule_reloads_the_best_weights_at_lr0_times_decay(root, tmp_path):
    """`schedule = "step"`: at each listed epoch the best weights so far are
    reloaded and lr = lr0 * lr_decay, the same value both times."""
    opts = {**BASE, **GROUP, **CASES["release-step"], "data_root": str(root)}
    cfg = resolved(opts)
    out = tmp_path / "run"
    ours = trainer_run(opts, out)
    lrs = {(int(r["epoch"]), float(r["lr"]), float(r["backbone_lr"])) for r in ours["rows"]}
    assert lrs == {(1, 1e-2, 5e-3), (2, 1e-2, 5e-3), (3, 1e-3, 5e-4), (4, 1e-3, 5e-4)}
    # Epoch 2 stays the best: the reload at 4 is not the weights epoch 3 left.
    assert ours["reloads"] == {3: 2, 4: 2}
    # The first step of epochs 3 and 4 starts from the best checkpoint: its
    # loss is that of the best checkpoint's weights on that batch.
    best = load_file(str(out / "checkpoints" / "best.safetensors"))
    state = {k[len("model.") :]: v for k, v in best.items() if k.startswith("model.")}
    first = {int(r["epoch"]): float(r["loss"]) for r in ours["rows"] if int(r["step"]) == 1}
    for epoch in (3, 4):
        want = first_batch_loss(cfg, root, state, epoch)
        assert abs(first[epoch] - want) <= 1e-6 + 4e-6 * abs(want), (epoch, first[epoch], want)
