"""Deterministic torchvision ResNet state dicts from NumPy, shared by the fixture script and tests.

Torch-free. :func:`state_dict_shapes` lists torchvision ``resnet18/34/50``'s ``state_dict()``
keys in its order with their shapes (``tests/fixtures/make_torchvision_logits.py`` asserts the
list equals torchvision's own); :func:`random_state_dict` fills them from one
``np.random.default_rng(seed)``, drawing in that order:

* conv ``weight`` ``[O, I, kh, kw]``: ``N(0, 2 / (I * kh * kw))`` (He, fan-in);
* BatchNorm ``weight`` ``U(0.3, 0.7)``, ``bias`` ``N(0, 0.1^2)``, ``running_mean``
  ``N(0, 0.1^2)``, ``running_var`` ``U(0.5, 1.5)`` (positive); ``num_batches_tracked`` 0
  (int64, no draw);
* ``fc.weight`` ``[C, D]``: ``N(0, 1 / D)``, ``fc.bias`` ``N(0, 0.1^2)``;

each drawn in float64 and cast to float32. :func:`fixture_images` are the NHWC float32 inputs.
:func:`write_torch_zip` writes a state dict in ``torch.save``'s zip format without torch.
"""

from __future__ import annotations

import struct
import zipfile

import numpy as np

ARCHS = {"resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False),
         "resnet50": ((3, 4, 6, 3), True)}  # torchvision name -> (blocks per stage, bottleneck)
KD_JAX_NAME = {name: f"imagenet_{name}" for name in ARCHS}
SEED = 20261202
NUM_CLASSES = 10
IMAGE_SHAPE = (2, 64, 64, 3)  # NHWC; stem 32, max-pool 16, stages 16/8/4/2


def state_dict_shapes(arch: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """torchvision ``resnet{18,34,50}(num_classes=...).state_dict()``'s keys, in order, and
    their shapes."""
    sizes, bottleneck = ARCHS[arch]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)

    def bn(name, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{leaf}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for s, (size, width) in enumerate(zip(sizes, (64, 128, 256, 512)), start=1):
        cout = width * (4 if bottleneck else 1)
        for b in range(size):
            p = f"layer{s}.{b}"
            stride = 2 if s > 1 and b == 0 else 1
            if bottleneck:
                for i, (co, ci, k) in enumerate([(width, cin, 1), (width, width, 3),
                                                 (cout, width, 1)], start=1):
                    conv(f"{p}.conv{i}", co, ci, k)
                    bn(f"{p}.bn{i}", co)
            else:
                conv(f"{p}.conv1", width, cin, 3)
                bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3)
                bn(f"{p}.bn2", width)
            if stride != 1 or cin != cout:
                conv(f"{p}.downsample.0", cout, cin, 1)
                bn(f"{p}.downsample.1", cout)
            cin = cout
    shapes["fc.weight"] = (num_classes, cin)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def random_state_dict(arch: str, num_classes: int = NUM_CLASSES,
                      seed: int = SEED) -> dict[str, np.ndarray]:
    """The module docstring's recipe: float32 tensors (int64 ``num_batches_tracked``)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in state_dict_shapes(arch, num_classes).items():
        leaf = key.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            state[key] = np.zeros((), np.int64)
            continue
        if key == "fc.weight":
            value = rng.normal(0, np.sqrt(1 / shape[1]), shape)
        elif len(shape) == 4:
            value = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        elif leaf == "weight":
            value = rng.uniform(0.3, 0.7, shape)
        elif leaf == "running_var":
            value = rng.uniform(0.5, 1.5, shape)
        else:  # BatchNorm bias, running_mean; fc.bias
            value = rng.normal(0, 0.1, shape)
        state[key] = value.astype(np.float32)
    return state


def fixture_images(seed: int = SEED) -> np.ndarray:
    """``IMAGE_SHAPE`` float32 NHWC images, ``N(0, 1)`` (already "normalised" inputs)."""
    return np.random.default_rng(seed + 1).normal(0, 1, IMAGE_SHAPE).astype(np.float32)


# ------------------------------------------------------------ torch.save's zip format, no torch

_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def _tuple(values) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def write_torch_zip(path, state: dict[str, np.ndarray]) -> None:
    """``torch.save(OrderedDict(state), path)`` as torch >= 1.6 writes it: ``archive/data.pkl``
    (protocol 2: ``OrderedDict`` of ``torch._utils._rebuild_tensor_v2(storage, 0, shape,
    stride, False, OrderedDict())``, storages as persistent ids) and one ``archive/data/<i>``
    record of little-endian bytes per tensor."""
    empty_dict = _global("collections", "OrderedDict") + b")R"  # OrderedDict()
    body = [b"\x80\x02", empty_dict, b"("]
    records = {}
    for i, (key, array) in enumerate(state.items()):
        array = np.ascontiguousarray(array)
        strides = tuple(s // array.itemsize for s in array.strides)
        storage = (b"(" + _str("storage") + _global("torch", _STORAGE[array.dtype]) + _str(str(i))
                   + _str("cpu") + _int(array.size) + b"tQ")  # BINPERSID
        body += [_str(key), _global("torch._utils", "_rebuild_tensor_v2"), b"(", storage,
                 _int(0), _tuple(array.shape), _tuple(strides), b"\x89", empty_dict, b"tR"]
        records[f"archive/data/{i}"] = array.astype(array.dtype.newbyteorder("<")).tobytes()
    body.append(b"u.")  # SETITEMS, STOP
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"".join(body))
        z.writestr("archive/byteorder", "little")
        for name, raw in records.items():
            z.writestr(name, raw)
        z.writestr("archive/version", "3\n")
