"""Training runs driven by the Rust core, and trained models loaded back.

>>> import grouploss
>>> result = grouploss.train(preset="glyphs", epochs=1)   # doctest: +SKIP
>>> result.test["recall@1"], result.run_dir                # doctest: +SKIP
>>> model = grouploss.load_run(result.run_dir)              # doctest: +SKIP
>>> emb, labels = model.embed_split("test")                 # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Tuple, Union

import torch

from . import _extras, _native, distributed
from ._args import boolean
from ._files import replaced

if TYPE_CHECKING:
    from .models import EmbeddingModel

PathLike = Union[str, pathlib.Path]

__all__ = [
    "LOSS_OPTIONS",
    "group_loss_options",
    "PRESETS",
    "RunModel",
    "TrainResult",
    "load_run",
    "resolve_config",
    "train",
]

PRESETS: tuple = tuple(_native.presets())
#: For each ``loss`` the trainer runs, the options that it reads and some
#: other loss does not; setting one of them away from the preset's value with
#: another loss is refused.
LOSS_OPTIONS: Dict[str, Tuple[str, ...]] = {
    loss: tuple(keys) for loss, keys in _native.loss_options()
}


def group_loss_options(config: dict) -> _native.GroupLossOptions:
    """The Group Loss's options of a run's configuration, built by the Rust
    core as the trainer builds them (before its warm-up; the trainer seeds
    random anchors per epoch, these draw per call):
    ``functional.group_loss(emb, labels, logits, group_loss_options(cfg))``
    is the loss that run trained."""
    return _native.group_loss_options(config)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: the run folder (``config.toml``, ``input.json``,
            ``metrics.jsonl``, ``summary.json``, ``checkpoints/``, plots).
        history: one dict per epoch: ``epoch``, ``train_loss``,
            ``images_per_s``, ``lr``, and the selection split's metrics under
            ``"val"`` (or ``"test"`` with ``select_on="test"``).
        best_epoch: the 1-based epoch whose weights were kept.
        test: test metrics of the best epoch: ``recall@K``, ``map@r``,
            ``r_precision``, ``nmi``.
        ensemble_test: test metrics of the naive ensemble (``ensemble > 1``).
        summary: the whole ``summary.json``.
    """

    run_dir: pathlib.Path
    history: list
    best_epoch: int
    test: dict
    ensemble_test: Optional[dict]
    summary: dict


def resolve_config(
    preset: Optional[str] = None, config: Optional[PathLike] = None, **options: Any
) -> dict:
    """The full configuration of a run: ``preset`` (else the config file's
    ``preset`` key, else ``fashion-mnist``), then the TOML file ``config``,
    then ``options``. Unknown options raise ``ValueError`` naming them."""
    return _native.resolve_config(preset, None if config is None else str(config), options)


def _nothing_to_undo() -> None:
    pass


def _convert_pt(cfg: dict, run_dir: pathlib.Path) -> Tuple[dict, Callable[[], None]]:
    """A ``.pt``/``.pth`` state dict is read with ``weights_only=True`` (so it
    cannot run code) and handed to the Rust core as safetensors, written
    into the run folder as ``pretrained.safetensors``; with the function
    that removes it (and the folders made for it) should the run not
    start. A ``pretrained.safetensors`` already there with other weights
    (another run's, a file of the user's) is refused, never replaced."""
    path = cfg.get("pretrained")
    if not path or pathlib.Path(path).suffix not in (".pt", ".pth", ".bin"):
        return cfg, _nothing_to_undo
    from safetensors.torch import load_file, save_file

    tensors = _read_state_dict(path)
    out = run_dir / "pretrained.safetensors"
    cfg = dict(cfg, pretrained=str(out))
    if out.exists():
        old = load_file(str(out))
        if old.keys() == tensors.keys() and all(torch.equal(old[k], tensors[k]) for k in old):
            return cfg, _nothing_to_undo
        raise ValueError(
            f"pretrained: {out} exists with other weights than {path}'s (another run's, or "
            "a file put there); give another out_dir"
        )
    had_config = (run_dir / "config.toml").exists()
    made = next((d for d in reversed([run_dir, *run_dir.parents]) if not d.exists()), None)
    with replaced(out) as tmp:
        save_file(tensors, str(tmp))

    def undo() -> None:
        if not had_config and (run_dir / "config.toml").exists():
            return  # the run started: it claimed the folder
        out.unlink(missing_ok=True)
        folder = run_dir
        while made is not None and folder != made.parent:
            try:
                folder.rmdir()
            except OSError:  # not empty: kept
                return
            folder = folder.parent

    return cfg, undo


