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

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _native, training
from ._args import integer

__all__ = [
    "BNInception",
    "ConvNet",
    "EmbeddingModel",
    "InputNormalization",
    "ResNet",
    "embedding_model",
    "initial_state_dict",
]


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


# ---- The networks as plain torch.nn modules (RunModel.to_torch, export)
#
# Each mirrors the Rust network of the same name layer for layer (src/model),
# so that a run's weights load under the same keys and give the same
# outputs; every module here is scriptable (torch.jit.script).


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, pad: int, bias: bool, momentum: float):
    return (
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, bias=bias),
        nn.BatchNorm2d(c_out, momentum=momentum),
    )


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, momentum: float) -> None:
        super().__init__()
        self.conv, self.bn = _conv_bn(c_in, c_out, 3, 1, 1, False, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ConvNet(nn.Module):
    """The ``convnet`` backbone: three conv-BN-ReLU blocks (32, 64, 128
    channels, the first two followed by 2 x 2 max pooling) and global
    average pooling (128 features). Keys ``blocks.{i}.conv``,
    ``blocks.{i}.bn``."""

    def __init__(self, in_channels: int = 1, *, bn_momentum: float = 0.1) -> None:
        super().__init__()
        widths = [in_channels, 32, 64, 128]
        self.blocks = nn.ModuleList(
            [_ConvBlock(widths[i], widths[i + 1], bn_momentum) for i in range(3)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < 2:
                x = F.max_pool2d(x, 2)
        return x.mean(dim=(2, 3))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, w: int, stride: int, momentum: float) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, w, 3, stride, 1, False, momentum)
        self.conv2, self.bn2 = _conv_bn(w, w, 3, 1, 1, False, momentum)
        self.downsample = _downsample(c_in, w, stride, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.downsample(x) + y)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, w: int, stride: int, momentum: float) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, w, 1, 1, 0, False, momentum)
        self.conv2, self.bn2 = _conv_bn(w, w, 3, stride, 1, False, momentum)
        self.conv3, self.bn3 = _conv_bn(w, 4 * w, 1, 1, 0, False, momentum)
        self.downsample = _downsample(c_in, 4 * w, stride, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(self.downsample(x) + y)


def _downsample(c_in: int, c_out: int, stride: int, momentum: float) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride, 0, False, momentum))


