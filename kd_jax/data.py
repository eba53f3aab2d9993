"""CIFAR data: TFDS arrays with a verified cache, augmentation, and sharded batches.

Reading goes through TFDS's random-access ``array_record`` data source and PIL, so a
prepared TFDS directory is enough: TensorFlow is needed only to prepare the data once.
Decoded splits are cached in the user's cache directory (``~/.cache/kd_jax``) as ``.npy``
files with a JSON header (fingerprint, shapes, dtypes, CRC-32) that is verified on every load.

Batches are dicts of global ``jax.Array``s split over the ``"data"`` mesh axis. The order
of a training epoch is ``epoch_permutation(seed, epoch, N)``, so batch ``b`` of epoch ``e``
holds the same examples for any number of devices or processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import queue
import re
import shlex
import shutil
import socket
import threading
import types
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from kd_jax.parallel import batch_sharding, check_batch_size, process_rows, replicated

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "DatasetSpec",
    "TrainLoader",
    "augment",
    "balanced_subset",
    "epoch_permutation",
    "eval_batches",
    "load_arrays",
    "normalize",
    "random_crop_flip",
    "num_classes",
    "steps_per_epoch",
]

_log = logging.getLogger(__name__)

IMAGE_SHAPE = (32, 32, 3)
_CACHE_FORMAT = 1
_DECODE_CHUNK = 1024
_DEFAULT_MAX_DEVICE_BYTES = 2 * 1024**3


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What kd_jax needs to know about a dataset.

    ``mean`` and ``std`` are per-channel (RGB) statistics of the training split on the
    [0, 1] scale; ``label_key`` is the TFDS feature holding the class label.
    """

    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    label_key: str = "label"


DATASETS: types.MappingProxyType[str, DatasetSpec] = types.MappingProxyType({
    "cifar10": DatasetSpec(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # TFDS's cifar100 stores the 100 fine classes as "label" (20 coarse ones as "coarse_label").
    "cifar100": DatasetSpec(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
})


class DataNotFoundError(RuntimeError):
    """The dataset is not prepared in the TFDS data dir and could not be prepared there."""


def _spec(dataset: str) -> DatasetSpec:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(
            f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}"
        ) from None


def num_classes(dataset: str) -> int:
    """Number of classes of ``dataset`` (10 for ``"cifar10"``, 100 for ``"cifar100"``)."""
    return _spec(dataset).num_classes


# ----------------------------------------------------------------------------- loading


def load_arrays(
    dataset: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    per_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads a split as NumPy arrays: images ``uint8[N, 32, 32, 3]`` and labels ``int32[N]``.

    Args:
      dataset: ``"cifar10"`` or ``"cifar100"`` (fine labels).
      split: any TFDS split string, e.g. ``"train"``, ``"test"``, ``"train[:10%]"``.
      data_dir: TFDS data dir; default TFDS's own (``$TFDS_DATA_DIR``, else
        ``~/tensorflow_datasets``). Data missing there is downloaded and prepared by TFDS.
      cache_dir: where decoded arrays are cached, keyed by dataset, version, split and
        ``per_class``; default ``$XDG_CACHE_HOME/kd_jax/<dataset>-<version>-<data dir
        hash>/`` (``~/.cache/kd_jax/...``), never the TFDS data dir, which may be shared or
        read-only. A cache failing its fingerprint, shape, dtype or CRC-32 check is rebuilt.
      per_class: keep only the first ``per_class`` examples of every class, in dataset
        order: the same arrays as ``balanced_subset(*load_arrays(dataset, split),
        per_class)``, but only those images are decoded, and reading stops once every class
        has them (a 1,000-image CIFAR-10 subset reads about 1,000 examples, not 50,000).

    Raises:
      DataNotFoundError: the data is not prepared and TFDS could not prepare it.
      ValueError: ``per_class`` is not a positive integer, or a class of the split has fewer
        than ``per_class`` examples.
    """
    import tensorflow_datasets as tfds  # Deferred: importing TFDS takes about a second.

    spec = _spec(dataset)
    if per_class is not None and (
        not isinstance(per_class, (int, np.integer)) or isinstance(per_class, bool)
        or per_class <= 0
    ):
        raise ValueError(f"per_class must be a positive integer or None, got {per_class!r}")
    builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        _prepare(builder, dataset)
    try:
        source = builder.as_data_source(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )
    except NotImplementedError as err:  # Prepared, but not in a random-access format.
        raise DataNotFoundError(
            f"{dataset} {builder.info.version} in {builder.data_dir} is not stored as "
            f"array_record, which kd_jax reads without TensorFlow. Fix: prepare it into "
            f"another data dir with {_prepare_command(dataset, '/path/to/tfds')}"
            f"{_where_to_install()} and pass that dir as --data-dir / data_dir= / "
            "TFDS_DATA_DIR."
        ) from err
    fingerprint = {
        "kd_jax_cache": _CACHE_FORMAT,
        "dataset": dataset,
        "version": str(builder.info.version),
        "split": split,
        "num_examples": len(source),
    }
    if per_class is not None:
        fingerprint["per_class"] = int(per_class)
    paths = _cache_paths(builder, dataset, split, cache_dir, per_class)
    if paths is not None:
        cached = _read_cache(paths, fingerprint)
        if cached is not None:
            return cached
    if per_class is None:
        images, labels = _decode(source, spec.label_key)
    else:
        images, labels = _decode_per_class(source, spec, int(per_class))
    if paths is not None:
        _write_cache(paths, images, labels, fingerprint)
    return images, labels


def _checkout_dir() -> Path | None:
    """The kd_jax source checkout this module runs from (an editable install), or None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def _prepare_command(dataset: str, data_dir: str) -> str:
    """Shell commands that install the ``[prepare]`` extra and prepare ``dataset``."""
    if "://" not in data_dir:
        data_dir = os.path.abspath(data_dir)  # The command may change directory first.
    checkout = _checkout_dir()
    install = 'pip install -e ".[prepare]"'
    if checkout is not None:
        install = f"cd {shlex.quote(str(checkout))} && {install}"
    return (
        f'{install} && python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{dataset}', data_dir='{data_dir}')"
        ".download_and_prepare(file_format='array_record')\""
    )


