"""Tests for kd_jax/data.py (one CPU device; one 4-device subprocess)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import data, parallel
from fake_tfds import FakeSource, fake_as_data_source, fake_example

SHARED_TFDS = Path(__file__).resolve().parents[1].parent / "shared" / "tfds"
FAKE_SIZES = {"train": 60, "test": 30}


# ------------------------------------------------------------------ a fake TFDS source

_FakeSource = FakeSource
_fake_example = fake_example


def _expected(dataset, split_name, indices):
    examples = [_fake_example(dataset, split_name, i) for i in indices]
    return (np.stack([e["image"] for e in examples]),
            np.array([e["label"] for e in examples], np.int32))


@pytest.fixture
def fake_tfds():
    with tfds.testing.mock_data(as_data_source_fn=fake_as_data_source(FAKE_SIZES)):
        yield


@pytest.fixture
def mesh():
    return parallel.make_mesh()


# ------------------------------------------------------------------------- load_arrays


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_load_arrays_shapes_dtypes_and_fine_labels(fake_tfds, tmp_path, dataset):
    images, labels = data.load_arrays(dataset, "train", cache_dir=tmp_path)
    chex.assert_shape(images, (60, 32, 32, 3))
    chex.assert_shape(labels, (60,))
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert 0 <= labels.min() and labels.max() < data.num_classes(dataset)
    want_images, want_labels = _expected(dataset, "train", range(60))
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)  # cifar100: "label", not "coarse_label"


def test_load_arrays_split_string_and_cache_keys(fake_tfds, tmp_path):
    quarter = data.load_arrays("cifar10", "train[:25%]", cache_dir=tmp_path)
    lead = data.load_arrays("cifar10", "train[:15]", cache_dir=tmp_path)  # same examples
    tail = data.load_arrays("cifar10", "train[-15:]", cache_dir=tmp_path)
    np.testing.assert_array_equal(quarter[0], _expected("cifar10", "train", range(15))[0])
    np.testing.assert_array_equal(lead[1], quarter[1])
    np.testing.assert_array_equal(tail[0], _expected("cifar10", "train", range(45, 60))[0])
    assert len(list(tmp_path.glob("*.json"))) == 3  # one cache entry per split string


def test_default_cache_is_the_users_cache_not_the_tfds_dir(fake_tfds, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tfds_dir = tmp_path / "tfds"
    tfds_dir.mkdir()  # writable, yet left alone: it may be shared
    first = data.load_arrays("cifar10", "test", data_dir=tfds_dir)
    assert list(tfds_dir.rglob("*")) == []
    (entry,) = (tmp_path / "xdg" / "kd_jax").glob("cifar10-3.0.2-*/*.json")
    reads = _FakeSource.reads
    second = data.load_arrays("cifar10", "test", data_dir=tfds_dir)
    assert _FakeSource.reads == reads  # served from the user's cache
    np.testing.assert_array_equal(first[0], second[0])
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data.load_arrays("cifar10", "test", data_dir=tfds_dir)
    assert list((tmp_path / "home" / ".cache" / "kd_jax").glob("cifar10-3.0.2-*/*.json"))


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("per_class", [1, 2, 3])
def test_per_class_equals_balanced_subset_and_reads_less(tmp_path, balanced, per_class):
    sizes = {"train": 60, "test": 30}
    with tfds.testing.mock_data(as_data_source_fn=fake_as_data_source(sizes, balanced=balanced)):
        full = data.load_arrays("cifar10", "train", cache_dir=tmp_path / "full")
        want = data.balanced_subset(*full, per_class)
        reads = _FakeSource.reads
        got = data.load_arrays("cifar10", "train", cache_dir=tmp_path / "sub", per_class=per_class)
        read = _FakeSource.reads - reads
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[1].dtype == np.int32 and len(got[1]) == 10 * per_class
        if balanced:  # labels cycle through the classes: exactly the kept examples are read
            assert read == 10 * per_class
        assert read < 60
        reads = _FakeSource.reads
        again = data.load_arrays("cifar10", "train", cache_dir=tmp_path / "sub",
                                 per_class=per_class)
        assert _FakeSource.reads == reads  # cached, apart from the whole split's entry
        np.testing.assert_array_equal(again[0], want[0])
        assert len(list((tmp_path / "sub").glob("*.json"))) == 1


def test_per_class_too_large_raises_balanced_subsets_error(fake_tfds, tmp_path):
    images, labels = data.load_arrays("cifar10", "test", cache_dir=tmp_path)
    with pytest.raises(ValueError) as want:
        data.balanced_subset(images, labels, 20)
    with pytest.raises(ValueError) as got:
        data.load_arrays("cifar10", "test", cache_dir=tmp_path, per_class=20)
    assert str(got.value) == str(want.value)
    for bad in [0, -1, 2.5, True]:
        with pytest.raises(ValueError, match="per_class"):
            data.load_arrays("cifar10", "test", cache_dir=tmp_path, per_class=bad)


def test_second_load_comes_from_cache(fake_tfds, tmp_path):
    first = data.load_arrays("cifar10", "test", cache_dir=tmp_path)
    reads = _FakeSource.reads
    second = data.load_arrays("cifar10", "test", cache_dir=tmp_path)
    assert _FakeSource.reads == reads
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def _truncate(paths):
    images = paths["images"]
    images.write_bytes(images.read_bytes()[:-1000])


def _flip_bytes(paths):
    raw = bytearray(paths["images"].read_bytes())
    raw[-500] ^= 0xFF  # image data, past the .npy header
    paths["images"].write_bytes(bytes(raw))


def _stale_fingerprint(paths):  # e.g. the split was re-prepared with other examples
    header = json.loads(paths["header"].read_text())
    header["fingerprint"]["num_examples"] += 1
    paths["header"].write_text(json.dumps(header))


def _wrong_header_shape(paths):
    header = json.loads(paths["header"].read_text())
    header["images"]["shape"][1] = 28
    paths["header"].write_text(json.dumps(header))


def _labels_replaced(paths):
    labels = np.load(paths["labels"])
    np.save(paths["labels"], (labels + 1) % 10)  # well-formed file, wrong content


def _garbage_header(paths):
    paths["header"].write_text("{not json")


@pytest.mark.parametrize(
    "corrupt",
    [_truncate, _flip_bytes, _stale_fingerprint, _wrong_header_shape, _labels_replaced,
     _garbage_header],
)
def test_corrupt_cache_is_detected_and_rebuilt(fake_tfds, tmp_path, corrupt):
    fresh = data.load_arrays("cifar10", "test", cache_dir=tmp_path)
    (header,) = tmp_path.glob("*.json")
    stem = str(header)[: -len(".json")]
    corrupt({"header": header, "images": Path(stem + ".images.npy"),
             "labels": Path(stem + ".labels.npy")})
    reads = _FakeSource.reads
    rebuilt = data.load_arrays("cifar10", "test", cache_dir=tmp_path)
    assert _FakeSource.reads == reads + len(fresh[0])  # decoded again, not trusted
    np.testing.assert_array_equal(rebuilt[0], fresh[0])
    np.testing.assert_array_equal(rebuilt[1], fresh[1])
    reads = _FakeSource.reads
    data.load_arrays("cifar10", "test", cache_dir=tmp_path)
    assert _FakeSource.reads == reads  # the rewritten cache is valid


def test_missing_data_raises_one_clear_error(tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    empty = tmp_path / "tfds"
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_arrays("cifar10", "test", data_dir=empty, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.__cause__, OSError)
    checkout = Path(__file__).resolve().parents[1]
    for part in [str(empty), "cifar10", "3.0.2", "Network is unreachable",
                 f'cd {checkout} && pip install -e ".[prepare]"',
                 f"data_dir='{empty}'", "download_and_prepare(file_format='array_record')",
                 "--data-dir", "TFDS_DATA_DIR"]:
        assert part in message, part
    assert "kd_jax[prepare]" not in message  # kd_jax is not on PyPI


_PROXY_VARIABLES = ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                    "ALL_PROXY"]


def _no_network(monkeypatch):
    """Every connection and name lookup fails at once, as on a machine without a network (and
    without a proxy)."""
    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, unreachable)
    for variable in _PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason='TFDS prepares CIFAR only with TensorFlow (pip install -e ".[prepare]")')
@pytest.mark.parametrize("existing", [False, True])
def test_offline_prepare_fails_fast_and_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    """TFDS's real download_and_prepare, offline: DataNotFoundError in seconds, where TFDS's
    ten retries with back-off took 206 s here, and the data dir as it was (TFDS leaves an
    empty dataset folder, downloads/extracted and a ``.tmp.`` download folder).
    Mutations that fail it: no retries=0 after a failed probe (200 s); no clean-up."""
    from tensorflow_datasets.core.download import downloader

    _no_network(monkeypatch)
    root = tmp_path / "tfds"
    if existing:  # A data dir in use: what was there stays, a stale .tmp. of another run too.
        for folder in ["downloads/cifar10/old.tar.gz.tmp.0", "cifar100/3.0.2",
                       "downloads/extracted"]:
            (root / folder).mkdir(parents=True)
        (root / "downloads" / "done.tar.gz").write_bytes(b"x")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    retries = downloader.MAX_RETRIES
    start = time.monotonic()
    with pytest.raises(data.DataNotFoundError, match="Network is unreachable"):
        data.load_arrays("cifar10", "test", data_dir=root, cache_dir=tmp_path / "cache")
    assert time.monotonic() - start < 30
    assert downloader.MAX_RETRIES == retries  # restored
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert [p for p in after if not p.startswith("cache")] == before


def test_failed_prepare_removes_only_its_partial_downloads(tmp_path, monkeypatch):
    """What a failed attempt made goes (``.tmp.`` downloads, ``incomplete.`` folders, folders
    it created and left empty); what existed stays, and so does a completed download, which
    spares the next attempt the network. Also on Ctrl-C."""
    root = tmp_path / "tfds"
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / "other.tar.gz.tmp.1").mkdir()  # another attempt's: not ours
    (root / "cifar100").mkdir()
    from kd_jax.data import _prepare
    monkeypatch.setattr(_prepare, "_unreachable", lambda url: None)  # no probe: network up
    for error in (OSError("disk full"), KeyboardInterrupt()):
        def failing(self, *args, **kwargs):
            (root / "downloads" / "cifar10" / "cifar.tar.gz.tmp.ab12").mkdir(parents=True)
            (root / "downloads" / "cifar10" / "cifar.tar.gz.tmp.ab12" / "part").write_bytes(b"x")
            (root / "downloads" / "extracted").mkdir(exist_ok=True)
            (root / "cifar10" / f"incomplete.{'0' * 32}.3.0.2").mkdir(parents=True)
            (root / "downloads" / "finished.tar.gz").write_bytes(b"done")
            raise error

        monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", failing)
        with pytest.raises(data.DataNotFoundError if isinstance(error, OSError)
                           else KeyboardInterrupt):
            data.load_arrays("cifar10", "test", data_dir=root, cache_dir=tmp_path / "cache")
        left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        assert left == ["cifar100", "downloads", "downloads/finished.tar.gz",
                        "downloads/other.tar.gz.tmp.1"], left
        (root / "downloads" / "finished.tar.gz").unlink()


def test_probe_of_the_download_host(monkeypatch):
    """The probe is a real TCP connection: open port None, closed port the error, silence a
    TimeoutError after its timeout; a proxy that serves the URL is not probed."""
    for variable in _PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert data._unreachable(f"http://127.0.0.1:{port}/x.tar.gz") is None
    assert isinstance(data._unreachable(f"http://127.0.0.1:{port}/x.tar.gz"),
                      ConnectionRefusedError)

    def silent(*args, **kwargs):  # a host that never answers (the probe waits 1.1 s at most)
        time.sleep(1.5)
        return types.SimpleNamespace(close=lambda: None)

    monkeypatch.setattr(socket, "create_connection", silent)
    start = time.monotonic()
    assert isinstance(data._unreachable("https://example.invalid/a", timeout=0.1), TimeoutError)
    assert time.monotonic() - start < 2
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    assert data._unreachable("https://example.invalid/a", timeout=0.1) is None


def test_prepare_command_uses_an_absolute_data_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    command = data._prepare_command("cifar100", "tfds")
    assert command.startswith("cd ") and 'pip install -e ".[prepare]"' in command
    assert f"tfds.builder('cifar100', data_dir='{tmp_path / 'tfds'}')" in command


def test_non_array_record_data_is_reported(tmp_path):
    def tfrecord_only(self, *args, **kwargs):
        raise NotImplementedError("Random access data source for file format tfrecord")

    with tfds.testing.mock_data(as_data_source_fn=tfrecord_only):
        with pytest.raises(data.DataNotFoundError, match="array_record"):
            data.load_arrays("cifar10", "test", cache_dir=tmp_path)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match=r"'mnist'.*cifar10.*cifar100"):
        data.load_arrays("mnist", "train")
    with pytest.raises(ValueError, match="cifar100"):
        data.num_classes("cifar1000")
    assert (data.num_classes("cifar10"), data.num_classes("cifar100")) == (10, 100)


@pytest.mark.skipif(not SHARED_TFDS.is_dir(), reason=f"no prepared TFDS data at {SHARED_TFDS}")
def test_real_cifar10_test_split(tmp_path):
    images, labels = data.load_arrays("cifar10", "test", data_dir=SHARED_TFDS, cache_dir=tmp_path)
    chex.assert_shape(images, (10_000, 32, 32, 3))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 1000))
    # Mean pixel on the [0, 1] scale near the training-set statistics, i.e. real photographs.
    np.testing.assert_allclose(images.mean((0, 1, 2)) / 255, data.DATASETS["cifar10"].mean,
                               atol=0.01)
    sub_images, sub_labels = data.load_arrays("cifar10", "test", data_dir=SHARED_TFDS,
                                              cache_dir=tmp_path, per_class=50)
    want_images, want_labels = data.balanced_subset(images, labels, 50)
    np.testing.assert_array_equal(sub_images, want_images)
    np.testing.assert_array_equal(sub_labels, want_labels)


# ------------------------------------------------------------ subsets, order, step count


def test_balanced_subset_keeps_first_per_class_in_order():
    labels = np.array([2, 0, 1, 0, 2, 2, 1, 0, 1], np.int32)
    images = np.arange(len(labels))  # image i is its own index
    sub_images, sub_labels = data.balanced_subset(images, labels, 2)
    np.testing.assert_array_equal(sub_images, [0, 1, 2, 3, 4, 6])
    np.testing.assert_array_equal(np.bincount(sub_labels), [2, 2, 2])
    with pytest.raises(ValueError, match="class 0 has only 3"):
        data.balanced_subset(images, labels, 4)


def test_epoch_permutation_is_a_function_of_seed_and_epoch():
    a = data.epoch_permutation(0, 3, 1000)
    assert a.dtype == np.int64
    np.testing.assert_array_equal(np.sort(a), np.arange(1000))
    np.testing.assert_array_equal(a, data.epoch_permutation(0, 3, 1000))
    assert not np.array_equal(a, data.epoch_permutation(0, 4, 1000))
    assert not np.array_equal(a, data.epoch_permutation(1, 3, 1000))


def test_steps_per_epoch_drops_partial_batch():
    assert data.steps_per_epoch(50_000, 128) == 390
    with pytest.raises(ValueError, match=r"batch size 64 .* 50 training examples"):
        data.steps_per_epoch(50, 64)


# ------------------------------------------------------------------------ augmentation


def _reference_crop_flip(images, offsets, flips, padding):
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out = np.stack([p[dy:dy + 32, dx:dx + 32] for p, (dy, dx) in zip(padded, offsets)])
    return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


def test_crop_flip_single_pixel_lands_where_expected():
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 10, 20] = 255
    # Offset (dy, dx) moves pixel (r, c) to (r + 4 - dy, c + 4 - dx); a flip then mirrors c.
    crop_flip = jax.jit(data._crop_flip, static_argnames="padding")
    out = crop_flip(image, np.array([[1, 7]]), np.array([False]), padding=4)
    assert np.argwhere(np.asarray(out[0, :, :, 0])).tolist() == [[13, 17]]
    out = crop_flip(image, np.array([[1, 7]]), np.array([True]), padding=4)
    assert np.argwhere(np.asarray(out[0, :, :, 0])).tolist() == [[13, 14]]
    out = crop_flip(image, np.array([[4, 4]]), np.array([False]), padding=4)
    np.testing.assert_array_equal(out, image)  # centre offset, no flip: identity


def test_crop_flip_matches_numpy_for_all_offsets_and_flips():
    offsets = np.array([(dy, dx) for dy in range(9) for dx in range(9)] * 2)
    flips = np.repeat([False, True], 81)
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (162, 32, 32, 3), dtype=np.uint8)  # no zeros: padding shows
    out = jax.jit(data._crop_flip, static_argnames="padding")(
        jnp.asarray(images), jnp.asarray(offsets), jnp.asarray(flips), padding=4)
    want = _reference_crop_flip(images, offsets, flips, 4)
    np.testing.assert_array_equal(out, want)
    assert (want[0, :4] == 0).all() and (want[0, :, :4] == 0).all()  # offset (0, 0): black border


def test_augment_draws_every_offset_and_flip():
    # Channel 0 holds row + 1, channel 1 holds column + 1, so the output reveals each draw.
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([r + 1, c + 1, np.zeros_like(r)], -1).astype(np.uint8)
    batch = np.broadcast_to(image, (4000, 32, 32, 3))
    out = jax.jit(data.augment, static_argnames="dataset")(
        jax.random.key(0), jnp.asarray(batch), dataset="cifar10")
    assert out.shape == (4000, 32, 32, 3) and out.dtype == jnp.float32
    spec = data.DATASETS["cifar10"]
    pixels = np.rint((np.asarray(out) * spec.std + spec.mean) * 255).astype(int)
    flipped = pixels[:, 16, 17, 1] < pixels[:, 16, 16, 1]
    dy = pixels[:, 16, 16, 0] - 13
    dx = np.where(flipped, pixels[:, 16, 16, 1] - 12, pixels[:, 16, 16, 1] - 13)
    combos = set(zip(dy.tolist(), dx.tolist(), flipped.tolist()))
    assert combos == {(y, x, f) for y in range(9) for x in range(9) for f in (False, True)}
    assert 0.45 < flipped.mean() < 0.55


def test_augment_is_a_pure_function_of_the_key():
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), np.uint8))
    augment = jax.jit(data.augment, static_argnames="dataset")
    a = augment(jax.random.key(1), images, dataset="cifar100")
    b = augment(jax.random.key(1), images, dataset="cifar100")
    c = augment(jax.random.key(2), images, dataset="cifar100")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# Published per-channel statistics of the 50,000 training images on the [0, 1] scale (mean
# and population std over every pixel). CIFAR-10: the values widely copied from the
# torchvision-era computation (e.g. "0.49139968, 0.48215841, 0.44653091" /
# "0.24703223, 0.24348513, 0.26158784"); not the (0.2023, 0.1994, 0.2010) of kuangliu's
# pytorch-cifar, which averages per-image stds. Here the JPEG export in ../shared/tfds gives
# mean (0.4913, 0.4821, 0.4465), std (0.2452, 0.2428, 0.2606): JPEG smooths a little.
# CIFAR-100: weiaicunzai/pytorch-cifar100 conf/global_settings.py (CIFAR100_TRAIN_MEAN/STD).
_PUBLISHED_STATS = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
    "cifar100": ((0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
                 (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)),
}


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_normalize_statistics(dataset):
    """The statistics are the published ones rounded to 4 decimals, and normalize applies
    them per channel. Fails if any of the 12 numbers changes (e.g. CIFAR-10's std set to
    0.347, or CIFAR-10's std swapped for the per-image 0.2023), or mean and std swap."""
    mean, std = _PUBLISHED_STATS[dataset]
    spec = data.DATASETS[dataset]
    assert spec.mean == tuple(round(m, 4) for m in mean)
    assert spec.std == tuple(round(s, 4) for s in std)
    mean_image = np.broadcast_to(np.float32(mean) * 255, (2, 32, 32, 3))
    # 4-decimal rounding moves the result by at most 5e-5 / 0.24 ~ 2e-4.
    np.testing.assert_allclose(data.normalize(mean_image, dataset=dataset), 0, atol=3e-4)
    white = data.normalize(np.full((1, 2, 2, 3), 255, np.uint8), dataset=dataset)
    assert white.dtype == jnp.float32
    np.testing.assert_allclose(white[0, 0, 0], (1 - np.array(mean)) / np.array(std), rtol=3e-4)


# ----------------------------------------------------------------------------- batches


def _toy(n=22):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, 10, n).astype(np.int32)


