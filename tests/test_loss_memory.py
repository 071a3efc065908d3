"""The memory of earlier batches (``memory_size``): the loss of a batch joined
by labelled points against the concatenation of memory and batch computed
by hand, and the module's memory (filling, warm-up, state dict)."""

from __future__ import annotations

import pytest
import torch

from grouploss import GroupLoss
from grouploss import functional as F
from reference import reference_group_loss_with_memory as concatenated_loss

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def batch_and_memory(n_mem=15, seed=0, classes=8, d=6):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 5, 5, 5])
    emb = torch.randn(len(labels), d, generator=g, dtype=torch.float64)
    emb += 2 * torch.randn(classes, d, generator=g, dtype=torch.float64)[labels]
    logits = torch.randn(len(labels), classes, generator=g, dtype=torch.float64)
    # Memory classes overlap the batch's (1, 2) and add others (3, 4, 6).
    mem_labels = torch.randint(1, 7, (n_mem,), generator=g)
    mem = torch.randn(n_mem, d, generator=g, dtype=torch.float64)
    return emb, labels, logits, mem, mem_labels


CASES = [
    {},
    {"num_iters": 3},
    {"similarity_power": 8.0, "num_anchors": 1},
    {"similarity": "cosine", "zero_diagonal": True},
    {"similarity": "gaussian", "sigma": 2.0, "num_iters": 2},
    {"batch_classes_only": True},
    {"batch_classes_only": True, "num_iters": 2, "num_anchors": 0},
]


