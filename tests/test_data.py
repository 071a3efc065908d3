"""grouploss.data: transforms against torchvision + PIL, and the threaded
Loader (order, determinism, shutdown, GIL, bad files and the skip policy)."""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from data_fixtures import GLYPHS, make_cub, photo, write_image
from PIL import Image
from ticking import ticking

from grouploss import ClassBalancedBatchSampler
from grouploss.data import Loader, eval_transform, small_transform, train_transform
from grouploss.datasets import CUB200, Glyphs, ImageFolder

IMAGENET = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


# ----------------------------------------------------------- transforms


def test_eval_transform_matches_torchvision(tmp_path):
    path = tmp_path / "x.jpg"
    write_image(path, seed=1, w=500, h=375)
    pil = Image.open(path).convert("RGB")
    ref = T.Compose([T.Resize(256), T.CenterCrop(227), T.ToTensor(), IMAGENET])(pil)
    ours = eval_transform(227, resize=256)(torch.from_numpy(np.array(pil)).permute(2, 0, 1))
    assert ours.shape == ref.shape == (3, 227, 227)
    diff = (ours - ref).abs()
    # One resampling of the source box instead of resize-then-crop: the same
    # filter, at most one level of 255 apart (rounding of the passes).
    assert diff.max() < 1.01 / 255 / 0.224 and diff.mean() < 0.006, (diff.mean(), diff.max())


def test_random_resized_crop_of_the_whole_image_is_a_resize(tmp_path):
    img = photo(2, 120, 90)
    ref = T.Compose([T.Resize((64, 64)), T.ToTensor()])(Image.fromarray(img))
    t = train_transform(
        64, scale=(1.0, 1.0), ratio=(120 / 90, 120 / 90), flip=True, normalization="none"
    )
    outs = [t(img, seed=s) for s in range(8)]
    for out in outs:
        a, b = (out - ref).abs().max(), (out.flip(-1) - ref).abs().max()
        assert min(a, b) < 2 / 255 + 1e-6, (a, b)
    flipped = [(o - ref).abs().max() > 2 / 255 for o in outs]
    assert any(flipped) and not all(flipped)


def test_random_resized_crop_resizes_the_crop_as_torchvision():
    """torchvision crops, then resizes the crop, so its filter stops at the
    box's edges; filtering the whole image put 9-13 grey levels of the
    neighbouring pixels into the edge columns. The box is 100 x 100 at y = 0
    of a 200 x 100 noise image; its x is the one torchvision agrees with."""
    import torchvision.transforms.functional as TF

    img = np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    pil = Image.fromarray(img)
    t = train_transform(32, scale=(0.5, 0.5), ratio=(1.0, 1.0), flip=False, normalization="none")
    refs = [TF.to_tensor(TF.resized_crop(pil, 0, x, 100, 100, [32, 32])) for x in range(101)]
    for seed in range(3):
        ours = t(img, seed=seed)
        diffs = [(ours - ref).abs().max().item() for ref in refs]
        # Rounding of the passes: one level of 255.
        assert min(diffs) <= 1.01 / 255, (seed, min(diffs) * 255)


def test_random_resized_crop_is_seeded_and_covers_the_scale_range():
    img = photo(3, 200, 150)
    t = train_transform(48, scale=(0.08, 1.0))
    assert torch.equal(t(img, seed=5), t(img, seed=5))
    assert not torch.equal(t(img, seed=5), t(img, seed=6))
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    assert torch.equal(a, t(img))  # the default seed comes from torch's generator


def test_jpeg_region_decoding_matches_decoding_the_whole_file(tmp_path):
    """The Rust path decodes only the box, with the margin the resize filter
    and the chroma upsampling read, at full resolution: the pixels of the
    whole decode, so the transform's output is the same. (A large box was
    decoded at 1/2 to 1/8 scale, another filter than torchvision's, and
    without the margin: up to 38 grey levels apart.)"""
    write_image(tmp_path / "c" / "big.jpg", seed=4, w=900, h=700)
    ds = ImageFolder(tmp_path, split="all")
    full = ds.load(0)
    transforms = [train_transform(size, scale=scale) for size, scale in TRAIN_CASES] + [
        eval_transform(227, resize=256),
        eval_transform(64, resize=73),
    ]
    for t in transforms:
        for seed in range(4):
            fast = ds._native.load_transformed(0, t._native, seed)
            assert torch.equal(fast, t(full, seed=seed)), seed


TRAIN_CASES = ((64, (0.5, 1.0)), (200, (0.08, 1.0)), (32, (0.9, 1.0)))