def test_eval_batches_cover_every_example_once(mesh):
    images, labels = _toy(10)
    batches = list(data.eval_batches(images, labels, batch_size=4, mesh=mesh))
    assert len(batches) == 3
    mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
    np.testing.assert_array_equal(mask, [True] * 10 + [False] * 2)
    got_images = np.concatenate([np.asarray(b["image"]) for b in batches])
    got_labels = np.concatenate([np.asarray(b["label"]) for b in batches])
    np.testing.assert_array_equal(got_images[:10], images)
    np.testing.assert_array_equal(got_labels[:10], labels)
    assert (got_images[10:] == 0).all() and (got_labels[10:] == 0).all()
    for b in batches:
        assert b["image"].sharding == parallel.batch_sharding(mesh)
        dtypes = (b["image"].dtype, b["label"].dtype, b["mask"].dtype)
        assert dtypes == (jnp.uint8, jnp.int32, jnp.bool_)


@pytest.mark.parametrize("device_resident", [True, False])
def test_train_batches_follow_the_epoch_permutation(mesh, device_resident):
    images, labels = _toy()
    loader = data.TrainLoader(images, labels, batch_size=4, seed=7, mesh=mesh,
                              device_resident=device_resident)
    assert loader.device_resident is device_resident and loader.steps_per_epoch == 5
    batches = list(loader.epoch(3))
    perm = data.epoch_permutation(7, 3, 22)
    assert len(batches) == 5
    for b, batch in enumerate(batches):
        rows = perm[4 * b:4 * (b + 1)]
        np.testing.assert_array_equal(batch["image"], images[rows])
        np.testing.assert_array_equal(batch["label"], labels[rows])
        assert batch["image"].sharding == parallel.batch_sharding(mesh)
        assert batch["label"].dtype == jnp.int32


