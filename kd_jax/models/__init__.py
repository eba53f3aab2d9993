"""Image classifiers by name: ``create("resnet20", num_classes=10)``; 32x32 inputs except the
``imagenet_*`` ResNets (224x224, any multiple of 32 works).

Every model is a Flax Linen module on NHWC images, called as::

    variables = model.init(key, images_BxHxWxC, train=False)
    logits = model.apply(variables, images, train=False)                       # eval
    logits, new_vars = model.apply(variables, images, train=True, mutable=["batch_stats"])
    (logits, features), _ = model.apply(variables, images, train=True, return_features=True,
                                        mutable=["batch_stats"])

Logits are ``[B, num_classes]`` float32 for any ``dtype``. ``features`` holds ``"stem"``,
``"stage1"``, ``"stage2"``, ... (NHWC maps in the computation dtype, taken before each stage's
final ReLU where the family has one) and ``"pooled"`` (``[B, D]`` float32, the classifier's
input); each family module documents its shapes. ``dtype=jnp.bfloat16`` computes in bfloat16
with float32 parameters and BatchNorm statistics. ``train`` is a required keyword.

``create(name, num_classes, shortcut="A" | "B")`` picks a ResNet's shortcut type (see
:func:`create`).

Names (family module; parameters for 10 / 100 classes):

* ``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``,
  ``resnet110`` (``resnet``; e.g. resnet20 269,722 / 275,572, resnet56 853,018 / 858,868,
  resnet110 1,727,962 / 1,733,812), ``resnet8x4`` (1,210,410 / 1,233,540), ``resnet32x4``
  (7,410,730 / 7,433,860), ``resnet18`` (11,173,962 / 11,220,132), ``resnet34``
  (21,282,122 / 21,328,292).
* ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` (``wrn``; e.g. wrn_40_2 2,243,546 /
  2,255,156).
* ``vgg8``, ``vgg13`` (``vgg``), ``mobilenetv2`` (``mobilenetv2``), ``shufflenetv1``,
  ``shufflenetv2`` (``shufflenet``): the rest of the CRD benchmark's CIFAR-100 zoo.
* ``imagenet_resnet18``, ``imagenet_resnet34``, ``imagenet_resnet50`` (``imagenet_resnet``;
  torchvision's layout, 11,689,512 / 21,797,672 / 25,557,032 for 1000 classes).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from kd_jax.models import imagenet_resnet, mobilenetv2, resnet, shufflenet, vgg, wrn
from kd_jax.models.fold import folded_apply

__all__ = ["SHORTCUTS", "available", "create", "folded_apply", "num_params", "shortcut_of"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": partial(resnet.cifar_resnet, d) for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"resnet{d}x4": partial(resnet.cifar_resnet, d, stem_width=32, stage_widths=(64, 128, 256),
                               shortcut="projection") for d in (8, 32)},
    "resnet18": partial(resnet.ResNet, stage_sizes=(2, 2, 2, 2),
                        stage_widths=(64, 128, 256, 512), stem_width=64),
    "resnet34": partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3),
                        stage_widths=(64, 128, 256, 512), stem_width=64),
    **{f"wrn_{d}_{k}": partial(wrn.WideResNet, depth=d, widen_factor=k)
       for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    "vgg8": partial(vgg.VGG, convs_per_block=(1, 1, 1, 1, 1)),
    "vgg13": partial(vgg.VGG, convs_per_block=(2, 2, 2, 2, 2)),
    "mobilenetv2": partial(mobilenetv2.MobileNetV2, width_mult=0.5, expansion=6),
    "shufflenetv1": shufflenet.ShuffleNetV1,
    "shufflenetv2": shufflenet.ShuffleNetV2,
    "imagenet_resnet18": partial(imagenet_resnet.ImageNetResNet, stage_sizes=(2, 2, 2, 2)),
    "imagenet_resnet34": partial(imagenet_resnet.ImageNetResNet, stage_sizes=(3, 4, 6, 3)),
    "imagenet_resnet50": partial(imagenet_resnet.ImageNetResNet, stage_sizes=(3, 4, 6, 3),
                                 block="bottleneck"),
}


def available() -> list[str]:
    """Sorted names accepted by :func:`create`."""
    return sorted(_REGISTRY)


SHORTCUTS = {"A": "zero_pad", "B": "projection"}


def create(name: str, num_classes: int, *, dtype: DTypeLike = jnp.float32,
           shortcut: str | None = None) -> nn.Module:
    """The untrained module registered as ``name`` with ``num_classes`` outputs.

    ``shortcut`` picks the ResNet shortcut where a block changes shape: ``"A"`` (He et al.'s
    option A: subsample ``x[:, ::2, ::2]`` and zero-pad the channels, no parameters; the
    default of ``resnet8`` ... ``resnet110``, as in the paper and akamaster's checkpoints) or
    ``"B"`` (a 1x1 stride-2 convolution + BatchNorm; the default of ``resnet8x4``,
    ``resnet32x4``, ``resnet18``, ``resnet34``, and the layout of RepDistiller, mdistiller
    and chenyaofo's CIFAR-100 checkpoints). ``None`` keeps the name's default. Only the
    ResNet names take it.

    Raises:
      ValueError: ``name`` is not registered (the message lists :func:`available`),
        ``num_classes < 1``, or a ``shortcut`` other than ``"A"``/``"B"`` or for a non-ResNet.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model name {name!r}; available: {', '.join(available())}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    kwargs = {}
    if shortcut is not None:
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be 'A' (zero-padded identity) or 'B' (1x1 conv + "
                             f"BN projection), got {shortcut!r}.")
        if not name.startswith("resnet"):
            raise ValueError(f"shortcut applies to the ResNet names only, not {name!r}.")
        kwargs["shortcut"] = SHORTCUTS[shortcut]
    return _REGISTRY[name](num_classes=num_classes, dtype=dtype, **kwargs)


def shortcut_of(model: nn.Module) -> str | None:
    """``"A"`` or ``"B"`` for a ResNet made by :func:`create`, else ``None``."""
    value = getattr(model, "shortcut", None)
    return {v: k for k, v in SHORTCUTS.items()}.get(value)


def num_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays (or ``jax.ShapeDtypeStruct`` from eval_shape).

    Pass ``variables["params"]`` to count what ``sum(p.numel() for p in model.parameters())``
    counts in PyTorch (BatchNorm scale and bias included, running statistics excluded).
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