def test_caffe_bgr_and_grey_conversions(tmp_path):
    rgb = photo(5, 32, 32)
    out = eval_transform(32, resize=32, normalization="caffe_bgr")(rgb)
    want = torch.from_numpy(rgb[..., ::-1].copy()).permute(2, 0, 1).float()
    want -= torch.tensor([104.0, 117.0, 128.0]).view(3, 1, 1)
    assert torch.equal(out, want)
    grey = eval_transform(32, resize=32, normalization="none", channels=1)(rgb)
    pil_l = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    assert torch.equal(grey[0], torch.from_numpy(pil_l))
    g = photo(6, 32, 32, grey=True)
    three = eval_transform(32, resize=32, normalization="none")(g)
    assert torch.equal(three[0], three[2]) and torch.equal(
        three[1] * 255, torch.from_numpy(g).float()
    )
    custom = eval_transform(32, resize=32, normalization=([0.5, 0.5, 0.5], [0.25, 0.5, 1.0]))(rgb)
    assert torch.allclose(custom[0], (torch.from_numpy(rgb[..., 0]).float() / 255 - 0.5) / 0.25)


def test_a_mean_that_is_not_finite_is_the_one_shown():
    with pytest.raises(ValueError, match=r"got mean \[0.1, 0.2, NaN\] and std \[1.0, 1.0, 1.0\]"):
        eval_transform(16, resize=16, normalization=([0.1, 0.2, float("nan")], [1, 1, 1]))


def test_small_transform_pads_crops_and_passes_through():
    img = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    plain = small_transform(28)(img)
    assert torch.equal(plain[0], torch.from_numpy(img).float() / 255)
    norm = small_transform(28, normalization=([0.286], [0.353]))(img)
    assert torch.allclose(norm, (plain - 0.286) / 0.353, atol=1e-6)
    jitter = small_transform(28, pad=4)
    shifted = 0
    for seed in range(20):
        out = jitter(img, seed=seed)[0]
        # A shift of the original by up to 4 pixels, zeros where it left.
        found = False
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                ref = torch.zeros(28, 28)
                src = torch.from_numpy(img).float() / 255
                ys, xs = slice(max(0, -dy), 28 - max(0, dy)), slice(max(0, -dx), 28 - max(0, dx))
                yd, xd = slice(max(0, dy), 28 - max(0, -dy)), slice(max(0, dx), 28 - max(0, -dx))
                ref[yd, xd] = src[ys, xs]
                found |= torch.equal(out, ref)
                shifted += torch.equal(out, ref) and (dx, dy) != (0, 0)
        assert found
    assert shifted > 5
    assert small_transform(32)(img).shape == (1, 32, 32)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: train_transform(0), "size: expected an integer >= 1"),
        (lambda: train_transform(8, scale=(0.5, 0.1)), "scale"),
        (lambda: train_transform(8, ratio=(0, 1)), "ratio"),
        (lambda: train_transform(8, normalization="caffe"), "normalization: expected 'imagenet'"),
        (
            lambda: train_transform(8, normalization=([0.5], [0.5])),
            "normalization: expected 3 values",
        ),
        (lambda: train_transform(8, channels=2), "channels: expected 1 or 3"),
        (lambda: eval_transform(8, resize=4), "resize: expected at least size"),
        (lambda: small_transform(8, normalization="imagenet"), "normalization: .* for grey output"),
        (lambda: small_transform(8, pad=-1), "pad"),
    ],
)
def test_transform_arguments_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    root = tmp_path_factory.mktemp("cub")
    make_cub(root, classes=8, per_class=6)
    return root


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_yields_the_planned_batches_as_nchw_float(cub):
    ds = CUB200(cub)
    sampler = ClassBalancedBatchSampler(ds.labels, 2, 3, seed=1)
    loader = Loader(ds, sampler, train_transform(40), num_threads=2, prefetch=2, seed=3)
    assert len(loader) == len(sampler)
    it = iter(loader)
    sampler.set_epoch(0)
    batches = 0
    for j, (planned, (x, y)) in enumerate(zip(sampler.plan().tolist(), it)):
        assert x.dtype == torch.float32 and x.shape == (6, 3, 40, 40) and x.is_contiguous()
        assert y.dtype == torch.int64 and y.tolist() == ds.labels[planned].tolist()
        assert it.indices == planned
        # The threads draw the augmentation the calling thread draws for
        # batch j of epoch 0.
        again, _ = loader.load_batch(planned, epoch=0, batch_index=j)
        assert torch.equal(x, again), j
        batches += 1
    assert batches == len(sampler)
    # Each image is its own sample's: with a transform that draws nothing,
    # the single-sample path gives each one.
    evaluation = eval_transform(40, resize=46)
    plain = Loader(ds, sampler, evaluation, num_threads=2, prefetch=2, seed=3)
    for planned, (x, _) in zip(sampler.plan().tolist(), plain):
        for i, index in enumerate(planned):
            assert torch.equal(x[i], ds._native.load_transformed(index, evaluation._native, 0))
    one, labels = loader.load_batch([0, 5, 7], epoch=0, batch_index=0)
    assert one.shape == (3, 3, 40, 40) and labels.tolist() == ds.labels[[0, 5, 7]].tolist()
    for kw, message in [
        (dict(batch_index=-1), r"^batch_index: expected an integer >= 0, got -1$"),
        (dict(epoch=-1), r"^epoch: expected an integer >= 0, got -1$"),
        (dict(indices=[0, 5.5]), r"^indices: expected an integer >= 0, got 5.5$"),
    ]:
        with pytest.raises(ValueError, match=message):
            loader.load_batch(**{"indices": [0, 5], **kw})