def test_resident_and_streaming_agree_and_resume_mid_epoch(mesh):
    images, labels = _toy()
    resident = data.TrainLoader(images, labels, batch_size=4, seed=1, mesh=mesh)
    streaming = data.TrainLoader(images, labels, batch_size=4, seed=1, mesh=mesh,
                                 max_device_bytes=0)
    assert resident.device_resident and not streaming.device_resident  # the automatic choice
    full = [np.asarray(b["image"]) for b in resident.epoch(2)]
    np.testing.assert_array_equal(full, [np.asarray(b["image"]) for b in streaming.epoch(2)])
    resumed = [np.asarray(b["image"]) for b in streaming.epoch(2, start_step=3)]
    np.testing.assert_array_equal(resumed, full[3:])
    assert not np.array_equal(full[0], next(iter(resident.epoch(1)))["image"])
    with pytest.raises(ValueError, match="start_step=6"):
        resident.epoch(0, start_step=6)


def test_streaming_stops_cleanly_when_abandoned(mesh):
    images, labels = _toy(400)
    loader = data.TrainLoader(images, labels, batch_size=4, seed=0, mesh=mesh,
                              device_resident=False)
    it = loader.epoch(0)
    next(it)
    it.close()  # joins the prefetch thread; a hang here fails the test by timeout
    assert not any(t.name == "kd_jax-prefetch" for t in threading.enumerate())


