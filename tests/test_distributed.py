"""Data-parallel training on torch.distributed: two gloo processes on the CPU
against one process that computes both ranks' batches and averages their
gradients (the plain DDP loop and the Rust loop), and the run folder of
``grouploss train --nproc-per-node 2``, interrupted and resumed."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from data_fixtures import make_glyph_like, tiny_run
from safetensors import safe_open
from safetensors.torch import load_file

import grouploss
from grouploss import ClassBalancedBatchSampler, _native, training

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "ddp_train.py"


def _env() -> dict:
    """The children import this grouploss; torchrun's one thread per rank."""
    env = dict(os.environ)
    package = str(pathlib.Path(grouploss.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package, env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(nproc: int) -> list:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]


@pytest.fixture(scope="module")
def glyphs_root(tmp_path_factory):
    # 48 images a class: epochs long enough (about a second on two busy
    # cores) to interrupt one reliably.
    return make_glyph_like(tmp_path_factory.mktemp("glyphs"), per=48)


def _load_example():
    spec = importlib.util.spec_from_file_location("ddp_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddp_plain_loop_equals_one_process_averaging_both_ranks(glyphs_root, tmp_path):
    """examples/ddp_train.py on 2 gloo processes, float64: its weights are
    those of one process stepping on the mean of the two ranks' gradients.

    What makes float64 weights after Adam comparable at 1e-9: the reference
    computes with one thread as each rank does (libtorch's reductions sum
    in an order that depends on the thread count and the CPU's vector
    width), and every parameter has a real gradient. A parameter whose
    true gradient is zero (a convolution bias before BatchNorm) receives
    rounding noise, which Adam scales up to a full lr step; the test checks
    that the example has none."""
    saved = tmp_path / "ddp.safetensors"
    epochs, steps, p, k, lr, seed = 2, 3, 3, 4, 1e-2, 5
    cmd = _torchrun(2) + [str(EXAMPLE), "--dataset", "glyphs", "--data", str(glyphs_root)]
    cmd += ["--epochs", str(epochs), "--max-steps", str(steps), "--classes-per-batch", str(p)]
    cmd += ["--samples-per-class", str(k), "--lr", str(lr), "--seed", str(seed)]
    cmd += ["--dtype", "float64", "--save", str(saved)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert run.returncode == 0, run.stderr[-4000:]
    assert "2 processes on cpu" in run.stdout and "test R@1" in run.stdout
    got = load_file(str(saved))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, start = _ddp_reference(glyphs_root, epochs, steps, p, k, lr, seed)
    finally:
        torch.set_num_threads(threads)

    assert set(got) == set(model.state_dict())
    for name, q in model.named_parameters():
        torch.testing.assert_close(got[name], q.detach(), rtol=1e-9, atol=1e-12, msg=name)
    assert any(not torch.equal(start[n], q.detach()) for n, q in model.named_parameters())


def _assert_no_noise_only_gradient(model):
    """Every parameter's gradient is far above float64 rounding relative to
    the largest gradient (a zero true gradient computes as about 1e-16 of
    it)."""
    largest = {n: q.grad.abs().max().item() for n, q in model.named_parameters()}
    scale = max(largest.values())
    noise = {n: g for n, g in largest.items() if g < 1e-10 * scale}
    assert not noise, f"parameters whose gradient is rounding noise: {noise}"


def _ddp_reference(glyphs_root, epochs, steps, p, k, lr, seed):
    """One process stepping on the mean of both ranks' gradients; returns
    the model and its initial parameters."""
    ex = _load_example()
    x, y = ex.load("glyphs", glyphs_root, "train")
    num_classes = int(y.max()) + 1
    model = ex.make_model(num_classes, seed).double()
    start = {n: q.detach().clone() for n, q in model.named_parameters()}
    loss_fn = ex.make_loss(num_classes)
    opt = ex.make_optimizer(model.parameters(), lr)
    samplers = [
        ClassBalancedBatchSampler(y, p, k, seed=seed, num_replicas=2, rank=r) for r in range(2)
    ]
    for epoch in range(epochs):
        model.train()
        for s in samplers:
            s.set_epoch(epoch)
        for step, batches in enumerate(zip(*samplers)):
            if step >= steps:
                break
            assert batches[0] != batches[1]
            grads = []
            for idx in batches:
                model.zero_grad()
                emb, logits = model(x[idx].double())
                loss_fn(emb, y[idx], logits).backward()
                grads.append([q.grad.clone() for q in model.parameters()])
            for q, g0, g1 in zip(model.parameters(), *grads):
                q.grad = (g0 + g1) / 2
            _assert_no_noise_only_gradient(model)
            opt.step()
    return model, start


class _ThreadGroup:
    """Ranks as threads of this process: the collectives the Rust loop calls
    (see grouploss.distributed.ProcessGroup), computed here in Python. With
    it one process computes every rank's batches and averages their
    gradients itself.

    The ranks compute in turns (rank 0 up to its next collective, then
    rank 1, ...): the threads share torch's random generator, which must see
    each rank's draws (the network's initialisation) as separate processes
    do."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.world_size, self._shared = rank, shared["world"], shared

    def wait_turn(self):
        shared = self._shared
        with shared["cond"]:
            if not shared["cond"].wait_for(
                lambda: shared["turn"] == self.rank or shared["aborted"], timeout=120
            ):
                raise TimeoutError(f"rank {self.rank}: no turn")
            if shared["aborted"]:
                raise RuntimeError(f"rank {self.rank}: another rank failed")

    def _exchange(self, tensors):
        shared = self._shared
        slots, barrier = shared["slots"], shared["barrier"]
        with shared["cond"]:
            slots[self.rank] = [t.clone() for t in tensors]
            shared["turn"] = (self.rank + 1) % self.world_size
            shared["cond"].notify_all()
        barrier.wait()
        everyone = [list(s) for s in slots]
        barrier.wait()
        self.wait_turn()
        return everyone

    def all_reduce_mean(self, tensors):
        everyone = self._exchange(tensors)
        for i, t in enumerate(tensors):
            total = everyone[0][i].clone()
            for other in everyone[1:]:
                total += other[i]
            t.copy_(total / self.world_size)

    def all_gather(self, tensor):
        return [s[0] for s in self._exchange([tensor])]

    def broadcast(self, tensors, src):
        everyone = self._exchange(tensors)
        for t, s in zip(tensors, everyone[src]):
            t.copy_(s)

    def barrier(self):
        self._exchange([])


def _threaded_run(config: dict, run_dir: pathlib.Path, world: int = 2) -> list:
    shared = {
        "world": world,
        "slots": [None] * world,
        "barrier": threading.Barrier(world, timeout=120),
        "cond": threading.Condition(),
        "turn": 0,
        "aborted": False,
    }
    outcomes, errors = [None] * world, []

    def rank(r):
        try:
            group = _ThreadGroup(r, shared)
            group.wait_turn()
            outcomes[r] = _native.train_run(config, str(run_dir), group, "cpu")
            # Lets the next rank finish too.
            with shared["cond"]:
                shared["turn"] = (r + 1) % world
                shared["cond"].notify_all()
        except BaseException as e:  # noqa: BLE001  surfaces in the test thread
            errors.append(e)
            with shared["cond"]:
                shared["aborted"] = True
                shared["cond"].notify_all()
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    # The torchrun ranks compute with one thread each: so does the reference.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]
    return outcomes


# The CLI runs are --quiet and the in-process one passes progress=False.
RUN = tiny_run(epochs=4, recall_ks=[1, 2], progress=None)


def _cli_options(root: pathlib.Path, out: pathlib.Path) -> list:
    args = ["--preset", "glyphs", "--quiet", "--data-root", str(root), "--out-dir", str(out)]
    for key, value in RUN.items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        args += ["--" + key.replace("_", "-"), text]
    return args


def _history(run_dir: pathlib.Path) -> list:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


TRAIN_2 = [sys.executable, "-m", "grouploss.cli", "train", "--nproc-per-node", "2"]


def _two_ranks_after_an_epoch(root: pathlib.Path, out: pathlib.Path, output) -> subprocess.Popen:
    """``grouploss train --nproc-per-node 2`` into ``out`` (in its own
    session), returned once its first epoch is logged."""
    p = subprocess.Popen(
        TRAIN_2 + _cli_options(root, out),
        stdout=output,
        stderr=output,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and metrics.read_text().strip():
            break
        time.sleep(0.05)
    return p


def _trainer_state(path: pathlib.Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["grouploss.trainer_state"])


def test_grouploss_train_nproc_per_node_2_resumes_and_averages_like_one_process(
    glyphs_root, tmp_path
):
    out = tmp_path / "cli"

    # Interrupted (Ctrl-C reaches torchrun and both ranks) in epoch 2 or later.
    p = _two_ranks_after_an_epoch(glyphs_root, out, subprocess.PIPE)
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode != 0, stderr[-4000:]
    assert stdout.count("interrupted: checkpoints/last.safetensors saved") == 1, stdout
    assert not (out / "summary.json").exists()
    state = _trainer_state(out / "checkpoints" / "last.safetensors")
    assert state["world_size"] == 2 and 1 <= state["epoch"] < RUN["epochs"]

    # Another world size may not continue it.
    with pytest.raises(ValueError, match="^world_size: expected 2"):
        grouploss.train(resume=out, plots=False)

    resumed = subprocess.run(
        TRAIN_2 + ["--resume", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    # One writer: rank 0 reports, writes the folder's files once, no leftovers.
    assert resumed.stdout.count("run folder:") == 1
    assert resumed.stdout.count("test metrics of the best epoch") == 1
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert files == [
        "checkpoints/best.safetensors",
        "checkpoints/last.safetensors",
        "config.toml",
        "input.json",
        "loss.png",
        "metrics.jsonl",
        "metrics.png",
        "steps.tsv",
        "summary.json",
    ]
    history = _history(out)
    assert [h["epoch"] for h in history] == list(range(1, RUN["epochs"] + 1))
    # steps.tsv: each step of every epoch once, the killed run's and the
    # resumed run's lines joined without a repeat.
    rows = [line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert len(rows) == len(set(map(tuple, rows)))
    for epoch in range(1, RUN["epochs"] + 1):
        steps = sorted(int(st) for e, st in rows if int(e) == epoch)
        assert steps == list(range(1, len(steps) + 1)) and steps, (epoch, steps)
    assert all({"recall@1", "map@r"} <= set(h["val"]) for h in history)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and {"recall@1", "map@r", "nmi"} <= set(summary["test"])

    # The reference: one process runs both ranks (threads) of the same
    # configuration uninterrupted and averages their gradients itself.
    ref = tmp_path / "ref"
    cfg = training.resolve_config(
        "glyphs", data_root=glyphs_root, out_dir=ref, progress=False, **RUN
    )
    outcomes = _threaded_run(cfg, ref)
    assert outcomes[0] == outcomes[1]  # every rank returns rank 0's outcome
    want = _history(ref)
    # The epoch interrupted mid-way logs the mean loss of its resumed steps.
    cut = state["epoch"] + 1 if state["step"] > 0 else None
    assert len(history) == len(want)
    for got_epoch, want_epoch in zip(history, want):
        if got_epoch["epoch"] != cut:
            assert got_epoch["train_loss"] == pytest.approx(want_epoch["train_loss"], rel=1e-5)
        assert got_epoch["val"]["map@r"] == pytest.approx(want_epoch["val"]["map@r"], abs=1e-5)
    assert summary["test"]["map@r"] == pytest.approx(outcomes[0]["test"]["map@r"], abs=1e-5)
    got_w = load_file(str(out / "checkpoints" / "last.safetensors"))
    want_w = load_file(str(ref / "checkpoints" / "last.safetensors"))
    assert set(got_w) == set(want_w)
    for name in want_w:
        torch.testing.assert_close(got_w[name], want_w[name], rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------- GroupLoss's own classifier


def _loss_classifier_rank(rank: int, world: int, port: int, wrap: bool, out: str) -> None:
    """One rank: a linear embedding and GroupLoss's own classifier, trained
    on this rank's own batches; ``wrap`` puts the loss in DDP too."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DDP(torch.nn.Linear(6, 5))
    loss_fn = grouploss.GroupLoss(8, embedding_size=5, temperature=10.0)
    if wrap:
        loss_fn = DDP(loss_fn)
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(3):
        x = torch.randn(12, 6, generator=g)
        y = torch.arange(4).repeat_interleave(3) + 4 * (rank % 2)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    own = loss_fn.module if wrap else loss_fn
    torch.save(own.classifier.weight.detach(), f"{out}/rank{rank}.pt")
    # Both ranks done before either tears gloo down (else the other's gloo
    # thread may see its peer vanish and abort the process).
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: libtorch's and gloo's static threads
    # being destroyed at exit sometimes abort a spawned child ("terminate
    # called without an active exception") after its work is done and saved.
    os._exit(0)


def _loss_memory_rank(rank: int, world: int, port: int, opts: tuple, out: str) -> None:
    """One rank: ``DDP(GroupLoss(..., memory_size=24))`` over this rank's own
    batches of 12 (classes 4 x rank + 0..3); saves the memory after 3 steps.
    ``opts``: (gather_ranks, DDP's broadcast_buffers)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    gather, broadcast = opts
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    loss = grouploss.GroupLoss(8, embedding_size=5, memory_size=24, gather_ranks=gather)
    loss_fn = DDP(loss, broadcast_buffers=broadcast)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(3):
        x = torch.randn(12, 5, generator=g, requires_grad=True)
        y = torch.arange(4).repeat_interleave(3) + 4 * rank
        loss_fn(x, y).backward()
    torch.save(
        {"embeddings": loss.memory_embeddings, "labels": loss.memory_labels},
        f"{out}/rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as in _loss_classifier_rank


def _children(pid: int) -> list:
    kids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_ranks_stop_and_save_when_their_launcher_is_killed(glyphs_root, tmp_path):
    """``kill -9`` of ``grouploss train --nproc-per-node 2`` (which cannot
    stop its ranks then): the ranks notice, agree on a step, save ``last``
    and end, as after Ctrl-C, instead of training on unseen."""
    out = tmp_path / "run"
    p = _two_ranks_after_an_epoch(glyphs_root, out, subprocess.DEVNULL)
    ranks = []
    try:
        ranks = _children(p.pid)
        assert len(ranks) == 2, ranks
        p.kill()
        p.wait(timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline and any(_running(r) for r in ranks):
            time.sleep(0.1)
        assert not any(_running(r) for r in ranks), "the ranks outlived their launcher"
    finally:
        for r in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(r, signal.SIGKILL)
    # They stopped (a few epochs on unseen would have finished the run).
    assert not (out / "summary.json").exists(), "the ranks trained on without their launcher"
    state = _trainer_state(out / "checkpoints" / "last.safetensors")
    assert state["world_size"] == 2 and 1 <= state["epoch"] < RUN["epochs"]
    assert not list(out.rglob(".*.tmp-*"))


@pytest.mark.parametrize("gather, broadcast", [(False, True), (False, False), (True, True)])
def test_ddp_of_the_loss_shares_the_memory_as_documented(tmp_path, gather, broadcast):
    """``DDP(loss_fn)`` copies rank 0's buffers, the memory among them, to
    every rank before each forward: without ``gather_ranks`` every rank
    refines with rank 0's memory (then appends its own batch), and
    ``broadcast_buffers=False`` keeps one memory per rank; with
    ``gather_ranks`` the memories hold the gathered batches, equal on every
    rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_loss_memory_rank, args=(2, port, (gather, broadcast), str(tmp_path)), nprocs=2)
    m0, m1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(m0["labels"]) == len(m1["labels"]) == 24
    if gather:
        assert torch.equal(m0["embeddings"], m1["embeddings"])
        assert torch.equal(m0["labels"], m1["labels"])
        assert set(m0["labels"].tolist()) == set(range(8))  # both ranks' classes
        return
    assert set(m0["labels"].tolist()) == {0, 1, 2, 3}
    assert set(m1["labels"][12:].tolist()) == {4, 5, 6, 7}  # its own last batch
    older = m1["labels"][:12].tolist()
    if broadcast:  # rank 0's second batch, copied before the third forward
        assert torch.equal(m1["embeddings"][:12], m0["embeddings"][:12])
        assert set(older) == {0, 1, 2, 3}
    else:
        assert set(older) == {4, 5, 6, 7}


@pytest.mark.parametrize("wrap", [True, False])
def test_the_loss_classifier_stays_equal_across_ranks_in_ddp(tmp_path, wrap):
    """``DDP(loss_fn)`` averages the gradients of GroupLoss's own classifier
    as DDP does the network's: the ranks keep one classifier. Unwrapped, each
    rank's classifier follows its own data (what the wrapper is for)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_loss_classifier_rank, args=(2, port, wrap, str(tmp_path)), nprocs=2)
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    torch.nn.Linear(6, 5)
    w_init = grouploss.GroupLoss(8, embedding_size=5).classifier.weight.detach()
    assert not torch.equal(w0, w_init)  # trained
    if wrap:
        torch.testing.assert_close(w0, w1, rtol=0, atol=0)
    else:
        assert (w0 - w1).abs().max() > 1e-3


def test_the_example_trains_with_the_loss_owning_the_classifier(glyphs_root, tmp_path):
    cmd = _torchrun(2) + [
        str(EXAMPLE),
        "--dataset",
        "glyphs",
        "--data",
        str(glyphs_root),
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--classes-per-batch",
        "3",
        "--samples-per-class",
        "4",
        "--loss-classifier",
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 0: loss" in done.stdout


# ------------------------------------------------ gather_ranks: one group


def _gathered_batch(rank: int, sizes=(12, 9)):
    """Rank ``rank``'s batch (float64; the ranks' sizes differ)."""
    g = torch.Generator().manual_seed(50 + rank)
    n = sizes[rank]
    labels = torch.randint(0, 6, (n,), generator=g)
    emb = torch.randn(n, 5, generator=g, dtype=torch.float64)
    logits = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return emb, labels, logits


def _gather_rank(rank: int, world: int, port: int, out: str, kwargs: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    emb, labels, logits = _gathered_batch(rank)
    emb.requires_grad_()
    logits.requires_grad_()
    loss = grouploss.GroupLoss(6, gather_ranks=True, **kwargs)(emb, labels, logits)
    loss.backward()
    torch.save(
        {"loss": loss.detach(), "emb": emb.grad, "logits": logits.grad}, f"{out}/rank{rank}.pt"
    )
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 10.0}, {"num_iters": 2, "similarity_power": 4.0, "batch_classes_only": True}],
)
def test_gather_ranks_equals_one_process_on_the_concatenated_batch(tmp_path, kwargs):
    """2 gloo ranks with ``gather_ranks=True``: the loss on every rank and
    the gradients of each rank's inputs equal those of one process computing
    the loss of the concatenated batch (float64, 1e-9)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_rank, args=(2, port, str(tmp_path), kwargs), nprocs=2)
    parts = [_gathered_batch(r) for r in (0, 1)]
    emb = torch.cat([p[0] for p in parts]).requires_grad_()
    labels = torch.cat([p[1] for p in parts])
    logits = torch.cat([p[2] for p in parts]).requires_grad_()
    loss = grouploss.GroupLoss(6, **kwargs)(emb, labels, logits)
    loss.backward()
    start = 0
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        n = len(parts[r][1])
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=0, atol=1e-9)
        torch.testing.assert_close(got["emb"], emb.grad[start : start + n], rtol=0, atol=1e-9)
        torch.testing.assert_close(got["logits"], logits.grad[start : start + n], rtol=0, atol=1e-9)
        start += n
    # One rank alone would give another loss (the test could fail).
    alone = grouploss.GroupLoss(6, **kwargs)(*[parts[0][i] for i in (0, 1, 2)])
    assert abs(alone.item() - loss.item()) > 1e-3


