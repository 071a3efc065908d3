"""grouploss.export and ``RunModel.to_torch``: a trained run leaves the
library as a plain PyTorch module, a TorchScript file that needs no
grouploss, or a safetensors file, each giving the embeddings the run gives
(``grouploss embed``) for the same images; the ResNets load into
torchvision's."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from data_fixtures import make_glyph_like, tiny_run

import grouploss
from grouploss import export
from grouploss.models import EmbeddingModel

TOL = 1e-5
BACKBONES = ("convnet", "resnet18", "resnet50", "bn_inception")


@pytest.fixture(scope="module")
def glyphs_root(tmp_path_factory):
    return make_glyph_like(tmp_path_factory.mktemp("glyphs"), train_classes=6, per=8)


@pytest.fixture(scope="module")
def runs(glyphs_root, tmp_path_factory):
    """One short run per backbone, trained when first asked for."""
    made = {}

    def run(backbone: str) -> pathlib.Path:
        if backbone not in made:
            out = tmp_path_factory.mktemp(f"run-{backbone}")
            name = _scripted_backbone(out) if backbone == "torchscript" else backbone
            opts = tiny_run(plots=False, epochs=1, backbone=name, embedding_size=16)
            made[backbone] = grouploss.train("glyphs", data_root=glyphs_root, out_dir=out, **opts)
        return made[backbone].run_dir

    return run


def _scripted_backbone(folder: pathlib.Path) -> str:
    """`torchscript:PATH` of a scripted network with a BatchNorm layer."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    path = folder / "backbone.pt"
    torch.jit.script(net).save(str(path))
    return f"torchscript:{path}"


def _test_images(model: grouploss.RunModel) -> torch.Tensor:
    """The run's test images as stored: uint8 N x C x H x W."""
    ds = model.dataset("test")
    return torch.stack([ds.load(i) for i in range(len(ds))])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grouploss.cli", *args], capture_output=True, text=True, timeout=300
    )


# Runs in a fresh interpreter in which importing grouploss fails.
_WITHOUT_GROUPLOSS = """
import importlib.abc, sys

class NoGrouploss(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grouploss" or name.startswith("grouploss."):
            raise ImportError("grouploss is not importable here")
        return None

sys.meta_path.insert(0, NoGrouploss())
try:
    import grouploss
    sys.exit("grouploss was importable")
except ImportError:
    pass
import json, numpy as np, torch
model_file, images_file, out_file, device = sys.argv[1:5]
extra = {"grouploss.json": ""}
model = torch.jit.load(model_file, map_location=device, _extra_files=extra)
images = torch.from_numpy(np.load(images_file)).to(device)
with torch.no_grad():
    emb = model(images)
np.save(out_file, emb.cpu().numpy())
print(json.loads(extra["grouploss.json"])["backbone"])
"""


