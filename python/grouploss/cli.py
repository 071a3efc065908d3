"""The ``grouploss`` command.

    grouploss train [--preset P] [--config FILE] [--OPTION VALUE ...] [--resume RUN_DIR]
                    [--nproc-per-node N]
    grouploss evaluate RUN_DIR [--split test]
    grouploss embed RUN_DIR --data SPLIT|FOLDER --out embeddings.npy
    grouploss export RUN_DIR --format torchscript|safetensors --out FILE
    grouploss index RUN_DIR --data SPLIT|FOLDER --out gallery.safetensors
    grouploss search RUN_DIR|INDEX IMAGES... [--k 10] [--gallery SPLIT|FOLDER] [--run RUN_DIR]
    grouploss report RUN_DIR [--out report.html] [--queries 8] [--k 8] ...
    grouploss datasets build glyphs [--root DIR] [--fonts DIR ...]

Every option of a run has the same name here (``--data-root``), in TOML
files (``data_root``) and as a Python keyword (``data_root``).

``grouploss train --nproc-per-node N`` trains data-parallel on N processes
of this machine (it launches ``torchrun --standalone``); under ``torchrun``
(``torchrun ... -m grouploss.cli train ...``, several machines included)
every process is a rank of one run. See :mod:`grouploss.distributed`.

Errors are one line on stderr, ``grouploss: error: <message>``, with exit
status 2 for a wrong command line and 1 otherwise; ``--debug`` (or
``GROUPLOSS_DEBUG=1``) shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import threading
import time
from typing import List, Optional, Sequence

from . import _native, training
from ._files import replaced_together


def _existing(text: str) -> pathlib.Path:
    """An argparse type: a path that exists."""
    path = pathlib.Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return path


def _file_out(text: str) -> pathlib.Path:
    """An argparse type: a file to write (not an existing folder)."""
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file to write")
    return path


def _at_least(low: int, high: Optional[int] = None):
    """An argparse type: an integer >= ``low`` (and <= ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"expected an integer <= {high}, got {value}")
        return value

    return parse


def _option_parser(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per configuration key, typed by its default."""
    defaults = training.resolve_config("fashion-mnist")
    # The descriptions are the doc comments of the options' Rust fields.
    docs = {k: v.replace("%", "%%").replace("`", "") for k, v in _native.option_docs()}
    group = parser.add_argument_group(
        "run options (override the preset; the fashion-mnist preset's value in brackets)"
    )
    for key, value in sorted(defaults.items()):
        if key == "preset" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        kw = dict(dest=key, default=None, help=f"{docs[key]} [{shown}]")
        if isinstance(value, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(value, list):
            group.add_argument(
                flag,
                metavar="A,B,...",
                type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                **kw,
            )
        elif isinstance(value, int):
            group.add_argument(flag, type=int, **kw)
        elif isinstance(value, float):
            group.add_argument(flag, type=float, **kw)
        else:
            group.add_argument(flag, **kw)
    # Options unset by default (None): typed here.
    for key, kind in (
        ("data_root", _existing),
        ("out_dir", None),
        ("pretrained", _existing),
        ("split_seed", int),
    ):
        flag = "--" + key.replace("_", "-")
        group.add_argument(flag, dest=key, type=kind, default=None, help=docs[key])


DEBUG_ENV = "GROUPLOSS_DEBUG"
# The pid of the process that started the ranks of `--nproc-per-node`.
LAUNCHER_ENV = "GROUPLOSS_LAUNCHER_PID"


class UsageError(Exception):
    """A wrong command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _debug_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's absent flag keeps the main parser's value.
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"on an error, show the Python traceback (or set {DEBUG_ENV}=1)",
    )


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="grouploss",
        description=__doc__.splitlines()[0],
        epilog="Errors are one line, 'grouploss: error: ...' (exit status 2 for a wrong "
        f"command line, 1 otherwise); --debug or {DEBUG_ENV}=1 shows the traceback.",
    )
    _debug_option(ap)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parsers = [
        _train_parser(sub),
        _evaluate_parser(sub),
        _embed_parser(sub),
        _export_parser(sub),
        _index_parser(sub),
        _search_parser(sub),
        _report_parser(sub),
        *_datasets_parser(sub),
    ]
    for p in parsers:
        _debug_option(p)
    return ap


