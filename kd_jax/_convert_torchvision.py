"""torchvision ResNet-18/34/50 state dicts to kd_jax ``imagenet_resnet*`` variables.

Used by :mod:`kd_jax.convert`, which recognises such a state dict (:func:`is_torchvision_resnet`)
and records :func:`meta_defaults` with it. Mapping (conv kernels OIHW -> HWIO, ``fc.weight``
``(out, in)`` -> ``(in, out)``; BatchNorm ``weight``/``bias`` -> ``params/.../scale``/``bias``,
``running_mean``/``running_var`` -> ``batch_stats/.../mean``/``var``; ``num_batches_tracked``
is dropped):

=============================================  ===============================================
torchvision                                    kd_jax
=============================================  ===============================================
``conv1.weight``, ``bn1.*``                    ``stem_conv/kernel``, ``stem_bn/*``
``layer{s}.{b}.conv{k}.weight``, ``.bn{k}.*``  ``stage{s}_block{b}/conv{k}/kernel``, ``bn{k}/*``
``layer{s}.{b}.downsample.0.weight``           ``stage{s}_block{b}/shortcut_conv/kernel``
``layer{s}.{b}.downsample.1.*``                ``stage{s}_block{b}/shortcut_bn/*``
``fc.weight``, ``fc.bias``                     ``classifier/kernel``, ``classifier/bias``
=============================================  ===============================================

``k`` is 1..2 (``BasicBlock``) or 1..3 (``Bottleneck``); the architecture follows from the
blocks per stage and the presence of ``conv3``, the classes from ``fc``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from kd_jax.convert import ConversionError

__all__ = ["ARCHS", "EVAL_TRANSFORM", "IMAGE_SIZE", "convert_torchvision_state_dict",
           "infer_torchvision_architecture", "is_torchvision_resnet", "meta_defaults"]

# (blocks per stage, bottleneck) -> kd_jax name; torchvision's resnet18/34/50.
ARCHS = {((2, 2, 2, 2), False): "imagenet_resnet18", ((3, 4, 6, 3), False): "imagenet_resnet34",
         ((3, 4, 6, 3), True): "imagenet_resnet50"}
IMAGE_SIZE = 224
# torchvision's ImageClassification preset of these weights (transforms/_presets.py).
EVAL_TRANSFORM = {"resize": 256, "crop": IMAGE_SIZE, "interpolation": "bilinear",
                  "antialias": True}

_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")


def is_torchvision_resnet(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` has torchvision ResNet's layout: a 7x7 ``conv1``, ``layer1..4``, ``fc``."""
    stem = state.get("conv1.weight")
    return (stem is not None and tuple(np.shape(stem)[2:]) == (7, 7) and "fc.weight" in state
            and any(k.startswith("layer4.") for k in state))


def infer_torchvision_architecture(state: Mapping[str, Any]) -> dict[str, Any]:
    """``{"arch", "shortcut": None, "num_classes"}`` of a torchvision ResNet state dict."""
    blocks: dict[int, set[int]] = {}
    for key in state:
        m = _BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(blocks) != [1, 2, 3, 4]:
        raise ConversionError(f"expected a torchvision ResNet with stages layer1..layer4, found "
                              f"stages {sorted(blocks) or 'none'}")
    if any(b != set(range(len(b))) for b in blocks.values()):
        found = {s: sorted(b) for s, b in sorted(blocks.items())}
        raise ConversionError(f"stages have gapped block indices: {found}")
    sizes = tuple(len(blocks[s]) for s in (1, 2, 3, 4))
    bottleneck = "layer1.0.conv3.weight" in state
    arch = ARCHS.get((sizes, bottleneck))
    if arch is None:
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        raise ConversionError(f"a torchvision ResNet of {kind}s {list(sizes)} per stage; kd_jax "
                              "has resnet18 (BasicBlock [2, 2, 2, 2]), resnet34 (BasicBlock "
                              "[3, 4, 6, 3]) and resnet50 (Bottleneck [3, 4, 6, 3])")
    return {"arch": arch, "shortcut": None, "num_classes": int(np.shape(state["fc.weight"])[0])}


def meta_defaults(info: Mapping[str, Any]) -> dict[str, Any]:
    """What a converted torchvision ResNet's metadata records beyond its weights: ImageNet
    normalisation, the eval transform (resize 256, centre crop 224), ``image_size`` 224, and
    ``dataset`` ``"imagenet2012"`` when it has 1000 classes; ``{}`` for any other arch."""
    if not info["arch"].startswith("imagenet_"):
        return {}
    return {"normalization": "imagenet", "image_size": IMAGE_SIZE,
            "eval_transform": dict(EVAL_TRANSFORM),
            "dataset": "imagenet2012" if info["num_classes"] == 1000 else None}


def _torch_name(module_path: tuple[str, ...]) -> str:
    top = module_path[0]
    if top in ("stem_conv", "stem_bn", "classifier"):
        return {"stem_conv": "conv1", "stem_bn": "bn1", "classifier": "fc"}[top]
    m = re.fullmatch(r"stage(\d+)_block(\d+)", top)
    assert m and len(module_path) == 2, module_path
    sub = {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}.get(
        module_path[1], module_path[1])
    return f"layer{m.group(1)}.{m.group(2)}.{sub}"


_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
         ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def convert_torchvision_state_dict(state: Mapping[str, np.ndarray], *, arch: str | None = None,
                                   num_classes: int | None = None) -> tuple[Any, dict[str, Any]]:
    """kd_jax ``variables`` (``params``, ``batch_stats``) for a torchvision ResNet state dict
    (keys without a ``module.`` prefix), and ``{"arch", "shortcut", "num_classes"}``.

    Every kd_jax variable is filled with a float32 array of exactly its shape and every
    tensor of ``state`` (``num_batches_tracked`` aside) is used, else :class:`ConversionError`;
    so is an ``arch`` other than the inferred one.
    """
    import jax
    import jax.numpy as jnp

    from kd_jax import models

    info = infer_torchvision_architecture(state)
    if arch is not None and arch != info["arch"]:
        raise ConversionError(f"the state dict is torchvision's {info['arch'][len('imagenet_'):]}"
                              f" ({info['arch']}); --arch {arch} does not fit it")
    if num_classes is not None:
        info["num_classes"] = num_classes
    model = models.create(info["arch"], info["num_classes"])
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 64, 64, 3)), train=False))
    used: set[str] = set()
    variables: dict[str, dict] = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract[collection]):
            path = tuple(p.key for p in path)
            key = f"{_torch_name(path[:-1])}.{_LEAF[(collection, path[-1])]}"
            if key not in state:
                raise ConversionError(f"{info['arch']} needs '{key}', which the state dict lacks")
            value = np.asarray(state[key], np.float32)
            if value.ndim == 4:  # conv OIHW -> HWIO
                value = value.transpose(2, 3, 1, 0)
            elif value.ndim == 2:  # Linear (out, in) -> (in, out)
                value = value.T
            if value.shape != tuple(leaf.shape):
                raise ConversionError(f"'{key}' has shape {value.shape} after transposition; "
                                      f"{info['arch']} expects {tuple(leaf.shape)} at "
                                      f"{collection}/{'/'.join(path)}")
            node = variables.setdefault(collection, {})
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
            used.add(key)
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if unused:
        raise ConversionError(f"{len(unused)} tensors of the state dict have no place in "
                              f"{info['arch']}: {', '.join(unused[:5])}"
                              f"{' ...' if len(unused) > 5 else ''}")
    return variables, info
