"""Trained models out of the library: plain PyTorch modules, TorchScript
and safetensors files.

>>> import grouploss
>>> run = grouploss.load_run("runs/glyphs-...")                 # doctest: +SKIP
>>> model = run.to_torch()            # a torch.nn.Module: images -> embeddings  # doctest: +SKIP
>>> grouploss.export.save(model, "model.pt", format="torchscript")  # doctest: +SKIP
>>> serving = torch.jit.load("model.pt")   # no grouploss needed   # doctest: +SKIP

A model takes images at the run's input size (``model.input_size``
square; a run on larger photos resizes the short side to
``description["input"]["resize"]`` and crops the centre first), ``uint8``
0-255 or floats in [0, 1], N x C x H x W, and returns the embeddings
that ``grouploss embed`` gives for those images.

Formats:

- ``"torchscript"``: one file with the pixel normalisation, backbone and
  embedding layer, loadable by ``torch.jit.load`` (in Python without
  grouploss, or in C++) and servable as is. The description is stored
  beside it as the extra file ``grouploss.json``.
- ``"safetensors"``: the module's state dict (nothing executable), the
  description in the file's metadata; :func:`load` rebuilds the module.
  The ResNets' keys are torchvision's, under ``backbone.``. A run whose
  backbone is a TorchScript file (``torchscript:PATH``) exports as
  TorchScript only: :func:`load` refuses to rebuild it from a path written
  in a file's metadata.
"""

from __future__ import annotations

import json
import os
import pathlib
import zipfile
from typing import Dict, Union

import torch

from ._files import replaced
from .models import EmbeddingModel, embedding_model

__all__ = ["FORMATS", "load", "save"]

PathLike = Union[str, os.PathLike]
FORMATS = ("torchscript", "safetensors")
_METADATA_KEY = "grouploss"
_EXTRA_FILE = "grouploss.json"


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    return format


def save(model: EmbeddingModel, path: PathLike, *, format: str = "torchscript") -> pathlib.Path:
    """Writes ``model`` (from ``RunModel.to_torch()`` or :func:`load`) to
    ``path`` as ``format`` (``"torchscript"`` or ``"safetensors"``),
    through a temporary file renamed at the end: a crash leaves the old
    file or the new one, never a partial one (a killed process may leave
    its ``.NAME.tmp-PID-XXXXXXXX`` beside it). Returns the path."""
    _check_format(format)
    if not isinstance(model, EmbeddingModel):
        raise TypeError(f"model: expected a grouploss EmbeddingModel, got {type(model).__name__}")
    path = pathlib.Path(path)
    text = json.dumps(model.description, sort_keys=True)
    was_training = model.training
    try:
        model.eval()
        with replaced(path) as tmp:
            if format == "torchscript":
                scripted = torch.jit.script(model)
                torch.jit.save(scripted, str(tmp), _extra_files={_EXTRA_FILE: text})
            else:
                from safetensors.torch import save_file

                state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                save_file(state, str(tmp), metadata={_METADATA_KEY: text, "format": "pt"})
    finally:
        model.train(was_training)
    return path


def load(path: PathLike, *, format: str = "safetensors") -> torch.nn.Module:
    """Reads a model written by :func:`save`: an :class:`EmbeddingModel`
    from ``"safetensors"`` (rebuilt from its description; no code is read
    from the file), or the ``torch.jit`` module of ``"torchscript"``.

    The default is the format that cannot run code, so a TorchScript file
    (what :func:`save` writes by default) needs ``format="torchscript"``;
    handed to the default, it is a ``ValueError`` saying so."""
    _check_format(format)
    path = pathlib.Path(path)
    if format == "torchscript":
        if path.is_dir():
            raise ValueError(f"path: {path} is a folder; expected a TorchScript file")
        if not path.is_file():
            raise FileNotFoundError(f"path: {path}: no such file")
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"path: {path} is not a TorchScript archive ({first})") from None
    from safetensors import SafetensorError, safe_open

    with open(path, "rb") as raw:
        is_zip = raw.read(4) == b"PK\x03\x04"
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                scripted = any("/code/" in name for name in archive.namelist())
        except zipfile.BadZipFile as e:
            raise ValueError(f"path: {path} is a damaged zip archive ({e})") from None
        if scripted:
            raise ValueError(
                f"path: {path} is a TorchScript archive (save's default format), not "
                "safetensors; load it with format='torchscript' (it holds a program: "
                "only from a source you trust)"
            )
        raise ValueError(f"path: {path} is a zip archive (torch.save's?), not safetensors")
    try:
        f = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ValueError(f"path: {path} is not a safetensors file ({e})") from None
    with f:
        metadata = f.metadata() or {}
        if _METADATA_KEY not in metadata:
            raise ValueError(f"path: {path} is not a model written by grouploss.export.save")
        state: Dict[str, torch.Tensor] = {k: f.get_tensor(k) for k in f.keys()}
    try:
        description = json.loads(metadata[_METADATA_KEY])
        backbone = str(description.get("backbone", ""))
    except (ValueError, AttributeError) as e:
        raise ValueError(f"path: {path} holds a damaged model description ({e})") from None
    if backbone.startswith("torchscript:"):
        # Rebuilding it would load (and run) the program its metadata names.
        raise ValueError(
            f"path: {path} holds a TorchScript backbone ({description['backbone']}); "
            "export such a run with format='torchscript'"
        )
    try:
        return embedding_model(description, state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"path: {path} holds a model that does not rebuild ({type(e).__name__}: {e})"
        ) from None