_MULTI_DEVICE = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from kd_jax import data, parallel
    mesh = parallel.make_mesh()
    assert mesh.size == 4, mesh
    try:
        parallel.check_batch_size(10, mesh)
        raise AssertionError("no error")
    except ValueError as e:
        assert "batch size 10" in str(e) and "4 devices" in str(e), e
    np.testing.assert_array_equal(parallel.process_rows(8, mesh), np.arange(8))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 30).astype(np.int32)
    perm = data.epoch_permutation(4, 1, 30)
    for resident in (True, False):
        loader = data.TrainLoader(images, labels, batch_size=8, seed=4, mesh=mesh,
                                  device_resident=resident)
        for b, batch in enumerate(loader.epoch(1)):
            x = batch["image"]
            assert x.sharding == parallel.batch_sharding(mesh)
            for shard in x.addressable_shards:
                rows = perm[8 * b:8 * (b + 1)][shard.index[0]]
                np.testing.assert_array_equal(shard.data, images[rows])
    batches = data.eval_batches(images, labels, batch_size=8, mesh=mesh)
    masks = [np.asarray(b["mask"]) for b in batches]
    assert np.concatenate(masks).sum() == 30 and len(masks) == 4
    aug = jax.jit(data.augment, static_argnames="dataset")
    key = jax.random.key(3)
    sharded = jax.device_put(images[:8], parallel.batch_sharding(mesh))
    single = jax.device_put(images[:8], jax.devices()[0])
    # Same draws; the normalisation may differ by an ulp between the two compilations.
    np.testing.assert_allclose(aug(key, sharded, dataset="cifar10"),
                               aug(key, single, dataset="cifar10"), rtol=0, atol=1e-5)
    print("OK")
""")


def test_four_devices_shard_batches_and_augment_identically():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "-c", _MULTI_DEVICE], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
