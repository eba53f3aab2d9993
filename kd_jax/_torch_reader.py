"""torch.save files read without torch: both formats (zip and the legacy pickle stream),
through an unpickler that resolves only what a state dict needs, to NumPy arrays.

Used by :mod:`kd_jax.convert`; nothing here executes code from the file.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import pickle
import zipfile
from typing import Any

import numpy as np


class ConversionError(ValueError):
    """The state dict does not have a layout this converter knows; the message says why."""


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER, PROTOCOL_VERSION
_LEGACY_PROTOCOL = 1001


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # A JAX dependency.

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


_STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32",
                   "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                   "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                   "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


@dataclasses.dataclass
class _Storage:
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None  # 1-D, filled after unpickling


@dataclasses.dataclass
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple


class _Global:
    """The stand-in the unpickler returns for an allowed global: a function of this module (or
    OrderedDict) to call, a tensor type, or a storage type with its dtype. Each lookup makes a
    new one, and pickle's BUILD on it is an error, so a file cannot alter what the next one
    finds."""

    __slots__ = ("call", "dtype")

    def __init__(self, call=None, dtype=None):
        self.call, self.dtype = call, dtype

    def __call__(self, *args):
        if self.call is None:
            raise pickle.UnpicklingError("called a type or storage")
        return self.call(*args)

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a global's state cannot be set")


def _rebuild_tensor(ref, offset, shape, stride, *_):  # _rebuild_tensor(_v2)'s arguments
    storage, start = ref
    return _Tensor(storage, start + int(offset), tuple(shape), tuple(stride))


def _rebuild_from_type(func, new_type, args, state):  # torch._tensor._rebuild_from_type_v2
    if not (isinstance(new_type, _Global) and new_type.call is None and new_type.dtype is None):
        raise pickle.UnpicklingError("a tensor subclass is not a plain state dict")
    return func(*args)


def _encode(text, encoding):  # pickle protocol 2's bytes: _codecs.encode(str, "latin1")
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


_SAFE_GLOBALS = {  # (module, name) -> _Global's arguments
    ("collections", "OrderedDict"): {"call": collections.OrderedDict},
    ("torch._utils", "_rebuild_tensor"): {"call": _rebuild_tensor},
    ("torch._utils", "_rebuild_tensor_v2"): {"call": _rebuild_tensor},
    ("torch._utils", "_rebuild_parameter"): {"call": lambda data, *_: data},
    ("torch._utils", "_rebuild_parameter_with_state"): {"call": lambda data, *_: data},
    ("torch._tensor", "_rebuild_from_type_v2"): {"call": _rebuild_from_type},
    ("torch", "Tensor"): {},
    ("torch.nn.parameter", "Parameter"): {},
    ("_codecs", "encode"): {"call": _encode},
    **{("torch", name): {"dtype": dtype} for name, dtype in _STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :data:`_SAFE_GLOBALS` (to stand-ins
    defined here, never to torch's code) and only ``"storage"`` persistent ids; anything else
    is an error, so a file cannot run code (the restriction of torch's weights_only load)."""

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        try:
            return _Global(**_SAFE_GLOBALS[(module, name)])
        except KeyError:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not allowed in a state dict (only tensors, storages, "
                "OrderedDict)") from None

    def persistent_load(self, pid):
        # ("storage", type, key, location, numel[, view]); location is ignored (to the CPU).
        if not (isinstance(pid, tuple) and len(pid) in (5, 6)
                and pid[0] in ("storage", b"storage")
                and isinstance(pid[1], _Global) and pid[1].dtype is not None):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        key, numel = str(pid[2]), int(pid[4])
        storage = self.storages.setdefault(key, _Storage(_dtype(pid[1].dtype), numel))
        view = pid[5] if len(pid) == 6 else None
        return storage, (int(view[1]) if view else 0)  # legacy views: (key, offset, size)


