"""grouploss.models: every layer the library builds starts as its PyTorch
counterpart does: torchvision's ResNets, and ``torch.nn.Conv2d``,
``torch.nn.BatchNorm2d`` and ``torch.nn.Linear`` for the rest.

Random tensors are compared with the PyTorch module's by their statistics
(mean, standard deviation, support, kurtosis, and a two-sample
Kolmogorov-Smirnov test), with tolerances from the number of draws;
constant ones (BatchNorm) must be equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import pytest
import torch

from grouploss import training
from grouploss.models import initial_state_dict

torchvision = pytest.importorskip("torchvision")

EMBED = 64
CLASSES = 10
CHANNELS = {"convnet": 1, "resnet18": 3, "resnet50": 3, "bn_inception": 3}
FEATURES = {"convnet": 128, "resnet18": 512, "resnet50": 2048, "bn_inception": 1024}
# The release's BN-Inception runs BatchNorm with momentum 0.9.
MOMENTUM = {"bn_inception": 0.9}


@dataclass
class Ref:
    """A tensor of a freshly built PyTorch module and the law it was drawn
    from: ``bound`` for PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    None for a normal law or a constant."""

    value: torch.Tensor
    bound: Optional[float] = None


def options(backbone: str, classifier: str) -> dict:
    opts = dict(backbone=backbone, embedding_size=EMBED, classifier=classifier)
    if backbone in MOMENTUM:
        opts["bn_momentum"] = MOMENTUM[backbone]
    return opts


def ours(backbone: str, classifier: str, **extra) -> Dict[str, torch.Tensor]:
    return initial_state_dict(
        "glyphs",
        in_channels=CHANNELS[backbone],
        num_classes=CLASSES,
        **options(backbone, classifier),
        **extra,
    )


def torch_default(module: torch.nn.Module, prefix: str) -> Dict[str, Ref]:
    """The state dict of a ``nn.Conv2d``, ``nn.Linear`` or ``nn.BatchNorm2d``;
    the bound of its uniform weight and bias (``fan_in`` of the weight)."""
    bound = None
    if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
        bound = 1 / math.sqrt(module.weight[0].numel())
    return {f"{prefix}.{k}": Ref(v, bound) for k, v in module.state_dict().items()}


def torchvision_resnet(backbone: str) -> Dict[str, Ref]:
    """torchvision's ResNet without its fc: normal convolutions."""
    net = getattr(torchvision.models, backbone)()
    return {f"backbone.{k}": Ref(v) for k, v in net.state_dict().items() if not k.startswith("fc.")}


def plain_layers(sd: Dict[str, torch.Tensor], momentum: float) -> Dict[str, Ref]:
    """A ``nn.BatchNorm2d`` for every BatchNorm of ``sd``'s backbone and a
    ``nn.Conv2d`` of the same shape for every convolution."""
    refs: Dict[str, Ref] = {}
    modules = sorted({k.rsplit(".", 1)[0] for k in sd if k.startswith("backbone.")})
    for m in modules:
        w = sd[f"{m}.weight"]
        if f"{m}.running_mean" in sd:
            layer = torch.nn.BatchNorm2d(w.shape[0], momentum=momentum)
        else:
            c_out, c_in, k, _ = w.shape
            layer = torch.nn.Conv2d(c_in, c_out, k, bias=f"{m}.bias" in sd)
        refs.update(torch_default(layer, m))
    return refs


def reference(backbone: str, classifier: str, sd: Dict[str, torch.Tensor]) -> Dict[str, Ref]:
    """The PyTorch modules our network's layers correspond to."""
    cfg = training.resolve_config("glyphs", **options(backbone, classifier))
    torch.manual_seed(0)
    if backbone.startswith("resnet"):
        refs = torchvision_resnet(backbone)
    else:
        refs = plain_layers(sd, cfg["bn_momentum"])
    refs.update(torch_default(torch.nn.Linear(FEATURES[backbone], EMBED), "embed"))
    cls = torch.nn.Linear(EMBED, CLASSES, bias=classifier == "linear")
    refs.update(torch_default(cls, "classifier"))
    return refs


