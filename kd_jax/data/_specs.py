"""What kd_jax knows of each dataset (classes, normalisation statistics), and its errors."""

from __future__ import annotations

import dataclasses
import os
import types

@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What kd_jax needs to know about a dataset.

    ``mean`` and ``std`` are per-channel (RGB) statistics of the training split on the
    [0, 1] scale; ``label_key`` is the TFDS feature holding the class label. ``image_size`` is
    the side of the images the models see; ``host_augmented`` datasets arrive augmented
    from host workers (:mod:`kd_jax.hostdata`: random-resized crops, flips), so the train
    step only normalises them, where CIFAR's crops and flips run on the device.
    """

    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    label_key: str = "label"
    image_size: int = 32
    host_augmented: bool = False


DATASETS: types.MappingProxyType[str, DatasetSpec] = types.MappingProxyType({
    "cifar10": DatasetSpec(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # TFDS's cifar100 stores the 100 fine classes as "label" (20 coarse ones as "coarse_label").
    "cifar100": DatasetSpec(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # TFDS's imagenet2012 (prepared from the manual download); torchvision's statistics.
    "imagenet2012": DatasetSpec(1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                image_size=224, host_augmented=True),
})
FOLDER = "folder:"  # "folder:PATH": an image folder PATH/{train,val}/<class>/*.JPEG


class DataNotFoundError(RuntimeError):
    """The dataset is not prepared in the TFDS data dir and could not be prepared there."""


def _spec(dataset: str) -> DatasetSpec:
    if dataset.startswith(FOLDER):
        return _folder_spec(dataset[len(FOLDER):])
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ValueError(
            f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)} or folder:PATH"
        ) from None


def _folder_spec(path: str) -> DatasetSpec:
    """An image folder's spec: its classes are ``PATH/train``'s subdirectories (as
    torchvision's ``ImageFolder`` finds them); ImageNet's statistics and 224-pixel crops."""
    train = os.path.join(os.path.expanduser(path), "train")
    try:
        classes = [e.name for e in os.scandir(train) if e.is_dir()]
    except OSError as err:
        raise ValueError(f"folder:{path} has no readable train/ directory ({err.strerror}); an "
                         "image folder holds PATH/train/<class>/*.JPEG and PATH/val/<class>/...")\
            from None
    if not classes:
        raise ValueError(f"folder:{path}: {train} holds no class directories.")
    base = DATASETS["imagenet2012"]
    return dataclasses.replace(base, num_classes=len(classes))


def spec(dataset: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``dataset``: a name of :data:`DATASETS` or ``folder:PATH``."""
    return _spec(dataset)


def num_classes(dataset: str) -> int:
    """Number of classes of ``dataset`` (10 for ``"cifar10"``, 100 for ``"cifar100"``, 1000
    for ``"imagenet2012"``, the class directories of a ``folder:PATH``)."""
    return _spec(dataset).num_classes