def _where_to_install() -> str:
    if _checkout_dir() is not None:
        return ""
    return " (run the pip command in a kd_jax source checkout, where pyproject.toml is)"


_PROBE_TIMEOUT_S = 5.0


def _prepare(builder, dataset: str) -> None:
    """Runs TFDS's download-and-prepare; any failure becomes one DataNotFoundError.

    Offline, TFDS retries each download ten times with back-off (about 3.5 minutes) before
    failing; when a connection to the download host fails first (:func:`_unreachable`), the
    attempt runs with TFDS's retries off, so it fails at once unless the archive is already in
    the download dir. A failed attempt removes the incomplete downloads and the empty folders
    it made (:func:`_remove_partial_prepare`); completed downloads stay for the next attempt.
    """
    root = str(builder.data_dir_root)
    local = "://" not in root
    before = _watched_entries(Path(root), dataset) if local else {}
    urls = list(getattr(builder, "url_infos", None) or ())
    unreachable = next(filter(None, map(_unreachable, urls)), None)
    try:
        with _tfds_download_retries(0 if unreachable else None):
            builder.download_and_prepare(file_format="array_record")
    except BaseException as err:  # Interrupted too: the partial download is removed.
        if local:
            _remove_partial_prepare(before, _watched_entries(Path(root), dataset))
        if not isinstance(err, Exception):
            raise
        reason = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
        if importlib.util.find_spec("tensorflow") is None:
            reason += " (TensorFlow is not installed; TFDS needs it to prepare CIFAR)"
        raise DataNotFoundError(
            f"{dataset} {builder.info.version} is not prepared in the TFDS data dir {root} "
            f"(looked for {builder.data_dir}), and preparing it there failed: {reason}.\n"
            f"Fix: with network access, run{_where_to_install()}\n"
            f"  {_prepare_command(dataset, root)}\n"
            "or point kd_jax at a prepared TFDS data dir (e.g. one copied from a machine "
            "where that ran) with --data-dir / data_dir= / TFDS_DATA_DIR."
        ) from err


def _unreachable(url: str, timeout: float = _PROBE_TIMEOUT_S) -> OSError | None:
    """Why a TCP connection to ``url``'s host fails within ``timeout`` s, or None if it opens.

    None also when a proxy serves the URL (the proxy, not this machine, reaches the host).
    Name resolution has no timeout of its own, so the probe runs in a daemon thread.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        return None
    proxies = urllib.request.getproxies()
    if (proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[OSError | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, daemon=True, name="kd_jax-probe")
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        return TimeoutError(f"no answer from {host}:{port} within {timeout:g} s")
    return outcome[0]


@contextlib.contextmanager
def _tfds_download_retries(retries: int | None):
    """TFDS's download retries (``downloader.MAX_RETRIES``) set for a block; None: as is."""
    from tensorflow_datasets.core.download import downloader

    saved = getattr(downloader, "MAX_RETRIES", None)
    if retries is not None and saved is not None:
        downloader.MAX_RETRIES = retries
    try:
        yield
    finally:
        if saved is not None:
            downloader.MAX_RETRIES = saved


