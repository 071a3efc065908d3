"""The Rust training loop: presets, backbones, run folders, resume, Ctrl-C,
and loading a trained run back."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from data_fixtures import (
    make_cars,
    make_cub,
    make_glyph_like,
    make_inshop,
    make_sop,
    tiny_run,
    tiny_run_script,
)
from safetensors.torch import load_file

import grouploss
from grouploss import training

HERE = pathlib.Path(__file__).resolve().parent


TINY = tiny_run()


@pytest.fixture(scope="module")
def glyphs_root(tmp_path_factory):
    return make_glyph_like(tmp_path_factory.mktemp("glyphs"))


def test_a_glyphs_run_writes_its_folder_and_learns(glyphs_root, tmp_path):
    out = tmp_path / "run"
    r = grouploss.train("glyphs", data_root=glyphs_root, out_dir=out, **dict(TINY, epochs=3))
    assert r.run_dir == out
    names = ("config.toml", "input.json", "metrics.jsonl", "summary.json", "loss.png")
    for name in (*names, "metrics.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("last.safetensors", "best.safetensors"):
        assert (out / "checkpoints" / name).stat().st_size > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    for x in lines:
        assert {"train_loss", "images_per_s", "lr", "val"} <= set(x)
        assert {"recall@1", "map@r", "r_precision"} <= set(x["val"])
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert set(r.test) >= {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi"}
    # Patterns plus noise are easy: far better than chance (1/6 at R@1).
    assert r.test["recall@1"] > 0.5
    assert r.summary["selected_on"].startswith("val")
    assert 1 <= r.best_epoch <= 3
    cfg = training.resolve_config(config=out / "config.toml")
    assert cfg["dataset"] == "glyphs" and cfg["epochs"] == 3


def test_any_metric_the_evaluation_reports_selects_the_best_epoch(glyphs_root, tmp_path):
    """select_metric takes every key of the evaluation (open-metric-learning's
    precision@K and map@K too), evaluated each epoch only when selected."""
    r = grouploss.train(
        "glyphs",
        data_root=glyphs_root,
        out_dir=tmp_path / "run",
        plots=False,
        **dict(TINY, epochs=2, select_metric="precision@2"),
    )
    values = [x["val"]["precision@2"] for x in r.history]
    assert r.best_epoch == 1 + max(range(2), key=lambda i: (values[i], -i))
    assert all("map@2" not in x["val"] for x in r.history)
    with pytest.raises(ValueError, match="^select_metric: expected a metric the evaluation"):
        training.resolve_config("glyphs", select_metric="precision@3")


def test_options_are_one_vocabulary(glyphs_root, tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('preset = "glyphs"\nepochs = 1\ntemperature = 3.5\n')
    cfg = training.resolve_config(config=conf, lr=0.01)
    assert (cfg["preset"], cfg["epochs"], cfg["temperature"], cfg["lr"]) == (
        "glyphs",
        1,
        3.5,
        0.01,
    )
    with pytest.raises(ValueError, match="epoch"):
        training.resolve_config(epoch=3)
    with pytest.raises(ValueError, match="^temperature: expected a finite number > 0"):
        training.resolve_config(temperature=0.0)
    # Sides whose square would pass the decoders' pixel limit (and abort on
    # allocation) are named.
    for name in ("image_size", "resize_size", "pad_jitter"):
        with pytest.raises(ValueError, match=f"^{name}: expected at most 16384, got 1000000"):
            training.resolve_config(**{name: 1_000_000})
    with pytest.raises(ValueError, match="^embedding_size: expected at most 65536, got 1073741824"):
        training.resolve_config(embedding_size=2**30)
    with pytest.raises(ValueError, match="^preset"):
        training.resolve_config("imagenet")


def test_a_pretrained_file_that_is_no_state_dict_is_named(tmp_path):
    """It is read with weights_only=True; torch's error (advising
    weights_only=False) is not passed on."""
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match=r"^pretrained: .*garbage\.bin is not a state dict") as e:
        grouploss.train(pretrained=str(bad), out_dir=tmp_path / "r", plots=False)
    assert "weights_only=False" not in str(e.value)
    # A folder is said to be one (it was "not a state dict").
    (tmp_path / "w.pt").mkdir()
    with pytest.raises(IsADirectoryError):
        grouploss.train(pretrained=str(tmp_path / "w.pt"), out_dir=tmp_path / "r", plots=False)


def test_options_take_numpy_scalars_and_name_what_they_refuse():
    cfg = training.resolve_config(
        epochs=np.int64(2), lr=np.float32(0.5), flip=np.bool_(False), recall_ks=[1, np.int32(4)]
    )
    assert (cfg["epochs"], cfg["lr"], cfg["flip"], cfg["recall_ks"]) == (2, 0.5, False, [1, 4])
    assert type(cfg["flip"]) is bool
    # numpy arrays too (they were an unnamed TypeError).
    cfg = training.resolve_config(recall_ks=np.array([1, 4]), lr=np.array(0.25))
    assert (cfg["recall_ks"], cfg["lr"]) == ([1, 4], 0.25)
    cases = [
        (dict(recall_ks=np.array([1.5])), r"^recall_ks: "),
        (dict(epochs=2**63), r"^epochs: expected an integer from -2\*\*63 to 2\*\*63 - 1, got 9"),
        (dict(seed=-(2**70)), r"^seed: expected an integer from -2\*\*63"),
        # A dataset name is checked with the options, by its name (it was
        # "kind", once the run folder existed).
        (dict(dataset="fashion"), r'^dataset: expected one of "fashion-mnist", "glyphs", '),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            training.resolve_config(**options)
    with pytest.raises(ValueError, match="^plots: expected True or False, got 'no'"):
        training.train(plots="no")


def test_cli_train_and_evaluate(glyphs_root, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "grouploss.cli", "train", "--preset", "glyphs", "--quiet"]
    cmd += ["--data-root", str(glyphs_root), "--out-dir", str(out), "--epochs", "1"]
    cmd += ["--classes-per-batch", "3", "--samples-per-class", "4", "--num-workers", "1"]
    cmd += ["--val-fraction", "0.3", "--device", "cpu", "--recall-ks", "1,2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "recall@1" in p.stdout and "map@r" in p.stdout and "nmi" in p.stdout
    e = subprocess.run(
        [sys.executable, "-m", "grouploss.cli", "evaluate", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert e.returncode == 0, e.stderr
    metrics = json.loads(e.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert metrics["recall@1"] == pytest.approx(summary["test"]["recall@1"])
    emb = tmp_path / "e.npy"
    m = subprocess.run(
        [sys.executable, "-m", "grouploss.cli", "embed", str(out), "--data", "test"]
        + ["--out", str(emb), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert m.returncode == 0, m.stderr
    assert np.load(emb).shape == (6 * 16, 64)
    assert np.load(tmp_path / "e_labels.npy").shape == (6 * 16,)


def test_a_run_loads_and_exports_without_its_dataset(tmp_path):
    """A run folder holds what its network takes (``input.json``: channels,
    classes, the evaluation transform with the training images' statistics),
    so it loads, embeds and exports where its dataset is not (loading once
    opened the dataset)."""
    data = make_glyph_like(tmp_path / "data")
    out = tmp_path / "run"
    kw = dict(TINY, epochs=1, normalization="mean_std")
    grouploss.train("glyphs", data_root=data, out_dir=out, plots=False, **kw)
    assert set(json.loads((out / "input.json").read_text())) == {
        "channels",
        "classes",
        "size",
        "transform_channels",
        "transform",
        "flip",
        "normalization",
    }
    model = grouploss.load_run(out, device="cpu")
    ds = grouploss.datasets.Glyphs(data, split="test")
    raw = torch.stack([ds.load(i) for i in range(4)])
    want, spec = model.embed(raw), model.input_spec
    data.rename(tmp_path / "moved")
    moved = grouploss.load_run(out, device="cpu")
    assert moved.input_spec == spec and len(spec["mean"]) == 1
    torch.testing.assert_close(moved.embed(raw), want, rtol=0, atol=0)
    assert moved.export(tmp_path / "m.pt").exists()
    # Integer images other than uint8 are refused (0-255 values were taken
    # as transformed ones).
    with pytest.raises(ValueError, match="^images: expected uint8 images"):
        moved.embed(raw.long())
    # Float images are taken as transformed: at the run's input size only.
    size = spec["size"]
    transformed = torch.zeros(2, 1, size, size)
    assert moved.embed(transformed).shape[0] == 2
    with pytest.raises(ValueError, match=rf"^images: expected {size} x {size}, the run's input"):
        moved.embed(torch.zeros(2, 1, size + 4, size + 4))
    # An edited input.json is refused before a network is built from its
    # figures: classes against the checkpoint's classifier, sizes bounded.
    text = (out / "input.json").read_text()
    for field, value, message in [
        ("classes", 2**24, r"classifier\.weight has \d+ rows, the run's input\.json 16777216"),
        ("size", 10**6, r"input\.json.*size: expected at most 16384"),
    ]:
        edited = json.loads(text)
        edited[field] = value
        (out / "input.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=message):
            grouploss.load_run(out, device="cpu")
    (out / "input.json").write_text(text)
    # Data that moved is given on resume (data_root is where the data is,
    # not a setting: input.json says whether it is the same data).
    again = grouploss.train(resume=out, plots=False, data_root=tmp_path / "moved")
    assert again.run_dir == out
    # Resumed on other images (other pixel statistics), the run is refused
    # rather than trained on an input its saved model does not describe.
    make_glyph_like(data, seed=1)
    with pytest.raises(ValueError, match="^data_root: expected the data the run in .* started"):
        grouploss.train(resume=out, plots=False, data_root=data)


def test_load_run_embeds_and_evaluates(glyphs_root, tmp_path):
    out = tmp_path / "run"
    r = grouploss.train("glyphs", data_root=glyphs_root, out_dir=out, **dict(TINY, epochs=1))
    model = grouploss.load_run(out, device="cpu")
    emb, labels = model.embed_split("test")
    assert emb.shape == (96, 64) and labels.shape == (96,)
    assert model.evaluate("test")["recall@1"] == pytest.approx(r.test["recall@1"])
    ds = grouploss.datasets.Glyphs(glyphs_root, split="test")
    e2, l2 = model.embed_dataset(ds)
    torch.testing.assert_close(e2, emb)
    raw = torch.stack([ds.load(i) for i in range(4)])
    torch.testing.assert_close(model.embed(raw), emb[:4], rtol=1e-4, atol=1e-5)
    assert model.history[-1]["epoch"] == 1
    # embed takes images; 0.x's split names and datasets still work, warned.
    with pytest.warns(FutureWarning, match="use RunModel.embed_split"):
        old_e, old_l = model.embed("test")
    torch.testing.assert_close(old_e, emb)
    with pytest.warns(FutureWarning, match="use RunModel.embed_dataset"):
        model.embed(ds)
    with pytest.raises(TypeError, match="^images: expected a torch.Tensor, got int"):
        model.embed(3)


def _train_cmd(root, out, epochs, extra=()):
    code = tiny_run_script(epochs=epochs)
    return [sys.executable, "-c", code, str(root), str(out), *extra]


def _epochs_done(out: pathlib.Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def long_glyphs_root(tmp_path_factory):
    # 200 images a class: an epoch lasts about a second even on a fast
    # machine, so that a kill right after epoch 1 lands inside epoch 2.
    return make_glyph_like(tmp_path_factory.mktemp("glyphs_long"), per=200)


def test_resume_after_kill_gives_the_same_metrics(long_glyphs_root, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(long_glyphs_root, ref, 3), check=True, timeout=600)
    killed = tmp_path / "killed"
    p = subprocess.Popen(_train_cmd(long_glyphs_root, killed, 3))
    deadline = time.time() + 300
    while _epochs_done(killed) < 1 and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(0.1)  # inside epoch 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert 1 <= _epochs_done(killed) < 3
    # Resumed in a process like the reference's (same thread count).
    code = "import sys, grouploss\ngrouploss.train(resume=sys.argv[1], plots=False)\n"
    subprocess.run([sys.executable, "-c", code, str(killed)], check=True, timeout=600)
    want = json.loads((ref / "summary.json").read_text())
    got = json.loads((killed / "summary.json").read_text())
    assert got["test"] == want["test"]
    assert got["best_epoch"] == want["best_epoch"]
    got_hist = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    ref_hist = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [h["train_loss"] for h in got_hist] == [h["train_loss"] for h in ref_hist]


def test_a_resumed_run_continues_with_the_group_losss_memory(glyphs_root, tmp_path):
    """A run with a memory (``memory_size``) stopped after epoch 1 and
    resumed gives the losses of an uninterrupted one: the memory is in the
    ``last`` checkpoint. (Without it, a test showed epoch 2's loss differs.)"""
    opts = {k: v for k, v in TINY.items() if k != "epochs"}
    opts.update(plots=False, memory_size=30, memory_warmup_steps=2)
    whole = grouploss.train(
        "glyphs", data_root=glyphs_root, out_dir=tmp_path / "a", epochs=2, **opts
    )
    grouploss.train("glyphs", data_root=glyphs_root, out_dir=tmp_path / "b", epochs=1, **opts)
    # The same run, stopped after its first epoch: let it go on to two.
    cfg = tmp_path / "b" / "config.toml"
    cfg.write_text(cfg.read_text().replace("\nepochs = 1\n", "\nepochs = 2\n"))
    resumed = grouploss.train(resume=tmp_path / "b", plots=False)
    want = [h["train_loss"] for h in whole.history]
    assert [h["train_loss"] for h in resumed.history] == want
    last = load_file(str(tmp_path / "b" / "checkpoints" / "last.safetensors"))
    assert last["memory.embeddings"].shape == (30, TINY.get("embedding_size", 64))
    # The memory changes the loss once the warm-up is over.
    plain = grouploss.train(
        "glyphs",
        data_root=glyphs_root,
        out_dir=tmp_path / "p",
        epochs=1,
        **dict(opts, memory_size=0),
    )
    assert plain.history[0]["train_loss"] != want[0]


def test_ctrl_c_saves_a_loadable_last_checkpoint(glyphs_root, tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "grouploss.cli", "train", "--preset", "glyphs", "--quiet"]
    cmd += ["--data-root", str(glyphs_root), "--out-dir", str(out), "--epochs", "50"]
    cmd += ["--classes-per-batch", "3", "--samples-per-class", "4", "--num-workers", "1"]
    cmd += ["--val-fraction", "0.3", "--device", "cpu"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _epochs_done(out) < 1 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "interrupted" in stdout
    model = grouploss.load_run(out, checkpoint="last", device="cpu")
    assert model.embed_split("test")[0].shape == (96, 64)


def _train_cli(out: pathlib.Path, glyphs_root, *extra: str) -> list:
    cmd = [sys.executable, "-m", "grouploss.cli", "train", "--preset", "glyphs"]
    cmd += ["--data-root", str(glyphs_root), "--out-dir", str(out), "--epochs", "2"]
    cmd += ["--classes-per-batch", "3", "--samples-per-class", "4", "--num-workers", "1"]
    cmd += ["--val-fraction", "0.3", "--device", "cpu", "--max-steps-per-epoch", "200"]
    cmd += ["--select-max-images", "60", "--schedule", "step", "--lr-decay-epochs", "2"]
    return cmd + list(extra)


def _trained_after_its_first_line(cmd: list, stop_after: float | None, line_has="] run "):
    """Runs `cmd`; with `stop_after`, sends SIGINT that many seconds after
    the first line of progress that holds `line_has` (by default the run's
    first, "run ... on cpu"). Returns the process, the seconds from that
    line to its end and its output."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    for line in p.stderr:
        if line_has in line:
            break
    begun = time.perf_counter()
    if stop_after is not None:
        time.sleep(stop_after)
        p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=300)
    return p, time.perf_counter() - begun, out


def _trainer_state(out: pathlib.Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(out / "checkpoints" / "last.safetensors"), "pt") as f:
        return json.loads(f.metadata()["grouploss.trainer_state"])


def test_ctrl_c_within_an_epoch_resumes_to_the_same_records(tmp_path):
    """Ctrl-C within an epoch, then --resume: every epoch's record (the mean
    loss and its terms, the epoch whose weights the step schedule reloaded,
    the validation metrics) is the uninterrupted run's. The resumed epoch
    once averaged only the steps after the resume, and forgot the reload."""
    # Epochs of 200 steps: most of an epoch's time is in them.
    glyphs_root = make_glyph_like(tmp_path / "data", per=400)
    whole, _, _ = _trained_after_its_first_line(_train_cli(tmp_path / "u", glyphs_root), None)
    assert whole.returncode == 0
    replayable = ("train_loss", "train_nll", "train_ce", "reloaded_best_epoch", "lr", "val")

    def records(out):
        return [{k: h[k] for k in replayable} for h in map(json.loads, open(out / "metrics.jsonl"))]

    want = records(tmp_path / "u")
    assert want[1]["reloaded_best_epoch"] == 1
    # Stops in the second epoch (it reloaded epoch 1's weights first), at a
    # fraction of its time after the first epoch's line: a signal sent at
    # once stops after its first step whatever the load; later ones land
    # further in unless the machine runs slower than it did for "u".
    epoch_s = json.loads((tmp_path / "u" / "metrics.jsonl").read_text().splitlines()[1])["time_s"]
    within = []
    for attempt, fraction in enumerate((0.0, 0.4, 0.2)):
        out = tmp_path / f"i{attempt}"
        cmd = _train_cli(out, glyphs_root)
        p, _, _ = _trained_after_its_first_line(cmd, fraction * epoch_s, "] epoch 1/2:")
        if p.returncode != 130:
            continue  # the run ended first
        state = _trainer_state(out)
        if 0 < state["step"]:
            within.append((state["epoch"] + 1, state["step"]))
        resumed = subprocess.run(
            [sys.executable, "-m", "grouploss.cli", "train", "--resume", str(out), "--quiet"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resumed.returncode == 0, resumed.stderr
        assert records(out) == want, (state["epoch"], state["step"])
        if len(within) == 2:
            break
    # (epoch, steps done) of each stop within an epoch.
    print(f"stopped within an epoch at {within}")
    assert within


def test_ctrl_c_after_the_last_epoch_keeps_the_finished_run(tmp_path):
    """Ctrl-C in the test evaluation that follows the last epoch (which runs
    to its end): the run is reported as finished, status 0 and its metrics,
    not as interrupted with its result lost (status 130, no table)."""
    glyphs_root = make_glyph_like(tmp_path / "data", per=400)
    cmd = _train_cli(tmp_path / "run", glyphs_root, "--max-steps-per-epoch", "5")
    p, _, out = _trained_after_its_first_line(cmd, 0.0, line_has="] epoch 2/2:")
    assert p.returncode == 0 and "test metrics of the best epoch" in out, out
    assert "interrupted" not in out
    assert (tmp_path / "run" / "summary.json").exists()


PAPER = tiny_run(
    epochs=1,
    max_steps_per_epoch=2,
    classes_per_batch=2,
    samples_per_class=2,
    image_size=64,
    resize_size=72,
    eval_batch_size=8,
    recall_ks=[1, 2],
    val_fraction=0.34,
)


@pytest.mark.parametrize("preset", ["cub200", "cars196", "sop", "inshop"])
def test_paper_presets_run_on_fixtures(preset, tmp_path):
    root = tmp_path / "data"
    if preset == "cub200":
        make_cub(root, classes=12, per_class=3)
    elif preset == "cars196":
        make_cars(root, classes=12, per_class=3)
    elif preset == "sop":
        make_sop(root, range(1, 9), range(100, 104), per=3)
    else:
        spec = [(f"id_{i:08d}", "train", 3) for i in range(1, 9)]
        spec += [(f"id_{i:08d}", s, 2) for i in range(20, 24) for s in ("query", "gallery")]
        make_inshop(root, spec)
    cfg = training.resolve_config(preset)
    assert cfg["backbone"] == "bn_inception" and cfg["optimizer"] == "radam"
    r = grouploss.train(preset, data_root=root, out_dir=tmp_path / "run", plots=False, **PAPER)
    assert set(r.test) >= {"recall@1", "recall@2", "map@r", "nmi"}
    assert all(np.isfinite(r.history[0]["train_loss"]) for _ in [0])
    assert r.summary["test"] == r.test


def test_select_on_test_is_labelled(glyphs_root, tmp_path):
    r = grouploss.train(
        "glyphs",
        data_root=glyphs_root,
        out_dir=tmp_path / "r",
        select_on="test",
        plots=False,
        **dict(TINY, epochs=1),
    )
    assert "release's protocol" in r.summary["selected_on"]
    assert "test" in r.history[0] and "val" not in r.history[0]


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "torchscript"])
def test_backbones_train_on_small_images(backbone, glyphs_root, tmp_path):
    if backbone == "torchscript":
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        path = tmp_path / "net.pt"
        torch.jit.script(net).save(str(path))
        backbone = f"torchscript:{path}"
    r = grouploss.train(
        "glyphs",
        data_root=glyphs_root,
        out_dir=tmp_path / "r",
        backbone=backbone,
        plots=False,
        **dict(TINY, epochs=1, max_steps_per_epoch=2),
    )
    assert np.isfinite(r.history[0]["train_loss"])


def test_torchvision_state_dict_loads_into_resnet18(glyphs_root, tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    sd = tv.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "r18.safetensors"))
    torch.save(sd, tmp_path / "r18.pt")
    for weights in ("r18.safetensors", "r18.pt"):
        out = tmp_path / f"run-{weights}"
        grouploss.train(
            "glyphs",
            data_root=glyphs_root,
            out_dir=out,
            backbone="resnet18",
            pretrained=tmp_path / weights,
            lr=1e-12,
            plots=False,
            **dict(TINY, epochs=1, max_steps_per_epoch=1),
        )
        from safetensors.torch import load_file

        got = load_file(str(out / "checkpoints" / "best.safetensors"))
        w = got["model.backbone.layer3.1.conv2.weight"]
        torch.testing.assert_close(w, sd["layer3.1.conv2.weight"], rtol=1e-6, atol=1e-6)
    bad = dict(sd)
    bad["layer9.weight"] = bad.pop("conv1.weight")
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing keys \[conv1.weight\].*unexpected keys \[layer9"
    ):
        grouploss.train(
            "glyphs",
            data_root=glyphs_root,
            out_dir=tmp_path / "bad",
            backbone="resnet18",
            pretrained=tmp_path / "bad.safetensors",
            plots=False,
            **TINY,
        )


def test_ce_only_baseline_and_ensemble(glyphs_root, tmp_path):
    r = grouploss.train(
        "glyphs",
        data_root=glyphs_root,
        out_dir=tmp_path / "ens",
        gtg_weight=0.0,
        ensemble=2,
        plots=False,
        **dict(TINY, epochs=1),
    )
    assert r.ensemble_test is not None and "recall@1" in r.ensemble_test
    assert (tmp_path / "ens" / "model-1" / "checkpoints" / "best.safetensors").exists()
    assert r.history[0]["train_nll"] == 0.0
    assert len(r.summary["members"]) == 2
    # The run as loaded: the first model's records (once FileNotFoundError,
    # and a report that said no epoch had finished).
    run = grouploss.load_run(tmp_path / "ens")
    assert run.history == r.history
    assert grouploss.RunInspection(tmp_path / "ens").history == r.history


def test_a_run_folder_refuses_another_configuration(glyphs_root, tmp_path):
    """A run folder keeps its configuration: a new run into it or a resumed
    run with another value of an option that changes the results is refused
    by that option's name (resume once dropped such options silently)."""
    out = tmp_path / "r"
    kw = dict(TINY, epochs=1)
    grouploss.train("glyphs", data_root=glyphs_root, out_dir=out, plots=False, **kw)
    lr = training.resolve_config("glyphs", **kw)["lr"]
    changed = rf"^lr: expected {lr}, the value of the run in {re.escape(str(out))} "
    with pytest.raises(ValueError, match=changed):
        grouploss.train(
            "glyphs", data_root=glyphs_root, out_dir=out, plots=False, **dict(kw, lr=0.5)
        )
    with pytest.raises(ValueError, match=changed + r".*; also seed: 0 there, 3 here\), got 0.5$"):
        grouploss.train(resume=out, plots=False, lr=0.5, seed=3)
    with pytest.raises(ValueError, match=r"^epochs: expected 1, the value of the run"):
        grouploss.train(resume=out, plots=False, epochs=2)
    with pytest.raises(ValueError, match="^options: unknown field `unknown_option`"):
        grouploss.train(resume=out, plots=False, unknown_option=1)
    # A resume keeps the run's preset, configuration and folder.
    with pytest.raises(ValueError, match="^preset: expected 'glyphs', the preset of the run in "):
        grouploss.train("fashion-mnist", resume=out, plots=False)
    toml = tmp_path / "c.toml"
    toml.write_text("lr = 0.5\n")
    with pytest.raises(ValueError, match="^config: a resumed run takes its configuration from "):
        grouploss.train(resume=out, config=toml, plots=False)
    with pytest.raises(ValueError, match="^out_dir: expected the resumed folder "):
        grouploss.train(resume=out, out_dir=tmp_path / "elsewhere", plots=False)
    assert "elsewhere" not in (out / "config.toml").read_text()
    # How the run is carried out may change, and the run's own values may
    # be repeated.
    again = grouploss.train(
        "glyphs", resume=out, out_dir=out, plots=False, num_workers=1, prefetch=3, lr=lr
    )
    assert again.run_dir == out


def test_a_run_that_cannot_open_its_data_leaves_no_configuration(glyphs_root, tmp_path):
    """The data opens before the run folder is claimed: a wrong data root
    once left a config.toml that refused the corrected retry."""
    out = tmp_path / "r"
    kw = dict(TINY, epochs=1, plots=False)
    with pytest.raises(FileNotFoundError):
        grouploss.train("glyphs", data_root=tmp_path / "nowhere", out_dir=out, **kw)
    assert not (out / "config.toml").exists()
    grouploss.train("glyphs", data_root=glyphs_root, out_dir=out, **kw)
    assert (out / "config.toml").exists()


def test_a_run_whose_network_cannot_load_leaves_no_configuration(glyphs_root, tmp_path):
    """The network builds, pretrained weights included, before the run
    folder is claimed: a damaged TorchScript backbone or a missing weights
    file once left a config.toml that refused the corrected retry."""
    out = tmp_path / "r"
    kw = dict(TINY, epochs=1, max_steps_per_epoch=1, plots=False)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a TorchScript archive")
    with pytest.raises(ValueError, match=r"damaged\.pt: not a loadable TorchScript module: "):
        grouploss.train(
            "glyphs", data_root=glyphs_root, out_dir=out, backbone=f"torchscript:{damaged}", **kw
        )
    assert not (out / "config.toml").exists()
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        grouploss.train(
            "glyphs",
            data_root=glyphs_root,
            out_dir=out,
            backbone="resnet18",
            pretrained=tmp_path / "missing.safetensors",
            **kw,
        )
    assert not (out / "config.toml").exists()
    scripted = tmp_path / "net.pt"
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    torch.jit.script(net).save(str(scripted))
    grouploss.train(
        "glyphs", data_root=glyphs_root, out_dir=out, backbone=f"torchscript:{scripted}", **kw
    )
    assert (out / "config.toml").exists()


def test_a_converted_pt_file_goes_with_a_run_that_does_not_start(glyphs_root, tmp_path):
    """A ``.pt`` state dict is converted into the run folder; a run that
    then fails to start (weights that do not fit, data not found) removes
    it, and the folder if it made it: a default folder name does not pile
    up one folder a try."""
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pt")
    kw = dict(TINY, epochs=1, max_steps_per_epoch=1, plots=False)
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="missing keys"):
        grouploss.train(
            "glyphs", data_root=glyphs_root, out_dir=fresh, pretrained=tmp_path / "other.pt", **kw
        )
    assert not fresh.exists()
    with pytest.raises(FileNotFoundError):
        grouploss.train(
            "glyphs",
            data_root=tmp_path / "no-data",
            out_dir=fresh,
            pretrained=tmp_path / "other.pt",
            **kw,
        )
    assert not fresh.exists()
    # Folders made for it go too; a folder that was there stays, with what
    # it held.
    with pytest.raises(ValueError, match="missing keys"):
        grouploss.train(
            "glyphs",
            data_root=glyphs_root,
            out_dir=tmp_path / "runs" / "a" / "b",
            pretrained=tmp_path / "other.pt",
            **kw,
        )
    assert not (tmp_path / "runs").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="missing keys"):
        grouploss.train(
            "glyphs", data_root=glyphs_root, out_dir=kept, pretrained=tmp_path / "other.pt", **kw
        )
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    # A run that starts keeps its converted weights.
    torch.save(_trained_backbone(glyphs_root, tmp_path), tmp_path / "convnet.pt")
    run = dict(kw, data_root=glyphs_root, out_dir=fresh)
    grouploss.train("glyphs", pretrained=tmp_path / "convnet.pt", **run)
    assert (fresh / "pretrained.safetensors").exists() and (fresh / "config.toml").exists()
    weights = (fresh / "pretrained.safetensors").read_bytes()
    # Other weights into that run folder are refused; its own file is kept,
    # and the run goes on with the same ones.
    with pytest.raises(ValueError, match=r"^pretrained: .*exists with other weights"):
        grouploss.train("glyphs", pretrained=tmp_path / "other.pt", **run)
    assert (fresh / "pretrained.safetensors").read_bytes() == weights
    grouploss.train("glyphs", pretrained=tmp_path / "convnet.pt", **run)
    grouploss.train(resume=fresh, plots=False)
    # A file of the user's under that name is not replaced either.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "pretrained.safetensors").write_bytes(weights)
    with pytest.raises(ValueError, match="exists with other weights"):
        grouploss.train(
            "glyphs", data_root=glyphs_root, out_dir=theirs, pretrained=tmp_path / "other.pt", **kw
        )
    assert (theirs / "pretrained.safetensors").read_bytes() == weights