def _mismatched_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of ``gather_ranks=True`` where rank 1 passes 7 labels for 8
    embeddings; saves the error it got (a hang ends in gloo's 20 s timeout)."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20)
    )
    from grouploss.distributed import gather_batches

    emb = torch.randn(8, 5)
    labels = torch.arange(8 - rank) % 4
    calls = [
        lambda: grouploss.GroupLoss(4, embedding_size=5, gather_ranks=True)(emb, labels),
        # rank 1's logits in float64: the gather's buffers would not match
        lambda: gather_batches(
            emb, torch.zeros(8, 4, dtype=[torch.float32, torch.float64][rank]), names=["e", "l"]
        ),
        # rank 0's embeddings too wide for the module's classifier: an error
        # before the gather, on rank 0 alone
        lambda: grouploss.GroupLoss(4, embedding_size=5, gather_ranks=True)(
            torch.randn(8, 5 + (rank == 0)), labels[:7]
        ),
    ]
    got = []
    for call in calls:
        try:
            call()
            got.append("no error")
        except Exception as e:  # noqa: BLE001 (the test reads the type and text)
            got.append(f"{type(e).__name__}: {e}")
    (pathlib.Path(out) / f"rank{rank}.txt").write_text("\n".join(got))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_gather_ranks_names_a_mismatched_argument_on_every_rank(tmp_path):
    """A labels length that does not match the embeddings on one rank, or
    logits of another dtype on one rank, is a ValueError naming the argument
    and the rank on every rank, none left waiting in the gather."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_mismatched_rank, args=(2, port, str(tmp_path)), nprocs=2)
    want = (
        "ValueError: labels: expected one row per row of embeddings on every rank, "
        "got 7 rows for 8 on rank 1\n"
        "ValueError: l: expected the same shape beyond the rows and the same dtype on "
        "every rank, got another on rank 1 than on rank 0\n"
    )
    got = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert got[0].startswith(want + "ValueError: embeddings: expected "), got[0]
    assert got[1] == want + (
        "RuntimeError: rank 0 failed before gathering the batches (its own error says why)"
    )


def test_gather_batches_checks_its_arguments():
    from grouploss.distributed import gather_batches

    with pytest.raises(ValueError, match="^tensors: expected at least one tensor"):
        gather_batches()
    with pytest.raises(ValueError, match="^names: expected 2 names, got 1"):
        gather_batches(torch.zeros(2), torch.zeros(2), names=["a"])
    x = torch.zeros(3, 2)
    assert gather_batches(x)[0] is x  # no process group: as it is


def test_the_trainer_gathers_ranks_into_one_group_with_one_memory(glyphs_root, tmp_path):
    """``gather_ranks`` with a memory in the Rust loop, 2 ranks (threads):
    the run completes, rank 0's checkpoint holds the memory of the global
    batches (2 x P x K samples a step), and a memory without
    ``gather_ranks`` over several processes is refused by name."""
    opts = dict(RUN, epochs=1, memory_size=40, memory_warmup_steps=1)
    cfg = training.resolve_config(
        "glyphs",
        data_root=glyphs_root,
        out_dir=tmp_path / "g",
        progress=False,
        gather_ranks=True,
        **opts,
    )
    outcomes = _threaded_run(cfg, tmp_path / "g")
    assert outcomes[0] == outcomes[1]
    last = tmp_path / "g" / "checkpoints" / "last.safetensors"
    weights = load_file(str(last))
    assert weights["memory.embeddings"].shape == (40, cfg["embedding_size"])
    steps = len((tmp_path / "g" / "steps.tsv").read_text().splitlines()) - 1
    assert _trainer_state(last)["memory_steps"] == steps > 0
    alone = training.resolve_config(
        "glyphs", data_root=glyphs_root, out_dir=tmp_path / "a", progress=False, **opts
    )
    with pytest.raises(ValueError, match="^memory_size: .*gather_ranks"):
        _threaded_run(alone, tmp_path / "a")
