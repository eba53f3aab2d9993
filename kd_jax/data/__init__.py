"""CIFAR data: TFDS arrays with a verified cache, augmentation, and sharded batches.

Reading goes through TFDS's random-access ``array_record`` data source and PIL, so a
prepared TFDS directory is enough: TensorFlow is needed only to prepare the data once.
Decoded splits are cached in the user's cache directory (``~/.cache/kd_jax``) as ``.npy``
files with a JSON header (fingerprint, shapes, dtypes, CRC-32) that is verified on every load.

Batches are dicts of global ``jax.Array``s split over the ``"data"`` mesh axis. The order
of a training epoch is ``epoch_permutation(seed, epoch, N)``, so batch ``b`` of epoch ``e``
holds the same examples for any number of devices or processes.

Modules: ``_specs`` (datasets and errors), ``_prepare`` (TFDS's download-and-prepare),
``_arrays`` (splits as arrays, the cache, subsets), ``_batches`` (order, augmentation,
loaders).
"""

from kd_jax.data._arrays import IMAGE_SHAPE
from kd_jax.data._arrays import balanced_subset
from kd_jax.data._arrays import load_arrays
from kd_jax.data._batches import TrainLoader
from kd_jax.data._batches import _crop_flip  # noqa: F401 — tested directly
from kd_jax.data._batches import augment
from kd_jax.data._batches import epoch_permutation
from kd_jax.data._batches import eval_batches
from kd_jax.data._batches import normalize
from kd_jax.data._batches import random_crop_flip
from kd_jax.data._randaugment import rand_augment
from kd_jax.data._batches import steps_per_epoch
from kd_jax.data._prepare import _prepare_command  # noqa: F401 — tested directly
from kd_jax.data._prepare import _unreachable  # noqa: F401 — tested directly
from kd_jax.data._specs import DATASETS
from kd_jax.data._specs import FOLDER
from kd_jax.data._specs import DataNotFoundError
from kd_jax.data._specs import DatasetSpec
from kd_jax.data._specs import num_classes
from kd_jax.data._specs import spec

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "DatasetSpec",
    "FOLDER",
    "IMAGE_SHAPE",
    "TrainLoader",
    "augment",
    "balanced_subset",
    "epoch_permutation",
    "eval_batches",
    "load_arrays",
    "normalize",
    "rand_augment",
    "random_crop_flip",
    "num_classes",
    "spec",
    "steps_per_epoch",
]