def _watched_entries(root: Path, dataset: str) -> dict[Path, set[str] | None]:
    """The entries of the folders TFDS's prepare writes to (None: the folder is absent)."""
    folders = [root, root / dataset, root / "downloads", root / "downloads" / dataset,
               root / "downloads" / "extracted"]
    entries: dict[Path, set[str] | None] = {}
    for folder in folders:
        try:
            entries[folder] = {entry.name for entry in os.scandir(folder)}
        except OSError:
            entries[folder] = None
    return entries


def _remove_partial_prepare(before: dict[Path, set[str] | None],
                            after: dict[Path, set[str] | None]) -> None:
    """Removes what a failed prepare added: TFDS's ``*.tmp.*`` downloads and ``incomplete.*``
    folders, then the folders it created that are left empty (deepest first). Entries that
    existed before, and completed downloads, are kept."""
    for folder, names in after.items():
        for name in sorted((names or set()) - (before.get(folder) or set())):
            if ".tmp." in name or name.startswith("incomplete."):
                path = folder / name
                try:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except OSError as err:
                    _log.warning("kd_jax: could not remove %s (%s).", path, err)
    for folder in sorted(after, key=lambda f: len(f.parts), reverse=True):
        if before.get(folder) is None and after[folder] is not None:
            try:
                folder.rmdir()  # Only if empty.
            except OSError:
                pass


