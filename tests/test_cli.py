"""The ``grouploss`` command: one-line errors with their exit status, the
traceback only on request, and logs that read well in a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from data_fixtures import make_glyph_like, tiny_run

from grouploss import cli


@pytest.fixture(scope="module")
def glyphs_root(tmp_path_factory):
    return make_glyph_like(tmp_path_factory.mktemp("glyphs"))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    env.update(extra)
    return env


def _cli(*args: str, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grouploss.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or _env(),
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", "--preset", "cub200", "--data-root", "/data/missing"],
            "argument --data-root: /data/missing: no such file or folder",
        ),
        (["train", "--resume", "/runs/missing"], "--resume: /runs/missing is not a run folder"),
        (
            ["train", "--epochs", "x"],
            "argument --epochs: invalid int value: 'x' (see 'grouploss train --help')",
        ),
        (["train", "--temperature", "-1"], "temperature: expected a finite number > 0, got -1"),
        (["train", "--nproc-per-node", "0"], "argument --nproc-per-node: expected an integer >= 1"),
        (["evaluate", "/runs/missing"], "argument run_dir: /runs/missing: no such file or folder"),
        (["report", ".", "--k", "0"], "argument --k: expected an integer >= 1, got 0"),
        (["report", ".", "--queries", "101"], "argument --queries: expected an integer <= 100"),
        (
            ["report", ".", "--seed", str(2**32)],
            "argument --seed: expected an integer <= 4294967295",
        ),
        (["report", ".", "--out", "."], "argument --out: . is a folder; expected a file to write"),
        (
            ["datasets", "build", "glyphs", "--max-train", "0"],
            "argument --max-train: expected an integer >= 1, got 0",
        ),
        (
            ["datasets", "build", "glyphs", "--fonts", "/fonts/missing"],
            "argument --fonts: /fonts/missing: no such file or folder",
        ),
        (["train", "--no-such-option", "1"], "unrecognized arguments: --no-such-option 1"),
        (["frob"], "argument command: invalid choice: 'frob'"),
        (["datasets", "build", "fonts"], "argument name: invalid choice: 'fonts'"),
        (["search", ".", "/images/missing.png"], "argument IMAGES: /images/missing.png: no such"),
        (["search", ".", ".", "--k", "0"], "argument --k: expected an integer >= 1, got 0"),
        (["export", "."], "the following arguments are required: --format, --out"),
        (
            ["export", ".", "--format", "torchscript", "--out", "/"],
            "argument --out: / is a folder; expected a file to write",
        ),
        (["embed", ".", "--data", "test", "--out", "/"], "argument --out: / is a folder"),
        (["index", ".", "--data", "test", "--out", "/"], "argument --out: / is a folder"),
        # Once status 1, from the trainer after the data had loaded.
        (["train", "--device", "gpu"], "device: expected cpu, cuda, cuda:N (an existing device)"),
        # Once status 1, from the run's model after it had loaded.
        (["evaluate", ".", "--split", "tset"], "argument --split: invalid choice: 'tset'"),
        (["report", ".", "--split", "validation"], "argument --split: invalid choice: 'valid"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(capsys, monkeypatch, args, message):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("grouploss: error: " + message), err
    assert err.count("\n") == 1


def test_other_errors_are_one_line_with_status_1(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["evaluate", str(tmp_path)]) == 1
    _, err = capsys.readouterr()
    assert err == f"grouploss: error: {tmp_path / 'config.toml'}: " + (
        f"no such file: {tmp_path} is not a run folder (`grouploss train` writes one)\n"
    )


@pytest.mark.parametrize("text", ["epochs = \n", 'epochs = "x"\n'])
def test_a_message_of_several_lines_becomes_one(capsys, monkeypatch, tmp_path, text):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert cli.main(["train", "--config", str(config)]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("grouploss: error: ") and err.count("\n") == 1, err


def test_the_traceback_only_with_debug(tmp_path):
    run = _cli("evaluate", str(tmp_path))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("grouploss: error: ") and run.stderr.count("\n") == 1
    assert _cli("evaluate", str(tmp_path), env=_env(GROUPLOSS_DEBUG="false")).stderr == run.stderr
    runs = [
        _cli("evaluate", str(tmp_path), "--debug"),
        _cli("evaluate", str(tmp_path), "--deb"),  # argparse's abbreviation
        _cli("evaluate", str(tmp_path), env=_env(GROUPLOSS_DEBUG="1")),
    ]
    for debug in runs:
        assert debug.returncode == 1
        assert "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.rstrip().splitlines()[-1].startswith("FileNotFoundError: ")


def test_help_documents_the_errors_and_debug():
    run = _cli("--help")
    assert run.returncode == 0
    assert "--debug" in run.stdout and "GROUPLOSS_DEBUG=1" in run.stdout
    assert "grouploss: error:" in run.stdout
    sub = _cli("train", "--help")
    assert sub.returncode == 0 and "--debug" in sub.stdout


def test_train_help_describes_every_option():
    """Each run option's flag shows the doc comment of its Rust field (the
    one description) and the default preset's value."""
    import argparse

    from grouploss import _native, training

    parser = argparse.ArgumentParser()
    cli._option_parser(parser)
    helps = {a.dest: a.help for a in parser._actions}
    docs = dict(_native.option_docs())
    for key in training.resolve_config("fashion-mnist"):
        if key == "preset":
            continue
        assert helps.get(key), f"--{key.replace('_', '-')} has no description"
        assert helps[key].startswith(docs[key].replace("`", "")[:20].replace("%", "%%")), key
    assert "[4]" in helps["epochs"] and "Passes over" in helps["epochs"]
    text = _cli("train", "--help").stdout
    assert "Seed of the validation classes" in " ".join(text.split())