class ResNet(nn.Module):
    """torchvision's ResNet-18 (``depth=18``) or ResNet-50 (v1.5) up to its
    global average pooling, under torchvision's names, so that
    ``torchvision.models.resnet50().load_state_dict(backbone.state_dict(),
    strict=False)`` takes every key (only ``fc`` is missing)."""

    def __init__(self, depth: int = 50, *, bn_momentum: float = 0.1) -> None:
        super().__init__()
        if depth not in (18, 50):
            raise ValueError(f"depth: expected 18 or 50, got {depth!r}")
        block = _BasicBlock if depth == 18 else _Bottleneck
        counts = [2, 2, 2, 2] if depth == 18 else [3, 4, 6, 3]
        self.conv1, self.bn1 = _conv_bn(3, 64, 7, 2, 3, False, bn_momentum)
        c_in = 64
        for layer, n in enumerate(counts):
            w = 64 << layer
            blocks = []
            for b in range(n):
                stride = 2 if layer > 0 and b == 0 else 1
                blocks.append(block(c_in, w, stride, bn_momentum))
                c_in = w * block.expansion
            setattr(self, f"layer{layer + 1}", nn.Sequential(*blocks))
        self.features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class _ConvBnRelu(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, pad: int, momentum: float):
        super().__init__()
        self.conv, self.bn = _conv_bn(c_in, c_out, k, stride, pad, True, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _Inception(nn.Module):
    """One inception block; ``pool``: "avg" or "max" (3 x 3, stride 1, then a
    1 x 1 projection) or "max2" (3 x 3, stride 2, no projection)."""

    def __init__(self, c_in: int, widths: List[int], pool: str, proj: int, momentum: float):
        super().__init__()
        w1, r3, c3, dr, dc = widths
        stride = 2 if pool == "max2" else 1
        self.pool = pool
        self.has_one = w1 > 0
        self.one = _ConvBnRelu(c_in, w1, 1, 1, 0, momentum) if w1 > 0 else nn.Identity()
        self.reduce3 = _ConvBnRelu(c_in, r3, 1, 1, 0, momentum)
        self.conv3 = _ConvBnRelu(r3, c3, 3, stride, 1, momentum)
        self.dreduce = _ConvBnRelu(c_in, dr, 1, 1, 0, momentum)
        self.dconv1 = _ConvBnRelu(dr, dc, 3, 1, 1, momentum)
        self.dconv2 = _ConvBnRelu(dc, dc, 3, stride, 1, momentum)
        self.proj = _ConvBnRelu(c_in, proj, 1, 1, 0, momentum) if proj > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: List[torch.Tensor] = []
        if self.has_one:
            outs.append(self.one(x))
        outs.append(self.conv3(self.reduce3(x)))
        outs.append(self.dconv2(self.dconv1(self.dreduce(x))))
        if self.pool == "avg":
            pooled = F.avg_pool2d(x, 3, 1, 1, ceil_mode=True, count_include_pad=True)
        elif self.pool == "max":
            pooled = F.max_pool2d(x, 3, 1, 1, ceil_mode=True)
        else:
            pooled = F.max_pool2d(x, 3, 2, 0, ceil_mode=True)
        outs.append(self.proj(pooled))
        return torch.cat(outs, 1)


# (name, input channels, widths: 1x1, 3x3 reduce, 3x3, double reduce,
# double 3x3; pooling; projection), as src/model/bn_inception.rs.
_INCEPTION_BLOCKS = [
    ("inception_3a", 192, [64, 64, 64, 64, 96], "avg", 32),
    ("inception_3b", 256, [64, 64, 96, 64, 96], "avg", 64),
    ("inception_3c", 320, [0, 128, 160, 64, 96], "max2", 0),
    ("inception_4a", 576, [224, 64, 96, 96, 128], "avg", 128),
    ("inception_4b", 576, [192, 96, 128, 96, 128], "avg", 128),
    ("inception_4c", 576, [160, 128, 160, 128, 160], "avg", 128),
    ("inception_4d", 608, [96, 128, 192, 160, 192], "avg", 128),
    ("inception_4e", 608, [0, 128, 192, 192, 256], "max2", 0),
    ("inception_5a", 1056, [352, 192, 320, 160, 224], "avg", 128),
    ("inception_5b", 1024, [352, 192, 320, 192, 224], "max", 128),
]
# Branch attributes of _Inception and the Caffe port's suffixes.
_CAFFE_BRANCH = {
    "one": "1x1",
    "reduce3": "3x3_reduce",
    "conv3": "3x3",
    "dreduce": "double_3x3_reduce",
    "dconv1": "double_3x3_1",
    "dconv2": "double_3x3_2",
    "proj": "pool_proj",
}


_PYTHON_BRANCH = {v: k for k, v in _CAFFE_BRANCH.items()}


def _caffe_key(key: str) -> str:
    """``blocks.inception_3a.reduce3.bn.weight`` ->
    ``inception_3a_3x3_reduce_bn.weight``; ``conv1_7x7_s2.conv.weight`` ->
    ``conv1_7x7_s2.weight``."""
    parts = key.split(".")
    if parts[0] == "blocks":
        _, block, branch, layer, name = parts
        base = f"{block}_{_CAFFE_BRANCH[branch]}"
    else:
        base, layer, name = parts
    return f"{base}{'_bn' if layer == 'bn' else ''}.{name}"


def _python_key(key: str) -> str:
    """The inverse of :func:`_caffe_key`."""
    base, name = key.rsplit(".", 1)
    layer = "bn" if base.endswith("_bn") else "conv"
    base = base[: -len("_bn")] if layer == "bn" else base
    if base.startswith("inception_"):
        block, suffix = base[: len("inception_3a")], base[len("inception_3a_") :]
        return f"blocks.{block}.{_PYTHON_BRANCH[suffix]}.{layer}.{name}"
    return f"{base}.{layer}.{name}"


class BNInception(nn.Module):
    """BN-Inception (the paper's backbone) up to its global average pooling
    (1024 features), for Caffe-style input (BGR, 0-255, mean subtracted).
    Its state dict uses the Caffe port's flat names (``conv1_7x7_s2``,
    ``conv1_7x7_s2_bn``, ``inception_3a_1x1``, ...), as the trainer's."""

    def __init__(self, *, bn_momentum: float = 0.1) -> None:
        super().__init__()
        m = bn_momentum
        self.conv1_7x7_s2 = _ConvBnRelu(3, 64, 7, 2, 3, m)
        self.conv2_3x3_reduce = _ConvBnRelu(64, 64, 1, 1, 0, m)
        self.conv2_3x3 = _ConvBnRelu(64, 192, 3, 1, 1, m)
        self.blocks = nn.Sequential()
        for name, c_in, widths, pool, proj in _INCEPTION_BLOCKS:
            self.blocks.add_module(name, _Inception(c_in, widths, pool, proj, m))
        self._register_state_dict_hook(_to_caffe_keys)
        self._register_load_state_dict_pre_hook(_from_caffe_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1_7x7_s2(x), 3, 2, 0, ceil_mode=True)
        x = self.conv2_3x3(self.conv2_3x3_reduce(x))
        x = self.blocks(F.max_pool2d(x, 3, 2, 0, ceil_mode=True))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _to_caffe_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + _caffe_key(key[len(prefix) :])] = state_dict.pop(key)


