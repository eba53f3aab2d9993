"""A stand-in for TFDS's array_record data source, for ``tfds.testing.mock_data``.

TFDS 4.9.10's own ``mock_data`` generator cannot encode images without TensorFlow and its
mocked source lacks a working ``__getitems__``; this one serves PNG bytes like the real one.
Use ``with tfds.testing.mock_data(as_data_source_fn=fake_as_data_source(sizes)): ...``.
"""

import io
import types

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def fake_example(dataset: str, split: str, index: int, *, balanced: bool = False) -> dict:
    """Example ``index`` of ``split``: random pixels; labels random or ``index % classes``."""
    rng = np.random.default_rng([len(dataset), len(split), index])
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    classes = NUM_CLASSES[dataset]
    label = index % classes if balanced else int(rng.integers(0, classes))
    return {"image": image, "label": label, "coarse_label": label // 5, "id": b"x"}


class FakeSource:
    """What ``builder.as_data_source(split, decoders={"image": SkipDecoding()})`` returns."""

    reads = 0  # Examples read by all fake sources, to tell cache hits from decodes.

    def __init__(self, dataset, split, sizes, balanced):
        infos = {name: types.SimpleNamespace(num_examples=n) for name, n in sizes.items()}
        spans = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
        self._keys = [(s.splitname, i) for s in spans
                      for i in range(sizes[s.splitname])[s.from_:s.to]]
        self._dataset = dataset
        self._balanced = balanced

    def __len__(self):
        return len(self._keys)

    def __getitems__(self, keys):
        type(self).reads += len(keys)
        out = []
        for k in keys:
            example = dict(fake_example(self._dataset, *self._keys[k], balanced=self._balanced))
            buffer = io.BytesIO()
            Image.fromarray(example["image"]).save(buffer, format="PNG")
            example["image"] = buffer.getvalue()
            if self._dataset == "cifar10":
                del example["coarse_label"]
            out.append(example)
        return out


def fake_as_data_source(sizes, *, balanced=False):
    """An ``as_data_source_fn`` for ``tfds.testing.mock_data`` serving ``sizes`` examples."""

    def as_data_source(builder, split=None, *, decoders=None, **kwargs):
        assert decoders is not None  # load_arrays asks for the encoded image bytes
        return FakeSource(builder.name, split, sizes, balanced)

    return as_data_source
