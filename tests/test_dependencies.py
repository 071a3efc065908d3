"""The main job needs only the declared dependencies.

The children of these tests run with every installed package that is not
in ``[project.dependencies]`` (nor required by one of them, transitively)
made unimportable by an import hook (a ``sitecustomize`` on PYTHONPATH, so
that torchrun's children get it too; ``importlib.util.find_spec`` raises
``ModuleNotFoundError`` for them rather than returning None, which
``grouploss._extras`` handles alike): what a user has after
``pip install grouploss``. They use the loss, train, evaluate and embed;
the figures, which need the ``report`` extra, are skipped with one line.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from data_fixtures import make_glyph_like
from packaging.requirements import Requirement

import grouploss
from grouploss import _extras

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = pathlib.Path(__file__).resolve().parent.parent

HOOK = '''
import importlib.abc, json, os, sys

_BLOCKED = frozenset(json.loads(os.environ["GROUPLOSS_TEST_BLOCKED"]))


class _NotInstalled(importlib.abc.MetaPathFinder):
    """Packages outside the declared dependencies look uninstalled."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not declared)", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
'''


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _declared() -> list:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def _allowed_distributions() -> set:
    """The declared dependencies and everything they require, for this
    Python (markers evaluated, no extras)."""
    todo = [r.name for r in _declared() if r.marker is None or r.marker.evaluate()]
    seen = set()
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            r = Requirement(text)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def _blocked_modules() -> list:
    """Top-level modules that only undeclared distributions provide."""
    allowed = _allowed_distributions() | {"grouploss"}
    blocked = []
    for module, dists in md.packages_distributions().items():
        if module.startswith("__") or module == "grouploss":
            continue
        if not any(_norm(d) in allowed for d in dists):
            blocked.append(module)
    return sorted(blocked)


@pytest.fixture(scope="module")
def declared_only(tmp_path_factory):
    """An environment for subprocesses in which only the declared
    dependencies can be imported."""
    hook_dir = tmp_path_factory.mktemp("hook")
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ)
    package = str(pathlib.Path(grouploss.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), package])
    env["GROUPLOSS_TEST_BLOCKED"] = json.dumps(_blocked_modules())
    env["OMP_NUM_THREADS"] = "1"
    env.pop("GROUPLOSS_DEBUG", None)
    return env


def _python(env, code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _cli(env, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grouploss.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_the_extras_are_the_packages_the_code_asks_for():
    """pyproject's extras and grouploss._extras name the same packages."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = declared["optional-dependencies"]
    for extra, (_, packages) in _extras.EXTRAS.items():
        assert sorted(Requirement(r).name for r in optional[extra]) == sorted(
            pip_name for _, pip_name in packages
        ), extra


def test_the_hook_hides_what_is_not_declared(declared_only):
    blocked = json.loads(declared_only["GROUPLOSS_TEST_BLOCKED"])
    # What the report extra and the tests use is hidden; torch's own
    # requirements are not.
    assert {"matplotlib", "sklearn", "PIL", "pytest"} <= set(blocked)
    assert not {"torch", "numpy", "safetensors", "sympy", "grouploss"} & set(blocked)
    run = _python(
        declared_only,
        """
        import importlib
        for name in ("matplotlib", "sklearn", "PIL", "fontTools", "scipy"):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                continue
            raise SystemExit(f"{name} was importable")
        import grouploss
        print(grouploss._extras.missing("report"), grouploss._extras.missing("glyphs"))
        """,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    missing = "['matplotlib', 'scikit-learn', 'pillow', 'threadpoolctl'] ['pillow', 'fonttools']"
    assert missing in run.stdout


def test_the_loss_forward_and_backward(declared_only):
    run = _python(
        declared_only,
        """
        import torch
        from grouploss import GroupLoss
        emb = torch.randn(12, 8, requires_grad=True)
        labels = torch.arange(3).repeat_interleave(4)
        loss_fn = GroupLoss(num_classes=3, embedding_size=8)
        loss = loss_fn(emb, labels)
        loss.backward()
        assert torch.isfinite(loss) and emb.grad.abs().sum() > 0
        print("ok", float(loss))
        """,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok ")


TINY = [
    "--epochs", "1", "--max-steps-per-epoch", "3", "--classes-per-batch", "3",
    "--samples-per-class", "4", "--num-workers", "1", "--val-fraction", "0.3",
    "--eval-batch-size", "16", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def glyphs_root(tmp_path_factory):
    return make_glyph_like(tmp_path_factory.mktemp("glyphs"))


def test_train_evaluate_embed_and_report_without_the_extras(declared_only, glyphs_root, tmp_path):
    hint = _extras.hint("report")
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "glyphs", "--data-root", str(glyphs_root), *TINY]
    train = _cli(declared_only, *args, "--out-dir", str(run_dir))
    assert train.returncode == 0, train.stderr[-3000:]
    assert "run folder:" in train.stdout
    assert (run_dir / "summary.json").exists() and (
        run_dir / "checkpoints/best.safetensors"
    ).exists()
    assert not (run_dir / "loss.png").exists()
    skipped = [line for line in train.stderr.splitlines() if hint in line]
    assert skipped == [f"grouploss: loss.png and metrics.png skipped: {hint}"], train.stderr

    evaluate = _cli(declared_only, "evaluate", str(run_dir), "--device", "cpu")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads(evaluate.stdout.splitlines()[-1])["recall@1"] >= 0

    out = tmp_path / "emb.npy"
    embed = _cli(declared_only, "embed", str(run_dir), "--data", "test", "--out", str(out))
    assert embed.returncode == 0, embed.stderr[-3000:]
    assert out.exists() and out.with_name("emb_labels.npy").exists()

    report = _cli(declared_only, "report", str(run_dir), "--device", "cpu")
    assert report.returncode == 1
    assert report.stderr == f"grouploss: error: {hint}\n"
    assert not (run_dir / "report.html").exists()


def test_python_train_returns_its_result_without_the_extras(declared_only, glyphs_root, tmp_path):
    run = _python(
        declared_only,
        """
        import sys, grouploss
        r = grouploss.train(
            "glyphs", data_root=sys.argv[1], out_dir=sys.argv[2], epochs=1,
            max_steps_per_epoch=3, classes_per_batch=3, samples_per_class=4,
            num_workers=1, val_fraction=0.3, eval_batch_size=16, device="cpu",
        )
        assert isinstance(r, grouploss.TrainResult), type(r)
        print("best", r.best_epoch, sorted(r.test))
        """,
        str(glyphs_root),
        str(tmp_path / "py"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("best 1 [")
    assert _extras.hint("report") in run.stderr


def test_two_processes_without_the_extras(declared_only, glyphs_root, tmp_path):
    run_dir = tmp_path / "ddp"
    args = ["train", "--nproc-per-node", "2", "--preset", "glyphs", "--quiet"]
    args += ["--data-root", str(glyphs_root), *TINY, "--out-dir", str(run_dir)]
    train = _cli(declared_only, *args)
    assert train.returncode == 0, train.stderr[-3000:]
    assert train.stdout.count("run folder:") == 1
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    assert train.stderr.count(_extras.hint("report")) == 1
