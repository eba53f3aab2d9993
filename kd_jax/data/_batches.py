"""Epoch order, on-device augmentation and normalisation, and sharded batches."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kd_jax.parallel import batch_sharding, check_batch_size, process_rows, replicated
from kd_jax.data._specs import _spec

_DEFAULT_MAX_DEVICE_BYTES = 2 * 1024**3

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

