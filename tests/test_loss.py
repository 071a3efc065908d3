"""GroupLoss and grouploss.functional against the spec and a brute-force
reference, on every dtype and device present."""

from __future__ import annotations

import ast
import copy
import inspect
import itertools
import pathlib
import time
import warnings

import pytest
import torch
from ticking import ticking

import grouploss
from grouploss import GroupLoss
from grouploss import functional as F
from reference import pk_batch, reference_group_loss, reference_similarity

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def golden():
    emb = torch.tensor(
        [
            [0.9, 0.1, 0.4, 0.7, 0.2],
            [0.8, 0.3, 0.5, 0.6, 0.1],
            [0.1, 0.9, 0.2, 0.3, 0.8],
            [0.2, 0.7, 0.1, 0.4, 0.9],
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[2, 1, 0], [1, 2, 0.5], [0, 1, 3], [0.5, 0.2, 0.1]], dtype=torch.float64)
    return emb, labels, logits


# ---------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    "device, implementation",
    [
        (device, implementation)
        for device in DEVICES
        for implementation in ("auto", "autograd", "libtorch", "fused_cpu")
        if implementation != "fused_cpu" or device == "cpu"  # fused_cpu: CPU tensors only
    ],
)
def test_golden_vector_of_the_spec(device, implementation):
    """Every implementation gives the spec's golden vector (``auto`` is
    ``fused_cpu`` on a CPU, ``libtorch`` on CUDA)."""
    emb, labels, logits = (t.to(device) for t in golden())
    kw = dict(temperature=2, num_anchors=1, return_details=True, implementation=implementation)
    w = F.similarity(emb)
    expected_w = torch.tensor(
        [[1, 0.913855, 0, 0], [0.913855, 1, 0, 0], [0, 0, 1, 0.921751], [0, 0, 0.921751, 1]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(w.cpu(), expected_w, atol=1e-6, rtol=0)
    out = F.group_loss(emb, labels, logits, **kw)
    expected_x = torch.tensor(
        [[1, 0, 0], [0.554140, 0.364524, 0.081336], [0, 1, 0], [0.220415, 0.631836, 0.147749]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out.probs.cpu(), expected_x, atol=1e-6, rtol=0)
    assert abs(out.nll.item() - 0.2623659) < 1e-6
    assert abs(out.ce.item() - 1.3054799) < 1e-6
    assert abs(out.loss.item() - 1.5678459) < 1e-6
    assert out.loss.device.type == device and out.loss.dtype == torch.float64
    three = F.group_loss(emb, labels, logits, num_iters=3, **kw)
    assert abs(three.nll.item() - 0.0035789) < 1e-6


def test_module_reproduces_the_golden_vector():
    emb, labels, logits = golden()
    loss_fn = GroupLoss(3, temperature=2, num_anchors=1)
    assert abs(loss_fn(emb, labels, logits).item() - 1.5678459) < 1e-6


# ------------------------------------------------- against the reference


def _grads(fn, emb, labels, logits):
    e = emb.clone().requires_grad_(True)
    lg = logits.clone().requires_grad_(True)
    loss = fn(e, labels, lg)
    loss.backward()
    return loss.detach(), e.grad, lg.grad


def _assert_matches_reference(emb, labels, logits, opts, implementation, tol):
    """Loss and both gradients of ours against the reference, relative to
    the largest entry of each. The reference computes in float64 from the
    same inputs: float32 would add its own rounding, whose bits depend on
    the CPU's kernels (vector width, thread count), to the difference."""
    ours = _grads(
        lambda e, y, lg: F.group_loss(e, y, lg, implementation=implementation, **opts),
        emb,
        labels,
        logits,
    )
    ref = _grads(
        lambda e, y, lg: reference_group_loss(e, y, lg, **opts)[0],
        emb.double(),
        labels,
        logits.double(),
    )
    for a, b in zip(ours, ref):
        scale = max(b.abs().max().item(), 1e-3)
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * scale)
    return ours


GRID = list(itertools.product([1, 2, 3], [0, 1, 2, 3], [1.0, 24.0, 79.0]))
IMPLEMENTATIONS = ["auto", "fused_cpu", "libtorch", "autograd"]


def _tolerance(dtype, temperature: float) -> float:
    """The largest difference allowed, relative to the largest entry: the
    logits' gradient is O(1/T) while its rounding is O(eps) in the
    probabilities, so the relative rounding grows as eps * T (measured:
    up to 1 eps * T for float32 and T = 79; 4 eps at T = 1)."""
    if dtype == torch.float64:
        return 1e-10
    return max(1e-5, 16 * torch.finfo(dtype).eps * max(1.0, temperature))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_iters,num_anchors,temperature", GRID)
def test_loss_and_gradients_match_the_reference(
    implementation, dtype, num_iters, num_anchors, temperature
):
    tol = _tolerance(dtype, temperature)
    seed = hash((num_iters, num_anchors, temperature)) % 1000
    p, k = [(3, 4), (5, 3), (6, 9), (2, 2)][seed % 4]
    emb, labels, logits = pk_batch(p, k, m=11, d=16, dtype=dtype, seed=seed)
    opts = dict(temperature=temperature, num_anchors=num_anchors, num_iters=num_iters)
    ours = _assert_matches_reference(emb, labels, logits, opts, implementation, tol)
    assert all(t.dtype == dtype for t in ours)


# CUB's batch, a long-row (SOP-like) batch, and batches around the size
# where the fused path hands its products back to libtorch.
BATCH_SHAPES = [(6, 9, 100, 1024), (10, 6, 3000, 256), (24, 8, 40, 300), (25, 8, 40, 300)]


@pytest.mark.parametrize("num_iters", [1, 3])
@pytest.mark.parametrize("p,k,m,d", BATCH_SHAPES)
def test_batch_sized_products_match_the_reference(p, k, m, d, num_iters):
    """The fused path's own matrix kernels, shared with its helper thread,
    on batches of the paper's sizes: float32 against the reference."""
    emb, labels, logits = _kink_free_batch(p, k, m, d, seed=p * k)
    opts = dict(temperature=24.0, num_anchors=2, num_iters=num_iters)
    tol = _tolerance(torch.float32, opts["temperature"])
    _assert_matches_reference(emb, labels, logits, opts, "fused_cpu", tol)


def _kink_free_batch(p, k, m, d, seed, margin=1e-5):
    """A float32 batch none of whose correlations lies within ``margin`` of
    W's kink at 0 (the first of seeds ``seed``, ``seed + 1000``, ...). A
    correlation within float32 rounding of 0 may land on either side of the
    relu in ours and in the reference, switching that pair's term of the
    gradient on or off: a difference of 1/n, not of rounding."""
    for attempt in range(64):
        batch = pk_batch(p, k, m=m, d=d, dtype=torch.float32, seed=seed + 1000 * attempt)
        x = batch[0].double()
        x = x - x.mean(dim=1, keepdim=True)
        x = x / x.norm(dim=1, keepdim=True)
        corr = (x @ x.t()).fill_diagonal_(1.0)
        if corr.abs().min().item() > margin:
            return batch
    raise AssertionError(f"no batch of shape {(p, k, m, d)} without a correlation near 0")


def test_results_do_not_depend_on_the_thread_count():
    """Every product tile and row is computed by one thread with the same
    operations, whichever thread: 1 and 2 threads agree bit for bit."""
    emb, labels, logits = pk_batch(6, 9, m=100, d=1024, dtype=torch.float32, seed=5)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            results.append(
                _grads(
                    lambda e, y, lg: F.group_loss(e, y, lg, implementation="fused_cpu"),
                    emb,
                    labels,
                    logits,
                )
            )
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _helper_cpu_ticks():
    """CPU time (clock ticks) of the loss's helper thread, None if absent."""
    for task in pathlib.Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == "grouploss-helpe":
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                return int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            continue
    return None


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_the_helper_thread_stops_spinning_when_the_calls_stop():
    """Between loss calls back to back the helper keeps polling; once calls
    stop, it sleeps within milliseconds instead of burning a CPU."""
    emb, labels, logits = pk_batch(6, 9, m=100, d=1024, dtype=torch.float32, seed=5)
    old = torch.get_num_threads()
    try:
        # The helper runs with 2 or more threads, on any machine.
        torch.set_num_threads(2)
        for _ in range(50):
            F.group_loss(emb, labels, logits, implementation="fused_cpu")
        time.sleep(0.1)
        before = _helper_cpu_ticks()
        assert before is not None, "the helper thread was not started"
        time.sleep(0.5)
        # At most a tick or two of rounding and bookkeeping, not 50 ticks of
        # a spinning thread.
        assert _helper_cpu_ticks() - before <= 3
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("zero_diagonal", [False, True])
def test_similarity_matches_the_definition(zero_diagonal):
    emb, _, _ = pk_batch(4, 5, m=8, d=12, seed=3)
    torch.testing.assert_close(
        F.similarity(emb, zero_diagonal=zero_diagonal),
        reference_similarity(emb, zero_diagonal),
        rtol=1e-12,
        atol=1e-12,
    )


def test_cosine_and_gaussian_similarities():
    emb, _, _ = pk_batch(3, 4, m=8, d=6, seed=4)
    u = emb / emb.norm(dim=1, keepdim=True)
    torch.testing.assert_close(
        F.similarity(emb, "cosine"),
        torch.relu(u @ u.t()).fill_diagonal_(1.0),
        rtol=1e-12,
        atol=1e-12,
    )
    d2 = torch.cdist(emb, emb) ** 2
    torch.testing.assert_close(
        F.similarity(emb, "gaussian", sigma=2.0), torch.exp(-d2 / 8.0), rtol=1e-10, atol=1e-10
    )


def _assert_gradcheck(seed: int, implementation: str, **options) -> None:
    """Float64 gradcheck of the loss in emb and logits on a small P x K batch
    (T = 2, one anchor a class, two iterations, and `options`)."""
    emb, labels, logits = pk_batch(3, 3, m=5, d=4, seed=seed)
    emb.requires_grad_(True)
    logits.requires_grad_(True)

    def fn(e, lg):
        return F.group_loss(
            e,
            labels,
            lg,
            temperature=2.0,
            num_anchors=1,
            num_iters=2,
            implementation=implementation,
            **options,
        )

    assert torch.autograd.gradcheck(fn, (emb, logits), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["correlation", "cosine", "gaussian"])
def test_gradcheck_float64(kind, implementation):
    _assert_gradcheck(7, implementation, similarity=kind, sigma=3.0)


def test_zero_diagonal_matches_the_reference():
    emb, labels, logits = pk_batch(4, 4, m=9, d=10, seed=11)
    ours = _grads(
        lambda e, y, lg: F.group_loss(e, y, lg, zero_diagonal=True, num_iters=2),
        emb,
        labels,
        logits,
    )
    ref = _grads(
        lambda e, y, lg: reference_group_loss(e, y, lg, zero_diagonal=True, num_iters=2)[0],
        emb,
        labels,
        logits,
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_weights_and_the_ce_only_baseline():
    emb, labels, logits = pk_batch(4, 4, m=9, d=10, seed=12)
    _, _, nll, ce = reference_group_loss(emb, labels, logits)
    got = F.group_loss(emb, labels, logits, gtg_weight=0.5, ce_weight=2.0)
    torch.testing.assert_close(got, 0.5 * nll + 2.0 * ce)
    ce_only = F.group_loss(emb, labels, logits, gtg_weight=0.0, return_details=True)
    torch.testing.assert_close(ce_only.loss, ce)
    assert ce_only.probs is None and ce_only.nll is None


# ------------------------------------------------------------- the options


def test_random_anchors_are_seeded_and_per_class():
    labels = torch.arange(5).repeat_interleave(6)[torch.randperm(30)]
    a = F.anchor_mask(labels, 2, "random", seed=3)
    assert a.dtype == torch.bool and a.shape == (30,)
    for c in range(5):
        assert int(a[labels == c].sum()) == 2
    assert torch.equal(a, F.anchor_mask(labels, 2, "random", seed=3))
    assert not all(torch.equal(a, F.anchor_mask(labels, 2, "random", seed=s)) for s in range(4, 9))
    first = F.anchor_mask(torch.tensor([2, 1, 2, 2, 1]), 2)
    assert first.tolist() == [True, True, True, False, True]


def test_module_random_anchors_repeat_with_the_same_seed():
    emb, labels, logits = pk_batch(4, 6, m=9, d=10, seed=13)

    def losses(seed):
        fn = GroupLoss(9, anchors="random", seed=seed)
        return [fn(emb, labels, logits).item() for _ in range(4)]

    first = losses(5)
    assert first == losses(5)
    assert len(set(first)) > 1  # new anchors every call
    torch.manual_seed(0)
    a = GroupLoss(9, anchors="random")(emb, labels, logits)
    torch.manual_seed(0)
    b = GroupLoss(9, anchors="random")(emb, labels, logits)
    assert a.item() == b.item()


def _draws(fn) -> list:
    """Four losses of one batch with random anchors: the anchors drawn."""
    emb, labels, logits = pk_batch(4, 6, m=9, d=10, seed=13)
    return [fn(emb, labels, logits).item() for _ in range(4)]


def _assert_draws_from_the_global_generator(fn) -> None:
    assert fn.anchor_generator_state.numel() == 0
    torch.manual_seed(0)
    first = _draws(fn)
    torch.manual_seed(0)
    assert _draws(fn) == first


@pytest.mark.parametrize("how", ["seed", "options"])
@pytest.mark.parametrize("constructed_with", [1, None])
def test_setting_the_seed_restarts_the_anchors_generator(how, constructed_with):
    """``loss_fn.seed = s`` (or new options with that seed) draws what a
    module constructed with ``seed=s`` draws, state buffer included; back to
    None, the global generator draws again."""
    losses = _draws
    want = GroupLoss(9, anchors="random", seed=5)
    fn = GroupLoss(9, anchors="random", seed=constructed_with)
    losses(fn)
    if how == "seed":
        fn.seed = 5
    else:
        fn.options = fn.options.replace(seed=5)
    assert fn.seed == 5
    torch.testing.assert_close(fn.anchor_generator_state, want.anchor_generator_state)
    assert losses(fn) == losses(want)
    torch.testing.assert_close(fn.anchor_generator_state, want.anchor_generator_state)
    # Another option changed keeps the generator where it is.
    fn.temperature = want.temperature = 20.0
    assert losses(fn) == losses(want)
    fn.seed = None
    _assert_draws_from_the_global_generator(fn)
    with pytest.raises(TypeError, match="options: expected a GroupLossOptions"):
        fn.options = {"seed": 5}


def test_assigning_the_seed_always_restarts_the_generator():
    """Even the seed it has, and after a state dict brought another
    generator's state."""
    losses = _draws
    fresh = losses(GroupLoss(9, anchors="random", seed=5))
    fn = GroupLoss(9, anchors="random", seed=5)
    assert losses(fn) == fresh
    fn.seed = 5
    assert losses(fn) == fresh
    other = GroupLoss(9, anchors="random", seed=8)
    losses(other)
    fn.load_state_dict(other.state_dict())
    fn.seed = 5
    assert losses(fn) == fresh
    fn.load_state_dict(other.state_dict())
    fn.seed = None
    _assert_draws_from_the_global_generator(fn)


def test_a_module_pickled_before_options_was_a_property_loads():
    fn = GroupLoss(9, anchors="random", seed=5, temperature=7.0)
    state = copy.deepcopy(fn.__getstate__())
    state["options"] = state.pop("_options")  # as 0.x pickled it
    old = GroupLoss.__new__(GroupLoss)
    old.__setstate__(state)
    assert old.options == fn.options and old.temperature == 7.0
    emb, labels, logits = pk_batch(4, 6, m=9, d=10, seed=13)
    assert old(emb, labels, logits).item() == fn(emb, labels, logits).item()


def test_refine_matches_the_loss_probabilities():
    emb, labels, logits = pk_batch(3, 5, m=7, d=8, seed=14)
    w = F.similarity(emb)
    prior = torch.softmax(logits / 24.0, dim=1)
    mask = F.anchor_mask(labels, 2)
    x = F.refine(prior, w, labels, mask, num_iters=2)
    _, ref_x, _, _ = reference_group_loss(emb, labels, logits, num_iters=2)
    torch.testing.assert_close(x, ref_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", ["auto", "autograd", "libtorch", "fused_cpu"])
def test_a_label_probability_of_exactly_zero_keeps_float32_gradients(implementation):
    # Sample 2 (class 3) is pulled by the class-0 anchor alone: its refined
    # class-3 probability is exactly 0 and its row sums to ~1e-30, so the
    # NLL's 1e12 / n over that sum overflowed float32 (NaN in every path).
    emb = torch.tensor(
        [
            [1.1930, -0.5592, 0.3592, 1.2947],
            [-0.1330, -1.2403, -0.6878, -0.0665],
            [-1.4715, -0.6946, 1.2820, -0.6147],
            [-1.3742, 1.2279, 0.2802, -0.4485],
        ],
        dtype=torch.float64,
    )
    logits = torch.tensor(
        [
            [-1.985, 11.535, -2.944, 13.954, -6.732, -7.504, 17.820],
            [-3.920, -4.474, -1.577, -24.096, -5.855, 5.600, -16.115],
            [-13.569, 20.527, 15.772, 18.590, 1.709, -18.973, 13.198],
            [-6.894, -0.299, 9.546, -0.660, -14.508, 6.835, -11.867],
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([5, 3, 3, 0])
    kw = dict(temperature=0.5, num_anchors=1, num_iters=1, zero_diagonal=True)
    out = F.group_loss(
        emb.float(),
        labels,
        logits.float(),
        implementation=implementation,
        return_details=True,
        **kw,
    )
    assert out.probs[2, 3] == 0
    loss, ge, gl = _loss_and_grads(
        emb, labels, logits, torch.float32, implementation=implementation, **kw
    )
    # Sample 0, similar to nothing, is 0 / 0 in the spec's computation: the
    # float64 autograd path is the reference (its gradient of the embeddings
    # is exactly 0 here: every W entry that could lift p is clipped).
    want, ge64, gl64 = _loss_and_grads(
        emb, labels, logits, torch.float64, implementation="autograd", **kw
    )
    assert loss == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(ge, ge64, rtol=0, atol=1e-6)
    assert _max_rel(gl, gl64) < 1e-4


def test_the_implementations_agree_on_a_gaussian_w_below_the_normal_range():
    # Samples 10-20 sigma apart: every W entry underflows. The fused kernels'
    # exp gave the smallest normal number there (libtorch: 0), which changed
    # the rows kept as they are, the loss (948.7795 against 948.7981) and
    # made the fused gradients NaN.
    emb = torch.tensor(
        [
            [-12.73, -0.73, -12.51],
            [1.25, -9.41, 9.99],
            [-22.80, 10.09, -7.48],
            [2.63, 11.32, 7.06],
            [-17.41, -14.23, -1.45],
        ]
    )
    labels = torch.tensor([2, 0, 3, 3, 3])
    logits = torch.tensor(
        [
            [308.08, -461.30, 1153.96, -903.43, -1456.03, -720.84],
            [373.05, -644.79, -941.23, 515.73, -448.95, -275.08],
            [-457.94, -52.53, 62.51, 330.65, 1633.50, -41.99],
            [-2478.73, 1361.27, -2092.47, -742.64, -458.62, -270.50],
            [-431.37, 519.58, 2057.74, 903.68, 232.32, -696.79],
        ]
    )
    kw = dict(
        similarity="gaussian",
        sigma=1.0,
        similarity_power=3.0,
        zero_diagonal=True,
        num_anchors=1,
        temperature=80.0,
    )
    results = {
        impl: _loss_and_grads(emb, labels, logits, torch.float32, implementation=impl, **kw)
        for impl in ("autograd", "libtorch", "fused_cpu")
    }
    loss, ge, gl = results["autograd"]
    assert torch.isfinite(ge).all() and torch.isfinite(gl).all()
    for other_loss, other_ge, other_gl in results.values():
        assert other_loss == pytest.approx(loss, rel=1e-6)
        torch.testing.assert_close(other_ge, ge, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(other_gl, gl, rtol=1e-4, atol=1e-6)


def test_refine_differentiates_the_zeros_of_its_probabilities():
    # The loss drops the gradient of X's exact zeros (constants there);
    # F.refine takes any probabilities and keeps autograd's, zeros included.
    emb, labels, logits = pk_batch(3, 4, m=5, d=8, seed=21)
    w = F.similarity(emb)
    prior = torch.softmax(logits, dim=1)
    prior[0, 1] = 0.0
    prior[5, 3] = 0.0
    no_anchors = torch.zeros(len(labels), dtype=torch.bool)
    seed = torch.randn(prior.shape, generator=torch.Generator().manual_seed(1), dtype=prior.dtype)

    def by_hand(x):
        for _ in range(2):
            x = x * (w @ x)
            x = x / x.sum(dim=1, keepdim=True)
        return x

    got, want = prior.clone().requires_grad_(), prior.clone().requires_grad_()
    (F.refine(got, w, labels, no_anchors, num_iters=2) * seed).sum().backward()
    (by_hand(want) * seed).sum().backward()
    assert got.grad[0, 1] != 0 and got.grad[5, 3] != 0
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def test_batch_classes_only_equals_refining_the_restricted_prior():
    emb, labels, logits = pk_batch(3, 4, m=50, d=8, seed=15)
    out = F.group_loss(emb, labels, logits, batch_classes_only=True, return_details=True)
    classes = torch.unique(labels)
    assert torch.equal(out.classes, classes)
    prior = torch.softmax(logits / 24.0, dim=1)[:, classes]
    prior = prior / prior.sum(1, keepdim=True)
    remapped = torch.searchsorted(classes, labels)
    x = F.refine(prior, F.similarity(emb), remapped, F.anchor_mask(labels, 2))
    torch.testing.assert_close(out.probs, x)
    nll = torch.nn.functional.nll_loss(torch.log(x + 1e-12), remapped)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(out.loss, nll + ce)


OPTION_MIXES = [
    dict(batch_classes_only=True, num_iters=3),
    dict(anchors="random", seed=5, num_anchors=2, num_iters=2),
    dict(zero_diagonal=True, num_iters=3, num_anchors=1),
    dict(similarity="gaussian", sigma=2.0, num_iters=2, num_anchors=3),
    dict(similarity="cosine", similarity_power=3.0, batch_classes_only=True, num_anchors=4),
]


@pytest.mark.parametrize("implementation", ["fused_cpu", "libtorch"])
@pytest.mark.parametrize("mix", OPTION_MIXES, ids=lambda m: "-".join(map(str, m.values())))
def test_closed_forms_match_autograd_on_shuffled_batches(implementation, mix):
    """Anchors scattered through the batch (the closed forms move them to
    the end internally), classes with as many anchors as samples, and the
    rarer options: loss, probabilities and both gradients equal autograd's."""
    emb, labels, logits = pk_batch(5, 4, m=13, d=12, seed=21)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(2))
    emb, labels, logits = emb[perm], labels[perm], logits[perm]

    def run(impl):
        e = emb.detach().clone().requires_grad_(True)
        lg = logits.detach().clone().requires_grad_(True)
        out = F.group_loss(e, labels, lg, return_details=True, implementation=impl, **mix)
        out.loss.backward()
        return out.loss, out.probs, e.grad, lg.grad

    for a, b in zip(run(implementation), run("autograd")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("implementation", ["auto", "fused_cpu", "libtorch"])
def test_gradients_scale_with_the_seed_and_survive_retain_graph(implementation):
    """The closed-form node hands its gradients to autograd without a copy
    when the seed is 1; a second backward through a retained graph, another
    seed, and torch.autograd.grad must still see the right values."""
    emb, labels, logits = pk_batch(4, 5, 9, 16, dtype=torch.float64, seed=3)
    emb.requires_grad_(True)
    logits.requires_grad_(True)
    _, ref_ge, ref_gl = _reference_grads(emb, labels, logits)

    def loss():
        return F.group_loss(emb, labels, logits, implementation=implementation)

    out = loss()
    out.backward(retain_graph=True)
    torch.testing.assert_close(emb.grad, ref_ge, rtol=1e-10, atol=1e-12)
    out.backward()
    torch.testing.assert_close(emb.grad, 2 * ref_ge, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits.grad, 2 * ref_gl, rtol=1e-10, atol=1e-12)

    emb.grad = logits.grad = None
    (3.0 * loss()).backward()
    torch.testing.assert_close(emb.grad, 3 * ref_ge, rtol=1e-10, atol=1e-12)

    out = loss()
    ge, gl = torch.autograd.grad(out, (emb, logits), retain_graph=True)
    ge2, _ = torch.autograd.grad(out, (emb, logits))
    torch.testing.assert_close(ge, ref_ge, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ge2, ref_ge, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gl, ref_gl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("implementation", ["auto", "fused_cpu", "libtorch"])
def test_a_gradient_changed_in_place_leaves_a_retained_graph_intact(implementation):
    """What torch.autograd.grad returns is the caller's: clipping it in
    place (as clip_grad_norm_ does) changes nothing the next backward
    through the retained graph gives."""
    emb, labels, logits = pk_batch(4, 5, 9, 16, dtype=torch.float64, seed=3)
    emb.requires_grad_(True)
    logits.requires_grad_(True)
    _, ref_ge, ref_gl = _reference_grads(emb, labels, logits)
    out = F.group_loss(emb, labels, logits, implementation=implementation)
    ge, gl = torch.autograd.grad(out, (emb, logits), retain_graph=True)
    ge.zero_()
    gl.clamp_(-1e-9, 1e-9)
    ge2, gl2 = torch.autograd.grad(out, (emb, logits))
    torch.testing.assert_close(ge2, ref_ge, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gl2, ref_gl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("return_details", [False, True])
@pytest.mark.parametrize("implementation", ["auto", "fused_cpu", "libtorch", "autograd"])
def test_double_backward_is_exact(implementation, return_details):
    """A second derivative through the loss (a gradient penalty): exact in
    every implementation, against finite differences of the first
    derivative. (The closed forms once refused it by name, and where the
    second pass did not reach their node's inputs, under
    ``torch.autograd.grad``, left their part out silently.)"""
    emb, labels, logits = pk_batch(3, 4, 6, 5, dtype=torch.float64, seed=8)
    net = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh()).double()

    def penalty():
        out = F.group_loss(
            net(emb), labels, logits, implementation=implementation, return_details=return_details
        )
        loss = out.loss if return_details else out
        (g,) = torch.autograd.grad(loss, net[0].weight, create_graph=True)
        return (g**2).sum()

    net.zero_grad()
    penalty().backward()
    w, h = net[0].weight, 1e-6
    numeric = torch.zeros_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            w.data[i, j] += h
            up = penalty().item()
            w.data[i, j] -= 2 * h
            down = penalty().item()
            w.data[i, j] += h
            numeric[i, j] = (up - down) / (2 * h)
    torch.testing.assert_close(w.grad, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("implementation", ["auto", "fused_cpu", "libtorch"])
def test_second_derivatives_of_the_closed_forms_are_autograds(implementation):
    """The ways a second derivative is asked for, which once gave 0 or a
    part of it with the closed forms: a Hessian of the inputs, the input
    gradient of a penalty on the gradient of a layer's input, and a
    Hessian-vector product; each equals the ``"autograd"`` implementation's."""
    emb, labels, logits = pk_batch(3, 3, 6, 5, dtype=torch.float64, seed=3)
    lin = torch.nn.Linear(5, 5).double()
    x = emb.clone().requires_grad_(True)

    def loss_of(impl, e, lg):
        return F.group_loss(e, labels, lg, implementation=impl)

    def hessian(impl):
        return torch.autograd.functional.hessian(lambda lg: loss_of(impl, emb, lg), logits)

    def penalty_grad(impl):
        (gx,) = torch.autograd.grad(loss_of(impl, lin(x), logits), x, create_graph=True)
        return torch.autograd.grad((gx**2).sum(), (lin.weight, x))

    def hvp(impl):
        return torch.autograd.functional.hvp(
            lambda e, lg: loss_of(impl, e, lg), (emb, logits), (torch.ones_like(emb), logits)
        )[1]

    for second in (hessian, penalty_grad, hvp):
        ours, reference = second(implementation), second("autograd")
        assert float(torch.cat([t.flatten() for t in reference]).abs().max()) > 1e-3
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("implementation", ["auto", "fused_cpu", "libtorch"])
def test_inputs_changed_in_place_before_backward_are_refused(implementation):
    """The closed forms save their inputs (a second derivative recomputes
    the loss from them): changed in place before backward, they are
    refused, as PyTorch's own losses refuse the inputs they save."""
    emb, labels, logits = pk_batch(3, 3, 6, 5, dtype=torch.float64, seed=3)
    e = emb.clone().requires_grad_(True) * 1.0
    loss = F.group_loss(e, labels, logits, implementation=implementation)
    with torch.no_grad():
        e.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("implementation", ["auto", "fused_cpu", "libtorch", "autograd"])
def test_forward_mode_gives_the_directional_derivative(implementation, requires_grad):
    """A dual tensor's tangent carries through the loss (the closed forms
    once dropped it, or refused it as lacking a forward derivative)."""
    import torch.autograd.forward_ad as fwad

    emb, labels, logits = pk_batch(3, 3, 6, 5, dtype=torch.float64, seed=5)
    v = torch.randn_like(emb, generator=torch.Generator().manual_seed(1))
    e = emb.clone().requires_grad_(True)
    F.group_loss(e, labels, logits, implementation="autograd").backward()
    expected = float((e.grad * v).sum())
    with fwad.dual_level():
        dual = fwad.make_dual(emb.clone().requires_grad_(requires_grad), v)
        out = F.group_loss(dual, labels, logits, implementation=implementation)
        tangent = fwad.unpack_dual(out).tangent
    assert tangent is not None and abs(expected) > 1e-4
    assert float(tangent.detach()) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_tracing_the_loss_is_refused():
    """torch.jit.trace would keep the traced batch's loss as a constant."""
    emb, labels, logits = pk_batch(3, 3, 6, 5, seed=5)
    with pytest.raises(RuntimeError, match="cannot be traced by torch.jit.trace"):
        torch.jit.trace(lambda e, lg: F.group_loss(e, labels, lg), (emb, logits))


def _reference_grads(emb, labels, logits):
    e = emb.detach().clone().requires_grad_(True)
    lg = logits.detach().clone().requires_grad_(True)
    loss = reference_group_loss(e, labels, lg)[0]
    loss.backward()
    return loss.detach(), e.grad, lg.grad


def test_zero_variance_rows_give_no_nan():
    emb, labels, logits = pk_batch(2, 3, m=4, d=5, seed=16)
    emb[0] = 0.7  # constant row: the release gives 0/0 here
    emb[1] = 0.0
    emb.requires_grad_(True)
    for zero_diagonal in (False, True):
        loss = F.group_loss(emb, labels, logits, zero_diagonal=zero_diagonal)
        (g,) = torch.autograd.grad(loss, emb)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    w = F.similarity(emb.detach())
    assert w[0, 0] == 1 and (w[0, 1:] == 0).all()


def _sparse_class_batch():
    """Class 2 (one sample, an anchor) almost absent around its anchor: its
    neighbours' prior gives it exp(-3900 / 80) ~ 7e-22, so after a step the
    anchor's row sums to ~1e-22 and, in float32, the gradient of the zeros
    of its one-hot row (1e43) overflows."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    emb = torch.randn(9, 8, generator=g, dtype=torch.float64)
    logits = torch.randn(9, 3, generator=g, dtype=torch.float64)
    logits[:, 2] = -3900.0
    kw = dict(temperature=80.0, num_anchors=1, num_iters=3, zero_diagonal=True)
    return emb, labels, logits, kw


def _found_by_hypothesis():
    """The float32 batch test_properties found (embeddings ~1e-6 in 2-D,
    a lone class-2 anchor among rows holding ~1e-23 of class 2)."""
    emb = torch.tensor(
        [
            [-2.8650e-07, -6.6835e-07],
            [1.5175e-06, 1.8911e-08],
            [-9.9832e-07, -6.9496e-07],
            [-2.8641e-07, -5.4050e-07],
            [3.6897e-07, -3.5345e-07],
            [-6.7469e-07, 8.0544e-07],
            [-1.1772e-06, 6.3389e-07],
            [-3.6987e-07, -8.9637e-07],
            [1.3625e-06, -3.4146e-07],
            [3.2967e-07, -1.0196e-06],
            [-2.3246e-06, 1.6486e-06],
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 1, 2, 0])
    logits = torch.tensor(
        [
            [82.7302, -126.0546, -14.1156, -2403.6702, 732.2870, -247.7425],
            [-978.9313, -70.2632, 409.1442, 832.9029, 1234.5281, 1549.5735],
            [-548.9444, -250.2039, 1729.2542, -374.8749, 2126.9871, -1824.6227],
            [-1596.0166, -777.4169, 1251.3474, 22.9771, -483.2616, 993.9559],
            [437.4818, -755.5772, 402.5219, -1261.1010, -604.0803, 2570.2307],
            [872.0852, 836.7053, -1395.6442, -1459.4452, 941.6412, 1309.7336],
            [396.5524, -142.1185, 538.2755, -744.6594, -738.9079, 903.1686],
            [820.0747, 1963.1621, -2122.7253, 295.6924, -457.3630, -1278.6882],
            [-931.4257, 370.2640, -822.4453, -545.5923, -719.1126, 1446.3260],
            [3327.7622, -657.6365, 1778.7836, 348.7674, -504.0734, -560.2267],
            [663.4037, 1290.5621, 1224.0531, -1525.5701, 305.4696, 1156.2200],
        ],
        dtype=torch.float64,
    )
    kw = dict(temperature=80.0, num_anchors=3, num_iters=2, zero_diagonal=True)
    return emb, labels, logits, kw


def _loss_and_grads(emb, labels, logits, dtype, **kw):
    e = emb.to(dtype).clone().requires_grad_()
    lg = logits.to(dtype).clone().requires_grad_()
    loss = F.group_loss(e, labels, lg, **kw)
    loss.backward()
    return loss.item(), e.grad.double(), lg.grad.double()


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("implementation", ["auto", "autograd", "libtorch", "fused_cpu"])
def test_a_class_almost_absent_around_its_anchor_keeps_float32_gradients(implementation):
    # The zeros of a row stay zero, so their gradient reaches nothing; carried,
    # it overflowed and met the zero as inf * 0 (NaN in every gradient).
    emb, labels, logits, kw = _sparse_class_batch()
    want = reference_group_loss(emb, labels, logits, **kw)[0].item()
    loss, ge, gl = _loss_and_grads(
        emb, labels, logits, torch.float32, implementation=implementation, **kw
    )
    _, ge64, gl64 = _loss_and_grads(
        emb, labels, logits, torch.float64, implementation="autograd", **kw
    )
    assert loss == pytest.approx(want, rel=1e-6)
    assert _max_rel(ge, ge64) < 1e-4 and _max_rel(gl, gl64) < 1e-4

    # In 2-D the correlation is +-1 wherever it is defined, so the true
    # embedding gradient is 0 and any float's is rounding: finite is the claim.
    emb, labels, logits, kw = _found_by_hypothesis()
    loss, ge, gl = _loss_and_grads(
        emb, labels, logits, torch.float32, implementation=implementation, **kw
    )
    _, _, gl64 = _loss_and_grads(
        emb, labels, logits, torch.float64, implementation="autograd", **kw
    )
    assert torch.isfinite(ge).all()
    assert loss == pytest.approx(1507.6434170, rel=1e-6)
    assert _max_rel(gl, gl64) < 1e-4


# ------------------------------------------------------ dtypes and devices


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_half_inputs(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 6).to(device)
    head = torch.nn.Linear(6, 5).to(device)
    x = torch.randn(12, 8, device=device)
    labels = torch.arange(4, device=device).repeat_interleave(3)
    with torch.autocast(device, dtype=dtype):
        emb = net(x)
        logits = head(emb)
        assert emb.dtype == dtype
        loss = GroupLoss(5)(emb, labels, logits)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(net.weight.grad).all() and net.weight.grad.abs().sum() > 0
    ref = GroupLoss(5)(emb.float(), labels, logits.float())
    torch.testing.assert_close(loss, ref)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    emb, labels, logits = pk_batch(6, 9, m=100, d=64, dtype=dtype, seed=17)
    cpu = _grads(lambda e, y, lg: F.group_loss(e, y, lg), emb, labels, logits)
    gpu = _grads(lambda e, y, lg: F.group_loss(e, y, lg), emb.cuda(), labels.cuda(), logits.cuda())
    tol = _tolerance(dtype, 24.0)  # the default temperature
    for a, b in zip(gpu, cpu):
        assert a.device.type == "cuda" and a.dtype == dtype
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol * max(b.abs().max().item(), 1e-3))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.int16])
def test_any_integer_label_dtype(dtype):
    emb, labels, logits = golden()
    got = F.group_loss(emb, labels.to(dtype), logits, temperature=2, num_anchors=1)
    assert abs(got.item() - 1.5678459) < 1e-6


def test_non_contiguous_inputs():
    emb, labels, logits = pk_batch(3, 4, m=7, d=8, seed=18)
    emb_t = emb.t().contiguous().t()
    logits_t = logits.t().contiguous().t()
    assert not emb_t.is_contiguous()
    torch.testing.assert_close(
        F.group_loss(emb_t, labels, logits_t), F.group_loss(emb, labels, logits)
    )


# ------------------------------------------- options beyond the release


@pytest.mark.parametrize("kind", ["correlation", "cosine", "gaussian"])
@pytest.mark.parametrize("zero_diagonal", [False, True])
def test_similarity_power_matches_the_definition(kind, zero_diagonal):
    emb, _, _ = pk_batch(4, 5, m=8, d=12, seed=3)
    for power in (1.0, 2.0, 5.5):
        torch.testing.assert_close(
            F.similarity(emb, kind, zero_diagonal, sigma=3.0, similarity_power=power),
            reference_similarity(emb, zero_diagonal, kind, 3.0, power),
            rtol=1e-10,
            atol=1e-12,
        )


SHARP = [
    ("correlation", 2.0, 3, 1, 10.0),
    ("correlation", 8.0, 1, 2, 2.0),
    ("cosine", 4.0, 2, 3, 24.0),
    ("gaussian", 3.0, 1, 2, 1.0),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,power,num_anchors,num_iters,temperature", SHARP)
def test_sharpened_loss_and_gradients_match_the_reference(
    implementation, dtype, kind, power, num_anchors, num_iters, temperature
):
    tol = _tolerance(dtype, temperature)
    emb, labels, logits = pk_batch(5, 4, m=11, d=16, dtype=dtype, seed=int(power * 10))
    if kind == "gaussian":
        emb = emb / 4  # distances where the kernel is neither 0 nor 1
    opts = dict(
        temperature=temperature,
        num_anchors=num_anchors,
        num_iters=num_iters,
        similarity=kind,
        sigma=2.0,
        similarity_power=power,
    )
    ours = _assert_matches_reference(emb, labels, logits, opts, implementation, tol)
    # A sharper W changes the loss (the option is not ignored).
    blunt = F.group_loss(emb, labels, logits, **dict(opts, similarity_power=1.0))
    assert abs(blunt.item() - ours[0].item()) > 1e-6


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradcheck_sharpened_w(implementation):
    _assert_gradcheck(8, implementation, similarity_power=3.0)


def test_power_one_is_the_release():
    emb, labels, logits = golden()
    out = F.group_loss(emb, labels, logits, temperature=2, num_anchors=1, similarity_power=1.0)
    assert abs(out.item() - 1.5678459) < 1e-6
    assert GroupLoss(3).similarity_power == 1.0
    assert type(GroupLoss(3, embedding_size=4).classifier) is torch.nn.Linear


def test_cosine_classifier_of_the_module():
    torch.manual_seed(0)
    emb, labels, _ = pk_batch(3, 4, m=6, d=5, seed=21)
    loss_fn = GroupLoss(6, embedding_size=5, classifier="cosine", classifier_scale=8.0)
    assert loss_fn.classifier.bias is None and len(list(loss_fn.parameters())) == 1
    w = loss_fn.classifier.weight.detach().double()
    cos = (emb / emb.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    logits = loss_fn.compute_logits(emb)
    torch.testing.assert_close(logits, 8.0 * cos, rtol=1e-6, atol=1e-6)
    assert logits.abs().max() <= 8.0 + 1e-9
    # Scale-invariant in the embeddings, unlike the linear classifier.
    torch.testing.assert_close(loss_fn.compute_logits(3 * emb), logits)
    expected = F.group_loss(emb, labels, logits, temperature=24.0, num_anchors=2)
    torch.testing.assert_close(loss_fn(emb, labels), expected)
    e = emb.clone().requires_grad_(True)
    loss_fn(e, labels).backward()
    assert e.grad is not None and loss_fn.classifier.weight.grad is not None


def test_normalize_embeddings():
    emb, labels, logits = pk_batch(3, 4, m=6, d=5, seed=22)
    unit = emb / emb.norm(dim=1, keepdim=True)
    for kind in ("correlation", "gaussian"):
        loss_fn = GroupLoss(6, similarity=kind, normalize_embeddings=True)
        expected = F.group_loss(unit, labels, logits, similarity=kind)
        torch.testing.assert_close(loss_fn(5 * emb, labels, logits), expected)
    # The gaussian W depends on the scale, so normalising changes it.
    raw = F.group_loss(5 * emb, labels, logits, similarity="gaussian")
    assert abs(raw.item() - expected.item()) > 1e-6
    # The module's linear classifier sees the normalised embeddings too.
    torch.manual_seed(0)
    loss_fn = GroupLoss(6, embedding_size=5, normalize_embeddings=True)
    torch.testing.assert_close(loss_fn.compute_logits(7 * emb), loss_fn.compute_logits(unit))


def test_gtg_warmup_and_ramp_of_the_module():
    emb, labels, logits = pk_batch(3, 4, m=6, d=5, seed=23)
    loss_fn = GroupLoss(6, temperature=2.0, gtg_weight=2.0, gtg_warmup_steps=2, gtg_ramp_steps=4)
    expected_weights = [0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the explicit count warns about nothing
        for w in expected_weights:
            assert loss_fn.current_gtg_weight() == w
            # Two forward calls a step (two views, or gradient accumulation).
            for _ in range(2):
                got = loss_fn(emb.clone().requires_grad_(True), labels, logits)
                torch.testing.assert_close(
                    got, F.group_loss(emb, labels, logits, temperature=2.0, gtg_weight=w)
                )
            loss_fn.step()
    assert int(loss_fn.num_steps) == len(expected_weights)
    # Evaluation and no-grad calls do not count either.
    with torch.no_grad():
        loss_fn(emb, labels, logits)
    loss_fn.eval()
    loss_fn(emb, labels, logits)
    assert int(loss_fn.num_steps) == len(expected_weights)
    assert GroupLoss(6).current_gtg_weight() == 1.0


def test_forward_calls_count_as_steps_until_step_is_called_with_a_warning():
    emb, labels, logits = pk_batch(3, 4, m=6, d=5, seed=23)
    loss_fn = GroupLoss(6, gtg_warmup_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            loss_fn(emb, labels, logits)
    # The first call whose count ends the warm-up says how to count steps.
    with pytest.warns(FutureWarning, match=r"call loss_fn.step\(\) after each optimizer.step"):
        loss_fn(emb, labels, logits)
    assert int(loss_fn.num_steps) == 3
    # The first step() takes the count over: forward calls no longer count.
    loss_fn.step()
    assert int(loss_fn.num_steps) == 1
    loss_fn(emb, labels, logits)
    assert int(loss_fn.num_steps) == 1


def test_the_state_dict_has_the_same_keys_whatever_the_options():
    keys = {
        "num_steps",
        "anchor_generator_state",
        "memory_embeddings",
        "memory_labels",
        "memory_steps",
    }
    assert set(GroupLoss(6).state_dict()) == keys
    assert set(GroupLoss(6, memory_size=10, memory_warmup_steps=3).state_dict()) == keys
    assert set(GroupLoss(6, gtg_warmup_steps=2, anchors="random", seed=1).state_dict()) == keys
    assert set(GroupLoss(6, embedding_size=4).state_dict()) == keys | {
        "classifier.weight",
        "classifier.bias",
    }
    # A state dict of an older release (no such buffers) loads, with a warning.
    with pytest.warns(FutureWarning) as caught:
        GroupLoss(6).load_state_dict({})
    said = sorted(str(w.message).split(":")[0] for w in caught)
    assert said == sorted(keys), said


def test_a_restored_module_draws_the_random_anchors_an_uninterrupted_one_would():
    emb, labels, logits = pk_batch(4, 4, m=6, d=5, seed=5)
    opts = dict(num_anchors=1, anchors="random", seed=7)
    ref = GroupLoss(6, **opts)
    want = [ref(emb, labels, logits) for _ in range(4)]
    first = GroupLoss(6, **opts)
    got = [first(emb, labels, logits) for _ in range(2)]
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = GroupLoss(6, **opts)
    resumed.load_state_dict(saved)
    got += [resumed(emb, labels, logits) for _ in range(2)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Anchors do differ between draws (the check above can fail).
    assert len({round(x.item(), 6) for x in want}) > 1
    # A module built without a seed takes the saved generator.
    unseeded = GroupLoss(6, num_anchors=1, anchors="random")
    unseeded.load_state_dict(saved)
    torch.testing.assert_close(unseeded(emb, labels, logits), want[2], rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_the_classifier_on_another_device_raises_like_nn_linear():
    loss_fn = GroupLoss(6, embedding_size=5)
    emb, labels, _ = pk_batch(3, 4, m=6, d=5, seed=1)
    with pytest.raises(RuntimeError, match="embeddings: expected a tensor on cpu"):
        loss_fn(emb.cuda(), labels.cuda())


def test_the_classifier_is_not_moved_to_the_inputs_device():
    loss_fn = GroupLoss(6, embedding_size=5)
    emb, labels, _ = pk_batch(3, 4, m=6, d=5, seed=1)
    meta = torch.empty(emb.shape, device="meta")
    with pytest.raises(
        RuntimeError, match=r"embeddings: expected a tensor on cpu .* got one on meta"
    ):
        loss_fn.compute_logits(meta)
    # Same device: the logits are those of the module's own weights.
    w, b = loss_fn.classifier.weight, loss_fn.classifier.bias
    want = torch.nn.functional.linear(emb, w.to(emb.dtype), b.to(emb.dtype))
    torch.testing.assert_close(loss_fn.compute_logits(emb), want)


def test_bad_new_options_name_the_argument():
    for p in (0.5, float("inf"), float("nan")):
        _raises(
            r"^similarity_power: expected a finite number >= 1", GroupLoss, 3, similarity_power=p
        )
    emb, labels, logits = golden()
    _raises(
        r"^similarity_power: expected a finite number >= 1, got 0.5",
        F.group_loss,
        emb,
        labels,
        logits,
        similarity_power=0.5,
    )
    _raises(r"^similarity_power: expected", F.similarity, emb, similarity_power=0.0)
    _raises(r'^classifier: expected one of "linear", "cosine"', GroupLoss, 3, classifier="arc")
    _raises(r"^classifier_scale: expected a finite number > 0", GroupLoss, 3, classifier_scale=0.0)
    _raises(r"^gtg_warmup_steps: expected an integer >= 0", GroupLoss, 3, gtg_warmup_steps=-1)
    _raises(r"^gtg_ramp_steps: expected an integer >= 0", GroupLoss, 3, gtg_ramp_steps=1.5)
    _raises(
        r"^ce_weight: expected > 0 with gtg_warmup_steps",
        GroupLoss,
        3,
        ce_weight=0.0,
        gtg_warmup_steps=3,
    )


# --------------------------------------------------------------- bad input


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_bad_inputs_name_the_argument():
    emb, labels, logits = golden()
    g = F.group_loss
    _raises(
        r"^embeddings: expected a 2-D tensor .* got a tensor of shape \[20\]",
        g,
        emb.reshape(-1),
        labels,
        logits,
    )
    _raises(
        r"^labels: expected a 1-D tensor .* got a tensor of shape \[4, 1\]",
        g,
        emb,
        labels[:, None],
        logits,
    )
    _raises(
        r"^labels: expected an integer dtype, got dtype float32", g, emb, labels.float(), logits
    )
    _raises(
        r"^labels: expected one label per embedding \(4\), got 3 labels", g, emb, labels[:3], logits
    )
    _raises(
        r"^logits: expected one row per embedding \(4\), got 3 rows", g, emb, labels, logits[:3]
    )
    _raises(
        r"^labels: expected labels >= 0, got a label -1",
        g,
        emb,
        torch.tensor([0, 0, 1, -1]),
        logits,
    )
    _raises(
        r"^labels: expected labels < num_classes \(3\), got a label 3",
        g,
        emb,
        torch.tensor([0, 0, 1, 3]),
        logits,
    )
    _raises(
        r"^logits: expected 4 columns, one per class \(num_classes\), got shape \[4, 3\]",
        GroupLoss(4),
        emb,
        labels,
        logits,
    )
    _raises(
        r"^embeddings: expected a batch of at least 2 samples, got 1 sample",
        g,
        emb[:1],
        labels[:1],
        logits[:1],
    )
    _raises(
        r"^num_anchors: expected an integer >= 0, got -1", g, emb, labels, logits, num_anchors=-1
    )
    _raises(r"^num_iters: expected an integer >= 1, got 0", g, emb, labels, logits, num_iters=0)
    _raises(
        r"^temperature: expected a finite number > 0, got 0", g, emb, labels, logits, temperature=0
    )
    _raises(
        r"^temperature: expected a finite number > 0, got -1",
        g,
        emb,
        labels,
        logits,
        temperature=-1,
    )
    bad = emb.clone()
    bad[1, 2] = float("nan")
    _raises(
        r"^embeddings: expected finite values, got 1 NaN and 0 Inf values", g, bad, labels, logits
    )
    bad_logits = logits.clone()
    bad_logits[0, 0] = float("inf")
    _raises(
        r"^logits: expected finite values, got 0 NaN and 1 Inf values", g, emb, labels, bad_logits
    )
    _raises(r"^similarity: expected one of", g, emb, labels, logits, similarity="l2")
    _raises(r"^anchors: expected", g, emb, labels, logits, anchors="last")
    _raises(
        r"^gtg_weight: expected at least one", g, emb, labels, logits, gtg_weight=0, ce_weight=0
    )
    _raises(
        r"^ce_weight: expected a finite number >= 0, got -1", g, emb, labels, logits, ce_weight=-1
    )
    _raises(r"^embeddings: expected at least one column", g, emb[:, :0], labels, logits)
    _raises(r"^embeddings: expected a floating-point dtype", g, emb.long(), labels, logits)


def test_bad_module_options_name_the_argument():
    _raises(r"^num_classes: expected an integer >= 1, got 0", GroupLoss, 0)
    _raises(r"^temperature: expected a finite number > 0", GroupLoss, 3, temperature=0.0)
    _raises(r"^num_anchors: expected an integer >= 0", GroupLoss, 3, num_anchors=-2)
    _raises(r"^num_iters: expected an integer >= 1", GroupLoss, 3, num_iters=0)
    _raises(r"^similarity: expected one of", GroupLoss, 3, similarity="dot")
    _raises(r"^anchors: expected", GroupLoss, 3, anchors="middle")
    emb, labels, _ = golden()
    _raises(r"^logits: expected .* got None", GroupLoss(3), emb, labels)
    _raises(
        r"^embeddings: expected shape \(batch, 7\)", GroupLoss(3, embedding_size=7), emb, labels
    )


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_devices_that_differ_are_named():
    emb, labels, logits = golden()
    _raises(
        r"^logits: expected the device of embeddings",
        F.group_loss,
        emb.cuda(),
        labels.cuda(),
        logits,
    )
    _raises(
        r"^labels: expected the device of embeddings",
        F.group_loss,
        emb.cuda(),
        labels,
        logits.cuda(),
    )


def test_no_panic_reaches_python():
    emb, labels, logits = golden()
    cases = [
        lambda: F.group_loss(emb.to_sparse(), labels, logits),
        lambda: F.group_loss(emb, labels, logits.to("meta")),
        lambda: F.refine(logits, emb, labels, labels.bool()),
        lambda: F.refine(
            logits.softmax(1),
            torch.ones(4, 4, dtype=torch.float64),
            labels,
            torch.ones(3, dtype=torch.bool),
        ),
        lambda: F.anchor_mask(labels.float(), 1),
        lambda: F.similarity(torch.empty(3, 2).to_sparse()),
        lambda: F.group_loss(torch.empty(0, 3), labels[:0], logits[:0]),
    ]
    for case in cases:
        with pytest.raises(Exception) as info:
            case()
        assert "Panic" not in type(info.value).__name__, info.value
        assert isinstance(info.value, (ValueError, RuntimeError, TypeError))


def test_non_tensor_arguments_raise_type_error():
    emb, labels, logits = golden()
    with pytest.raises(TypeError, match="^embeddings: expected a torch.Tensor, got list"):
        F.group_loss(emb.tolist(), labels, logits)


# --------------------------------------------------------------- training


class _Net(torch.nn.Module):
    def __init__(self, dims=16, emb=8, classes=0):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(dims, 32), torch.nn.ReLU(), torch.nn.Linear(32, emb)
        )
        self.head = torch.nn.Linear(emb, classes) if classes else None

    def forward(self, x):
        e = self.body(x)
        return e, (self.head(e) if self.head is not None else None)


def _toy_batches(steps, p=4, k=5, classes=8, dims=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dims, generator=g)
    for _ in range(steps):
        cls = torch.randperm(classes, generator=g)[:p]
        y = cls.repeat_interleave(k)
        yield centres[y] + torch.randn(p * k, dims, generator=g), y


@pytest.mark.parametrize("form", ["user_logits", "module_classifier"])
def test_both_call_forms_train_a_model(form):
    torch.manual_seed(0)
    if form == "user_logits":
        net = _Net(classes=8)
        loss_fn = GroupLoss(8, temperature=10.0)
        params = list(net.parameters())
    else:
        net = _Net()
        loss_fn = GroupLoss(8, embedding_size=8, temperature=10.0)
        params = [*net.parameters(), *loss_fn.parameters()]
        assert len(list(loss_fn.parameters())) == 2
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for x, y in _toy_batches(60):
        emb, logits = net(x)
        loss = loss_fn(emb, y, logits) if logits is not None else loss_fn(emb, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.3 * first, (first, last)


def test_module_classifier_follows_the_embeddings_dtype():
    loss_fn = GroupLoss(3, embedding_size=5)
    emb, labels, _ = golden()
    loss = loss_fn(emb.requires_grad_(True), labels)
    assert loss.dtype == torch.float64
    loss.backward()
    assert loss_fn.classifier.weight.grad is not None
    assert loss_fn.classifier.weight.grad.dtype == torch.float32


# ------------------------------------------------------------ the surface


def test_help_shows_every_parameter_the_formula_and_an_example():
    for documented, params in [
        (GroupLoss, inspect.signature(GroupLoss.__init__).parameters),
        (F.group_loss, inspect.signature(F.group_loss).parameters),
    ]:
        doc = inspect.getdoc(documented)
        for name in params:
            if name not in ("self", "option_values"):
                assert f"{name}:" in doc, (documented, name)
    doc = inspect.getdoc(GroupLoss)
    for piece in ("X * (W @ X)", "softmax(logits / temperature)", "Example::", "relu(corr"):
        assert piece in doc


def test_stubs_match_the_native_module():
    stub = pathlib.Path(grouploss.__file__).with_name("_native.pyi")
    tree = ast.parse(stub.read_text())

    def params(fn):
        args = [a.arg for a in fn.args.args + fn.args.kwonlyargs if a.arg != "self"]
        return args + ([fn.args.kwarg.arg] if fn.args.kwarg else [])

    stubbed = {node.name: params(node) for node in tree.body if isinstance(node, ast.FunctionDef)}
    public = {n: o for n, o in vars(grouploss._native).items() if not n.startswith("_")}
    native = {
        name: list(inspect.signature(obj).parameters)
        for name, obj in public.items()
        if callable(obj) and not isinstance(obj, type)
    }
    assert stubbed == native
    # Classes: the same public members, and the same parameters wherever the
    # native side exposes a signature.
    stub_classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    classes = {n: o for n, o in public.items() if isinstance(o, type)}
    assert set(stub_classes) == set(classes)
    for name, cls in classes.items():
        methods = {n.name: n for n in stub_classes[name].body if isinstance(n, ast.FunctionDef)}
        attributes = {n.target.id for n in stub_classes[name].body if isinstance(n, ast.AnnAssign)}
        assert {m for m in (*methods, *attributes) if not m.startswith("_")} == {
            m for m in vars(cls) if not m.startswith("_")
        }, name
        for m, node in methods.items():
            target = cls if m == "__init__" else getattr(cls, m)
            try:
                sig = list(inspect.signature(target).parameters)
            except (TypeError, ValueError):  # properties, slots without a signature
                continue
            if sig[-2:] == ["args", "kwargs"]:  # a slot wrapper's generic signature
                continue
            assert [p for p in sig if p != "self"] == params(node), (name, m)


def test_native_calls_release_the_gil():
    emb, labels, logits = pk_batch(40, 50, m=400, d=256, dtype=torch.float32, seed=19)
    with ticking(0.0005) as ticks:
        time.sleep(0.01)
        start = time.perf_counter()
        for _ in range(3):
            F.group_loss(emb, labels, logits, num_iters=3)
        end = time.perf_counter()
    during = [x for x in ticks if start < x < end]
    # With the GIL held the counter could not run at all during the calls.
    assert len(during) > 0.2 * (end - start) / 0.0005 * 0.2, (len(during), end - start)


def test_the_old_keyword_names_still_work_with_a_warning():
    """0.x spelled some functional keywords differently from the loss; they
    still work for one release, each with a FutureWarning naming the new one."""
    emb, labels, logits = pk_batch(3, 4, m=6, d=5, seed=2)
    with pytest.warns(FutureWarning, match=r"similarity: kind= is deprecated, use similarity="):
        old = F.similarity(emb, kind="cosine")
    torch.testing.assert_close(old, F.similarity(emb, similarity="cosine"))
    with pytest.warns(FutureWarning, match=r"power= is deprecated, use similarity_power="):
        old = F.similarity(emb, power=2.0)
    torch.testing.assert_close(old, F.similarity(emb, similarity_power=2.0))
    with pytest.warns(FutureWarning, match=r"anchor_mask: mode= is deprecated, use anchors="):
        old = F.anchor_mask(labels, 2, mode="random", seed=4)
    assert torch.equal(old, F.anchor_mask(labels, 2, anchors="random", seed=4))
    prior = torch.softmax(logits, dim=1)
    w, mask = F.similarity(emb), F.anchor_mask(labels, 1)
    with pytest.warns(FutureWarning, match=r"refine: W= is deprecated, use w="):
        old = F.refine(prior, W=w, labels=labels, anchor_mask=mask)
    torch.testing.assert_close(old, F.refine(prior, w, labels, mask))
    with pytest.raises(TypeError, match="unexpected keyword argument 'sharpness'"):
        F.similarity(emb, sharpness=2.0)


# ------------------------------------------------------------ one options type


def test_the_options_defaults_are_the_rust_cores():
    defaults = {
        name: p.default for name, p in inspect.signature(F.GroupLossOptions).parameters.items()
    }
    assert defaults == F.GroupLossOptions().to_dict()
    assert list(defaults) == list(F.GroupLossOptions.NAMES)
    # The wrappers show the same defaults.
    for fn in (F.group_loss, GroupLoss):
        params = inspect.signature(fn).parameters
        assert {n: params[n].default for n in defaults} == defaults, fn


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(temperature=0.0), r"^temperature: expected a finite number > 0"),
        (dict(num_anchors=-1), r"^num_anchors: expected an integer >= 0"),
        (dict(num_iters=0), r"^num_iters: expected an integer >= 1"),
        (dict(gtg_weight=-1.0), r"^gtg_weight: expected a finite number >= 0"),
        (dict(gtg_weight=0.0, ce_weight=0.0), r"^gtg_weight: expected at least one"),
        (dict(similarity="dot"), r"^similarity: expected one of"),
        (dict(similarity="gaussian", sigma=0.0), r"^sigma: expected a finite number > 0"),
        (dict(similarity_power=0.5), r"^similarity_power: expected a finite number >= 1"),
        (dict(anchors="last"), r"^anchors: expected one of \"first\", \"random\""),
    ],
)
def test_the_options_are_validated_once_for_every_layer(bad, match):
    emb, labels, logits = golden()
    _raises(match, F.GroupLossOptions, **bad)
    _raises(match, GroupLoss, 3, **bad)
    _raises(match, F.group_loss, emb, labels, logits, **bad)
    _raises(match, F.GroupLossOptions().replace, **bad)
    # The trainer's configuration: the same check, the same message.
    _raises(match, grouploss.training.resolve_config, "glyphs", **bad)
    loss_fn = GroupLoss(3)
    name, value = next(iter(bad.items()))
    if len(bad) == 1:
        with pytest.raises(ValueError, match=match):
            setattr(loss_fn, name, value)


def test_options_pickle_copy_compare_and_replace():
    import copy
    import pickle

    o = F.GroupLossOptions(temperature=10.0, similarity_power=8.0, anchors="random", seed=3)
    assert pickle.loads(pickle.dumps(o)) == o
    assert copy.deepcopy(o) == o
    assert o.replace(temperature=10.0) == o
    assert o.replace(temperature=11.0) != o and o.temperature == 10.0
    assert "similarity_power=8.0" in repr(o)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tempreature'"):
        o.replace(tempreature=1.0)
    # The function or module the user called is named, with the option meant.
    unknown = r"unexpected keyword argument 'tempreature'; did you mean 'temperature'\?$"
    with pytest.raises(TypeError, match=r"^group_loss\(\) got an " + unknown):
        F.group_loss(*golden(), tempreature=1.0)
    with pytest.raises(TypeError, match=r"^GroupLoss\(\) got an " + unknown):
        GroupLoss(4, tempreature=1.0)
    with pytest.raises(TypeError, match=r"^GroupLoss\(\) got an unexpected keyword argument 'zz'$"):
        GroupLoss(4, F.GroupLossOptions(), zz=1)


def test_an_options_object_and_its_keywords_give_the_same_loss():
    emb, labels, logits = golden()
    o = F.GroupLossOptions(temperature=2.0, num_anchors=1, similarity_power=2.0, ce_weight=0.5)
    want = F.group_loss(emb, labels, logits, **o.to_dict())
    torch.testing.assert_close(F.group_loss(emb, labels, logits, o), want, rtol=0, atol=0)
    # Keywords override the object's values.
    torch.testing.assert_close(
        F.group_loss(emb, labels, logits, o.replace(ce_weight=1.0), ce_weight=0.5), want
    )
    loss_fn = GroupLoss(3, o)
    assert loss_fn.options == o and loss_fn.temperature == 2.0
    torch.testing.assert_close(loss_fn(emb, labels, logits), want, rtol=0, atol=0)
    loss_fn.temperature = 3.0
    assert loss_fn.options == o.replace(temperature=3.0)


def test_the_trainers_options_are_the_same_type_built_from_the_same_names():
    cfg = grouploss.training.resolve_config("glyphs")
    opts = grouploss.training.group_loss_options(cfg)
    assert isinstance(opts, F.GroupLossOptions)
    same = {k: cfg[k] for k in F.GroupLossOptions.NAMES if k != "seed"}
    assert opts == F.GroupLossOptions(**same)
    assert opts.similarity_power == cfg["similarity_power"] != 1.0


def test_the_classifier_is_the_layer_its_argument_names():
    linear = GroupLoss(6, embedding_size=5)
    cosine = GroupLoss(6, embedding_size=5, classifier="cosine", classifier_scale=8.0)
    assert type(linear.classifier) is torch.nn.Linear
    assert isinstance(cosine.classifier, grouploss.loss.CosineClassifier)
    assert cosine.classifier.scale == 8.0
    assert set(cosine.state_dict()) == {
        "num_steps",
        "anchor_generator_state",
        "classifier.weight",
        *grouploss.loss._MEMORY_BUFFERS,
    }
    for loss_fn, kind in ((linear, "linear"), (cosine, "cosine")):
        with pytest.warns(FutureWarning, match="classifier_kind is deprecated"):
            assert loss_fn.classifier_kind == kind


def test_integer_embeddings_are_named_before_the_classifier_or_normalisation():
    emb, labels, _ = pk_batch(3, 4, m=6, d=5, seed=1)
    for loss_fn in (GroupLoss(6, embedding_size=5), GroupLoss(6, normalize_embeddings=True)):
        logits = None if loss_fn.classifier is not None else torch.zeros(12, 6)
        want = "^embeddings: expected a floating tensor, got dtype int64"
        with pytest.raises(ValueError, match=want):
            loss_fn(emb.long(), labels, logits)


def test_negative_seeds_are_named():
    with pytest.raises(ValueError, match=r"^seed: expected an integer >= 0, got -1"):
        grouploss.GroupLossOptions(seed=-1)
    with pytest.raises(ValueError, match=r"^seed: expected an integer >= 0, got -1"):
        GroupLoss(10, anchors="random", seed=-1)
    with pytest.raises(ValueError, match=r"^seed: expected an integer >= 0, got -3"):
        F.anchor_mask(torch.tensor([0, 0, 1]), 1, "random", seed=-3)


def test_return_details_is_named_before_anything_changes():
    emb, labels, logits = pk_batch(3, 4, m=6, d=5, seed=1)
    module = GroupLoss(6, anchors="random", seed=3, gtg_warmup_steps=5)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for call in (F.group_loss, module):
        with pytest.raises(ValueError, match=r"^return_details: expected True or False, got 1"):
            call(emb, labels, logits, return_details=1)
    # Neither a step counted nor anchors drawn.
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_refine_names_w_as_its_parameter():
    probs = torch.full((6, 3), 1 / 3)
    labels, mask = torch.tensor([0, 0, 1, 1, 2, 2]), torch.zeros(6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^w: expected shape \[6, 6\]"):
        F.refine(probs, torch.rand(5, 5), labels, mask)


def test_integer_arguments_are_not_truncated():
    labels = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=r"^num_anchors: expected an integer, got 1.9"):
        F.anchor_mask(labels, 1.9)
    with pytest.raises(ValueError, match=r"^num_classes: expected an integer, got 'x'"):
        F.group_loss(torch.randn(3, 2), labels, torch.randn(3, 2), num_classes="x")
