"""PyTorch CIFAR ResNet checkpoints to kd_jax variables, with their preprocessing recorded.

    python -m kd_jax.convert SRC DST [--arch resnet56] [--shortcut A|B] [--num-classes 100]
                                     [--normalization imagenet|cifar10|cifar100 | --mean ... --std ...]
                                     [--dataset cifar10] [--license TEXT]

``SRC`` is a ``torch.save`` file (``.th``, ``.pth``, ``.pt``) holding a state dict, possibly
wrapped as ``{"state_dict": ...}`` and with DataParallel's ``module.`` prefix. It is read
without torch (:func:`read_torch_file`: the zip format of torch >= 1.6 and the legacy format
before it) by an unpickler that resolves only what a state dict needs, so, as with
``torch.load(..., weights_only=True)``, no pickled code runs. A file it cannot read is handed
to ``torch.load(..., weights_only=True)`` when torch is installed (``pip install -e
".[torch]"``). ``DST`` becomes a kd_jax variables checkpoint
(:func:`kd_jax.checkpoint.save_variables`) that ``--teacher-checkpoint DST`` and
:func:`kd_jax.pretrained.load_checkpoint` read.

Architecture, shortcut type and number of classes are inferred from the state dict (flags
override them). The input normalisation cannot be read from weights: for the published files in
:data:`KNOWN_SOURCES` (recognised by SHA-256) it, the licence and the published accuracy are
filled in; any other file needs ``--normalization`` or ``--mean``/``--std``.

Mapping (PyTorch name -> kd_jax path; conv kernels OIHW -> HWIO, Linear ``(out, in)`` ->
``(in, out)``; BatchNorm ``weight``/``bias`` -> ``params/.../scale``/``bias``,
``running_mean``/``running_var`` -> ``batch_stats/.../mean``/``var``;
``num_batches_tracked`` is dropped):

=====================================================  ==========================================
PyTorch                                                kd_jax
=====================================================  ==========================================
``conv1.weight``, ``bn1.*``                            ``stem_conv/kernel``, ``stem_bn/*``
``layer{s}.{b}.conv{1,2}.weight``, ``.bn{1,2}.*``      ``stage{s}_block{b}/conv{1,2}/kernel``, ``bn{1,2}``
``layer{s}.{b}.downsample.0.weight`` (or                ``stage{s}_block{b}/shortcut_conv/kernel``
``shortcut.0.weight``)
``layer{s}.{b}.downsample.1.*`` (or ``shortcut.1.*``)  ``stage{s}_block{b}/shortcut_bn/*``
``linear.*`` or ``fc.*``                               ``classifier/kernel``, ``classifier/bias``
=====================================================  ==========================================

Option-A shortcuts (akamaster) have no parameters; a state dict without ``downsample``/
``shortcut`` weights is option A.

A torchvision ResNet-18/34/50 state dict (7x7 ``conv1``, ``layer1..4``, ``fc``) is recognised
as such and becomes ``imagenet_resnet18/34/50`` (:mod:`kd_jax._convert_torchvision`), with
ImageNet normalisation, ``image_size`` 224 and the eval transform (resize 256, centre crop 224).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import math
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["KNOWN_SOURCES", "NORMALIZATIONS", "ConversionError", "Source", "convert_file",
           "convert_state_dict", "infer_architecture", "load_torch_state_dict", "read_torch_file",
           "sha256_file"]

NORMALIZATIONS: dict[str, dict[str, tuple[float, float, float]]] = {
    # torchvision's ImageNet statistics, used by akamaster/pytorch_resnet_cifar10's trainer.py.
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    # chenyaofo/pytorch-cifar-models' training configs.
    "cifar10": {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.201)},
    "cifar100": {"mean": (0.507, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2761)},
}


@dataclasses.dataclass(frozen=True)
class Source:
    """What is known of a published checkpoint file beyond its weights."""

    dataset: str
    arch: str
    normalization: str
    published_accuracy: float
    license: str
    origin: str


_AKAMASTER = ("BSD-2-Clause, Copyright (c) 2018 Yerlan Idelbayev; "
              "github.com/akamaster/pytorch_resnet_cifar10")
_CHENYAOFO = ("BSD-3-Clause, Copyright (c) 2021 chenyaofo; "
              "github.com/chenyaofo/pytorch-cifar-models")

KNOWN_SOURCES: dict[str, Source] = {
    "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8": Source(
        "cifar10", "resnet20", "imagenet", 0.9173, _AKAMASTER,
        "akamaster/pytorch_resnet_cifar10 pretrained_models/resnet20-12fca82f.th"),
    "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850": Source(
        "cifar10", "resnet32", "imagenet", 0.9263, _AKAMASTER,
        "akamaster/pytorch_resnet_cifar10 pretrained_models/resnet32-d509ac18.th"),
    "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4": Source(
        "cifar10", "resnet44", "imagenet", 0.9310, _AKAMASTER,
        "akamaster/pytorch_resnet_cifar10 pretrained_models/resnet44-014dd654.th"),
    "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367": Source(
        "cifar10", "resnet56", "imagenet", 0.9339, _AKAMASTER,
        "akamaster/pytorch_resnet_cifar10 pretrained_models/resnet56-4bfd9763.th"),
    "f2eff4c8461ca1e0d39af83a65f7243bf7d29ec421efee3064bcee93a3caaa73": Source(
        "cifar100", "resnet56", "cifar100", 0.7263, _CHENYAOFO,
        "chenyaofo/pytorch-cifar-models release resnet/cifar100_resnet56-f2eff4c8.pt"),
}


class ConversionError(ValueError):
    """The state dict does not have a layout this converter knows; the message says why."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict in ``path`` as NumPy arrays, without executing pickled code.

    Read by :func:`read_torch_file`; a file it cannot read goes to ``torch.load(...,
    weights_only=True)`` when torch is installed. Unwraps ``{"state_dict": ...}`` (and
    ``"model"``) and strips a ``module.`` prefix.
    """
    try:
        obj = read_torch_file(path)
    except ConversionError as err:
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{err} (with torch installed, pip install -e \".[torch]\", "
                                  "torch.load(weights_only=True) would be tried)") from err
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    return _unwrap({k: v.detach().cpu().numpy() if hasattr(v, "detach") else v
                    for k, v in _state_dict_of(obj).items()})


# ------------------------------------------------------------ torch.save files without torch

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


def _state_dict_of(obj: Any) -> Mapping[str, Any]:
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    if isinstance(obj, Mapping):
        return obj
    raise ConversionError(f"expected a state dict (a mapping of tensors), got {type(obj).__name__}")


def _unwrap(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    state = dict(_state_dict_of(state))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: np.asarray(v) for k, v in state.items()}


_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")


def infer_architecture(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{"arch", "shortcut", "num_classes"}`` of a CIFAR ResNet state dict.

    Three stages of ``n`` basic blocks give ``resnet{6n+2}`` (stem 16 channels) or
    ``resnet{6n+2}x4`` (stem 32, stages 64/128/256); a projection (``downsample`` or
    ``shortcut`` conv) means shortcut ``"B"``, none means ``"A"``.
    """
    state = _unwrap(state)
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = _BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(blocks) != [1, 2, 3]:
        raise ConversionError(f"expected a CIFAR ResNet with stages layer1..layer3, found "
                              f"stages {sorted(blocks) or 'none'}")
    sizes = {s: len(b) for s, b in blocks.items()}
    if len(set(sizes.values())) != 1 or any(b != set(range(sizes[s])) for s, b in blocks.items()):
        raise ConversionError(f"stages have unequal or gapped blocks: {sizes}")
    if "conv1.weight" not in state:
        raise ConversionError("no stem convolution 'conv1.weight'")
    n = sizes[1]
    stem = state["conv1.weight"].shape[0]
    width = {16: "", 32: "x4"}.get(stem)
    if width is None:
        raise ConversionError(f"stem of {stem} channels; known: 16 (resnetN), 32 (resnetNx4)")
    head = _head_prefix(state)
    projection = any(".downsample." in k or ".shortcut." in k for k in state)
    return {"arch": f"resnet{6 * n + 2}{width}", "shortcut": "B" if projection else "A",
            "num_classes": int(state[f"{head}.weight"].shape[0])}