def _read_state_dict(path) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.pt`` state dict (or of its ``"state_dict"``),
    loaded with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # missing, a folder, unreadable: said as such
        raise
    except Exception as e:  # torch's message advises weights_only=False: not here
        raise ValueError(
            f"pretrained: {path} is not a state dict that loads without running code "
            f"(torch.load(weights_only=True) raised {type(e).__name__})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained: {path} holds a {type(state).__name__}, not a state dict")
    return {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}


def train(
    preset: Optional[str] = None,
    *,
    config: Optional[PathLike] = None,
    resume: Optional[PathLike] = None,
    plots: bool = True,
    **options: Any,
) -> TrainResult:
    """Runs a whole training in the Rust core (GIL released): the dataset's
    class-disjoint splits, P x K sampling, the threaded loader, the network,
    GroupLoss, the optimizer and schedule, evaluation of the validation classes
    every epoch with the best epoch kept, and the test metrics of that epoch.

    Args:
        preset: ``fashion-mnist`` (default), ``glyphs``, ``cub200``,
            ``cars196``, ``sop`` or ``inshop``.
        config: a TOML file of options (the same names as the keywords).
        resume: a run folder to continue, with its own configuration:
            ``config`` is refused, and options given beside it must have
            the run's values (a ``ValueError`` names one that differs),
            except ``progress``, ``num_workers``, ``prefetch`` and
            ``data_root`` (for data that moved: the run's ``input.json``
            checks that it is the same data).
        plots: write ``loss.png`` and ``metrics.png`` into the run folder
            (with the ``report`` extra; without it they are skipped with one
            line on stderr saying how to install it).
        **options: any option, e.g. ``epochs=3``, ``data_root=...``,
            ``out_dir=...``, ``device="cuda"``, ``temperature=10.0``; see
            ``grouploss train --help``.

    Ctrl-C saves ``checkpoints/last.safetensors`` and raises
    ``KeyboardInterrupt``; ``train(resume=run_dir)`` continues from there.

    Data-parallel: in a process started by ``torchrun --nproc-per-node N``
    (or with an initialised ``torch.distributed`` default group) this
    process is one rank of the run; see :mod:`grouploss.distributed`. Rank 0
    resolves the configuration and alone writes the run folder; every rank
    returns the same :class:`TrainResult`.
    """
    plots = boolean("plots", plots)
    with distributed.process_group() as group:
        if group is None:
            cfg, run_dir, undo = _prepare(preset, config, resume, options)
            with _undone_on_error(undo):
                out = _native.train_run(cfg, str(run_dir))
        else:
            cfg, run_dir, undo = _prepare_on_rank_0(group, preset, config, resume, options)
            device = distributed.rank_device(cfg.get("device", "auto"))
            with _undone_on_error(undo), distributed.deferred_keyboard_interrupt():
                out = _native.train_run(cfg, str(run_dir), group, device)
    result = TrainResult(
        run_dir=pathlib.Path(out["run_dir"]),
        history=out["history"],
        best_epoch=out["best_epoch"],
        test=out["test"],
        ensemble_test=out["ensemble_test"],
        summary=out["summary"],
    )
    if plots and (group is None or group.rank == 0):
        write_plots(result.run_dir, result.history, cfg.get("select_on", "val"))
    return result


@contextlib.contextmanager
def _undone_on_error(undo: Callable[[], None]) -> Iterator[None]:
    """Runs ``undo`` if the block raises (Ctrl-C included), then re-raises:
    a run that could not start leaves no folder behind."""
    try:
        yield
    except BaseException:
        undo()
        raise


def _prepare(preset, config, resume, options) -> tuple:
    """The configuration and run folder of a new or resumed run, and what
    removes the files written for it (see :func:`_convert_pt`)."""
    if resume is not None:
        run_dir = pathlib.Path(resume)
        cfg_path = run_dir / "config.toml"
        if not cfg_path.exists():
            raise FileNotFoundError(f"resume: {cfg_path} does not exist (not a run folder)")
        _check_resume_options(run_dir, preset, config, options)
        # Options that change the results are refused by the trainer when
        # they differ from the run's (naming them); those that only change
        # how it is carried out (progress, num_workers, prefetch) and where
        # the data is (data_root) apply.
        options = {k: v for k, v in options.items() if k != "out_dir"}
        cfg = _native.resolve_config(None, str(cfg_path), options)
        if preset is not None and preset != cfg["preset"]:
            raise ValueError(
                f"preset: expected {cfg['preset']!r}, the preset of the run in {run_dir} "
                f"(a run folder keeps its configuration), got {preset!r}"
            )
    else:
        cfg = resolve_config(preset, config, **options)
        run_dir = pathlib.Path(cfg.get("out_dir") or _native.default_run_dir(cfg))
        cfg["out_dir"] = str(run_dir)
        cfg, undo = _convert_pt(cfg, run_dir)
        return cfg, run_dir, undo
    return cfg, run_dir, _nothing_to_undo


