"""Image datasets that do not fit on the devices: host decoding in Grain workers, sharded batches.

Sources are an image folder (``folder:PATH``: ``PATH/{train,val}/<class>/<image>``, the order
of torchvision's ``ImageFolder``) or TFDS's ``imagenet2012`` read through its ``array_record``
data source. Training batches hold the examples ``epoch_permutation(seed, epoch, N)[b*B:(b+1)*B]``
(as :class:`kd_jax.data.TrainLoader`), each augmented with draws from
``example_rng(seed, epoch, index)``: a batch is a pure function of ``(seed, epoch, step)``, so
resuming at a step count gives exactly the batches of the uninterrupted run, and no count of
workers, threads or processes changes a pixel. Process ``p`` decodes only the rows of each
global batch its devices hold. Images leave the host as uint8; normalisation is the device's.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from kd_jax._image_ops import (
    IMG_EXTENSIONS,
    DecodeBatch,
    ImageDecodeError,
    ImageFolder,
    TfdsSource,
    eval_transform,
    example_rng,
    random_resized_crop_params,
    resized_crop,
    train_transform,
)
from kd_jax.data import epoch_permutation, steps_per_epoch
from kd_jax.parallel import batch_sharding, check_batch_size, process_rows

__all__ = [
    "IMG_EXTENSIONS",
    "HostLoader",
    "ImageDecodeError",
    "ImageFolder",
    "TfdsSource",
    "eval_batches",
    "eval_transform",
    "example_rng",
    "open_source",
    "random_resized_crop_params",
    "resized_crop",
    "train_transform",
]

_FOLDER = "folder:"
_TFDS_SPLITS = {"train": "train", "val": "validation"}


def open_source(dataset: str, split: str, *, data_dir: str | os.PathLike | None = None):
    """The examples of ``split`` (``"train"`` or ``"val"``) of ``dataset``.

    ``"folder:PATH"``: an :class:`ImageFolder` of ``PATH/train`` or ``PATH/val``.
    ``"imagenet2012"``: a :class:`TfdsSource` of TFDS's ``train`` or ``validation`` split in
    ``data_dir`` (default TFDS's own); any other TFDS split string is passed through.
    """
    if dataset.startswith(_FOLDER):
        if split not in _TFDS_SPLITS:
            raise ValueError(f"split must be 'train' or 'val' for {dataset!r}, got {split!r}")
        return ImageFolder(os.path.join(os.path.expanduser(dataset[len(_FOLDER):]), split))
    if dataset == "imagenet2012":
        return TfdsSource(dataset, _TFDS_SPLITS.get(split, split), data_dir=data_dir)
    raise ValueError(f"unknown dataset {dataset!r}; choose 'imagenet2012' or 'folder:PATH'")


def _local_rows(batch_size: int, mesh: Mesh | None, process_index, process_count) -> np.ndarray:
    """Rows of each global batch this process decodes: its devices' rows with a mesh, else the
    contiguous slice ``process_index`` of ``process_count`` (which a mesh must agree with)."""
    explicit = process_index is not None or process_count is not None
    if explicit:
        if process_index is None or process_count is None:
            raise ValueError("pass both process_index and process_count, or neither")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is outside 0..{process_count - 1}")
        if batch_size % process_count:
            raise ValueError(f"batch size {batch_size} is not divisible by the {process_count} "
                             f"processes; choose a multiple of {process_count}")
        per = batch_size // process_count
        rows = np.arange(process_index * per, (process_index + 1) * per, dtype=np.int64)
    if mesh is None:
        return rows if explicit else np.arange(batch_size, dtype=np.int64)
    check_batch_size(batch_size, mesh)
    mesh_rows = process_rows(batch_size, mesh)
    if explicit and not np.array_equal(rows, mesh_rows):
        raise ValueError(
            f"process_index={process_index} of {process_count} does not match the mesh, whose "
            f"devices on this process hold rows {mesh_rows[0]}..{mesh_rows[-1]}; pass mesh=None "
            "to get process-local NumPy batches, or omit process_index/process_count")
    return mesh_rows


def _check_workers(workers: int, threads: int, prefetch: int) -> None:
    for name, value, least in [("workers", workers, 0), ("threads", threads, 1),
                               ("prefetch", prefetch, 1)]:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _decoded(batches: np.ndarray, decode: DecodeBatch, workers: int, threads: int,
             prefetch: int) -> Iterator[dict[str, np.ndarray]]:
    """``decode(batches[k])`` for each k, in order, computed ahead by Grain.

    Each element is a whole batch, so Grain's worker slicing (worker ``i`` of ``W`` takes
    elements ``i, i+W, ...``, interleaved back in order) cannot change any batch.
    """
    import grain  # Deferred: importing Grain takes seconds.

    ds = grain.MapDataset.source(list(batches)).map(decode)
    # Grain runs at most prefetch_buffer_size of its num_threads at once.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=max(prefetch, threads)))
    if workers:
        _allow_unparsed_grain_flag()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=prefetch))
    iterator = iter(it)
    try:
        yield from iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


@dataclasses.dataclass(frozen=True)
class _Parallelism:
    workers: int
    threads: int
    prefetch: int


def _allow_unparsed_grain_flag() -> None:
    """Grain 0.2.18 reads an absl flag before a program without ``absl.app`` parsed flags
    (google/grain#1355, fixed after that release); its default is made readable the way
    Grain itself does for its debug flags. Parsed flags are left as they are."""
    flags = sys.modules.get("absl.flags")  # Grain's own absl, loaded by `import grain`
    name = "grain_enable_multiprocess_worker_profiling"
    if flags is not None and not flags.FLAGS.is_parsed() and name in flags.FLAGS:
        flags.FLAGS[name].present = True


def _batches(batches: np.ndarray, decode: DecodeBatch, how, keys, mesh: Mesh | None,
             batch_size: int) -> Iterator[dict]:
    """The decoded ``batches`` with ``keys``, placed on ``mesh`` (NumPy without one)."""
    if not len(batches):
        return
    sharding = None if mesh is None else batch_sharding(mesh)
    for local in _decoded(batches, decode, how.workers, how.threads, how.prefetch):
        # Out of Grain's shared memory (worker output), which closes when its array is
        # collected: a CPU jax.Array may alias its NumPy source.
        local = {k: np.array(local[k]) if how.workers else local[k] for k in keys}
        if sharding is None:
            yield local
        else:
            yield {k: jax.make_array_from_process_local_data(
                sharding, local[k], (batch_size, *local[k].shape[1:])) for k in keys}


class HostLoader:
    """Training batches of an image source, decoded and augmented on the host.

    ``epoch(e, start_step=k)`` yields batches ``k, k+1, ...`` of epoch ``e``: batch ``b``
    holds examples ``perm[b*B:(b+1)*B]``, ``perm = epoch_permutation(seed, e, len(source))``,
    as ``{"image": uint8[B, S, S, 3], "label": int32[B], "index": int32[B]}`` (``S =
    image_size``; ``index`` is the example's position in ``source``) -- global arrays sharded
    ``P("data")`` over ``mesh``, or, with ``mesh=None``, this process's rows as NumPy arrays.
    The last partial batch of an epoch is dropped. ``train=False`` swaps the augmentation for
    :func:`eval_transform`.

    Args:
      source: an :class:`ImageFolder`, a :class:`TfdsSource` (see :func:`open_source`) or
        anything with ``len()`` and ``read(i) -> (encoded bytes, label, name)``.
      batch_size: the global batch size.
      workers: decode processes (Grain's ``mp_prefetch``; 0: decode in this process).
      threads: decode threads per process (PIL releases the GIL while it decodes and resizes).
      prefetch: batches each process keeps decoded ahead (at least ``threads`` in flight).
      draft: reduced-size JPEG decoding of crops at least twice ``image_size`` on both sides
        (see :func:`resized_crop`); False gives torchvision's pixels exactly.
      process_index, process_count: this process's share, the contiguous slice
        ``process_index`` of each global batch; default: the rows ``mesh`` puts on this
        process's devices (all rows without a mesh).
    """

    def __init__(self, source, *, batch_size: int, seed: int, mesh: Mesh | None,
                 train: bool = True, image_size: int = 224, workers: int = 0,
                 threads: int = 1, prefetch: int = 2, draft: bool = True,
                 process_index: int | None = None, process_count: int | None = None):
        _check_workers(workers, threads, prefetch)
        self.source, self.seed, self.mesh, self.train = source, seed, mesh, train
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_examples = len(source)
        self.steps_per_epoch = steps_per_epoch(self.num_examples, batch_size)
        self.draft = draft
        self._how = _Parallelism(workers, threads, prefetch)
        self._rows = _local_rows(batch_size, mesh, process_index, process_count)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """The batches of epoch ``epoch`` from step ``start_step`` (0-based, within the epoch)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(
                f"start_step={start_step} is outside the epoch's {self.steps_per_epoch} steps; "
                f"pass 0 <= start_step <= {self.steps_per_epoch}")
        perm = epoch_permutation(self.seed, epoch, self.num_examples)
        b = self.batch_size
        batches = perm[:self.steps_per_epoch * b].reshape(-1, b)[start_step:, self._rows]
        decode = DecodeBatch(self.source, train=self.train, seed=self.seed, epoch=epoch,
                             size=self.image_size, resize_size=_resize_size(self.image_size),
                             draft=self.draft)
        return _batches(batches, decode, self._how, ("image", "label", "index"), self.mesh, b)


def _resize_size(image_size: int) -> int:
    return int(round(image_size * 256 / 224))


def eval_batches(source, *, batch_size: int, mesh: Mesh | None, image_size: int = 224,
                 resize_size: int | None = None, workers: int = 0, threads: int = 1,
                 prefetch: int = 2, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
    """Every example of ``source`` exactly once, in order, through :func:`eval_transform`.

    Batches are ``{"image": uint8[B, S, S, 3], "label": int32[B], "mask": bool[B]}``, the
    structure of :func:`kd_jax.data.eval_batches`: the last batch is padded with zero images
    and label 0, and ``mask`` is False there. Global arrays sharded ``P("data")`` over
    ``mesh``, or with ``mesh=None`` this process's rows as NumPy arrays. ``resize_size``
    defaults to ``round(image_size * 256 / 224)`` (256 for 224). Other arguments as for
    :class:`HostLoader`.
    """
    _check_workers(workers, threads, prefetch)
    resize_size = _resize_size(image_size) if resize_size is None else resize_size
    if resize_size < image_size:
        raise ValueError(f"resize_size={resize_size} is smaller than image_size={image_size}; "
                         "the centre crop needs resize_size >= image_size")
    rows = _local_rows(batch_size, mesh, process_index, process_count)
    n = len(source)
    starts = np.arange(0, n, batch_size, dtype=np.int64)
    idx = starts[:, None] + rows[None, :]
    batches = np.where(idx < n, idx, -1)
    decode = DecodeBatch(source, train=False, seed=0, epoch=0, size=image_size,
                         resize_size=resize_size, draft=False)
    return _batches(batches, decode, _Parallelism(workers, threads, prefetch),
                    ("image", "label", "mask"), mesh, batch_size)
