"""Crash safety of training runs: kill -9 at random moments (in a step, in
evaluation, in a checkpoint write) and a full disk while a checkpoint is
written. Every restart continues from the newest complete checkpoint and the
run ends with the metrics of an uninterrupted one (CPU, same seed).

``GROUPLOSS_STRESS_KILLS`` sets the number of kills (3 by default; ``make
stress`` uses more)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
from data_fixtures import make_glyph_like, tiny_run, tiny_run_script

import grouploss

KILLS = int(os.environ.get("GROUPLOSS_STRESS_KILLS", "3"))
# Enough epochs for every kill to land inside the run.
EPOCHS = max(3, KILLS)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_glyph_like(tmp_path_factory.mktemp("glyphs-crash"), per=12)


def _cmd(root, out, epochs=EPOCHS):
    code = tiny_run_script(epochs=epochs)
    return [sys.executable, "-c", code, str(root), str(out)]


def _epochs_done(out: pathlib.Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _history(out: pathlib.Path):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    start = time.time()
    subprocess.run(_cmd(data_root, out), check=True, timeout=900)
    (out / "wall_seconds").write_text(str(time.time() - start))
    return out


def _replayable(record: dict) -> dict:
    """What an epoch's record holds that a resumed run reproduces (its
    timings aside)."""
    return {k: record.get(k) for k in ("epoch", "train_loss", "lr", "val")}


def _assert_same_run(out: pathlib.Path, ref: pathlib.Path) -> None:
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((ref / "summary.json").read_text())
    assert got["test"] == want["test"]
    assert got["best_epoch"] == want["best_epoch"]
    assert [_replayable(h) for h in _history(out)] == [_replayable(h) for h in _history(ref)]
    assert not list(out.rglob(".*.tmp-*")), "a temporary file was left behind"


def _checkpoint_is_complete(out: pathlib.Path, ref: pathlib.Path) -> None:
    """The `last` checkpoint (if any) loads, holds finite weights, and its
    trainer state is that of the uninterrupted run after the same epochs."""
    from safetensors import safe_open

    last = out / "checkpoints" / "last.safetensors"
    if not last.exists():
        return
    model = grouploss.load_run(out, checkpoint="last", device="cpu")
    weights = model.state_dict()
    assert any(k.startswith("embed.") for k in weights), sorted(weights)
    assert all(t.isfinite().all() for t in weights.values() if t.is_floating_point())
    with safe_open(str(last), "pt") as f:
        state = json.loads(f.metadata()["grouploss.trainer_state"])
    done = [_replayable(h) for h in state["history"]]
    assert state["epoch"] == len(done)
    assert done == [_replayable(h) for h in _history(ref)][: len(done)]


def _kill_when(p: subprocess.Popen, out: pathlib.Path, moment, delay: float) -> bool:
    """Kills `p` at `moment` ("checkpoint": while a checkpoint's temporary
    file exists; an int e: as soon as epoch e is logged, in the checkpoint
    writes and evaluation that follow; "random": after `delay` s); False if
    the run ended first."""
    ck = out / "checkpoints"
    deadline = time.time() + 300
    start = time.time()
    while p.poll() is None and time.time() < deadline:
        if moment == "checkpoint":
            hit = ck.exists() and any(ck.glob(".*.tmp-*"))
        elif isinstance(moment, int):
            hit = _epochs_done(out) >= moment
        else:
            hit = time.time() - start >= delay
        if hit:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    p.wait(timeout=60)
    return p.returncode == -signal.SIGKILL


def test_kill_9_at_random_moments_loses_nothing(data_root, reference, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(1234)
    wall = float((reference / "wall_seconds").read_text())
    # First right after an epoch (always inside the run), then alternately
    # while a checkpoint is written and at a random time.
    moments = [1] + ["checkpoint" if i % 2 == 0 else "random" for i in range(KILLS - 1)]
    killed = []
    for moment in moments:
        p = subprocess.Popen(_cmd(data_root, out), stderr=subprocess.PIPE)
        # A random time within what is left of the run (a fraction of an
        # uninterrupted run's wall time, in proportion to the epochs left).
        left = (EPOCHS - _epochs_done(out)) / EPOCHS
        if _kill_when(p, out, moment, delay=rng.uniform(0.3, 0.9) * wall * left):
            killed.append((moment, _epochs_done(out)))
            _checkpoint_is_complete(out, reference)
        else:
            assert p.returncode == 0, p.stderr.read().decode()
            break
    assert killed and killed[0][0] == 1, killed
    print(f"kills landed (moment, epochs logged): {killed}")
    if not (out / "summary.json").exists():
        subprocess.run(_cmd(data_root, out), check=True, timeout=900)
    _assert_same_run(out, reference)


def _ignore_sigxfsz():
    # A write past RLIMIT_FSIZE then fails with EFBIG instead of killing the
    # process: a full disk, as the program sees it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(data_root, reference, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(
        _cmd(data_root, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigxfsz,
    )
    last = out / "checkpoints" / "last.safetensors"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.005)
    assert last.exists(), "no checkpoint was written"
    # From now on no file of the process may grow past 4 KiB (a checkpoint
    # is far larger; metrics.jsonl and config.toml fit).
    resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (4096, 4096))
    snapshot = hashlib.sha256(last.read_bytes()).hexdigest()
    _, stderr = p.communicate(timeout=600)
    assert p.returncode != 0, "the run should fail when its checkpoint cannot be written"
    assert "File too large" in stderr or "No space" in stderr, stderr[-2000:]
    assert "safetensors" in stderr, stderr[-2000:]
    # The previous checkpoint is intact and loadable, no partial file left.
    assert hashlib.sha256(last.read_bytes()).hexdigest() == snapshot
    assert not list(out.rglob(".*.tmp-*"))
    _checkpoint_is_complete(out, reference)
    # With space again, the run resumes and ends like an uninterrupted one.
    subprocess.run(_cmd(data_root, out), check=True, timeout=900)
    _assert_same_run(out, reference)


@pytest.mark.parametrize("change", ["rename", "drop", "add", "step", "seed", "nan"])
def test_a_checkpoint_with_a_missing_or_unknown_field_is_refused(data_root, tmp_path, change):
    """The trainer's state is read field by field: a renamed, missing or
    unknown key is an error naming it, never a silent restart at epoch 0;
    values that do not fit together (a step edited to 10**6 once resumed
    silently, recording an epoch of loss 0), the state of another run (a
    `last` copied from a run of another seed once resumed) and NaN in the
    optimizer's state (once a loss error naming no file) are named too."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    grouploss.train(
        "glyphs",
        data_root=str(data_root),
        out_dir=str(out),
        **tiny_run(max_steps_per_epoch=2, eval_batch_size=None, plots=False),
    )
    last = out / "checkpoints" / "last.safetensors"
    with safe_open(str(last), framework="pt") as f:
        meta = dict(f.metadata())
    state = json.loads(meta["grouploss.trainer_state"])
    if change == "rename":
        state["epochs_done"] = state.pop("epoch")
    elif change == "drop":
        del state["best_epoch"]
    elif change == "step":
        state["step"] = 10**6
    elif change == "seed":
        state["seed"] = 999
    elif change == "add":
        state["momentum"] = 0.9
    meta["grouploss.trainer_state"] = json.dumps(state)
    tensors = load_file(str(last))
    if change == "nan":
        name = next(k for k in sorted(tensors) if k.startswith("optim."))
        tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, str(last), metadata=meta)
    expected = {
        "rename": "unknown field `epochs_done`",
        "drop": "missing field `best_epoch`",
        "add": "unknown field `momentum`",
        "step": "step 1000000 with the totals of 0 steps",
        "seed": "the state of member 0 with seed 999, where this run's member 0 has seed",
        "nan": "has values that are not finite",
    }[change]
    with pytest.raises(ValueError, match="last.safetensors") as e:
        grouploss.train(resume=str(out), plots=False)
    assert expected in str(e.value)
    assert change == "nan" or "trainer state" in str(e.value)
