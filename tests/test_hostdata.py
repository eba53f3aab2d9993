"""Tests for kd_jax/hostdata.py and kd_jax/_image_ops.py (CPU; a few subprocesses).

torchvision parity uses fixtures made with torchvision itself (tests/fixtures/
make_hostdata_torchvision.py, run in a scratch venv with torch): SHA-256 digests of
``Resize(256)`` + ``CenterCrop(224)`` and of ``resized_crop`` + ``hflip`` applied to
``ImageFolder``'s ``pil_loader`` images, and statistics of ``RandomResizedCrop.get_params``. The
TFDS stand-in (tests/fixtures/make_hostdata_tfds.py) is a tiny imagenet2012 prepared as
array_record by TFDS's own imagenet2012 builder from fake ILSVRC tar files.
"""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import numpy as np
import pytest
from PIL import Image

from kd_jax import data, hostdata, parallel

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hostdata"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())

# Generated folder: (class, file, width, height, PIL mode, format) for train; val alike.
_MODES = ["RGB", "RGB", "L", "CMYK", "RGB", "RGBA", "RGB", "P"]
_SIZES = [(300, 200), (40, 60), (120, 90), (75, 290), (256, 256), (290, 41), (99, 101),
          (200, 150)]


def _sha(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, np.uint8).tobytes()).hexdigest()