def _decode(source, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads every example of a data source; images arrive as PNG/JPEG bytes."""
    n = len(source)
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.int32)
    # Batched reads plus our own PIL decode take about half the time of TFDS's decoding
    # (0.12 vs 0.24 ms per CIFAR image here); threads do not help, the work holds the GIL.
    for start in range(0, n, _DECODE_CHUNK):
        keys = list(range(start, min(start + _DECODE_CHUNK, n)))
        for i, example in zip(keys, source.__getitems__(keys)):
            images[i] = _decode_image(example["image"], i)
            labels[i] = example[label_key]
    return images, labels


def _decode_per_class(source, spec: DatasetSpec, per_class: int):
    """``balanced_subset`` of the whole source, decoding only the images it keeps.

    Reads in dataset order and stops once every class has ``per_class`` examples; each read
    asks for as many examples as are still missing, which is the fewest that could finish.
    """
    n = len(source)
    counts = np.zeros(spec.num_classes, np.int64)
    labels_read = np.empty((n,), np.int32)
    kept: dict[int, np.ndarray] = {}
    end = 0
    while end < n and (counts < per_class).any():
        missing = int(np.maximum(per_class - counts, 0).sum())
        keys = list(range(end, min(end + min(missing, _DECODE_CHUNK), n)))
        for i, example in zip(keys, source.__getitems__(keys)):
            label = int(example[spec.label_key])
            labels_read[i] = label
            if 0 <= label < spec.num_classes and counts[label] < per_class:
                counts[label] += 1
                kept[i] = _decode_image(example["image"], i)
        end = keys[-1] + 1
    if (counts >= per_class).all():
        keep = np.array(sorted(kept), np.int64)
    else:  # Read to the end and some class ran short: balanced_subset's own rule and error.
        keep, _ = balanced_subset(np.arange(n), labels_read, per_class)
    images = np.empty((len(keep), *IMAGE_SHAPE), np.uint8)
    for row, i in enumerate(keep):
        images[row] = kept[int(i)]
    return images, labels_read[keep]


def _decode_image(value, index: int) -> np.ndarray:
    if isinstance(value, np.ndarray):
        image = value
    else:
        with Image.open(io.BytesIO(value), formats=("PNG", "JPEG")) as pil:
            image = np.asarray(pil if pil.mode == "RGB" else pil.convert("RGB"))
    if image.shape != IMAGE_SHAPE:
        raise ValueError(f"example {index} has image shape {image.shape}, expected {IMAGE_SHAPE}")
    return image


# ------------------------------------------------------------------------------- cache


@dataclasses.dataclass(frozen=True)
class _CachePaths:
    header: Path
    images: Path
    labels: Path


def _cache_paths(builder, dataset: str, split: str, cache_dir,
                 per_class: int | None = None) -> _CachePaths | None:
    version = str(builder.info.version)
    directory = Path(cache_dir) if cache_dir is not None else None
    if directory is None:
        # The user's cache, never the TFDS dir (shared or read-only); one subdirectory per
        # TFDS data dir, since two data dirs may hold different copies.
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = hashlib.blake2b(str(builder.data_dir).encode(), digest_size=6).hexdigest()
        directory = Path(root) / "kd_jax" / f"{dataset}-{version}-{where}"
    if not _writable_dir(directory):
        _log.warning("kd_jax: cannot write a cache in %s; decoding %s without caching.",
                     directory, dataset)
        return None
    # The readable part of the name can collide ("train[:10]" vs "train[10:]"); the hash cannot.
    safe = re.sub(r"[^A-Za-z0-9.-]+", "_", split).strip("_")
    tag = hashlib.blake2b(split.encode(), digest_size=4).hexdigest()
    subset = "" if per_class is None else f"-per_class{int(per_class)}"
    stem = directory / f"{dataset}-{version}-{safe}-{tag}{subset}"
    return _CachePaths(
        Path(f"{stem}.json"), Path(f"{stem}.images.npy"), Path(f"{stem}.labels.npy")
    )


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).data)


def _read_cache(paths: _CachePaths, fingerprint: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when absent or failing any check."""
    if not paths.header.exists():
        return None
    try:
        header = json.loads(paths.header.read_text())
        if header.get("fingerprint") != fingerprint:
            raise ValueError(f"fingerprint {header.get('fingerprint')} != {fingerprint}")
        # A subset's size follows from its labels; a whole split has num_examples rows.
        n = header["labels"]["shape"][0] if "per_class" in fingerprint else (
            fingerprint["num_examples"])
        arrays = []
        for name, path, shape, dtype in [
            ("images", paths.images, [n, *IMAGE_SHAPE], "uint8"),
            ("labels", paths.labels, [n], "int32"),
        ]:
            entry = header[name]
            if entry["shape"] != shape or entry["dtype"] != dtype:
                raise ValueError(f"{name} header {entry} does not match {shape} {dtype}")
            array = np.load(path, allow_pickle=False)
            if list(array.shape) != shape or array.dtype != np.dtype(dtype):
                raise ValueError(f"{name} file holds {array.shape} {array.dtype}")
            if _crc32(array) != entry["crc32"]:
                raise ValueError(f"{name} checksum mismatch")
            arrays.append(array)
    except Exception as err:  # A cache must never be trusted or break loading: rebuild it.
        _log.warning("kd_jax: ignoring cache %s (%s); decoding again.", paths.header, err)
        return None
    return arrays[0], arrays[1]


def _write_cache(paths: _CachePaths, images: np.ndarray, labels: np.ndarray, fingerprint: dict):
    header = {"fingerprint": fingerprint}
    try:
        for name, path, array in [("images", paths.images, images),
                                  ("labels", paths.labels, labels)]:
            _atomic_write(path, lambda f, a=array: np.save(f, a, allow_pickle=False))
            header[name] = {
                "shape": list(array.shape), "dtype": str(array.dtype), "crc32": _crc32(array)
            }
        # Written last: a header always describes files that were completely written.
        _atomic_write(paths.header, lambda f: f.write(json.dumps(header, indent=1).encode()))
    except OSError as err:
        _log.warning("kd_jax: could not write cache %s (%s).", paths.header, err)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------- subsets and ordering


def balanced_subset(
    images: np.ndarray, labels: np.ndarray, per_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` examples of every class ``0..max(labels)``, in dataset order.

    Raises ``ValueError`` when a class has fewer than ``per_class`` examples.
    """
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"images has {len(images)} examples but labels has {len(labels)}")
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    keep = []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(
                f"class {c} has only {len(members)} examples, fewer than per_class={per_class}; "
                "choose a smaller per_class"
            )
        keep.append(members[:per_class])
    keep = np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64)
    return images[keep], labels[keep]


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of epoch ``epoch``: a permutation of ``range(num_examples)``, int64.

    A function of ``(seed, epoch, num_examples)`` only.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_examples).astype(np.int64, copy=False)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full batches, ``num_examples // batch_size`` (the partial batch is dropped)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size > num_examples:
        raise ValueError(
            f"batch size {batch_size} is larger than the {num_examples} training examples; "
            f"choose a batch size of at most {num_examples}"
        )
    return num_examples // batch_size


# ------------------------------------------------------------------------- augmentation


def normalize(images: jax.Array, *, dataset: str) -> jax.Array:
    """``(images / 255 - mean) / std`` per channel, float32; ``images`` uint8 ``[..., 3]``."""
    spec = _spec(dataset)
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std


def _crop_flip(
    images: jax.Array, offsets: jax.Array, flips: jax.Array, *, padding: int
) -> jax.Array:
    """Crops each zero-padded image at ``offsets`` and mirrors it where ``flips``.

    ``images`` ``[B, H, W, C]``, ``offsets`` int ``[B, 2]`` = (row, column) of the crop's
    top-left corner in the image padded by ``padding`` zeros on each side, each in
    ``[0, 2 * padding]`` (``(padding, padding)`` returns the image); ``flips`` bool ``[B]``
    mirrors the crop left-right. Returns ``[B, H, W, C]``, same dtype.
    """
    _, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = offsets[:, 0:1] + jnp.arange(h)  # [B, H]
    cols = jnp.where(flips[:, None], jnp.arange(w)[::-1], jnp.arange(w)) + offsets[:, 1:2]
    # One gather with the flip folded into the column index: faster on CPU than a vmapped
    # dynamic_slice followed by a select (0.35 ms vs 0.52 ms at B=128).
    batch = jnp.arange(images.shape[0])[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def augment(key: jax.Array, images: jax.Array, *, dataset: str, padding: int = 4) -> jax.Array:
    """Random crop with zero padding, random horizontal flip, then :func:`normalize`.

    Like torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``: each
    ``uint8`` image is padded with ``padding`` zero (black, before normalisation) pixels on
    every side, cropped back to its size at an offset drawn uniformly from the
    ``(2 * padding + 1) ** 2`` positions, and mirrored with probability 1/2. The draws are
    made for the whole (global) batch from ``key``, so they do not depend on sharding.

    Args:
      key: a ``jax.random`` key.
      images: uint8 ``[B, H, W, 3]``.
    Returns:
      float32 ``[B, H, W, 3]``.
    """
    return normalize(random_crop_flip(key, images, padding=padding), dataset=dataset)


def random_crop_flip(key: jax.Array, images: jax.Array, *, padding: int = 4) -> jax.Array:
    """The pixels of :func:`augment` before normalisation: ``[B, H, W, C]``, ``images``' dtype.

    Models with different input normalisations (a converted teacher and a student) share one
    view by normalising this output each their own way.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    b = images.shape[0]
    key_offsets, key_flips = jax.random.split(key)
    offsets = jax.random.randint(key_offsets, (b, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(key_flips, 0.5, (b,))
    return _crop_flip(images, offsets, flips, padding=padding)


# ------------------------------------------------------------------------------ batches


def _global_array(sharding, local: np.ndarray, global_shape: tuple[int, ...]) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def _prefetch(items: Iterable, size: int) -> Iterator:
    """Yields ``items``, produced by a background thread at most ``size`` ahead."""
    if size <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as err:  # Re-raised in the consumer.
            put(_Raised(err))

    thread = threading.Thread(target=produce, daemon=True, name="kd_jax-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


@dataclasses.dataclass(frozen=True)
class _Raised:
    error: BaseException


def _gather_rows(images: jax.Array, labels: jax.Array, idx: jax.Array):
    return images[idx], labels[idx]


class TrainLoader:
    """Training batches of a fixed epoch order, sharded over the ``"data"`` mesh axis.

    ``epoch(e, start_step=k)`` yields batches ``k, k+1, ...`` of epoch ``e``; batch ``b``
    holds examples ``perm[b*B:(b+1)*B]`` with ``perm = epoch_permutation(seed, e, N)``, as
    ``{"image": uint8[B, 32, 32, 3], "label": int32[B], "index": int32[B]}`` global arrays
    sharded ``P("data")``; ``index`` is each example's position in ``images`` (CRD's memory
    bank is indexed by it). The last partial batch of an epoch is dropped.

    Two modes give identical batches. Device-resident (default in a single process when
    images and labels take at most ``max_device_bytes``): the split is copied once to every
    device and each batch is a jitted gather there, so only the indices move per step.
    Streaming (otherwise): each process gathers the rows of the batch its devices hold and
    copies them, ``prefetch`` batches ahead in a background thread.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        seed: int,
        mesh: Mesh,
        device_resident: bool | None = None,
        max_device_bytes: int = _DEFAULT_MAX_DEVICE_BYTES,
        prefetch: int = 2,
    ):
        images = np.asarray(images)
        labels = np.asarray(labels, np.int32)
        if images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(
                "expected images [N, H, W, C] and labels [N], "
                f"got {images.shape} and {labels.shape}"
            )
        check_batch_size(batch_size, mesh)
        self.batch_size = batch_size
        self.seed = seed
        self.mesh = mesh
        self.num_examples = len(images)
        self.steps_per_epoch = steps_per_epoch(self.num_examples, batch_size)
        self.prefetch = prefetch
        if device_resident is None:
            device_resident = (
                jax.process_count() == 1 and images.nbytes + labels.nbytes <= max_device_bytes
            )
        self.device_resident = device_resident
        self._rows = process_rows(batch_size, mesh)
        self._sharding = batch_sharding(mesh)
        if device_resident:
            everywhere = replicated(mesh)
            self._images = _global_array(everywhere, images, images.shape)
            self._labels = _global_array(everywhere, labels, labels.shape)
            self._gather = jax.jit(
                _gather_rows,
                in_shardings=(everywhere, everywhere, self._sharding),
                out_shardings=(self._sharding, self._sharding),
            )
        else:
            self._images, self._labels = images, labels

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
        """The batches of epoch ``epoch`` from step ``start_step`` (0-based, within the epoch)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(
                f"start_step={start_step} is outside the epoch's {self.steps_per_epoch} steps; "
                f"pass 0 <= start_step <= {self.steps_per_epoch}"
            )
        perm = epoch_permutation(self.seed, epoch, self.num_examples)
        if self.device_resident:
            return self._resident_batches(perm, start_step)
        return _prefetch(self._host_batches(perm, start_step), self.prefetch)

    def _batch_indices(self, perm: np.ndarray, step: int) -> np.ndarray:
        b = self.batch_size
        return perm[step * b:(step + 1) * b][self._rows]

    def _resident_batches(self, perm, start_step):
        for step in range(start_step, self.steps_per_epoch):
            idx = self._batch_indices(perm, step).astype(np.int32)
            idx = _global_array(self._sharding, idx, (self.batch_size,))
            images, labels = self._gather(self._images, self._labels, idx)
            yield {"image": images, "label": labels, "index": idx}

    def _host_batches(self, perm, start_step):
        image_shape = (self.batch_size, *self._images.shape[1:])
        for step in range(start_step, self.steps_per_epoch):
            idx = self._batch_indices(perm, step)
            yield {
                "image": _global_array(self._sharding, self._images[idx], image_shape),
                "label": _global_array(self._sharding, self._labels[idx], (self.batch_size,)),
                "index": _global_array(self._sharding, idx.astype(np.int32), (self.batch_size,)),
            }


def eval_batches(
    images: np.ndarray, labels: np.ndarray, *, batch_size: int, mesh: Mesh, prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Every example exactly once, in order, in batches of ``batch_size`` sharded ``P("data")``.

    Each batch is ``{"image": uint8[B, ...], "label": int32[B], "mask": bool[B]}``; the last
    batch is padded with zero images and label 0, and ``mask`` is False on the padding.
    Every process holds the whole split and materialises only the rows its devices hold (the
    same row logic as training, rather than ``tfds.split_for_jax_process``), so the batches
    are the same for any number of processes.
    """
    images = np.asarray(images)
    labels = np.asarray(labels, np.int32)
    if labels.shape != images.shape[:1]:
        raise ValueError(f"images has {len(images)} examples but labels has shape {labels.shape}")
    check_batch_size(batch_size, mesh)
    sharding = batch_sharding(mesh)
    rows = process_rows(batch_size, mesh)
    n = len(images)

    def batches():
        for start in range(0, n, batch_size):
            idx = start + rows
            mask = idx < n
            idx = np.where(mask, idx, 0)
            image = images[idx]
            image[~mask] = 0
            label = np.where(mask, labels[idx], 0).astype(np.int32)
            yield {
                "image": _global_array(sharding, image, (batch_size, *images.shape[1:])),
                "label": _global_array(sharding, label, (batch_size,)),
                "mask": _global_array(sharding, mask, (batch_size,)),
            }

    return _prefetch(batches(), prefetch)
