"""The networks the trainer builds, seen from Python.

>>> from grouploss.models import initial_state_dict
>>> sd = initial_state_dict("glyphs", in_channels=1, num_classes=10)  # doctest: +SKIP
>>> sd["backbone.blocks.0.conv.weight"].shape  # doctest: +SKIP
torch.Size([32, 1, 3, 3])

Every layer starts as its PyTorch counterpart does: convolutions, linear
layers and BatchNorm as ``torch.nn.Conv2d``, ``torch.nn.Linear`` and
``torch.nn.BatchNorm2d`` construct them, and the ResNets as torchvision's
``resnet18()`` / ``resnet50()`` (same names, without ``fc``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from . import _native, training

__all__ = ["initial_state_dict"]


def initial_state_dict(
    preset: Optional[str] = None,
    *,
    in_channels: int,
    num_classes: int,
    member: int = 0,
    **options: Any,
) -> Dict[str, torch.Tensor]:
    """The weights a run starts from, before any ``pretrained`` weights are
    loaded: every parameter and BatchNorm running statistic of the network of
    ensemble member ``member``, as CPU tensors (copies).

    The configuration is resolved as :func:`grouploss.training.resolve_config`
    does (``preset``, then ``config=`` a TOML file, then ``options`` such as
    ``backbone``, ``embedding_size``, ``classifier``, ``bn_momentum`` or
    ``seed``). ``in_channels`` is the channels of the dataset's images (1
    grey, 3 colour) and ``num_classes`` its training classes. torch is seeded
    with ``seed + member`` as the trainer seeds it, so the result is the
    trainer's first weights, and the same for the same arguments.

    Keys: ``backbone.*`` (torchvision's names for the ResNets, the Caffe
    port's for BN-Inception, ``blocks.{i}.conv`` / ``blocks.{i}.bn`` for the
    convnet), ``embed.weight`` / ``embed.bias`` (absent when the embedding is
    the backbone's feature), ``classifier.weight`` and, for the linear
    classifier, ``classifier.bias``. BatchNorm layers have no
    ``num_batches_tracked``.
    """
    cfg = training.resolve_config(preset, **options)
    return _native.initial_state_dict(cfg, in_channels, num_classes, member)