def test_augmentation_does_not_depend_on_threads_or_prefetch(cub):
    ds = CUB200(cub)
    runs = []
    for n, prefetch in ((1, 1), (3, 2), (4, 16)):
        sampler = ClassBalancedBatchSampler(ds.labels, 2, 3, seed=1)
        runs.append(collect(Loader(ds, sampler, train_transform(32), n, prefetch, seed=9)))
    for other in runs[1:]:
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(runs[0], other)
        )
    sampler = ClassBalancedBatchSampler(ds.labels, 2, 3, seed=1)
    reseeded = collect(Loader(ds, sampler, train_transform(32), 2, seed=10))
    assert not torch.equal(reseeded[0][0], runs[0][0][0])


def test_each_iteration_is_a_new_epoch(cub):
    ds = CUB200(cub)
    sampler = ClassBalancedBatchSampler(ds.labels, 2, 3)
    loader = Loader(ds, sampler, train_transform(24), num_threads=2)
    e0, e1 = collect(loader), collect(loader)
    assert loader.epoch == 2 and sampler.epoch == 1
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(e0, e1))
    loader.set_epoch(0)
    again = collect(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e0, again))


def test_any_batch_sampler_and_a_short_last_batch(cub):
    ds = CUB200(cub)
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    loader = Loader(ds, batches, eval_transform(24, resize=24), num_threads=2)
    out = collect(loader)
    assert [len(y) for _, y in out] == [4, 4, 2]
    ref = ds._native.load_transformed(9, eval_transform(24, resize=24)._native, 0)
    assert torch.equal(out[2][0][1], ref)


def test_grey_idx_dataset_through_the_loader():
    ds = Glyphs(GLYPHS, split="test")
    sampler = ClassBalancedBatchSampler(ds.labels, 10, 6)
    loader = Loader(ds, sampler, small_transform(32, pad=2, flip=True), num_threads=2)
    x, y = next(iter(loader))
    assert x.shape == (60, 1, 32, 32) and len(set(y.tolist())) == 10


def test_stopping_mid_epoch_stops_the_threads(cub):
    ds = CUB200(cub)
    before = threads()
    loader = Loader(ds, [[i] * 8 for i in range(24)] * 20, train_transform(64), num_threads=3)
    it = iter(loader)
    next(it)
    assert threads() >= before + 3
    it.close()
    # A joined thread can stay listed in /proc for a moment after it exits.
    assert _threads_settle_to(before)
    it = iter(loader)
    next(it)
    del it  # collected: the threads stop too
    assert _threads_settle_to(before)