def _train_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="train a model (the Rust training loop)")
    t.add_argument("--preset", choices=training.PRESETS, default=None)
    t.add_argument("--config", type=_existing, help="a TOML file of options")
    # Not checked here: under torchrun only rank 0 needs to see the folder.
    t.add_argument(
        "--resume",
        type=pathlib.Path,
        help="continue an interrupted run folder (other options must have the run's values, "
        "except --num-workers, --prefetch, --quiet and --data-root; not with --config)",
    )
    t.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    t.add_argument(
        "--nproc-per-node",
        type=_at_least(1),
        default=None,
        metavar="N",
        help="train data-parallel on N processes of this machine (runs torchrun)",
    )
    _option_parser(t)
    return t


def _model_options(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """Which of a run's models (``--checkpoint``), where it runs, and
    whether a TorchScript backbone may load."""
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    if device:
        parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--trust-torchscript",
        action="store_true",
        help="load a run on a torchscript: backbone (a program, which runs as it loads)",
    )


def _evaluate_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("evaluate", help="evaluate a run's best model")
    e.add_argument("run_dir", type=_existing)
    e.add_argument("--split", default="test", choices=SPLITS)
    _model_options(e)
    return e


def _embed_parser(sub) -> argparse.ArgumentParser:
    m = sub.add_parser("embed", help="write embeddings of a split or an image folder")
    m.add_argument("run_dir", type=_existing)
    m.add_argument("--data", required=True, help="a split name of the run's dataset, or a folder")
    m.add_argument(
        "--out", required=True, type=_file_out, help="embeddings .npy (the suffix is added)"
    )
    _model_options(m)
    return m


def _export_parser(sub) -> argparse.ArgumentParser:
    from .export import FORMATS

    x = sub.add_parser(
        "export",
        help="write a run's model as TorchScript or safetensors",
        description="Writes the run's network (pixel normalisation, backbone, embedding "
        "layer) as one file: TorchScript, loadable by torch.jit.load without grouploss, "
        "or safetensors, read back by grouploss.export.load.",
    )
    x.add_argument("run_dir", type=_existing)
    x.add_argument("--format", required=True, choices=FORMATS)
    x.add_argument("--out", required=True, type=_file_out, help="the file to write")
    _model_options(x, device=False)
    return x


def _index_parser(sub) -> argparse.ArgumentParser:
    i = sub.add_parser(
        "index",
        help="embed a gallery with a run and save it as a search index",
        description="Embeds a split of the run's dataset or a folder of images and writes "
        "a grouploss.Index (safetensors): ids are the images' positions, labels their "
        "classes. Search it with 'grouploss search INDEX IMAGES... --run RUN_DIR'.",
    )
    i.add_argument("run_dir", type=_existing)
    i.add_argument("--data", required=True, help="a split name of the run's dataset, or a folder")
    i.add_argument("--out", required=True, type=_file_out, help="the index file to write")
    i.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    _model_options(i)
    return i


def _search_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "search",
        help="print the nearest gallery images of query images",
        description="Embeds IMAGES (JPEG or PNG files, or folders of them) with a run and "
        "prints each one's K nearest neighbours by cosine similarity: in a split of the "
        "run's dataset or a folder (--gallery, with a run folder), or in an index file "
        "written by 'grouploss index' (with --run RUN_DIR to embed the queries).",
    )
    s.add_argument("source", type=_existing, metavar="RUN_DIR|INDEX")
    s.add_argument("images", nargs="+", type=_existing, metavar="IMAGES")
    s.add_argument("--k", type=_at_least(1), default=10, help="neighbours per query")
    s.add_argument(
        "--gallery", default=None, help="with a run: a split name (default test) or a folder"
    )
    s.add_argument("--run", type=_existing, help="with an index: the run that embeds the queries")
    _model_options(s)
    return s


def _report_parser(sub) -> argparse.ArgumentParser:
    from .plots import TSNE_SEED_MAX
    from .report import MOST_THUMBNAILS as most

    r = sub.add_parser("report", help="write RUN_DIR/report.html")
    r.add_argument("run_dir", type=_existing)
    r.add_argument("--out", type=_file_out, help="default RUN_DIR/report.html")
    r.add_argument("--split", default="test", choices=SPLITS)
    _model_options(r)
    r.add_argument("--data-root", type=_existing, help="the dataset, if it moved")
    r.add_argument(
        "--queries", type=_at_least(1, most), default=8, help=f"rows of the galleries (<= {most})"
    )
    r.add_argument(
        "--k", type=_at_least(1, most), default=8, help=f"neighbours per query (<= {most})"
    )
    r.add_argument("--max-points", type=_at_least(3), default=1000, help="points of the t-SNE map")
    r.add_argument("--seed", type=_at_least(0, TSNE_SEED_MAX), default=0)
    return r


