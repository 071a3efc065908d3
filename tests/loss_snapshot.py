"""Bit-for-bit guard for refactoring the loss's kernels (not a test).

Computes the loss, its parts, the refined probabilities (and their
classes) and both gradients of one implementation over a grid of 480
batches (float64 and float32; four batch shapes, up to 256 rows; 1 to 3
iterations; 0, 1, 3 anchors per class or all rows anchors; every
similarity, sharpened or not; zero diagonal; batch classes only; either
weight 0), each with and without gradients and probabilities, and
compares two such snapshots exactly::

    python tests/loss_snapshot.py save before.pt --implementation fused_cpu
    # ... change the code, rebuild ...
    python tests/loss_snapshot.py save after.pt --implementation fused_cpu
    python tests/loss_snapshot.py compare before.pt after.pt

A change that only moves code keeps every value identical on the same
machine and thread count; one that reorders arithmetic does not, and then
the tolerance tests (tests/test_loss.py, the Rust `loss` tests) decide.
"""

from __future__ import annotations

import argparse
import sys

import torch

from grouploss import _native
from grouploss.functional import loss_options

#: (temperature, zero_diagonal, batch_classes_only, similarity, power,
#: gtg_weight, ce_weight)
OPTIONS = [
    (1.0, False, False, "correlation", 1.0, 1.0, 1.0),
    (24.0, True, False, "cosine", 2.0, 0.7, 0.0),
    (79.0, False, True, "gaussian", 4.5, 1.0, 1.3),
    (10.0, False, False, "correlation", 1.0, 0.0, 1.0),
    (10.0, False, True, "correlation", 1.0, 1.0, 1.0),
]
#: (n, P, K, classes, dims); the last is past the products' blocking
SHAPES = [(20, 4, 5, 11, 8), (54, 6, 9, 100, 64), (120, 30, 4, 300, 128), (256, 64, 4, 500, 64)]
#: Anchors per class: none, some, and 9 (every row an anchor)
ANCHORS = (0, 1, 3, 9)
#: (want_grads, want_probs)
WANTS = ((True, True), (False, True), (True, False))


OUTPUTS = ("loss", "nll", "ce", "probs", "classes", "grad_embeddings", "grad_logits")


def _batch(case: int, shape, kind: torch.dtype):
    n, p, k, m, d = shape
    g = torch.Generator().manual_seed(case)
    labels = torch.randperm(m, generator=g)[:p].repeat_interleave(k)
    labels = labels[torch.randperm(n, generator=g)]
    centres = torch.randn(m, d, generator=g, dtype=torch.float64)
    emb = centres[labels] + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    logits = 2 * torch.randn(n, m, generator=g, dtype=torch.float64)
    return emb.to(kind), labels, logits.to(kind)


def snapshot(implementation: str) -> dict:
    """``{(case, want_grads, want_probs): {output name: tensor}}`` over the
    grid."""
    torch.set_num_threads(2)
    out, case = {}, 0
    for kind in (torch.float64, torch.float32):
        for shape in SHAPES:
            for iters in (1, 2, 3):
                for anchors in ANCHORS:
                    for t, zd, bco, sim, power, gw, cw in OPTIONS:
                        case += 1
                        emb, labels, logits = _batch(case, shape, kind)
                        opts = loss_options(
                            None,
                            dict(
                                temperature=t,
                                num_anchors=anchors,
                                num_iters=iters,
                                zero_diagonal=zd,
                                batch_classes_only=bco,
                                similarity=sim,
                                similarity_power=power,
                                gtg_weight=gw,
                                ce_weight=cw,
                                sigma=3.0,
                            ),
                        )
                        for grads, probs in WANTS:
                            r = _native.group_loss(
                                emb,
                                labels,
                                logits,
                                want_grads=grads,
                                want_probs=probs,
                                options=opts,
                                seed=None,
                                num_classes=None,
                                implementation=implementation,
                            )
                            out[(case, grads, probs)] = {
                                a: getattr(r, a) for a in OUTPUTS if getattr(r, a) is not None
                            }
    return out


def differences(a: dict, b: dict) -> list:
    """``(case, output)`` pairs whose tensors are not identical."""
    if a.keys() != b.keys():
        return [("cases", sorted(a.keys() ^ b.keys()))]
    return [
        (case, name)
        for case in a
        for name in sorted(set(a[case]) | set(b[case]))
        if name not in a[case]
        or name not in b[case]
        or not torch.equal(a[case][name], b[case][name])
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save")
    save.add_argument("out")
    save.add_argument(
        "--implementation", default="fused_cpu", choices=("fused_cpu", "libtorch", "autograd")
    )
    compare = sub.add_parser("compare")
    compare.add_argument("before")
    compare.add_argument("after")
    args = parser.parse_args(argv)
    if args.command == "save":
        snap = snapshot(args.implementation)
        torch.save(snap, args.out)
        print(f"{len(snap)} calls ({args.implementation}) -> {args.out}")
        return 0
    a, b = (torch.load(p, weights_only=True) for p in (args.before, args.after))
    bad = differences(a, b)
    print(f"{len(a)} calls, {len(bad)} outputs differ" + (f": {bad[:10]}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
