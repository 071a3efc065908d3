"""The loss, the metrics and the sampler called from several Python threads
at once give the same results as called one by one (the GIL is released
inside, so the calls really overlap)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from grouploss import ClassBalancedBatchSampler
from grouploss import functional as F
from grouploss import metrics as M
from reference import pk_batch

THREADS = 4


def _loss_job(seed: int, implementation: str, dtype, shape=(6, 5, 40, 64)):
    emb, labels, logits = pk_batch(*shape, dtype=dtype, seed=seed)
    emb.requires_grad_()
    logits.requires_grad_()
    loss = F.group_loss(emb, labels, logits, num_iters=2, implementation=implementation)
    loss.backward()
    return loss.detach(), emb.grad, logits.grad


def test_batch_sized_loss_from_threads_equals_loss_one_by_one():
    """CUB's batch: its products are shared with the helper thread, whose
    single job slot the concurrent calls contend for."""
    args = [(seed, "fused_cpu", torch.float32, (6, 9, 100, 1024)) for seed in range(8)]
    sequential, concurrent = _run_both(_loss_job, args)
    for a, b in zip(sequential, concurrent):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def _metrics_job(seed: int):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(400, 24)).astype(np.float32)
    labels = rng.integers(0, 12, size=400)
    return M.evaluate(emb, labels, include=("recall", "map@r", "r_precision", "nmi"), seed=seed)


def _sampler_job(seed: int):
    labels = np.repeat(np.arange(30), 7)
    s = ClassBalancedBatchSampler(labels, 5, 4, seed=seed)
    s.set_epoch(seed % 3)
    return [list(b) for b in s]


def _run_both(job, args):
    sequential = [job(*a) for a in args]
    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(lambda a: job(*a), args))
    return sequential, concurrent


@pytest.mark.parametrize("implementation", ["auto", "libtorch", "autograd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_from_threads_equals_loss_one_by_one(implementation, dtype):
    args = [(seed, implementation, dtype) for seed in range(16)]
    sequential, concurrent = _run_both(_loss_job, args)
    for a, b in zip(sequential, concurrent):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_metrics_and_sampler_from_threads_equal_one_by_one():
    seq, conc = _run_both(_metrics_job, [(s,) for s in range(8)])
    assert seq == conc
    seq, conc = _run_both(_sampler_job, [(s,) for s in range(16)])
    assert seq == conc


def test_loss_and_metrics_interleaved_from_threads():
    def job(i):
        return _loss_job(i, "auto", torch.float32) if i % 2 else _metrics_job(i)

    seq, conc = _run_both(job, [(i,) for i in range(12)])
    for a, b in zip(seq, conc):
        if isinstance(a, dict):
            assert a == b
        else:
            assert all(torch.equal(x, y) for x, y in zip(a, b))