def _head_prefix(state) -> str:
    for head in ("linear", "fc", "classifier"):
        if f"{head}.weight" in state:
            return head
    raise ConversionError("no classifier ('linear.weight' or 'fc.weight')")


def _torch_name(flax_path: tuple[str, ...], head: str) -> str:
    """The PyTorch state-dict prefix of a kd_jax module path."""
    module = flax_path[0]
    if module == "stem_conv":
        return "conv1"
    if module == "stem_bn":
        return "bn1"
    if module == "classifier":
        return head
    m = re.fullmatch(r"stage(\d+)_block(\d+)", module)
    if not m:
        raise ConversionError(f"no PyTorch name for kd_jax module {'/'.join(flax_path)}")
    prefix = f"layer{m.group(1)}.{m.group(2)}"
    sub = flax_path[1]
    return {"shortcut_conv": f"{prefix}.{{sc}}.0", "shortcut_bn": f"{prefix}.{{sc}}.1"}.get(
        sub, f"{prefix}.{sub}")


def convert_state_dict(state: Mapping[str, np.ndarray], *, arch: str | None = None,
                       shortcut: str | None = None, num_classes: int | None = None
                       ) -> tuple[Any, dict[str, Any]]:
    """kd_jax ``variables`` (``params``, ``batch_stats``) for a PyTorch ResNet state dict.

    Every kd_jax variable must be filled with an array of exactly its shape and every float
    tensor of the state dict used (``num_batches_tracked`` aside), else :class:`ConversionError`.
    Returns ``(variables, {"arch", "shortcut", "num_classes"})``.
    """
    import jax
    import jax.numpy as jnp

    from kd_jax import models

    from kd_jax import _convert_torchvision as tv

    state = _unwrap(state)
    if tv.is_torchvision_resnet(state):  # 7x7 stem, layer1..4, fc: ImageNet ResNet-18/34/50
        return tv.convert_torchvision_state_dict(state, arch=arch, num_classes=num_classes)
    info = infer_architecture(state)
    info.update({k: v for k, v in (("arch", arch), ("shortcut", shortcut),
                                   ("num_classes", num_classes)) if v is not None})
    model = models.create(info["arch"], info["num_classes"], shortcut=info["shortcut"])
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 32, 32, 3)), train=False))
    head = _head_prefix(state)
    sc = "downsample" if any(".downsample." in k for k in state) else "shortcut"
    used: set[str] = set()

    def take(collection: str, path: tuple[str, ...], leaf) -> np.ndarray:
        base = _torch_name(path[:-1], head).format(sc=sc)
        name = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                ("batch_stats", "var"): "running_var"}[(collection, path[-1])]
        key = f"{base}.{name}"
        if key not in state:
            raise ConversionError(f"{info['arch']} (shortcut {info['shortcut']}) needs "
                                  f"'{key}', which the state dict lacks")
        value = np.asarray(state[key], np.float32)
        if value.ndim == 4:  # conv OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:  # Linear (out, in) -> (in, out)
            value = value.T
        if value.shape != tuple(leaf.shape):
            raise ConversionError(f"'{key}' has shape {value.shape} after transposition; "
                                  f"{info['arch']} expects {tuple(leaf.shape)} at "
                                  f"{collection}/{'/'.join(path)}")
        used.add(key)
        return value

    variables = {}
    for collection in ("params", "batch_stats"):
        flat = {tuple(k.key for k in path): take(collection, tuple(k.key for k in path), leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(abstract[collection])}
        variables[collection] = _unflatten(flat)
    unused = sorted(k for k, v in state.items()
                    if k not in used and not k.endswith("num_batches_tracked"))
    if unused:
        raise ConversionError(f"{len(unused)} tensors of the state dict have no place in "
                              f"{info['arch']} (shortcut {info['shortcut']}): "
                              f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
    return variables, info


def _unflatten(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, *, arch: str | None = None,
                 shortcut: str | None = None, num_classes: int | None = None,
                 normalization: str | None = None, mean=None, std=None,
                 dataset: str | None = None, license: str | None = None) -> dict[str, Any]:
    """Converts the PyTorch checkpoint ``src`` and writes a kd_jax checkpoint at ``dst``.

    Returns the metadata written with it: ``arch``, ``shortcut``, ``num_classes``,
    ``normalization`` (``{"name", "mean", "std"}`` on the [0, 1] scale), ``dataset``,
    ``source`` (file name, SHA-256, origin), ``license``, ``published_accuracy`` (known
    files), ``params``; for torchvision ResNets also ``image_size`` and ``eval_transform``.
    """
    from kd_jax import _convert_torchvision, checkpoint, models

    digest = sha256_file(src)
    known = KNOWN_SOURCES.get(digest)
    state = load_torch_state_dict(src)
    variables, info = convert_state_dict(state, arch=arch, shortcut=shortcut,
                                         num_classes=num_classes)
    tv_meta = _convert_torchvision.meta_defaults(info)  # ImageNet preprocessing; {} for CIFAR
    if (mean is None) != (std is None):
        raise ConversionError("give both --mean and --std, or --normalization")
    if mean is not None:
        norm = {"name": "custom", "mean": [float(x) for x in mean], "std": [float(x) for x in std]}
    else:
        name = normalization or (known.normalization if known else tv_meta.get("normalization"))
        if name is None:
            raise ConversionError(
                f"{os.path.basename(src)} is not a known published file, so its input "
                "normalisation is unknown; pass --normalization "
                f"{'|'.join(NORMALIZATIONS)} or --mean R G B --std R G B")
        if name not in NORMALIZATIONS:
            raise ConversionError(f"unknown normalization {name!r}; choose from "
                                  f"{', '.join(NORMALIZATIONS)} or give --mean/--std")
        norm = {"name": name, **{k: list(v) for k, v in NORMALIZATIONS[name].items()}}
    if len(norm["mean"]) != 3 or len(norm["std"]) != 3 or min(norm["std"]) <= 0:
        raise ConversionError(f"mean and std need 3 values each, std > 0; got {norm}")
    if known and known.arch != info["arch"]:
        raise ConversionError(f"{os.path.basename(src)} is the published {known.arch}; "
                              f"--arch {info['arch']} does not fit it")
    meta = {
        "format": "kd_jax.convert/1",
        **info,
        **{k: tv_meta[k] for k in ("image_size", "eval_transform") if k in tv_meta},
        "normalization": norm,
        "dataset": dataset or (known.dataset if known else tv_meta.get("dataset") if tv_meta else
                               {10: "cifar10", 100: "cifar100"}.get(info["num_classes"])),
        "source": {"file": os.path.basename(os.fspath(src)), "sha256": digest,
                   "origin": known.origin if known else None},
        "license": license or (known.license if known else None),
        "published_accuracy": known.published_accuracy if known else None,
        "params": models.num_params(variables["params"]),
    }
    checkpoint.save_variables(dst, variables, meta)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kd_jax.convert",
                                description="Convert a PyTorch CIFAR ResNet checkpoint to kd_jax.")
    p.add_argument("src", help="PyTorch checkpoint (.th, .pth, .pt)")
    p.add_argument("dst", help="output directory (a kd_jax variables checkpoint)")
    p.add_argument("--arch", help="override the inferred architecture, e.g. resnet56")
    p.add_argument("--shortcut", choices=["A", "B"], help="override the inferred shortcut type")
    p.add_argument("--num-classes", type=int, help="override the inferred number of classes")
    p.add_argument("--normalization", choices=sorted(NORMALIZATIONS),
                   help="the input normalisation the model was trained with (known files: "
                        "filled in)")
    p.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="per-channel input mean on the [0, 1] scale")
    p.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                   help="per-channel input std on the [0, 1] scale")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], help="the training dataset")
    p.add_argument("--license", help="the licence of the weights, recorded in the metadata")
    args = p.parse_args(argv)
    if not os.path.isfile(args.src):
        print(f"kd_jax.convert: error: no file {args.src!r}", file=sys.stderr)
        return 2
    try:
        meta = convert_file(args.src, args.dst, arch=args.arch, shortcut=args.shortcut,
                            num_classes=args.num_classes, normalization=args.normalization,
                            mean=args.mean, std=args.std, dataset=args.dataset,
                            license=args.license)
    except (ConversionError, ImportError) as err:
        print(f"kd_jax.convert: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.src} -> {args.dst}: {meta['arch']} shortcut {meta['shortcut']}, "
          f"{meta['num_classes']} classes, {meta['params']:,} params, normalisation "
          f"{meta['normalization']['name']}, sha256 {meta['source']['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