def _datasets_parser(sub) -> List[argparse.ArgumentParser]:
    d = sub.add_parser("datasets", help="build a dataset that is made, not downloaded")
    dsub = d.add_subparsers(dest="datasets_command", required=True, parser_class=_Parser)
    b = dsub.add_parser(
        "build",
        help="render the glyph benchmark from this machine's typefaces",
        description="Renders the glyph benchmark (284 character classes, 32 x 32 grey, "
        "the zero-shot split of its classes.tsv) from the typefaces installed on this "
        "machine. Needs pip install 'grouploss[glyphs]'.",
    )
    b.add_argument("name", choices=("glyphs",))
    b.add_argument(
        "--root",
        type=pathlib.Path,
        default=None,
        help="output folder (default: $GROUPLOSS_DATA/glyphs, else "
        "$XDG_DATA_HOME/grouploss/glyphs or ~/.local/share/grouploss/glyphs: where "
        "Glyphs() and --preset glyphs look)",
    )
    b.add_argument(
        "--fonts",
        type=_existing,
        action="append",
        default=None,
        metavar="DIR_OR_FILE",
        help="font files or folders to use (repeatable; default: the system's font folders)",
    )
    b.add_argument("--seed", type=_at_least(0), default=0, help="typefaces drawn, file order")
    b.add_argument("--max-train", type=_at_least(1), default=400, help="typefaces a train class")
    b.add_argument("--max-test", type=_at_least(1), default=50, help="typefaces a test class")
    b.add_argument("--force", action="store_true", help="replace a dataset already at --root")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    return [d, b]


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