@pytest.mark.parametrize("implementation", ["auto", "autograd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradients_equal_the_concatenation_with_memory_anchors(case, implementation):
    emb, labels, logits, mem, mem_labels = batch_and_memory()
    e1, l1 = emb.clone().requires_grad_(), logits.clone().requires_grad_()
    expected = concatenated_loss(e1, labels, l1, mem, mem_labels, **case)
    expected.backward()
    e2, l2 = emb.clone().requires_grad_(), logits.clone().requires_grad_()
    m = mem.clone().requires_grad_()
    got = F.group_loss(
        e2,
        labels,
        l2,
        memory_embeddings=m,
        memory_labels=mem_labels,
        implementation=implementation,
        **case,
    )
    got.backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(e2.grad, e1.grad, rtol=0, atol=1e-9)
    torch.testing.assert_close(l2.grad, l1.grad, rtol=0, atol=1e-9)
    assert m.grad is None  # the memory receives no gradient
    # The memory changes the loss (the test would pass without it otherwise).
    plain = F.group_loss(emb, labels, logits, **case)
    assert abs(plain.item() - got.item()) > 1e-4


def test_an_empty_memory_is_no_memory():
    emb, labels, logits, _, _ = batch_and_memory()
    empty = F.group_loss(
        emb,
        labels,
        logits,
        memory_embeddings=emb[:0],
        memory_labels=labels[:0],
    )
    torch.testing.assert_close(empty, F.group_loss(emb, labels, logits), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, arg",
    [
        (lambda m, y: (m[:, :3], y), "memory_embeddings"),
        (lambda m, y: (m, y[:-1]), "memory_labels"),
        (lambda m, y: (m, y + 10), "memory_labels"),
        (lambda m, y: (m * float("nan"), y), "memory_embeddings"),
        (lambda m, y: (m, None), "memory_labels"),
    ],
)
def test_bad_memories_are_named(change, arg):
    emb, labels, logits, mem, mem_labels = batch_and_memory()
    mem, mem_labels = change(mem, mem_labels)
    with pytest.raises((ValueError, TypeError), match=arg):
        F.group_loss(emb, labels, logits, memory_embeddings=mem, memory_labels=mem_labels)


@pytest.mark.parametrize("device", DEVICES)
def test_memory_on_the_inputs_device_in_float32(device):
    emb, labels, logits, mem, mem_labels = batch_and_memory()
    expected = concatenated_loss(emb, labels, logits, mem, mem_labels)
    got = F.group_loss(
        emb.float().to(device),
        labels.to(device),
        logits.float().to(device),
        memory_embeddings=mem.float().to(device),
        memory_labels=mem_labels.to(device),
    )
    assert got.dtype == torch.float32 and got.device.type == device
    assert abs(got.item() - expected.item()) < 1e-5


# ----------------------------------------------------------- the module


def _batches(steps, seed=3):
    """2 classes x 3 samples: with the default 2 anchors a class, one sample
    of each is refined, so a memory changes the loss (with 2 samples a
    class every row would be an anchor and no memory could)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        labels = torch.randperm(8, generator=g)[:2].repeat_interleave(3)
        yield torch.randn(6, 4, generator=g, dtype=torch.float64), labels


def test_the_module_keeps_the_last_batches_and_uses_them_after_the_warm_up():
    loss_fn = GroupLoss(8, embedding_size=4, memory_size=10, memory_warmup_steps=2).double()
    seen_emb, seen_labels = [], []
    for step, (emb, labels) in enumerate(_batches(5)):
        logits = loss_fn.compute_logits(emb)
        expected_plain = F.group_loss(emb, labels, logits)
        got = loss_fn(emb, labels, logits)
        if step < 2:  # the warm-up: no memory yet in the groups
            torch.testing.assert_close(got, expected_plain, rtol=0, atol=0)
        else:
            mem, mem_labels = torch.cat(seen_emb)[-10:], torch.cat(seen_labels)[-10:]
            expected = concatenated_loss(emb, labels, logits, mem, mem_labels)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
            assert abs(got.item() - expected_plain.item()) > 1e-6, "the memory joined"
        seen_emb.append(emb)
        seen_labels.append(labels)
        torch.testing.assert_close(loss_fn.memory_embeddings, torch.cat(seen_emb)[-10:])
        assert torch.equal(loss_fn.memory_labels, torch.cat(seen_labels)[-10:])
    assert int(loss_fn.memory_steps) == 5


def test_a_memory_larger_than_any_tensor_keeps_every_row():
    with pytest.raises(ValueError, match=r"^memory_size: expected an integer <= 2\*\*63 - 1"):
        GroupLoss(8, memory_size=2**63)
    loss_fn = GroupLoss(8, embedding_size=4, memory_size=2**63 - 1).double()
    batches = list(_batches(3))
    for emb, labels in batches:
        loss_fn(emb, labels)
    expected = torch.cat([emb for emb, _ in batches])
    torch.testing.assert_close(loss_fn.memory_embeddings, expected, rtol=0, atol=0)


def test_evaluation_calls_neither_use_nor_write_the_memory():
    loss_fn = GroupLoss(8, embedding_size=4, memory_size=10).double()
    batches = list(_batches(3))
    for emb, labels in batches[:2]:
        loss_fn(emb, labels)
    before = loss_fn.memory_embeddings.clone()
    emb, labels = batches[2]
    with torch.no_grad():
        plain = F.group_loss(emb, labels, loss_fn.compute_logits(emb))
        torch.testing.assert_close(loss_fn(emb, labels), plain, rtol=0, atol=0)
    loss_fn.eval()
    torch.testing.assert_close(loss_fn(emb, labels).detach(), plain, rtol=0, atol=0)
    assert torch.equal(loss_fn.memory_embeddings, before)
    # In training, with gradients, the memory joins the group (the
    # comparisons above could fail).
    loss_fn.train()
    assert abs(loss_fn(emb, labels).item() - plain.item()) > 1e-6


def test_the_memory_keeps_the_modules_dtype():
    """Buffers follow the module (``.double()``, ``.float()``), not the
    last batch: a float32 batch into a float64 module is kept in float64."""
    loss_fn = GroupLoss(8, embedding_size=4, memory_size=10).double()
    (emb, labels), (emb2, labels2) = list(_batches(2))
    loss_fn(emb, labels)
    loss_fn.classifier.float()
    loss_fn(emb2.float(), labels2)
    assert loss_fn.memory_embeddings.dtype == torch.float64
    torch.testing.assert_close(
        loss_fn.memory_embeddings, torch.cat([emb, emb2.float().double()])[-10:], rtol=0, atol=0
    )
    loss_fn.float()
    assert loss_fn.memory_embeddings.dtype == torch.float32
    loss_fn.classifier.double()
    loss_fn(emb, labels)
    assert loss_fn.memory_embeddings.dtype == torch.float32
    # A float64 state dict loads into the float32 module in float32.
    wide = GroupLoss(8, embedding_size=4, memory_size=10).double()
    wide(emb, labels)
    loss_fn.load_state_dict(wide.state_dict())
    assert loss_fn.memory_embeddings.dtype == torch.float32
    torch.testing.assert_close(loss_fn.memory_embeddings, emb.float()[-10:])


def test_the_memory_is_in_the_state_dict_and_a_resumed_module_continues_alike():
    batches = list(_batches(6))
    a = GroupLoss(8, embedding_size=4, memory_size=9).double()
    for emb, labels in batches[:3]:
        a(emb, labels)
    state = a.state_dict()
    assert state["memory_embeddings"].shape == (9, 4)
    assert state["memory_labels"].shape == (9,)
    b = GroupLoss(8, embedding_size=4, memory_size=9).double()
    b.load_state_dict(state)
    for emb, labels in batches[3:]:
        torch.testing.assert_close(b(emb, labels), a(emb, labels), rtol=0, atol=0)
    torch.testing.assert_close(b.memory_embeddings, a.memory_embeddings, rtol=0, atol=0)
    # The keys are the same without a memory.
    assert set(GroupLoss(8).state_dict()) >= {"memory_embeddings", "memory_labels", "memory_steps"}


def test_memory_options_are_checked():
    with pytest.raises(ValueError, match="memory_size"):
        GroupLoss(8, memory_size=-1)
    with pytest.raises(ValueError, match="memory_warmup_steps"):
        GroupLoss(8, memory_warmup_steps=1.5)
    with pytest.raises(ValueError, match="gather_ranks"):
        GroupLoss(8, gather_ranks="yes")