def _check_resume_options(run_dir: pathlib.Path, preset, config, options) -> None:
    """What a resume cannot take: a configuration file (the run folder's
    ``config.toml`` is the run's), another folder to write in."""
    if config is not None:
        raise ValueError(
            f"config: a resumed run takes its configuration from {run_dir / 'config.toml'}; "
            "give options beside resume only with the run's values"
        )
    out_dir = options.get("out_dir")
    if out_dir is not None and pathlib.Path(out_dir).resolve() != run_dir.resolve():
        raise ValueError(
            f"out_dir: expected the resumed folder {run_dir} (a resumed run stays in its "
            f"folder), got {out_dir}"
        )


def _prepare_on_rank_0(group, preset, config, resume, options) -> tuple:
    """Rank 0's :func:`_prepare`, shared with the other ranks (which may
    not see the run folder), or its error raised on every rank; the undo
    is rank 0's alone."""
    if group.rank == 0:
        try:
            cfg, run_dir, undo = _prepare(preset, config, resume, options)
        except Exception as e:
            distributed.broadcast_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        distributed.broadcast_text(json.dumps({"config": cfg, "run_dir": str(run_dir)}))
        return cfg, run_dir, undo
    got = json.loads(distributed.broadcast_text(None))
    if "error" in got:
        raise distributed.RankZeroFailed(f"rank 0 could not start the run: {got['error']}")
    return got["config"], pathlib.Path(got["run_dir"]), _nothing_to_undo


def write_plots(run_dir: PathLike, history: list, split: str = "val") -> bool:
    """Writes ``loss.png`` and ``metrics.png`` of a run and returns True;
    without the ``report`` extra, prints one line on stderr saying how to
    get them and returns False (the run itself is complete either way)."""
    if _extras.missing("report"):
        print(
            f"grouploss: loss.png and metrics.png skipped: {_extras.hint('report')}",
            file=sys.stderr,
        )
        return False
    from . import plots

    plt = plots._plt()
    run_dir = pathlib.Path(run_dir)
    for fig in (
        plots.loss_curve(history, run_dir / "loss.png"),
        plots.metric_curves(history, split, run_dir / "metrics.png"),
    ):
        plt.close(fig)
    return True