def _stop_when_orphaned() -> None:
    """In a rank that ``--nproc-per-node`` started: Ctrl-C to itself once
    the launcher is gone (killed by SIGKILL, it cannot stop its ranks), so
    that the ranks agree on a step, save ``last`` and end, instead of
    training on unseen beside a ``--resume``."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher is None or str(os.getppid()) != launcher:
        return

    def watch() -> None:
        while str(os.getppid()) == launcher:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="grouploss-launcher-watch", daemon=True).start()


def _quiet_launcher_logs() -> None:
    """Silences the loggers of torch's elastic launcher (imported): each of
    its modules sets its own logger's level (from LOGLEVEL), which the
    parents' level does not override ("Received 2 death signal, shutting
    down workers" on Ctrl-C)."""
    import logging

    launcher = ("torch.distributed.elastic", "torch.distributed.run")
    for name in [*launcher, *logging.root.manager.loggerDict]:
        if name.startswith(launcher):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _launch(nproc: int, argv: Sequence[str], debug: bool) -> int:
    """Runs ``torchrun --standalone --nproc-per-node N -m grouploss.cli
    ARGS`` in this process and returns the run's exit status. Each rank
    reports its own error in one line; torchrun's own report of a failed
    child (a traceback) and its log lines are shown only with ``--debug``."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from . import distributed

    if distributed.launched_by_torchrun():
        raise UsageError("--nproc-per-node under torchrun; give it to torchrun alone")
    args = ["--standalone", f"--nproc-per-node={nproc}", "-m", "grouploss.cli"]
    args += _without_nproc(argv)
    if not debug:
        _quiet_launcher_logs()
    sys.stdout.flush()
    sys.stderr.flush()
    outer = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the ranks inherit it
    try:
        torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as e:
        if debug:
            raise
        return max(1, e.get_first_failure()[1].exitcode)
    except SignalException as e:
        if debug:
            raise
        return 128 + int(e.sigval)
    finally:
        if outer is None:
            os.environ.pop(LAUNCHER_ENV, None)
        else:
            os.environ[LAUNCHER_ENV] = outer
    return 0


def _train(args: argparse.Namespace, argv: Sequence[str], debug: bool) -> int:
    reserved = {"command", "preset", "config", "resume", "quiet", "nproc_per_node", "debug"}
    options = {k: v for k, v in vars(args).items() if k not in reserved and v is not None}
    if args.quiet:
        options["progress"] = False
    # Every rank of a data-parallel run gets the result; rank 0 reports.
    report = int(os.environ.get("RANK", "0")) == 0
    if args.resume is None:
        # The options are checked here, so that a mistake is a usage error
        # (and is caught before torchrun starts N processes).
        try:
            training.resolve_config(args.preset, config=args.config, **options)
        except ValueError as e:
            raise UsageError(str(e)) from e
    elif report and not (args.resume / "config.toml").exists():
        raise UsageError(f"--resume: {args.resume} is not a run folder (no config.toml)")
    if args.nproc_per_node is not None and args.nproc_per_node > 1:
        return _launch(args.nproc_per_node, argv, debug)
    _stop_when_orphaned()
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


def _evaluate(args: argparse.Namespace) -> int:
    model = _load_run(args, args.run_dir)
    metrics = model.evaluate(args.split)
    _print_metrics(f"{args.split} metrics of {args.run_dir}:", metrics)
    print(json.dumps(metrics))
    return 0


SPLITS = tuple(_native.SPLITS)


def _check_gallery(data: str, option: str) -> str:
    """``data`` when it is a split name or a folder (checked before a model
    is loaded); a usage error naming ``option`` otherwise."""
    if data not in SPLITS and not pathlib.Path(data).is_dir():
        raise UsageError(
            f"{option}: expected a split name ({', '.join(SPLITS)}) or a folder, got {data!r}"
        )
    return data


def _gallery(model: training.RunModel, data: str):
    """``(embeddings, labels, dataset)`` of a split name of the run's
    dataset (first) or an image folder (``./test`` for a folder named like
    a split), checked by :func:`_check_gallery`."""
    from .datasets import ImageFolder

    if data in SPLITS:
        dataset = model.dataset(data)
    else:
        dataset = ImageFolder(data, split="all")
    emb, labels = model.embed_dataset(dataset)
    return emb, labels, dataset


def _gallery_index(model: training.RunModel, data: str, dtype: str = "float32"):
    """``(index, dataset)``: :func:`_gallery`'s embeddings in a
    :class:`grouploss.Index` (ids their positions, labels their classes)."""
    from .index import Index

    emb, labels, dataset = _gallery(model, data)
    index = Index(emb.shape[1], dtype=dtype)
    index.add(emb, labels=labels)
    index.info = {
        WEIGHTS_KEY: _weights_sha256(model),
        CLASSES_KEY: json.dumps([str(c) for c in dataset.classes]),
    }
    return index, dataset


# `Index.info` keys `grouploss index` writes (src/eval/index.rs names them).
WEIGHTS_KEY, CLASSES_KEY = "grouploss.weights_sha256", "grouploss.class_names"


def _class_names(index) -> Optional[List[str]]:
    """The class names `grouploss index` recorded, or None (an index from
    elsewhere, or a record that is not a list of names: labels are then
    printed as numbers)."""
    try:
        names = json.loads(index.info.get(CLASSES_KEY, "null"))
    except ValueError:
        return None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    return None


def _weights_sha256(model: training.RunModel) -> str:
    """A SHA-256 of the embedding network's weights (names, dtypes, shapes
    and values of every tensor but the classifier's): equal for the best
    and last checkpoints of a run whose best epoch is its last."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(k for k in state if not k.startswith("classifier.")):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _embed(args: argparse.Namespace) -> int:
    import numpy as np

    data = _check_gallery(args.data, "--data")
    model = _load_run(args, args.run_dir)
    emb, labels, _ = _gallery(model, data)
    # np.save adds ".npy" to a name without it; the names printed are those written.
    out = args.out if args.out.suffix == ".npy" else args.out.with_name(args.out.name + ".npy")
    labels_out = out.with_name(out.stem + "_labels.npy")
    # Both or neither: a failed write leaves the old pair as it was.
    with replaced_together([out, labels_out]) as tmps:
        for tmp, values in zip(tmps, (emb, labels)):
            with open(tmp, "wb") as f:
                np.save(f, values.cpu().numpy())
    print(f"{tuple(emb.shape)} embeddings -> {out}, labels -> {labels_out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    model = _load_run(args, args.run_dir, device="cpu")
    path = model.export(args.out, format=args.format)
    print(f"{args.format} model of {args.run_dir} -> {path}")
    return 0


def _index(args: argparse.Namespace) -> int:
    data = _check_gallery(args.data, "--data")
    model = _load_run(args, args.run_dir)
    index, _ = _gallery_index(model, data, dtype=args.dtype)
    index.save(args.out)
    print(f"{len(index)} embeddings of {args.data} ({args.dtype}) -> {args.out}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from .datasets import ImageFiles
    from .index import Index

    if args.source.is_dir():
        if args.run is not None:
            raise UsageError("--run: only with an index file (RUN_DIR embeds the queries)")
        data = _check_gallery(args.gallery or "test", "--gallery")
        model = _load_run(args, args.source)
        index, gallery = _gallery_index(model, data)
    else:
        if args.run is None:
            raise UsageError("--run: needed with an index file, to embed the queries")
        if args.gallery is not None:
            raise UsageError("--gallery: only with a run folder (the index is the gallery)")
        model = _load_run(args, args.run)
        index, gallery = Index.load(args.source), None
        made_by = index.info.get(WEIGHTS_KEY)
        if made_by is not None and made_by != _weights_sha256(model):
            raise UsageError(
                f"--run: {args.run} ({args.checkpoint} checkpoint) is not the network that "
                f"embedded {args.source} (its weights differ): the queries must be embedded "
                "by the network that embedded the index"
            )
    queries = ImageFiles(args.images)
    q, _ = model.embed_dataset(queries)
    k = min(args.k, len(index))
    scores, ids = index.search(q.cpu().numpy(), k)
    _print_neighbours(queries, scores, ids, index, gallery)
    return 0


def _print_neighbours(queries, scores, ids, index, gallery) -> None:
    """Each query's path, then its neighbours: rank, similarity, id, label
    (the class name with a dataset gallery) and, with one, the image."""
    labels = index.labels
    ids_ = index.ids
    names = gallery.classes if gallery is not None else _class_names(index)
    if labels is not None and len(set(ids_.tolist())) < len(ids_):
        labels = None  # ids that repeat do not name one label
    where = {int(i): n for n, i in enumerate(ids_)} if labels is not None else {}
    for q in range(len(queries)):
        print(f"query {q}: {_shown(queries.path(q))}")
        for rank, (score, i) in enumerate(zip(scores[q], ids[q]), start=1):
            line = f"  {rank:>3}  {score:.4f}  id {int(i)}"
            if labels is not None:
                label = int(labels[where[int(i)]])
                named = names is not None and 0 <= label < len(names)
                line += f"  label {names[label] if named else label}"
            if gallery is not None:
                line += f"  {gallery.describe(int(i))}"
            print(line)


def _shown(path: str) -> str:
    """A path for the terminal: the bytes of a name that is not UTF-8 (held
    as surrogate escapes, which a UTF-8 stdout refuses) shown as U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _report(args: argparse.Namespace) -> int:
    from .report import report

    names = ("out", "split", "checkpoint", "device", "data_root", "max_points", "queries", "k")
    print(report(args.run_dir, **_pick(args, *names, "seed", "trust_torchscript")))
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from .datasets import build_glyphs

    names = ("fonts", "seed", "max_train", "max_test", "force")
    build_glyphs(args.root, **_pick(args, *names), progress=not args.quiet)
    return 0


def _load_run(args: argparse.Namespace, run_dir, device: Optional[str] = None):
    """The run's model as ``--checkpoint``, ``--device`` (or ``device``)
    and ``--trust-torchscript`` say."""
    return training.load_run(
        run_dir,
        checkpoint=args.checkpoint,
        device=device or args.device,
        trust_torchscript=args.trust_torchscript,
    )


def _pick(args: argparse.Namespace, *names: str) -> dict:
    """The parsed values of ``names``, as keyword arguments."""
    return {name: getattr(args, name) for name in names}


def _run(args: argparse.Namespace, argv: Sequence[str], debug: bool) -> int:
    if args.command == "train":
        return _train(args, argv, debug)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "embed":
        return _embed(args)
    if args.command == "export":
        return _export(args)
    if args.command == "index":
        return _index(args)
    if args.command == "search":
        return _search(args)
    if args.command == "report":
        return _report(args)
    if args.command == "datasets":
        return _datasets(args)
    raise UsageError(f"unknown command {args.command!r}")


def _error(message: str) -> None:
    """``grouploss: error: <message>`` as one line, written at once (the
    ranks of a run share stderr)."""
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    rank = os.environ.get("RANK")
    if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1":
        text = f"rank {rank}: {text}"
    sys.stderr.write(f"grouploss: error: {text}\n")
    sys.stderr.flush()


def _message(e: BaseException) -> str:
    """A user's error as its message; anything else with its type and a
    pointer to ``--debug``."""
    text = str(e) or type(e).__name__
    if isinstance(e, (ValueError, OSError, ImportError, RuntimeError)):
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            return f"{e.filename}: {e.strerror}"
        return text
    return f"{type(e).__name__}: {text} (--debug shows the traceback)"


def _debug_asked(argv: Sequence[str]) -> bool:
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return "--debug" in argv or value not in ("", "0", "false", "no", "off")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``grouploss`` command; returns its exit status."""
    from .distributed import RankZeroFailed

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_asked(argv)
    try:
        args = _parser().parse_args(argv)
        debug = debug or getattr(args, "debug", False)
        return _run(args, argv, debug)
    except UsageError as e:
        if debug:
            raise
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write("\ninterrupted\n")
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001  pyo3's PanicException is a BaseException
        if debug:
            raise
        if not isinstance(e, RankZeroFailed):  # rank 0 reports it
            _error(_message(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