def _from_caffe_keys(state_dict, prefix, *_args) -> None:
    # The Caffe names have one dot (layer.name); this module's have more.
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix) :].count(".") == 1:
            state_dict[prefix + _python_key(key[len(prefix) :])] = state_dict.pop(key)


class InputNormalization(nn.Module):
    """The run's pixel normalisation, as its evaluation transform computes
    it: output channel ``c`` is ``(v[source[c]] / scale - mean[c]) /
    std[c]`` for 8-bit values ``v``.

    Takes ``uint8`` images (N x C x H x W, 0-255: on the CPU the same values
    as the trainer's, bit for bit; on CUDA to float rounding) or floating
    images in [0, 1] (``v / 255``, as torchvision's ``ToTensor`` gives).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: float = 255.0,
        source_channels: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if len(mean) == 0:
            raise ValueError("mean: expected one value per channel, got none")
        if not all(math.isfinite(v) for v in mean):
            raise ValueError(f"mean: expected finite values, got {list(mean)}")
        if len(mean) != len(std):
            raise ValueError(f"std: expected {len(mean)} values (one per mean), got {len(std)}")
        if not all(math.isfinite(v) and v > 0 for v in std):
            raise ValueError(f"std: expected finite values > 0, got {list(std)}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a finite number > 0, got {scale}")
        source = (
            list(range(len(mean)))
            if source_channels is None
            else [integer("source_channels", c) for c in source_channels]
        )
        if len(source) != len(mean):
            raise ValueError(f"source_channels: expected {len(mean)} values, got {len(source)}")
        if not all(0 <= c < len(mean) for c in source):
            raise ValueError(
                f"source_channels: expected channel indices in [0, {len(mean)}), got {source}"
            )
        self.scale = float(scale)
        self.channels = len(mean)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))
        self.register_buffer("source", torch.tensor(source, dtype=torch.int64))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.size(1) != self.channels:
            raise ValueError(
                "images: expected N x "
                + str(self.channels)
                + " x H x W, got shape "
                + str(list(images.shape))
            )
        # In the module's dtype (float32 unless .half(), .double(), ...).
        if images.dtype == torch.uint8:
            x = images.to(self.mean.dtype) / self.scale
        elif images.is_floating_point():
            x = images.to(self.mean.dtype) * (255.0 / self.scale)
        else:
            # Other integers: 0-255 values would be read as 0-1 ones.
            raise ValueError(
                "images: expected uint8 values (0-255) or floating values (0-1), "
                "got another integer dtype"
            )
        x = x.index_select(1, self.source)
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class EmbeddingModel(nn.Module):
    """A trained network as a plain module: pixel normalisation, backbone,
    embedding layer and (if the run normalised them) L2-normalisation.

    ``forward(images)`` takes images at the run's input size (``uint8``
    0-255, or floats in [0, 1]; see :class:`InputNormalization`) and
    returns the embeddings the trainer would. It computes in the module's
    dtype (``.half()``, ``.to(torch.bfloat16)``), and takes other sizes
    too, for training further at them: unlike :meth:`RunModel.embed` it
    resizes nothing. Made by
    ``grouploss.load_run(RUN).to_torch()`` or :func:`grouploss.export.load`.

    Attributes:
        input_normalization: an :class:`InputNormalization`.
        backbone: :class:`ConvNet`, :class:`ResNet` (torchvision's names),
            :class:`BNInception` or the run's TorchScript module.
        embed: ``nn.Linear`` (features -> embedding), or ``nn.Identity``
            when the embedding is the backbone's feature.
        input_size: the height and width the run's images had.
        description: what :func:`grouploss.export.load` rebuilds it from.
    """

    def __init__(
        self,
        backbone: nn.Module,
        embed: nn.Module,
        input_normalization: InputNormalization,
        *,
        backbone_channels: int,
        normalize_embeddings: bool,
        input_size: int,
        description: Dict[str, Any],
    ) -> None:
        super().__init__()
        self.input_normalization = input_normalization
        self.backbone = backbone
        self.embed = embed
        c = input_normalization.channels
        self.repeat_to = backbone_channels if c == 1 and backbone_channels > 1 else 0
        self.normalize_embeddings = bool(normalize_embeddings)
        self.input_size = int(input_size)
        self.description = dict(description)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.input_normalization(images)
        if self.repeat_to > 0:
            x = x.expand(-1, self.repeat_to, -1, -1)
        e = self.embed(self.backbone(x).flatten(1))
        if self.normalize_embeddings:
            e = F.normalize(e, p=2.0, dim=1, eps=1e-12)
        return e


# Backbones and the channels they read (0: the images').
_BACKBONE_CHANNELS = {"convnet": 0, "resnet18": 3, "resnet50": 3, "bn_inception": 3}


def _backbone(name: str, in_channels: int, bn_momentum: float) -> nn.Module:
    if name == "convnet":
        return ConvNet(in_channels, bn_momentum=bn_momentum)
    if name in ("resnet18", "resnet50"):
        return ResNet(int(name[len("resnet") :]), bn_momentum=bn_momentum)
    if name == "bn_inception":
        return BNInception(bn_momentum=bn_momentum)
    if name.startswith("torchscript:"):
        return torch.jit.load(name[len("torchscript:") :], map_location="cpu")
    raise ValueError(
        f"backbone: expected convnet, resnet18, resnet50, bn_inception or torchscript:PATH, "
        f"got {name!r}"
    )


def embedding_model(description: Dict[str, Any], state_dict: Dict[str, torch.Tensor]):
    """An :class:`EmbeddingModel` built from ``description`` (``backbone``,
    ``bn_momentum``, ``normalize_embeddings`` and ``input``, a run's
    ``input_spec``) with the weights of ``state_dict`` (keyed as the trainer's
    checkpoint or as the module's own; ``classifier.*`` is left out).
    Every weight of the network must be there, and every key must be used."""
    spec = description["input"]
    name = str(description["backbone"])
    normalization = InputNormalization(
        spec["mean"], spec["std"], scale=spec["scale"], source_channels=spec["source_channels"]
    )
    # Checked before anything is built from it (a file's metadata says it).
    channels = spec["channels"]
    if channels not in (1, 3) or channels != normalization.channels:
        raise ValueError(
            f"description: expected 1 or 3 input channels, one per mean "
            f"({normalization.channels}), got {channels!r}"
        )
    backbone = _backbone(name, channels, float(description["bn_momentum"]))
    w = state_dict.get("embed.weight")
    embed = nn.Identity() if w is None else nn.Linear(w.shape[1], w.shape[0])
    model = EmbeddingModel(
        backbone,
        embed,
        normalization,
        backbone_channels=_BACKBONE_CHANNELS.get(name, 0),
        normalize_embeddings=bool(description["normalize_embeddings"]),
        input_size=int(spec["size"]),
        description=description,
    )
    weights = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Left as built: the normalisation (from `description`) and BatchNorm's
    # batch counter (unused with a momentum; the trainer's own networks keep
    # none, a TorchScript backbone's checkpoint has its own).
    missing = [
        k
        for k in missing
        if not (k.startswith("input_normalization.") or k.endswith(".num_batches_tracked"))
    ]
    if missing or unexpected:
        raise ValueError(
            f"state_dict: does not match the {name} network: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )
    return model.eval()
