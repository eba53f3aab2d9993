"""What kd_jax knows of each dataset (classes, normalisation statistics), and its errors."""

from __future__ import annotations

import dataclasses
import types



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