def _picture(seed: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def _save(path: Path, seed: int, width: int, height: int, mode: str) -> None:
    image = Image.fromarray(_picture(seed, width, height))
    image = image.convert("P", palette=Image.ADAPTIVE, colors=16) if mode == "P" else (
        image.convert(mode))
    fmt = "PNG" if mode in ("RGBA", "P") else "JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path.with_suffix(".png" if fmt == "PNG" else path.suffix), format=fmt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """folder:ROOT with train (3 classes, 24 images) and val (3 classes, 10 images)."""
    root = tmp_path_factory.mktemp("images")
    k = 0
    for split, per_class in [("train", 8), ("val", [4, 3, 3])]:
        for c, name in enumerate(["n02", "N01", "cat"]):
            count = per_class if isinstance(per_class, int) else per_class[c]
            for i in range(count):
                w, h = _SIZES[(c + i) % len(_SIZES)]
                suffix = [".JPEG", ".jpg", ".jpeg"][i % 3]
                _save(root / split / name / f"img{i:02d}{suffix}", k, w, h, _MODES[(c + i) % 8])
                k += 1
        (root / split / "n02" / "labels.csv").write_text("not an image\n")
    return root


class _Counting:
    """A source that counts the reads of each example."""

    def __init__(self, source):
        self.source = source
        self.reads = np.zeros(len(source), np.int64)

    def __len__(self):
        return len(self.source)

    def read(self, i):
        self.reads[i] += 1
        return self.source.read(i)


def _numpy(batches) -> list[dict]:
    return [{k: np.asarray(v) for k, v in b.items()} for b in batches]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------- torchvision parity


def test_image_folder_order_is_torchvisions():
    source = hostdata.ImageFolder(FIXTURES / "folder")
    assert source.classes == EXPECTED["classes"] == ["B", "a", "n01"]  # case-sensitive sort
    ours = [(os.path.relpath(source.path(i), FIXTURES / "folder"), int(source.labels[i]))
            for i in range(len(source))]
    assert ours == [tuple(s) for s in EXPECTED["samples"]]  # a/ files before a/sub/, no .txt


def test_eval_transform_is_torchvisions_resize_256_center_crop_224():
    source = hostdata.ImageFolder(FIXTURES / "folder")
    thumbs = np.load(FIXTURES / "thumbs.npz")["thumbs"]
    for i in range(len(source)):
        out = hostdata.eval_transform(*source.read(i)[::2])
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        diff = np.abs(out[::16, ::16].astype(int) - thumbs[i, 0]).max()
        assert _sha(out) == EXPECTED["eval_sha256"][i], (source.path(i), f"max diff {diff}")


def test_resized_crop_is_torchvisions_resized_crop_and_hflip():
    source = hostdata.ImageFolder(FIXTURES / "folder")
    for i, expected in enumerate(EXPECTED["train"]):
        data_, _, where = source.read(i)
        for draft in (False, True):  # these crops are too small for a reduced decode
            out = hostdata.resized_crop(data_, where, tuple(expected["box"]),
                                        flip=expected["flip"], draft=draft)
            assert _sha(out) == expected["sha256"], (where, expected)


def test_crop_parameters_follow_torchvisions_distribution():
    n = 8000
    rng = np.random.default_rng(0)
    for size, expected in EXPECTED["crop_stats"].items():
        width, height = map(int, size.split("x"))
        draws = np.array([hostdata.random_resized_crop_params(rng, width, height)
                          for _ in range(n)], np.float64)
        if expected["distinct"] is not None:  # the fallback: centre crop clamped to the ratio
            assert np.unique(draws, axis=0).astype(int).tolist() == expected["distinct"], size
            continue
        assert (draws[:, 2] <= height).all() and (draws[:, 3] <= width).all()
        assert (draws[:, 0] + draws[:, 2] <= height).all()
        assert (draws[:, 1] + draws[:, 3] <= width).all()
        # Means of (top, left, h, w) within 5 standard errors of torchvision's 20,000 draws.
        se = np.sqrt(draws.var(0) / n + np.square(expected["std"]) / 20_000)
        np.testing.assert_array_less(np.abs(draws.mean(0) - expected["mean"]), 5 * se + 1e-9,
                                     err_msg=size)
        np.testing.assert_allclose(draws.std(0), expected["std"], rtol=0.06, err_msg=size)


# ------------------------------------------------------------------------- transforms


def test_reduced_jpeg_decoding_keeps_the_crop():
    big = _picture(7, 1400, 1000)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="JPEG", quality=90)
    box = (120, 300, 700, 900)  # min side 700 >= 2 * 224: decoded at 1/2 scale
    full = hostdata.resized_crop(buffer.getvalue(), "big", box, flip=True, draft=False)
    reduced = hostdata.resized_crop(buffer.getvalue(), "big", box, flip=True, draft=True)
    assert not np.array_equal(full, reduced)  # the reduced decode did happen
    assert np.abs(full.astype(int) - reduced).mean() < 2.0  # ... of the same crop
    exact = np.asarray(Image.fromarray(big).crop((300, 120, 1200, 820)).resize(
        (224, 224), Image.BILINEAR))[:, ::-1]
    assert np.abs(exact.astype(int) - reduced).mean() < 3.0


def test_every_mode_decodes_to_rgb(folder):
    source = hostdata.ImageFolder(folder / "train")
    rng = np.random.default_rng(0)
    for i in range(len(source)):
        data_, _, where = source.read(i)
        with Image.open(io.BytesIO(data_)) as image:
            mode = image.mode
        for out in [hostdata.train_transform(data_, where, rng),
                    hostdata.eval_transform(data_, where)]:
            assert out.shape == (224, 224, 3) and out.dtype == np.uint8, where
            if mode == "L":
                assert (out == out[..., :1]).all(), where
    cmyk = next(i for i in range(len(source))
                if Image.open(io.BytesIO(source.read(i)[0])).mode == "CMYK")
    data_, _, where = source.read(cmyk)
    expected = Image.open(io.BytesIO(data_)).convert("RGB")
    box = (0, 0, expected.size[1], expected.size[0])
    np.testing.assert_array_equal(
        hostdata.resized_crop(data_, where, box, flip=False, size=50),
        np.asarray(expected.resize((50, 50), Image.BILINEAR)))


def test_a_corrupt_image_is_named_in_the_error(tmp_path, folder):
    bad = tmp_path / "train" / "c"
    bad.mkdir(parents=True)
    good = (folder / "train" / "cat" / "img00.JPEG").read_bytes()
    (bad / "a_good.jpg").write_bytes(good)
    (bad / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "c_garbage.jpeg").write_bytes(b"\xff\xd8 not a jpeg" * 10)
    source = hostdata.open_source(f"folder:{tmp_path}", "train")
    for i, name in [(1, "b_truncated.jpg"), (2, "c_garbage.jpeg")]:
        with pytest.raises(hostdata.ImageDecodeError, match=f"{bad / name}.*replace or remove"):
            hostdata.eval_transform(*source.read(i)[::2])
    loader = hostdata.HostLoader(source, batch_size=3, seed=0, mesh=None)
    with pytest.raises(hostdata.ImageDecodeError, match=r"cannot decode image .*/c/(b_truncated\.jpg|c_garbage\.jpeg)"):
        list(loader.epoch(0))


# ---------------------------------------------------------------------- the loader


def test_an_epoch_reads_every_image_once_in_the_epoch_permutation(folder):
    source = _Counting(hostdata.open_source(f"folder:{folder}", "train"))
    mesh = parallel.make_mesh()
    loader = hostdata.HostLoader(source, batch_size=8, seed=5, mesh=mesh)
    assert (loader.steps_per_epoch, loader.batch_size, loader.num_examples) == (3, 8, 24)
    batches = list(loader.epoch(2))
    assert batches[0]["image"].sharding == parallel.batch_sharding(mesh)
    batches = _numpy(batches)
    perm = data.epoch_permutation(5, 2, 24)
    for b, batch in enumerate(batches):
        chex.assert_shape([batch["image"], batch["label"], batch["index"]],
                          [(8, 224, 224, 3), (8,), (8,)])
        assert (batch["image"].dtype, batch["label"].dtype, batch["index"].dtype) == (
            np.uint8, np.int32, np.int32)
        np.testing.assert_array_equal(batch["index"], perm[b * 8:(b + 1) * 8])
        np.testing.assert_array_equal(batch["label"], source.source.labels[batch["index"]])
    np.testing.assert_array_equal(source.reads, np.ones(24))
    # Example i's pixels: train_transform with example_rng(seed, epoch, i).
    i = int(batches[1]["index"][3])
    np.testing.assert_array_equal(batches[1]["image"][3], hostdata.train_transform(
        *source.source.read(i)[::2], hostdata.example_rng(5, 2, i)))
    other = _numpy(loader.epoch(3))
    assert not np.array_equal(batches[0]["index"], other[0]["index"])
    # train=False: the same order through the evaluation transform (112: resize to 128).
    plain = next(hostdata.HostLoader(source.source, batch_size=8, seed=5, mesh=None,
                                     train=False, image_size=112).epoch(2))
    i = int(plain["index"][0])
    np.testing.assert_array_equal(plain["image"][0], hostdata.eval_transform(
        *source.source.read(i)[::2], size=112, resize_size=128))


def test_batches_do_not_depend_on_workers_or_threads(folder):
    source = hostdata.open_source(f"folder:{folder}", "train")
    one = hostdata.HostLoader(source, batch_size=6, seed=1, mesh=None)  # 4 steps
    many = hostdata.HostLoader(source, batch_size=6, seed=1, mesh=None, workers=3, threads=2,
                               prefetch=1)
    _assert_same(_numpy(one.epoch(1)), _numpy(many.epoch(1)))
    evals = [_numpy(hostdata.eval_batches(hostdata.open_source(f"folder:{folder}", "val"),
                                          batch_size=4, mesh=None, workers=w, threads=t))
             for w, t in [(0, 1), (0, 3)]]
    _assert_same(*evals)


def test_resume_at_a_step_yields_exactly_the_rest_of_the_epoch(folder):
    source = hostdata.open_source(f"folder:{folder}", "train")
    loader = hostdata.HostLoader(source, batch_size=8, seed=2, mesh=parallel.make_mesh())
    whole = _numpy(loader.epoch(4))
    _assert_same(_numpy(loader.epoch(4, start_step=1)), whole[1:])
    assert list(loader.epoch(4, start_step=3)) == []
    with pytest.raises(ValueError, match=r"start_step=4 .* 3 steps"):
        loader.epoch(4, start_step=4)


def test_two_process_shards_are_disjoint_complete_contiguous_slices(folder):
    source = hostdata.open_source(f"folder:{folder}", "train")
    whole = _numpy(hostdata.HostLoader(source, batch_size=8, seed=3, mesh=None).epoch(0))
    shards = [_numpy(hostdata.HostLoader(source, batch_size=8, seed=3, mesh=None,
                                         process_index=p, process_count=2).epoch(0))
              for p in range(2)]
    for b, batch in enumerate(whole):
        for k in batch:
            np.testing.assert_array_equal(
                np.concatenate([shards[0][b][k], shards[1][b][k]]), batch[k], err_msg=k)
    seen = np.concatenate([s["index"] for shard in shards for s in shard])
    np.testing.assert_array_equal(np.sort(seen), np.arange(24))
    val = hostdata.open_source(f"folder:{folder}", "val")
    evals = [_numpy(hostdata.eval_batches(val, batch_size=4, mesh=None, process_index=p,
                                          process_count=2)) for p in range(2)]
    masks = np.concatenate([np.concatenate([a["mask"], b["mask"]]) for a, b in zip(*evals)])
    labels = np.concatenate([np.concatenate([a["label"], b["label"]]) for a, b in zip(*evals)])
    np.testing.assert_array_equal(masks, np.arange(12) < 10)
    np.testing.assert_array_equal(labels[:10], val.labels)
    with pytest.raises(ValueError, match="process_index=1 of 2 does not match the mesh"):
        hostdata.HostLoader(source, batch_size=8, seed=3, mesh=parallel.make_mesh(),
                            process_index=1, process_count=2)


_SUBPROCESS = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from kd_jax import hostdata, parallel
    folder, out, pid, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if pid >= 0:
        parallel.maybe_initialize_distributed(f"localhost:{port}", 2, pid,
                                              initialization_timeout=60)
    mesh = parallel.make_mesh()
    assert (mesh.size, jax.process_count()) == (2, 2 if pid >= 0 else 1)
    def local(x):  # this process's rows, in row order
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])
    arrays = {}
    train = hostdata.open_source("folder:" + folder, "train")
    loader = hostdata.HostLoader(train, batch_size=8, seed=3, mesh=mesh)
    for b, batch in enumerate(loader.epoch(1, start_step=1)):
        arrays.update({f"train{b}_{k}": local(v) for k, v in batch.items()})
    val = hostdata.open_source("folder:" + folder, "val")
    for b, batch in enumerate(hostdata.eval_batches(val, batch_size=4, mesh=mesh)):
        arrays.update({f"eval{b}_{k}": local(v) for k, v in batch.items()})
    np.savez(out, **arrays)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_make_the_batches_of_one_process_with_two_devices(folder, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "JAX_", "KD_JAX_"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    port = str(_free_port())
    runs = []
    for pid, flags in [(-1, "--xla_force_host_platform_device_count=2"), (0, ""), (1, "")]:
        runs.append(subprocess.Popen(
            [sys.executable, "-c", _SUBPROCESS, str(folder), str(tmp_path / f"{pid}.npz"),
             str(pid), port], env={**env, "XLA_FLAGS": flags},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for run in runs:
        output = run.communicate(timeout=240)[0]
        assert run.returncode == 0, output[-3000:]
    one, p0, p1 = (np.load(tmp_path / f"{pid}.npz") for pid in (-1, 0, 1))
    assert sorted(one.files) == sorted(p0.files) == sorted(p1.files)
    for name in one.files:
        np.testing.assert_array_equal(np.concatenate([p0[name], p1[name]]), one[name], name)
    # ... and those are the batches this process makes: the tail of epoch 1, every val image.
    source = hostdata.open_source(f"folder:{folder}", "train")
    here = _numpy(hostdata.HostLoader(source, batch_size=8, seed=3, mesh=None).epoch(1))[1:]
    for b, batch in enumerate(here):
        for k, v in batch.items():
            np.testing.assert_array_equal(one[f"train{b}_{k}"], v)
    masks = np.concatenate([one[f"eval{b}_mask"] for b in range(3)])
    np.testing.assert_array_equal(masks, np.arange(12) < 10)


def test_eval_batches_hold_every_example_once_in_order_padded_and_masked(folder):
    source = hostdata.open_source(f"folder:{folder}", "val")
    mesh = parallel.make_mesh()
    batches = list(hostdata.eval_batches(source, batch_size=4, mesh=mesh))
    assert batches[0]["image"].sharding == parallel.batch_sharding(mesh)
    batches = _numpy(batches)
    assert len(batches) == 3
    images = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(mask, np.arange(12) < 10)
    np.testing.assert_array_equal(labels, np.r_[source.labels, 0, 0])
    assert not images[10:].any()
    for i in range(10):
        np.testing.assert_array_equal(images[i], hostdata.eval_transform(*source.read(i)[::2]))
    # The structure of kd_jax.data.eval_batches, which loop.make_evaluator consumes.
    reference = next(data.eval_batches(images[:4], labels[:4], batch_size=4, mesh=mesh))
    assert {k: (v.shape, v.dtype) for k, v in reference.items()} == {
        k: (v.shape, v.dtype) for k, v in batches[0].items()}


# ---------------------------------------------------------------------- TFDS source


def test_tfds_imagenet2012_is_read_through_its_array_record_source():
    listing = json.loads((FIXTURES / "tfds.json").read_text())
    data_dir = FIXTURES / "tfds"
    train = hostdata.open_source("imagenet2012", "train", data_dir=data_dir)
    assert (len(train), train.num_classes) == (12, 1000)
    for i, (name, label, digest) in enumerate(listing["train"]):
        encoded, got_label, where = train.read(i)
        assert (got_label, hashlib.sha256(encoded).hexdigest()) == (label, digest)
        assert where == f"TFDS imagenet2012 train example {i} ({name})"
    counting = _Counting(train)
    batches = _numpy(hostdata.HostLoader(counting, batch_size=4, seed=0, mesh=None).epoch(0))
    np.testing.assert_array_equal(counting.reads, np.ones(12))
    indices = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(np.sort(indices), np.arange(12))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                  [listing["train"][i][1] for i in indices])
    val = hostdata.open_source("imagenet2012", "val", data_dir=data_dir)
    evals = _numpy(hostdata.eval_batches(val, batch_size=4, mesh=None))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in evals])[:5],
                                  [label for _, label, _ in listing["validation"]])
    np.testing.assert_array_equal(evals[1]["image"][0], hostdata.eval_transform(
        *val.read(4)[::2]))


# --------------------------------------------------------------------------- errors


def test_user_errors_name_the_argument_and_the_fix(tmp_path, folder):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*folder:PATH"):
        hostdata.open_source("imagenet", "train")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train does not exist"):
        hostdata.open_source(f"folder:{tmp_path}", "train")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        hostdata.open_source("imagenet2012", "train", data_dir=tmp_path)
    source = hostdata.open_source(f"folder:{folder}", "train")
    with pytest.raises(ValueError, match="batch size 32 is larger than the 24"):
        hostdata.HostLoader(source, batch_size=32, seed=0, mesh=None)
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        hostdata.HostLoader(source, batch_size=8, seed=0, mesh=None, workers=-1)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        hostdata.HostLoader(source, batch_size=8, seed=0, mesh=None, process_index=0,
                            process_count=3)
    with pytest.raises(ValueError, match="resize_size=200 is smaller than image_size=224"):
        hostdata.eval_batches(source, batch_size=8, mesh=None, resize_size=200)