def _trained_backbone(glyphs_root, tmp_path) -> dict:
    """The backbone's state dict of a short glyphs run, under its own names."""
    run = grouploss.train(
        "glyphs",
        data_root=glyphs_root,
        out_dir=tmp_path / "source",
        plots=False,
        **dict(TINY, epochs=1, max_steps_per_epoch=1),
    )
    state = grouploss.load_run(run.run_dir, device="cpu").state_dict()
    return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}


def test_a_torchscript_backbones_tied_weights_step_once(glyphs_root, tmp_path):
    """A module used twice in a scripted backbone lists its weight under two
    names; the optimizer steps it once, as torch.optim over
    model.parameters() does. Adam's first step moves each weight by lr
    (it moved them by 2 lr when each name had its own state)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    shared = torch.nn.Conv2d(8, 8, 3, padding=1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        shared,
        torch.nn.ReLU(),
        shared,
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    path = tmp_path / "tied.pt"
    torch.jit.script(net).save(str(path))
    before = shared.weight.detach().clone()
    lr = 1e-2
    out = tmp_path / "r"
    grouploss.train(
        "glyphs",
        data_root=glyphs_root,
        out_dir=out,
        backbone=f"torchscript:{path}",
        plots=False,
        **dict(
            TINY,
            epochs=1,
            max_steps_per_epoch=1,
            optimizer="adam",
            lr=lr,
            backbone_lr=lr,
            weight_decay=0.0,
        ),
    )
    weights = load_file(str(out / "checkpoints" / "last.safetensors"))
    a, b = weights["model.backbone.2.weight"], weights["model.backbone.4.weight"]
    assert torch.equal(a, b), "one tensor under two names"
    moved = (a - before).abs().max().item()
    assert lr * 0.9 < moved < lr * 1.1, moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_bf16_run(glyphs_root, tmp_path):
    r = grouploss.train(
        "glyphs",
        data_root=glyphs_root,
        out_dir=tmp_path / "r",
        plots=False,
        **dict(TINY, device="cuda", bf16=True, epochs=1),
    )
    assert np.isfinite(r.history[0]["train_loss"]) and r.summary["device"].startswith("cuda:")


def test_the_default_preset_is_fashion_mnist():
    cfg = training.resolve_config()
    assert cfg["dataset"] == "fashion-mnist" and cfg["backbone"] == "convnet"
    assert os.path.isdir("/usr/share/datasets/fashion-mnist")


# ------------------------------------------- options of the quality search


def test_split_seed_fixes_the_validation_classes(glyphs_root, tmp_path):
    def val_labels(name, **options):
        opts = dict(TINY, epochs=1, **options)
        r = grouploss.train("glyphs", data_root=glyphs_root, out_dir=tmp_path / name, **opts)
        _, labels = grouploss.load_run(r.run_dir).embed_split("val")
        return np.asarray(labels)

    a = val_labels("a", seed=1, split_seed=7)
    b = val_labels("b", seed=2, split_seed=7)
    c = val_labels("c", seed=1)
    assert np.array_equal(a, b)
    ds = grouploss.datasets.Glyphs(glyphs_root, "val", val_fraction=0.3, split_seed=7)
    assert np.array_equal(a, np.asarray(ds.labels))
    # Unset, the carve follows the run seed.
    ds1 = grouploss.datasets.Glyphs(glyphs_root, "val", val_fraction=0.3, split_seed=1)
    assert np.array_equal(c, np.asarray(ds1.labels))
    assert training.resolve_config("glyphs", split_seed=3)["split_seed"] == 3


def test_gtg_warmup_ramp_and_sharpness_reach_the_loss(glyphs_root, tmp_path):
    opts = dict(TINY, epochs=3, gtg_warmup_epochs=1, gtg_ramp_epochs=1.0, classifier="cosine")
    r = grouploss.train("glyphs", data_root=glyphs_root, out_dir=tmp_path / "ramp", **opts)
    h = r.history
    assert h[0]["gtg_weight"] == 0.0 and h[0]["train_nll"] == 0.0
    assert 0.0 < h[1]["gtg_weight"] < 1.0 and h[1]["train_nll"] > 0.0
    assert h[2]["gtg_weight"] == 1.0
    base = dict(TINY, epochs=1, classifier="cosine", num_anchors=3)
    blunt = grouploss.train(
        "glyphs", data_root=glyphs_root, out_dir=tmp_path / "p1", similarity_power=1.0, **base
    )
    sharp = grouploss.train(
        "glyphs", data_root=glyphs_root, out_dir=tmp_path / "p8", similarity_power=8.0, **base
    )
    assert sharp.history[0]["train_nll"] != blunt.history[0]["train_nll"]
    with pytest.raises(ValueError, match=r"^similarity_power: expected a finite number >= 1"):
        training.resolve_config("glyphs", similarity_power=0.5)


def test_the_runs_dataset_is_split_as_the_run_split_it(glyphs_root, tmp_path):
    """``RunModel.dataset`` opens a split with the run's split seed, which
    is not the run's seed here: the same images, in the same order, as the
    trainer's ``embed_split``."""
    opts = tiny_run(plots=False, epochs=1, seed=3, split_seed=11)
    result = grouploss.train("glyphs", data_root=glyphs_root, out_dir=tmp_path, **opts)
    model = grouploss.load_run(result.run_dir, device="cpu")
    for split in ("train", "val"):
        want, want_labels = model.embed_split(split)
        got, got_labels = model.embed_dataset(model.dataset(split))
        assert torch.equal(got_labels, want_labels)
        assert torch.equal(got, want), split
    other = grouploss.datasets.Glyphs(glyphs_root, split="val", val_fraction=0.3, split_seed=3)
    assert other.classes != model.dataset("val").classes