class RunModel:
    """A trained model loaded from its run folder (see :func:`load_run`)."""

    def __init__(
        self,
        run_dir: PathLike,
        checkpoint: str = "best",
        device: str = "auto",
        *,
        trust_torchscript: bool = False,
    ):
        self.run_dir = pathlib.Path(run_dir)
        trust = boolean("trust_torchscript", trust_torchscript)
        # Checked on the configuration the loader itself reads.
        self._native = _native.RunModel(str(self.run_dir), checkpoint, device, trust)
        self.config: dict = self._native.config
        #: The Group Loss's options the run trained with (before its warm-up).
        self.loss_options: _native.GroupLossOptions = self._native.loss_options

    def __repr__(self) -> str:
        c = self.config
        return f"RunModel({str(self.run_dir)!r}, {c['dataset']}, {c['backbone']})"

    @property
    def history(self) -> list:
        """The per-epoch records of ``metrics.jsonl`` (of the first model,
        ``model-0/``, in an ensemble, as :attr:`TrainResult.history`)."""
        folder = self.run_dir / "model-0" if self.config["ensemble"] > 1 else self.run_dir
        path = folder / "metrics.jsonl"
        lines = path.read_text().splitlines()
        return [_json_record(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]

    @property
    def summary(self) -> dict:
        """The run's ``summary.json`` (written when the run finished)."""
        path = self.run_dir / "summary.json"
        return _json_record(path, None, path.read_text())

    def embed(self, images: torch.Tensor, *, root: Optional[PathLike] = None) -> torch.Tensor:
        """Embeddings of a tensor of images N x C x H x W (uint8: the run's
        evaluation transform is applied; float: taken as transformed).

        A split name or a dataset (0.x) still works, returning
        ``(embeddings, labels)`` with a ``FutureWarning``: use
        :meth:`embed_split` and :meth:`embed_dataset`.
        """
        if isinstance(images, torch.Tensor):
            return self._native.embed(images)
        if isinstance(images, str) or getattr(images, "_native", None) is not None:
            new = "embed_split" if isinstance(images, str) else "embed_dataset"
            warnings.warn(
                f"RunModel.embed: a split name or a dataset is deprecated here, use "
                f"RunModel.{new} (embed takes images and returns a tensor); the old form "
                "goes in the next release",
                FutureWarning,
                stacklevel=2,
            )
            if isinstance(images, str):
                return self.embed_split(images, root=root)
            return self.embed_dataset(images)
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")

    def embed_split(
        self, split: str, *, root: Optional[PathLike] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings, labels)`` of a split of the run's dataset:
        ``"train"``, ``"val"``, ``"test"``, ``"query"``, ``"gallery"`` or
        ``"all"`` (``root``: the dataset's folder, if it moved)."""
        if not isinstance(split, str):
            raise TypeError(f"split: expected a str, got {type(split).__name__}")
        return self._native.embed_split(split, None if root is None else str(root))

    def dataset(self, split: str = "test", *, root: Optional[PathLike] = None):
        """The ``split`` of the run's dataset, opened as the run opened it
        (its order and labels are those of :meth:`embed_split`); ``root``:
        the dataset's folder, if it moved."""
        from .datasets import run_dataset

        return run_dataset(self.config, split, root=root)

    def embed_dataset(self, dataset) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings, labels)`` of a ``grouploss.datasets`` dataset."""
        native = getattr(dataset, "_native", None)
        if native is None or not hasattr(native, "labels"):
            raise TypeError(
                f"dataset: expected a grouploss.datasets dataset, got {type(dataset).__name__}"
            )
        return self._native.embed_dataset(native)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Classifier logits (N x training classes) of embeddings returned by
        :meth:`embed`: with the batch's labels, they give the Group Loss prior
        ``softmax(logits / temperature)`` of that batch. Columns follow the
        labels of the run's training split."""
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings: expected a torch.Tensor, got {type(embeddings).__name__}")
        return self._native.logits(embeddings)

    def evaluate(self, split: str = "test") -> dict:
        """Recall@K, MAP@R, R-Precision and NMI of ``split``."""
        return self._native.evaluate(split)

    @property
    def input_spec(self) -> dict:
        """What the network reads: ``channels``, ``size`` (square),
        ``geometry`` (``"pad_crop"``: images pass at ``size``;
        ``"resize_center_crop"``: short side resized to ``resize``, then the
        central crop) and the pixel normalisation, per channel ``(v[source_
        channels[c]] / scale - mean[c]) / std[c]`` for 8-bit values."""
        return self._native.input_spec

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The network's weights and BatchNorm statistics as CPU copies,
        keyed as the trainer's (``backbone.*``, ``embed.*``, ``classifier.*``)."""
        return self._native.state_dict()

    def to_torch(self) -> EmbeddingModel:
        """The network as a plain ``torch.nn.Module`` on the CPU, in
        evaluation mode, with the run's weights: images at the run's input
        size to their embeddings, ``uint8`` images to those :meth:`embed`
        gives for them. It also takes floats in [0, 1] (``x / 255``), which
        it normalises as it does ``uint8`` (:meth:`embed` takes a float
        tensor as normalised already). The ResNets carry torchvision's parameter names under
        ``backbone.``; train it further in your own loop, or save it with
        :func:`grouploss.export.save`."""
        from . import models

        c = self.config
        description = {
            "backbone": c["backbone"],
            "bn_momentum": c["bn_momentum"],
            "normalize_embeddings": c["normalize_embeddings"],
            "input": self.input_spec,
        }
        return models.embedding_model(description, self.state_dict())

    def export(self, path: PathLike, *, format: str = "torchscript") -> pathlib.Path:
        """Writes :meth:`to_torch`'s module to ``path`` (``"torchscript"``
        or ``"safetensors"``; see :mod:`grouploss.export`)."""
        from . import export

        export._check_format(format)
        return export.save(self.to_torch(), path, format=format)


def _json_record(path: pathlib.Path, line: Optional[int], text: str) -> dict:
    """A JSON object of a run's file, or a ValueError naming the file (and
    line) that does not hold one."""
    where = f"{path}" if line is None else f"{path}, line {line}"
    try:
        record = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def load_run(
    run_dir: PathLike,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    trust_torchscript: bool = False,
) -> RunModel:
    """The model of a finished (or interrupted: ``checkpoint="last"``) run.

    A run on a ``torchscript:PATH`` backbone names a program, which runs
    as the run loads: such a run is refused unless ``trust_torchscript=True``
    (``--trust-torchscript`` on the command line), so that a run folder
    from elsewhere cannot run code by being opened. The other backbones
    are built from weights alone (safetensors)."""
    return RunModel(run_dir, checkpoint, device, trust_torchscript=trust_torchscript)
