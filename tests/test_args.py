"""The package's argument checks (grouploss._args) and the public arguments
that go through them: a value of the wrong kind is refused by name, never
coerced (a string is not a bool, a float is not an integer)."""

import re

import numpy as np
import pytest
import torch
from data_fixtures import FASHION

import grouploss
from grouploss import GroupLoss
from grouploss import functional as F
from grouploss._args import boolean, integer, number


def test_integer():
    assert integer("n", 3) == 3 and type(integer("n", np.int16(3))) is int
    assert integer("n", 0, 0) == 0
    for bad, shown in [(2.0, "2.0"), (True, "True"), ("3", "'3'"), (-1, "-1")]:
        with pytest.raises(ValueError, match=rf"^n: expected an integer >= 0, got {shown}$"):
            integer("n", bad, 0)


def test_boolean():
    assert boolean("flag", True) is True and boolean("flag", np.bool_(False)) is False
    for bad in ["no", "False", 0, 1, None, 1.0]:
        with pytest.raises(ValueError, match=r"^flag: expected True or False, got "):
            boolean("flag", bad)


def test_number():
    assert number("x", 2) == 2.0 and type(number("x", np.float32(0.5))) is float
    assert number("x", 0, 0) == 0.0
    cases = [
        ({}, "1", r"^x: expected a finite number, got '1'$"),
        ({}, True, r"^x: expected a finite number, got True$"),
        ({}, float("nan"), r"^x: expected a finite number, got nan$"),
        ({}, float("-inf"), r"^x: expected a finite number, got -inf$"),
        ({}, 10**400, r"^x: expected a finite number, got 1000"),
        (dict(minimum=0), -0.5, r"^x: expected a finite number >= 0, got -0.5$"),
        (dict(minimum=0, strict=True), 0, r"^x: expected a finite number > 0, got 0$"),
        (dict(minimum=1.5), 1, r"^x: expected a finite number >= 1.5, got 1$"),
    ]
    for kw, bad, message in cases:
        with pytest.raises(ValueError, match=message):
            number("x", bad, **kw)


def _emb():
    return torch.randn(6, 4)


# Each of these arguments was once coerced with bool(), float() or int():
# "no" switched a flag on, a string number was parsed, 1.5 became 1.
REFUSED = [
    ("normalize_embeddings", lambda: GroupLoss(3, normalize_embeddings="no")),
    ("gather_ranks", lambda: GroupLoss(3, gather_ranks=1)),
    ("classifier_scale", lambda: GroupLoss(3, embedding_size=4, classifier_scale="16")),
    ("scale", lambda: grouploss.loss.CosineClassifier(4, 3, scale=float("inf"))),
    ("zero_diagonal", lambda: F.similarity(_emb(), zero_diagonal="no")),
    ("sigma", lambda: F.similarity(_emb(), "gaussian", sigma="1")),
    ("similarity_power", lambda: F.similarity(_emb(), similarity_power=None)),
    ("margin", lambda: F.triplet_margin_loss(_emb(), torch.arange(6) % 2, margin=True)),
    (
        "normalize",
        lambda: grouploss.metrics.evaluate(_emb().numpy(), np.arange(6) % 2, normalize="no"),
    ),
    ("normalize", lambda: grouploss.metrics.knn(_emb().numpy(), 2, normalize=0)),
    ("seed", lambda: grouploss.data.small_transform(28)(np.zeros((28, 28), np.uint8), seed=1.5)),
]


@pytest.mark.parametrize(
    "name, call", REFUSED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(REFUSED)]
)
def test_public_arguments_are_checked_not_coerced(name, call):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: expected "):
        call()


def test_dataset_arguments_are_checked_not_coerced():
    ds = grouploss.datasets.FashionMNIST
    for kw, name in [
        (dict(val_fraction="0.1"), "val_fraction"),
        (dict(split_seed=1.5), "split_seed"),
    ]:
        with pytest.raises(ValueError, match=rf"^{name}: expected "):
            ds(FASHION, **kw)


def _meta(*shape, labels=False):
    if labels:
        return torch.zeros(shape, dtype=torch.long, device="meta")
    return torch.empty(shape, device="meta")


def _index_holding_one():
    index = grouploss.Index(4)
    index.add(torch.randn(3, 4))
    return index


# Every public function that takes tensors, given a meta tensor (no data;
# tch's C API reports it, and xpu's, as an mps device): once an internal
# libtorch error "Cannot copy out of meta tensor" with a C++ backtrace, or
# a panic, and "mps" in the messages that named a device.
META = [
    ("embeddings", lambda: F.group_loss(_meta(6, 4), torch.arange(6) % 2, torch.randn(6, 2))),
    ("embeddings", lambda: GroupLoss(2)(_meta(6, 4), _meta(6, labels=True), _meta(6, 2))),
    ("embeddings", lambda: F.similarity(_meta(6, 4))),
    ("labels", lambda: F.anchor_mask(_meta(6, labels=True), 2)),
    ("probs", lambda: F.refine(_meta(6, 2), _meta(6, 6), _meta(6, labels=True), _meta(6))),
    ("embeddings", lambda: F.triplet_margin_loss(_meta(6, 4), torch.arange(6) % 2)),
    ("embeddings", lambda: grouploss.metrics.evaluate(_meta(6, 4), torch.arange(6) % 2)),
    ("labels", lambda: grouploss.metrics.evaluate(torch.randn(6, 4), _meta(6, labels=True))),
    ("labels", lambda: grouploss.metrics.nmi(_meta(6, labels=True), torch.arange(6))),
    ("x", lambda: grouploss.metrics.kmeans(_meta(6, 4), 2)),
    ("embeddings", lambda: grouploss.metrics.knn(_meta(6, 4), 2)),
    ("embeddings", lambda: grouploss.Index(4).add(_meta(3, 4))),
    ("queries", lambda: _index_holding_one().search(_meta(2, 4), 1)),
]


@pytest.mark.parametrize("name, call", META, ids=[f"{n}-{i}" for i, (n, _) in enumerate(META)])
def test_a_tensor_without_data_is_refused_by_name(name, call):
    message = rf"^{name}: expected a tensor on cpu or cuda, got a tensor on meta$"
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "name, call",
    [
        ("embeddings", lambda e, y: torch.func.vmap(lambda x: F.group_loss(x, y, x[:, :2]))(e)),
        ("embeddings", lambda e, y: torch.func.vmap(lambda x: F.similarity(x))(e)),
        (
            "embeddings",
            lambda e, y: torch.func.jacfwd(lambda x: F.group_loss(x, y, x[:, :2]))(e[0]),
        ),
        ("embeddings", lambda e, y: torch.func.vmap(lambda x: grouploss.metrics.knn(x, 1)[0])(e)),
        ("x", lambda e, y: torch.func.vmap(lambda x: grouploss.metrics.kmeans(x, 2)[1])(e)),
    ],
)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_the_wrappers_of_torch_func_are_refused_by_name(name, call):
    """Once an internal error (a panic on "Cannot access data pointer")."""
    e, y = torch.randn(3, 6, 4), torch.arange(6) % 2
    message = rf"^{name}: expected a tensor with data, got a wrapper without data \(torch.func's"
    with pytest.raises(ValueError, match=message):
        call(e, y)


def test_a_device_mismatch_names_both_devices():
    message = r"^labels: expected the device of embeddings \(cpu\), got device meta$"
    with pytest.raises(ValueError, match=message):
        F.group_loss(torch.randn(6, 4), _meta(6, labels=True), torch.randn(6, 2))
