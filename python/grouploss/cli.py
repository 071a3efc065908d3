"""The ``grouploss`` command.

    grouploss train [--preset P] [--config FILE] [--OPTION VALUE ...] [--resume RUN_DIR]
                    [--nproc-per-node N]
    grouploss evaluate RUN_DIR [--split test]
    grouploss embed RUN_DIR --data SPLIT|FOLDER --out embeddings.npy
    grouploss report RUN_DIR [--out report.html] [--queries 8] [--k 8] ...

Every option of a run has the same name here (``--data-root``), in TOML
files (``data_root``) and as a Python keyword (``data_root``).

``grouploss train --nproc-per-node N`` trains data-parallel on N processes
of this machine (it launches ``torchrun --standalone``); under ``torchrun``
(``torchrun ... -m grouploss.cli train ...``, several machines included)
every process is a rank of one run. See :mod:`grouploss.distributed`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import List, Optional, Sequence

from . import training


def _option_parser(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per configuration key, typed by its default."""
    defaults = training.resolve_config("fashion-mnist")
    group = parser.add_argument_group("run options (override the preset)")
    for key, value in sorted(defaults.items()):
        if key == "preset":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(value, list):
            group.add_argument(
                flag,
                dest=key,
                default=None,
                metavar="A,B,...",
                type=lambda s: [int(x) for x in s.split(",") if x.strip()],
            )
        elif isinstance(value, int):
            group.add_argument(flag, dest=key, type=int, default=None)
        elif isinstance(value, float):
            group.add_argument(flag, dest=key, type=float, default=None)
        else:
            group.add_argument(flag, dest=key, default=None)
    # Options whose default is unset are absent from the TOML: add them.
    for key in ("data_root", "out_dir", "pretrained"):
        if key not in defaults:
            group.add_argument("--" + key.replace("_", "-"), dest=key, default=None)
    if "split_seed" not in defaults:
        group.add_argument("--split-seed", dest="split_seed", type=int, default=None)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="grouploss", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (the Rust training loop)")
    t.add_argument("--preset", choices=training.PRESETS, default=None)
    t.add_argument("--config", type=pathlib.Path, help="a TOML file of options")
    t.add_argument("--resume", type=pathlib.Path, help="continue an interrupted run folder")
    t.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    t.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="train data-parallel on N processes of this machine (launches torchrun)",
    )
    _option_parser(t)

    e = sub.add_parser("evaluate", help="evaluate a run's best model")
    e.add_argument("run_dir", type=pathlib.Path)
    e.add_argument("--split", default="test")
    e.add_argument("--device", default="auto")
    e.add_argument("--checkpoint", default="best", choices=("best", "last"))

    m = sub.add_parser("embed", help="write embeddings of a split or an image folder")
    m.add_argument("run_dir", type=pathlib.Path)
    m.add_argument("--data", required=True, help="a split name of the run's dataset, or a folder")
    m.add_argument("--out", required=True, type=pathlib.Path, help="embeddings .npy")
    m.add_argument("--device", default="auto")

    r = sub.add_parser("report", help="write RUN_DIR/report.html")
    r.add_argument("run_dir", type=pathlib.Path)
    r.add_argument("--out", type=pathlib.Path, help="default RUN_DIR/report.html")
    r.add_argument("--split", default="test")
    r.add_argument("--checkpoint", default="best", choices=("best", "last"))
    r.add_argument("--device", default="auto")
    r.add_argument("--data-root", type=pathlib.Path, help="the dataset, if it moved")
    r.add_argument("--queries", type=int, default=8, help="rows of the galleries")
    r.add_argument("--k", type=int, default=8, help="neighbours per query")
    r.add_argument("--max-points", type=int, default=1000, help="points of the t-SNE map")
    r.add_argument("--seed", type=int, default=0)
    return ap


def _print_metrics(title: str, metrics: dict) -> None:
    print(title)
    for k, v in metrics.items():
        if k != "left_out":
            print(f"  {k:<12} {v:.4f}")


def _without_nproc(argv: Sequence[str]) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def _launch(nproc: int, argv: Sequence[str]) -> None:
    """Becomes ``torchrun --standalone --nproc-per-node N -m grouploss.cli
    ARGS`` (exec, so that Ctrl-C and the exit status go straight to it)."""
    from . import distributed

    if distributed.launched_by_torchrun():
        raise SystemExit("grouploss: --nproc-per-node under torchrun; give it to torchrun alone")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "grouploss.cli", *_without_nproc(argv)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "train":
        if args.nproc_per_node is not None:
            if args.nproc_per_node < 1:
                raise SystemExit(f"--nproc-per-node: expected N >= 1, got {args.nproc_per_node}")
            if args.nproc_per_node > 1:
                _launch(args.nproc_per_node, argv)
        reserved = {"command", "preset", "config", "resume", "quiet", "nproc_per_node"}
        options = {k: v for k, v in vars(args).items() if k not in reserved and v is not None}
        if args.quiet:
            options["progress"] = False
        # Every rank of a data-parallel run gets the result; rank 0 reports.
        report = int(os.environ.get("RANK", "0")) == 0
        try:
            result = training.train(args.preset, config=args.config, resume=args.resume, **options)
        except KeyboardInterrupt:
            if report:
                print("\ninterrupted: checkpoints/last.safetensors saved; resume with --resume")
            return 130
        if not report:
            return 0
        _print_metrics(
            f"test metrics of the best epoch ({result.best_epoch}, selected on "
            f"{result.summary['selected_on']}):",
            result.test,
        )
        if result.ensemble_test:
            _print_metrics("test metrics of the ensemble:", result.ensemble_test)
        print(f"run folder: {result.run_dir}")
        return 0
    if args.command == "evaluate":
        model = training.load_run(args.run_dir, checkpoint=args.checkpoint, device=args.device)
        metrics = model.evaluate(args.split)
        _print_metrics(f"{args.split} metrics of {args.run_dir}:", metrics)
        print(json.dumps(metrics))
        return 0
    if args.command == "embed":
        import numpy as np

        model = training.load_run(args.run_dir, device=args.device)
        data = pathlib.Path(args.data)
        if data.is_dir():
            from .datasets import ImageFolder

            emb, labels = model.embed(ImageFolder(data, split="all"))
        else:
            emb, labels = model.embed(args.data)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, emb.cpu().numpy())
        labels_out = args.out.with_name(args.out.stem + "_labels.npy")
        np.save(labels_out, labels.cpu().numpy())
        print(f"{tuple(emb.shape)} embeddings -> {args.out}, labels -> {labels_out}")
        return 0
    if args.command == "report":
        from .report import report

        print(
            report(
                args.run_dir,
                out=args.out,
                split=args.split,
                checkpoint=args.checkpoint,
                device=args.device,
                data_root=args.data_root,
                max_points=args.max_points,
                queries=args.queries,
                k=args.k,
                seed=args.seed,
            )
        )
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