def test_python_dash_m_grouploss_is_the_command(tmp_path):
    """``python -m grouploss`` runs the same command (and exit status) as
    ``grouploss``, for an environment whose scripts are not on PATH."""
    run = subprocess.run(
        [sys.executable, "-m", "grouploss", "evaluate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (run.returncode, run.stderr) == (1, _cli("evaluate", str(tmp_path)).stderr)
    assert run.stderr.startswith("grouploss: error: ")


def test_a_run_logged_to_a_file_has_no_progress_frames(glyphs_root, tmp_path):
    """stderr not a terminal: lines only, one per epoch (the step lines
    come at most every 30 s; Rust's unit tests time them), and the device
    as PyTorch names it."""
    out = tmp_path / "run"
    args = ["train", "--preset", "glyphs", "--data-root", str(glyphs_root), "--epochs", "2"]
    args += ["--classes-per-batch", "3", "--samples-per-class", "4", "--num-workers", "1"]
    args += ["--val-fraction", "0.3", "--device", "cpu", "--out-dir", str(out)]
    run = _cli(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\r" not in run.stderr
    lines = run.stderr.splitlines()
    assert lines[0].endswith(f"run {out} on cpu: glyphs (convnet), 2 epochs"), lines[0]
    assert [line.split("] ")[1].split(":")[0] for line in lines[1:3]] == ["epoch 1/2", "epoch 2/2"]
    assert not any(" step " in line for line in lines), lines


@pytest.fixture(scope="module")
def small_run(glyphs_root, tmp_path_factory):
    import grouploss

    out = tmp_path_factory.mktemp("run")
    opts = tiny_run(plots=False, epochs=1, embedding_size=16)
    return grouploss.train("glyphs", data_root=glyphs_root, out_dir=out, **opts).run_dir


def _neighbours(stdout: str):
    """``{query path: [(score, id, rest of the line), ...]}`` of ``grouploss search``."""
    found, query = {}, None
    for line in stdout.splitlines():
        if line.startswith("query "):
            query = line.split(": ", 1)[1]
            found[query] = []
        else:
            rank, score, _, i, *rest = line.split(maxsplit=4)
            assert int(rank) == len(found[query]) + 1
            found[query].append((float(score), int(i), " ".join(rest)))
    return found


def test_search_finds_the_query_images_in_the_gallery(small_run, tmp_path):
    """Test images written as PNG files are found as their own first
    neighbour in the test split; the neighbours are those of an Index of
    the run's embeddings, and an index file gives the same."""
    from PIL import Image

    import grouploss

    model = grouploss.load_run(small_run, device="cpu")
    test = model.dataset("test")
    picks = [0, 5, len(test) - 1]
    paths = []
    for i in picks:
        path = tmp_path / "queries" / test.classes[test.labels[i]] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.load(i)[0].numpy()).save(path)
        paths.append(str(path))
    run = _cli("search", str(small_run), *paths, "--k", "3", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    found = _neighbours(run.stdout)
    assert list(found) == paths

    emb, labels = model.embed_split("test")
    index = grouploss.Index(emb.shape[1])
    index.add(emb, labels=labels)
    scores, ids = index.search(emb[picks].numpy(), 3)
    for q, (i, path) in enumerate(zip(picks, paths)):
        rows = found[path]
        assert rows[0][1] == i and abs(rows[0][0] - 1) < 1e-4
        assert [r[1] for r in rows] == ids[q].tolist()
        assert [r[0] for r in rows] == pytest.approx(scores[q].tolist(), abs=1e-4)
        assert rows[0][2].startswith(f"label {test.classes[test.labels[i]]}  ")

    gallery = tmp_path / "gallery.safetensors"
    run = _cli("index", str(small_run), "--data", "test", "--out", str(gallery), "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert len(grouploss.Index.load(gallery)) == len(test)
    run = _cli("search", str(gallery), *paths, "--k", "3", "--run", str(small_run))
    assert run.returncode == 0, run.stderr
    from_file = _neighbours(run.stdout)
    for path in paths:
        assert [r[1] for r in from_file[path]] == [r[1] for r in found[path]]
        # The index file keeps the class names.
        expected = [f"label {test.classes[test.labels[r[1]]]}" for r in found[path]]
        assert [r[2] for r in from_file[path]] == expected


def test_an_index_with_damaged_class_names_prints_label_numbers(small_run, tmp_path, capsys):
    """An index file edited elsewhere: class names that are not JSON, not a
    list of names, or fewer than its labels are printed as numbers, never a
    KeyError or IndexError."""
    import grouploss

    gallery = tmp_path / "gallery.safetensors"
    argv = ["index", str(small_run), "--data", "test", "--out", str(gallery), "--device", "cpu"]
    assert cli.main(argv) == 0
    index = grouploss.Index.load(gallery)
    image = tmp_path / "q.png"
    from PIL import Image

    Image.new("L", (32, 32)).save(image)
    capsys.readouterr()
    for names in ("{", '{"a": 1}', '["only one"]'):
        index.info = {**index.info, "grouploss.class_names": names}
        index.save(gallery)
        search = ["search", str(gallery), str(image), "--k", "40", "--run", str(small_run)]
        assert cli.main([*search, "--device", "cpu"]) == 0
        labels = [r[2].split()[1] for r in _neighbours(capsys.readouterr().out)[str(image)]]
        assert len(labels) == 40 and any(label.isdigit() for label in labels), labels


def test_damaged_run_files_are_named(small_run, tmp_path):
    """metrics.jsonl and summary.json that do not hold JSON objects are
    named, with the line, instead of a bare JSON or TypeError."""
    import shutil

    import grouploss

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    model = grouploss.load_run(run, device="cpu")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not JSON"):
        _ = model.history
    (run / "summary.json").write_text('"a string"')
    with pytest.raises(ValueError, match=r"summary\.json: expected a JSON object, got str"):
        _ = model.summary


def test_an_index_refuses_queries_of_another_network(small_run, glyphs_root, tmp_path):
    """The queries of an index file must be embedded by the network that
    embedded it: another run's (same input and width) is a usage error."""
    import grouploss

    gallery = tmp_path / "gallery.safetensors"
    run = _cli("index", str(small_run), "--data", "test", "--out", str(gallery), "--device", "cpu")
    assert run.returncode == 0, run.stderr
    info = grouploss.Index.load(gallery).info
    assert len(info["grouploss.weights_sha256"]) == 64
    assert json.loads(info["grouploss.class_names"])[:2] == list(
        grouploss.load_run(small_run, device="cpu").dataset("test").classes[:2]
    )
    other = grouploss.train(
        "glyphs",
        data_root=glyphs_root,
        out_dir=tmp_path / "other",
        **tiny_run(plots=False, epochs=1, embedding_size=16, seed=7),
    ).run_dir
    image = tmp_path / "q.png"
    from PIL import Image

    Image.new("L", (32, 32)).save(image)
    args = ("search", str(gallery), str(image), "--k", "2", "--device", "cpu")
    refused = _cli(*args, "--run", str(other))
    assert refused.returncode == 2
    assert "is not the network that embedded" in refused.stderr
    assert _cli(*args, "--run", str(small_run)).returncode == 0


def test_search_in_an_index_needs_the_run(small_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    import grouploss

    index = grouploss.Index(4)
    index.add(torch.eye(4))
    index.save(tmp_path / "g.safetensors")
    image = tmp_path / "q.png"
    from PIL import Image

    Image.new("L", (32, 32)).save(image)
    assert cli.main(["search", str(tmp_path / "g.safetensors"), str(image)]) == 2
    assert "--run: needed with an index file" in capsys.readouterr().err
    assert cli.main(["search", str(small_run), str(image), "--run", str(small_run)]) == 2
    assert "--run: only with an index file" in capsys.readouterr().err
    index_args = ["search", str(tmp_path / "g.safetensors"), str(image), "--run", str(small_run)]
    assert cli.main([*index_args, "--gallery", "test"]) == 2
    assert "--gallery: only with a run folder" in capsys.readouterr().err
    # A split name is the run's split even where a folder has that name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test").mkdir()
    assert cli.main(["search", str(small_run), str(image), "--gallery", "test", "--k", "1"]) == 0
    assert "t10k-images-idx3-ubyte" in capsys.readouterr().out


def test_a_gallery_that_is_neither_split_nor_folder_names_its_option(
    small_run, tmp_path, capsys, monkeypatch
):
    from PIL import Image

    from grouploss import training

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    # Refused before any model is loaded.
    loaded = []
    monkeypatch.setattr(training, "load_run", lambda *a, **k: loaded.append(a))
    image = tmp_path / "q.png"
    Image.new("L", (28, 28)).save(image)
    assert cli.main(["search", str(small_run), str(image), "--gallery", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "--gallery: expected a split name (train, val, test" in err
    assert "or a folder, got 'nowhere'" in err
    out = tmp_path / "e.npy"
    assert cli.main(["embed", str(small_run), "--data", "nowhere", "--out", str(out)]) == 2
    assert "--data: expected a split name" in capsys.readouterr().err
    assert not out.exists()
    index_args = ["index", str(small_run), "--data", "nowhere", "--out", str(out)]
    assert cli.main(index_args) == 2
    assert "--data: expected a split name" in capsys.readouterr().err
    assert loaded == []


def test_embed_replaces_embeddings_and_labels_together(small_run, tmp_path, monkeypatch):
    """A failed write (a full disk while the labels are written) leaves the
    previous pair as it was, never new embeddings beside old labels."""
    import numpy as np

    out = tmp_path / "emb.npy"
    argv = ["embed", str(small_run), "--out", str(out), "--data"]
    assert cli.main([*argv, "test"]) == 0
    before = out.read_bytes(), (tmp_path / "emb_labels.npy").read_bytes()
    save, calls = np.save, []

    def full_disk_at_the_labels(f, values):
        calls.append(values.shape)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        save(f, values)

    monkeypatch.setattr(np, "save", full_disk_at_the_labels)
    assert cli.main([*argv, "train"]) == 1
    assert len(calls) == 2 and calls[0] != np.load(out).shape  # another split
    assert (out.read_bytes(), (tmp_path / "emb_labels.npy").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "emb_labels.npy"]


def test_embed_takes_the_checkpoint_and_device_like_the_other_commands(
    small_run, tmp_path, monkeypatch
):
    """``grouploss embed --checkpoint last --device cpu`` loads that model
    and writes its embeddings and labels of the split."""
    import numpy as np

    from grouploss import training

    asked = []
    load_run = training.load_run

    def recording(*args, **kwargs):
        asked.append(kwargs)
        return load_run(*args, **kwargs)

    monkeypatch.setattr(training, "load_run", recording)
    out = tmp_path / "emb.npy"
    argv = ["embed", str(small_run), "--data", "test", "--out", str(out)]
    assert cli.main([*argv, "--checkpoint", "last", "--device", "cpu"]) == 0
    assert asked == [{"checkpoint": "last", "device": "cpu", "trust_torchscript": False}]
    emb, labels = load_run(small_run, checkpoint="last", device="cpu").embed_split("test")
    np.testing.assert_array_equal(np.load(out), emb.numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "emb_labels.npy"), labels.numpy())
    # A name without ".npy" gets it, and the names printed are those written.
    assert cli.main([*argv[:-1], str(tmp_path / "plain")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), emb.numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "plain_labels.npy"), labels.numpy())


def test_the_launchers_own_loggers_are_silenced():
    """torch's elastic modules set their loggers' levels themselves: the
    parent's level let "Received 2 death signal, shutting down workers"
    through on Ctrl-C of an --nproc-per-node run."""
    import logging

    from torch.distributed import run  # noqa: F401  creates the launcher's loggers

    names = [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        cli._quiet_launcher_logs()
        agent = logging.getLogger("torch.distributed.elastic.agent.server.api")
        assert not agent.isEnabledFor(logging.WARNING)
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def test_a_path_that_is_not_utf8_is_shown_with_a_replacement_character():
    """Dataset paths keep a name's undecodable bytes as surrogate escapes,
    which a UTF-8 stdout refuses: the search's lines show U+FFFD instead."""
    assert cli._shown("/img/caf\udce9.png") == "/img/caf\ufffd.png"
    assert cli._shown("/img/café.png") == "/img/café.png"