def _threads_settle_to(count: int, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while threads() > count and time.time() < deadline:
        time.sleep(0.01)
    return threads() == count


def test_waiting_for_a_batch_releases_the_gil(cub):
    ds = CUB200(cub)
    loader = Loader(
        ds, [[i % 24] * 24 for i in range(30)], train_transform(160), num_threads=1, prefetch=1
    )
    with ticking(0.001) as ticks:
        start = time.perf_counter()
        collect(loader)
        elapsed = time.perf_counter() - start
    assert len([x for x in ticks if x > start]) > 0.3 * elapsed / 0.001, (len(ticks), elapsed)


def test_loader_arguments_are_checked(cub):
    ds = CUB200(cub)
    with pytest.raises(ValueError, match="dataset: expected a grouploss.datasets dataset"):
        Loader(list(range(3)), [[0]], train_transform(8))
    with pytest.raises(ValueError, match="transform: expected a grouploss.data.Transform"):
        Loader(ds, [[0]], None)
    with pytest.raises(ValueError, match="num_threads: expected an integer >= 1"):
        Loader(ds, [[0]], train_transform(8), num_threads=0)
    with pytest.raises(ValueError, match='on_error: expected one of "raise", "skip"'):
        Loader(ds, [[0]], train_transform(8), on_error="ignore")
    with pytest.raises(ValueError, match=r"batch_sampler: expected indices below .* got index 99"):
        iter(Loader(ds, [[0, 99]], train_transform(8)))


# ------------------------------------------------------------ bad files


@pytest.fixture
def broken(tmp_path):
    """CUB with 4 classes x 4 images; sample 1 missing, 2 empty, 5 corrupt."""
    paths = make_cub(tmp_path, classes=4, per_class=4)
    (tmp_path / "images" / paths[1]).unlink()
    (tmp_path / "images" / paths[2]).write_bytes(b"")
    (tmp_path / "images" / paths[5]).write_bytes(b"\xff\xd8\xff\xe0 garbage")
    return tmp_path, paths


def test_bad_files_raise_naming_file_and_line(broken):
    root, paths = broken
    ds = CUB200(root)
    with pytest.raises(FileNotFoundError, match=r"Bird_1_0001.jpg \(line 2 of .*images.txt\)"):
        list(Loader(ds, [[0, 1]], train_transform(16), num_threads=2))
    with pytest.raises(ValueError, match=r"Bird_1_0002.jpg \(line 3 of .*\): empty file"):
        list(Loader(ds, [[0], [2]], train_transform(16), num_threads=2))
    with pytest.raises(ValueError, match=r"Bird_2_0001.jpg \(line 6 of .*\): corrupt JPEG"):
        list(Loader(ds, [[5]], train_transform(16), num_threads=1))
    it = iter(Loader(ds, [[0], [1], [3]], train_transform(16), num_threads=2))
    next(it)
    with pytest.raises(FileNotFoundError):
        next(it)
    with pytest.raises(StopIteration):  # the epoch ends at its first error
        next(it)


def test_skip_policy_replaces_bad_samples_with_their_class_and_warns_once(broken):
    root, _ = broken
    ds = CUB200(root)  # classes 1-2: samples 0-3 and 4-7
    batches = [[0, 1, 2, 3, 4, 5, 6, 7], [1, 1, 5, 4, 0, 2, 7, 6]]
    loader = Loader(ds, batches, train_transform(16), num_threads=2, on_error="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = iter(loader)
        for planned, (x, y) in zip(batches, it):
            assert x.shape == (8, 3, 16, 16)
            assert y.tolist() == ds.labels[planned].tolist()  # P x K kept
            assert not {1, 2, 5} & set(it.indices)
            assert all(ds.labels[i] == ds.labels[p] for i, p in zip(it.indices, planned))
        collect(loader)  # a second epoch reports nothing new
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 3, messages
    assert any("Bird_1_0001.jpg (line 2 of" in m for m in messages)
    assert any("empty file" in m for m in messages)
    assert any("corrupt JPEG" in m for m in messages)
    # Deterministic replacements whatever the thread count.
    with pytest.warns(RuntimeWarning):
        a = collect(Loader(ds, batches, train_transform(16), 1, seed=4, on_error="skip"))
    with pytest.warns(RuntimeWarning):
        b = collect(Loader(ds, batches, train_transform(16), 3, seed=4, on_error="skip"))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


def test_skip_policy_fails_when_a_whole_class_is_unreadable(tmp_path):
    paths = make_cub(tmp_path, classes=2, per_class=2)
    for p in paths[:2]:
        (tmp_path / "images" / p).write_bytes(b"")
    loader = Loader(CUB200(tmp_path, split="all"), [[0, 2]], train_transform(8), on_error="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match='no other sample of class "001.Bird_1" could be read'):
            list(loader)


def test_the_0x_keyword_normalize_still_works_with_a_warning():
    rgb = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    want = eval_transform(32, resize=32, normalization="caffe_bgr")(rgb)
    with pytest.warns(FutureWarning, match="normalize= is deprecated, use normalization=") as w:
        got = eval_transform(32, resize=32, normalize="caffe_bgr")(rgb)
    assert w[0].filename == __file__  # the caller's line, not the library's
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'normalise'"):
        small_transform(28, normalise="none")
