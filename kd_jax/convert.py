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
import dataclasses
import hashlib
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from kd_jax._torch_reader import (  # noqa: F401 — the reader's names, as they were here
    _LEGACY_MAGIC, _LEGACY_PROTOCOL, ConversionError, read_torch_file)

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