def ks_statistic(x: torch.Tensor, y: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between
    the empirical distribution functions."""
    x, y = x.flatten().sort().values, y.flatten().sort().values
    both = torch.cat([x, y])
    fx = torch.searchsorted(x, both, right=True) / x.numel()
    fy = torch.searchsorted(y, both, right=True) / y.numel()
    return float((fx - fy).abs().max())


def kurtosis(x: torch.Tensor) -> float:
    """E[(x - mu)^4] / sigma^4: 1.8 for a uniform law, 3 for a normal one."""
    c = x - x.mean()
    return float((c**4).mean() / (c**2).mean() ** 2)


def compare(name: str, x: torch.Tensor, ref: Ref) -> List[str]:
    """What tells ``x`` from the PyTorch module's tensor (empty: nothing)."""
    y = ref.value
    if x.shape != y.shape or x.dtype != y.dtype:
        return [f"{name}: {x.dtype} {tuple(x.shape)}, PyTorch {y.dtype} {tuple(y.shape)}"]
    if bool((y == y.flatten()[0]).all()):
        return [] if torch.equal(x, y) else [f"{name}: not the constant {y.flatten()[0]}"]
    x, y, n = x.double(), y.double(), x.numel()
    problems = []
    # The means: 5 standard errors of their difference.
    se = math.sqrt((x.var() + y.var()) / n)
    if abs(float(x.mean() - y.mean())) > 5 * se + 1e-12:
        problems.append(f"{name}: mean {float(x.mean()):.3g} vs {float(y.mean()):.3g}")
    # The standard deviations: each estimates sigma within sqrt(1/(2n))
    # (normal law; a uniform one's are tighter), relative.
    ratio = float(x.std() / y.std())
    if abs(ratio - 1) > 5 * math.sqrt(1 / n) + 0.01:
        problems.append(f"{name}: std {float(x.std()):.4g} vs {float(y.std()):.4g}")
    # The same law: at 2 * 1e-6 the statistic stays under 2.76 sqrt(2 / m),
    # on m <= 100,000 of the (independent) draws, every n/m-th.
    step = -(-n // 100_000)
    d, m = ks_statistic(x.flatten()[::step], y.flatten()[::step]), len(range(0, n, step))
    if d > 2.76 * math.sqrt(2 / m):
        problems.append(f"{name}: Kolmogorov-Smirnov distance {d:.3g} (n={m})")
    # The family: the kurtosis of a normal sample has a standard error of
    # sqrt(24 / n), a uniform one's far less.
    kx, ky = kurtosis(x), kurtosis(y)
    if abs(kx - ky) > 5 * math.sqrt(48 / n) + 0.05:
        problems.append(f"{name}: kurtosis {kx:.3g} vs {ky:.3g}")
    if ref.bound is not None:
        problems += support(name, x, y, ref.bound)
    return problems


def support(name: str, x: torch.Tensor, y: torch.Tensor, bound: float) -> List[str]:
    """U(-bound, bound): every draw inside, and the largest of n within
    15 / n of the bound (all n below it: probability e^-15)."""
    assert float(y.abs().max()) <= bound * (1 + 1e-6), f"PyTorch's {name} outside +-{bound}"
    top = float(x.abs().max())
    if top > bound * (1 + 1e-6) or top < bound * (1 - min(1.0, 15 / x.numel())):
        return [f"{name}: max |x| {top:.4g}, bound {bound:.4g}"]
    return []


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
@pytest.mark.parametrize("backbone", list(CHANNELS))
def test_every_layer_starts_as_pytorchs(backbone, classifier):
    sd = ours(backbone, classifier)
    refs = reference(backbone, classifier, sd)
    # BatchNorm's num_batches_tracked is the one PyTorch buffer we lack (the
    # loader ignores it; it matters only for momentum=None).
    lacking = {k for k in refs if k not in sd}
    assert all(k.endswith(".num_batches_tracked") for k in lacking), sorted(lacking)
    assert all(int(refs[k].value) == 0 for k in lacking)
    assert set(sd) <= set(refs), sorted(set(sd) - set(refs))
    assert ("classifier.bias" in sd) == (classifier == "linear")
    problems = [p for k, t in sorted(sd.items()) for p in compare(k, t, refs[k])]
    assert not problems, "\n".join(problems)


def test_resnet_names_are_torchvisions():
    sd = ours("resnet50", "linear")
    net = torchvision.models.resnet50()
    expected = {
        f"backbone.{k}"
        for k in net.state_dict()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    assert {k for k in sd if k.startswith("backbone.")} == expected


def test_the_seed_and_the_member_pick_the_weights():
    a = ours("convnet", "linear", seed=3)
    b = ours("convnet", "linear", seed=3)
    c = ours("convnet", "linear", seed=4)
    d = ours("convnet", "linear", seed=3, member=1)
    assert a.keys() == b.keys() == c.keys() == d.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    random = [k for k in a if not bool((a[k] == a[k].flatten()[0]).all())]
    # Three convolutions, the embedding's weight and bias, the classifier's.
    assert len(random) == 7
    assert all(not torch.equal(a[k], c[k]) for k in random)
    # Member m of seed s starts where member 0 of seed s + m does.
    assert all(torch.equal(c[k], d[k]) for k in a)


def test_the_tensors_are_copies_on_the_cpu():
    sd = ours("convnet", "cosine")
    assert all(t.device.type == "cpu" and not t.requires_grad for t in sd.values())
    assert sd["backbone.blocks.0.conv.weight"].shape == (32, 1, 3, 3)
    sd["backbone.blocks.0.bn.weight"].zero_()
    assert bool((ours("convnet", "cosine")["backbone.blocks.0.bn.weight"] == 1).all())


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="num_classes"):
        initial_state_dict("glyphs", in_channels=1, num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        initial_state_dict("glyphs", in_channels=0, num_classes=3)
    with pytest.raises(ValueError, match="backbone"):
        initial_state_dict("glyphs", in_channels=1, num_classes=3, backbone="vgg")


def test_input_normalization_checks_its_arguments():
    from grouploss.models import InputNormalization

    for args, kwargs, message in [
        (([], []), {}, "^mean: expected one value per channel"),
        (([0.5], [0.0]), {}, r"^std: expected finite values > 0, got \[0.0\]"),
        (([0.5, 0.5], [1.0]), {}, "^std: expected 2 values"),
        (([0.5] * 3, [1.0] * 3), {"source_channels": [2, 1, 5]}, r"^source_channels: .*\[0, 3\)"),
        (([0.5], [1.0]), {"scale": 0.0}, "^scale: expected a finite number > 0"),
        (([0.5] * 2, [1.0] * 2), {"source_channels": [0.5, 1]}, "^source_channels: expected an"),
    ]:
        with pytest.raises(ValueError, match=message):
            InputNormalization(*args, **kwargs)
    # Integer images other than uint8 would pass 0-255 values as 0-1 ones,
    # in Python and in TorchScript alike.
    norm = InputNormalization([0.5], [0.25])
    for module in (norm, torch.jit.script(norm)):
        with pytest.raises(Exception, match="images: expected uint8 values .* integer dtype"):
            module(torch.zeros(1, 1, 2, 2, dtype=torch.int32))