@pytest.mark.parametrize("backbone", ["convnet", "resnet18"])
def test_torchscript_needs_no_grouploss_and_matches_embed(runs, backbone, tmp_path):
    run_dir = runs(backbone)
    model_file = tmp_path / "model.pt"
    done = _cli("export", str(run_dir), "--format", "torchscript", "--out", str(model_file))
    assert done.returncode == 0, done.stderr
    assert model_file.exists() and not list(tmp_path.glob(".*tmp*"))
    done = _cli("embed", str(run_dir), "--data", "test", "--out", str(tmp_path / "emb.npy"))
    assert done.returncode == 0, done.stderr
    expected = np.load(tmp_path / "emb.npy")

    images = _test_images(grouploss.load_run(run_dir, device="cpu"))
    np.save(tmp_path / "images.npy", images.numpy())
    child = subprocess.run(
        [sys.executable, "-I", "-c", _WITHOUT_GROUPLOSS, str(model_file)]
        + [str(tmp_path / "images.npy"), str(tmp_path / "out.npy"), "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == backbone
    got = np.load(tmp_path / "out.npy")
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchscript_on_cuda_matches_embed(runs, tmp_path):
    run_dir = runs("resnet18")
    model = grouploss.load_run(run_dir, device="cuda")
    expected, _ = model.embed_split("test")
    path = model.export(tmp_path / "model.pt", format="torchscript")
    scripted = torch.jit.load(str(path), map_location="cuda")
    with torch.no_grad():
        got = scripted(_test_images(model).cuda())
    assert (got - expected.cuda()).abs().max().item() <= TOL


@pytest.mark.parametrize("backbone", BACKBONES)
def test_to_torch_gives_the_runs_embeddings(runs, backbone):
    model = grouploss.load_run(runs(backbone), device="cpu")
    expected, _ = model.embed_split("test")
    net = model.to_torch()
    assert isinstance(net, torch.nn.Module) and not net.training
    images = _test_images(model)
    with torch.no_grad():
        from_uint8 = net(images)
        from_float = net(images.float() / 255)
    assert (from_uint8 - expected).abs().max().item() <= TOL
    assert (from_float - expected).abs().max().item() <= TOL
    assert net.description["backbone"] == backbone


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_to_torch_computes_in_the_modules_dtype(runs, dtype):
    """As for any torch module, ``.to(dtype)`` carries the computation:
    uint8 and [0, 1] float images give embeddings in that dtype, close to
    the float32 ones (bfloat16: to its 8-bit mantissa)."""
    model = grouploss.load_run(runs("convnet"), device="cpu")
    net = model.to_torch()
    images = _test_images(model)[:16]
    with torch.no_grad():
        want = net(images).double()
        net = net.to(dtype)
        got = [net(images), net(images.to(dtype) / 255)]
    tol = 1e-5 if dtype == torch.float64 else 0.05 * want.abs().max().item()
    for e in got:
        assert e.dtype == dtype
        assert (e.double() - want).abs().max().item() <= tol


def test_a_torchscript_backbone_keeps_its_batchnorm_statistics(runs, tmp_path):
    """The checkpoint holds the scripted module's buffers under PyTorch's
    names, so the reloaded run, its plain module and its TorchScript export
    give the embeddings the trainer evaluated (the statistics were in no
    checkpoint: a reloaded run used the file's)."""
    from safetensors.torch import load_file

    run_dir = runs("torchscript")
    weights = load_file(str(run_dir / "checkpoints" / "best.safetensors"))
    mean = weights["model.backbone.1.running_mean"]
    assert mean.abs().max().item() > 1e-3, "the statistics moved off their initial zeros"
    assert "model.backbone.0.weight" in weights and "model.backbone.1.running_var" in weights
    model = grouploss.load_run(run_dir, device="cpu", trust_torchscript=True)
    emb, labels = model.embed_split("test")
    evaluated = json.loads((run_dir / "summary.json").read_text())["test"]
    again = grouploss.metrics.evaluate(emb, labels)
    for key in ("map@r", "recall@1", "r_precision"):
        assert again[key] == pytest.approx(evaluated[key], abs=1e-9), key
    net = model.to_torch()
    assert torch.equal(net.backbone.state_dict()["1.running_mean"], mean)
    images = _test_images(model)
    with torch.no_grad():
        assert (net(images) - torch.as_tensor(emb)).abs().max().item() <= TOL
    scripted = torch.jit.load(str(model.export(tmp_path / "m.pt", format="torchscript")))
    with torch.no_grad():
        assert (scripted(images) - torch.as_tensor(emb)).abs().max().item() <= TOL


def test_a_run_on_a_torchscript_backbone_loads_only_when_trusted(runs):
    """Its backbone is a program that runs as the run loads: a run folder
    from elsewhere must not run code by being opened, from Python or from
    any command that loads a run."""
    run_dir = runs("torchscript")
    with pytest.raises(ValueError, match=r"^trust_torchscript: expected True to load the run in "):
        grouploss.load_run(run_dir)
    with pytest.raises(ValueError, match="^trust_torchscript"):
        grouploss.report(run_dir)
    export = ["export", str(run_dir), "--format", "safetensors", "--out", "x.safetensors"]
    for command in (["evaluate", str(run_dir)], export):
        refused = _cli(*command)
        assert refused.returncode == 1 and "--trust-torchscript" in refused.stderr, refused.stderr
    trusted = _cli("evaluate", str(run_dir), "--trust-torchscript", "--device", "cpu")
    assert trusted.returncode == 0, trusted.stderr
    # The other backbones are weights alone.
    grouploss.load_run(runs("convnet"))


def test_to_torch_trains_on_in_a_plain_loop(runs):
    """The weights are parameters a torch optimizer moves; a train step
    changes the embeddings and leaves the run alone."""
    model = grouploss.load_run(runs("convnet"), device="cpu")
    net = model.to_torch().train()
    images = _test_images(model)[:8]
    before = model.to_torch()(images).detach()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(images).sum()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    opt.step()
    after = net.eval()(images).detach()
    assert (after - before).abs().max().item() > 1e-4
    assert torch.equal(model.to_torch()(images).detach(), before)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_resnet_loads_into_torchvision(runs, backbone):
    torchvision = pytest.importorskip("torchvision")
    net = grouploss.load_run(runs(backbone), device="cpu").to_torch()
    tv = getattr(torchvision.models, backbone)()
    state = {
        k[len("backbone.") :]: v for k, v in net.state_dict().items() if k.startswith("backbone.")
    }
    result = tv.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    tv.fc = torch.nn.Identity()
    tv.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tv(x), net.backbone(x), atol=1e-6, rtol=0)


def test_safetensors_round_trip(runs, tmp_path):
    model = grouploss.load_run(runs("bn_inception"), device="cpu")
    net = model.to_torch()
    path = export.save(net, tmp_path / "model.safetensors", format="safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        description = json.loads(f.metadata()["grouploss"])
        keys = set(f.keys())
    assert description == json.loads(json.dumps(net.description))
    assert not any(k.startswith("classifier.") for k in keys)
    back = export.load(path)
    assert isinstance(back, EmbeddingModel)
    images = _test_images(model)
    with torch.no_grad():
        assert torch.equal(back(images), net(images))


def test_cli_export_safetensors_loads_back(runs, tmp_path):
    run_dir = runs("convnet")
    out = tmp_path / "sub" / "model.safetensors"
    done = _cli("export", str(run_dir), "--format", "safetensors", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    model = grouploss.load_run(run_dir, device="cpu")
    expected, _ = model.embed_split("test")
    with torch.no_grad():
        got = export.load(out)(_test_images(model))
    assert (got - expected).abs().max().item() <= TOL


def test_wrong_format_is_named(runs, tmp_path):
    model = grouploss.load_run(runs("convnet"), device="cpu")
    with pytest.raises(ValueError, match="format: expected one of torchscript, safetensors"):
        model.export(tmp_path / "m.onnx", format="onnx")
    with pytest.raises(ValueError, match="format"):
        export.load(tmp_path / "m.onnx", format="onnx")
    with pytest.raises(TypeError, match="model: expected a grouploss EmbeddingModel"):
        export.save(torch.nn.Linear(2, 2), tmp_path / "m.pt")
    done = _cli("export", str(runs("convnet")), "--format", "onnx", "--out", "m.onnx")
    assert done.returncode == 2 and "argument --format: invalid choice: 'onnx'" in done.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_load_refuses_a_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a model written by grouploss.export.save"):
        export.load(tmp_path / "other.safetensors")


def test_load_names_a_file_of_another_format(runs, tmp_path):
    """save's default (TorchScript) handed to load's (safetensors, which
    cannot run code) says which format it is; a file of neither kind is a
    ValueError naming it."""
    model = grouploss.load_run(runs("convnet"), device="cpu")
    scripted = export.save(model.to_torch(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"m\.pt is a TorchScript archive .*format='torchscript'"):
        export.load(scripted)
    assert isinstance(export.load(scripted, format="torchscript"), torch.jit.ScriptModule)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"^path: .*notes\.txt is not a safetensors file"):
        export.load(tmp_path / "notes.txt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"state\.pt is a zip archive \(torch\.save's\?\)"):
        export.load(tmp_path / "state.pt")
    # Damaged files and the wrong format named: a ValueError naming the
    # path, not the reader's own exception.
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(scripted.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"^path: .*cut\.pt is a damaged zip archive"):
        export.load(truncated)
    st = export.save(model.to_torch(), tmp_path / "m.safetensors", format="safetensors")
    with pytest.raises(ValueError, match=r"^path: .*m\.safetensors is not a TorchScript archive"):
        export.load(st, format="torchscript")
    with pytest.raises(ValueError, match=r"^path: .* is a folder; expected a TorchScript file"):
        export.load(tmp_path, format="torchscript")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(st), "pt") as f:
        description = json.loads(f.metadata()["grouploss"])
    description["input"]["channels"] = 3_000_000  # would build a 3-million-channel convolution
    for metadata, message in [
        ("{", "a damaged model description"),
        ("{}", "a model that does not rebuild"),
        (json.dumps(description), r"a model that does not rebuild .*expected 1 or 3 input"),
    ]:
        save_file(load_file(str(st)), str(tmp_path / "bad.safetensors"), {"grouploss": metadata})
        with pytest.raises(ValueError, match=rf"^path: .*bad\.safetensors holds {message}"):
            export.load(tmp_path / "bad.safetensors")


def test_load_refuses_a_torchscript_backbone_named_in_the_metadata(runs, tmp_path):
    """Rebuilding such a model would load the program its metadata names:
    a safetensors file must not be able to run code."""
    from safetensors.torch import save_file

    net = grouploss.load_run(runs("convnet"), device="cpu").to_torch()
    description = dict(net.description, backbone=f"torchscript:{tmp_path / 'evil.pt'}")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / "m.safetensors"
    save_file(state, str(path), metadata={"grouploss": json.dumps(description)})
    with pytest.raises(ValueError, match="holds a TorchScript backbone"):
        export.load(path)


def test_embedding_model_refuses_missing_weights(runs):
    model = grouploss.load_run(runs("convnet"), device="cpu")
    net = model.to_torch()
    state = dict(net.state_dict())
    state.pop(next(k for k in state if k.startswith("backbone.")))
    from grouploss.models import embedding_model

    with pytest.raises((ValueError, RuntimeError), match="backbone"):
        embedding_model(net.description, state)