def read_torch_file(path: str | os.PathLike) -> Any:
    """What ``torch.load(path, weights_only=True)`` returns, with NumPy arrays for tensors.

    Reads both ``torch.save`` formats: the zip archive (torch >= 1.6: ``<dir>/data.pkl``, one
    ``<dir>/data/<key>`` record per storage) and the legacy one (pickles of the magic number,
    protocol version and system info, the object, the storage keys, then each storage as
    int64 ``numel`` and its bytes). Tensors may be views (offset and strides) of shared
    storages, of any of the dtypes of :data:`_STORAGE_DTYPES`, little- or big-endian; arrays
    come back as native-endian copies. Raises :class:`ConversionError` for anything else,
    including any global beyond a state dict's (:class:`_StateDictUnpickler`).
    """
    storages: dict[str, _Storage] = {}
    try:
        if zipfile.is_zipfile(path):
            obj = _read_zip(path, storages)
        else:
            obj = _read_legacy(path, storages)
        return _materialise(obj)
    except ConversionError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError,
            AttributeError, zipfile.BadZipFile) as err:
        raise ConversionError(f"cannot read {os.fspath(path)!r} as a torch.save state dict: "
                              f"{type(err).__name__}: {err}") from err


def _read_zip(path, storages):
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ConversionError(f"{os.fspath(path)!r}: a zip archive but not a torch.save file "
                                  "(no single <dir>/data.pkl)")
        prefix = pickles[0][:-len("data.pkl")]
        order = "<"
        if f"{prefix}byteorder" in archive.namelist():
            order = {b"little": "<", b"big": ">"}[archive.read(f"{prefix}byteorder").strip()]
        with archive.open(pickles[0]) as f:
            obj = _StateDictUnpickler(f, storages).load()
        for key, storage in storages.items():
            name, size = f"{prefix}data/{key}", storage.numel * storage.dtype.itemsize
            if archive.getinfo(name).file_size != size:
                raise ConversionError(f"storage {key} holds {archive.getinfo(name).file_size} "
                                      f"bytes, not {storage.numel} x {storage.dtype}")
            storage.data = np.frombuffer(archive.read(name), storage.dtype.newbyteorder(order))
    return obj


def _read_legacy(path, storages):
    with open(path, "rb") as f:
        header = [_StateDictUnpickler(f, {}).load() for _ in range(3)]
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise ConversionError(f"{os.fspath(path)!r} is not a torch.save file (neither a zip "
                                  "archive nor the legacy format)")
        order = "<" if header[2].get("little_endian", True) else ">"
        obj = _StateDictUnpickler(f, storages).load()
        keys = _StateDictUnpickler(f, {}).load()
        left = os.fstat(f.fileno()).st_size - f.tell()
        for key in keys:
            storage = storages[str(key)]
            numel = int(np.frombuffer(f.read(8), np.dtype("int64").newbyteorder(order))[0])
            size = numel * storage.dtype.itemsize
            if numel != storage.numel or size + 8 > left:
                raise ConversionError(f"storage {key}: {numel} elements recorded, "
                                      f"{storage.numel} expected, {left} bytes left")
            storage.data = np.frombuffer(f.read(size), storage.dtype.newbyteorder(order))
            left -= size + 8
    return obj


def _materialise(obj):
    """``obj`` with every tensor stand-in replaced by its array (copied, bounds-checked)."""
    if isinstance(obj, _Tensor):
        base, shape, stride = obj.storage.data, obj.shape, obj.stride
        if base is None or len(shape) != len(stride) or min((*shape, *stride, obj.offset),
                                                            default=0) < 0:
            raise ConversionError(f"malformed tensor: shape {shape}, stride {stride}")
        if math.prod(shape) == 0:
            return np.zeros(shape, base.dtype.newbyteorder("="))
        end = obj.offset + sum((n - 1) * s for n, s in zip(shape, stride)) + 1
        if end > len(base):
            raise ConversionError(f"tensor of shape {shape} runs past its storage")
        view = np.lib.stride_tricks.as_strided(
            base[obj.offset:], shape, [s * base.itemsize for s in stride], writeable=False)
        return view.astype(base.dtype.newbyteorder("="))
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


