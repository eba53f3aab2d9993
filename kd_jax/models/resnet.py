"""Post-activation ResNets with basic blocks for 32x32 inputs: CIFAR ResNets and ResNet-18/34.

One module, :class:`ResNet`, covers the registered names:

* ``resnet8`` ... ``resnet110``: He et al. 2016, Sec. 4.2 -- a 3x3 stem of 16 channels, three
  stages of 16/32/64 channels with ``n = (depth - 2) / 6`` blocks each, option-A shortcuts
  (identity; at a stage change, subsample ``x[:, ::2, ::2]`` and zero-pad the channels).
* ``resnet8x4``, ``resnet32x4``: the 4x-wide pair of the CRD benchmark (Tian et al. 2020,
  RepDistiller ``resnet.py``) -- stem 32, stages 64/128/256, 1x1 conv + BN projection
  shortcuts wherever the shape changes.
* ``resnet18``, ``resnet34``: He et al. 2016 adapted to 32x32 inputs (3x3 stride-1 stem of 64
  channels, no max-pool; stages 64/128/256/512 with [2, 2, 2, 2] / [3, 4, 6, 3] blocks;
  projection shortcuts), as kuangliu/pytorch-cifar and RepDistiller ``resnetv2.py``.

Every stage after the first halves the resolution with a stride-2 first block. Block: conv3x3
-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU. Initialisation and BatchNorm: see ``_layers``.

Features (``return_features=True``), for an ``[B, H, W, 3]`` input and ``S`` stages:

* ``"stem"``: ``[B, H, W, stem_width]``, after the stem's conv-BN-ReLU.
* ``"stage{s}"`` (``s = 1..S``): ``[B, H / 2**(s-1), W / 2**(s-1), stage_widths[s-1]]``, the
  last block's residual sum *before* its final ReLU (RepDistiller's ``preact`` features).
* ``"pooled"``: ``[B, stage_widths[-1]]`` float32, the globally averaged embedding fed to the
  classifier.

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
  Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020.
"""

from __future__ import annotations

from typing import Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from kd_jax.models import _layers

__all__ = ["ResNet", "cifar_resnet"]

Shortcut = Literal["zero_pad", "projection"]


class _BasicBlock(nn.Module):
    """Post-activation basic block; returns the residual sum before the final ReLU."""

    features: int
    strides: int
    shortcut: Shortcut
    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = _layers.conv(self.features, 3, strides=self.strides, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="bn1")(y))
        y = _layers.conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
        y = _layers.batch_norm(train=train, dtype=self.dtype, name="bn2")(y)
        in_features = x.shape[-1]
        if self.strides != 1 or in_features != self.features:
            if self.shortcut == "projection":
                x = _layers.conv(self.features, 1, strides=self.strides, dtype=self.dtype,
                                 name="shortcut_conv")(x)
                x = _layers.batch_norm(train=train, dtype=self.dtype, name="shortcut_bn")(x)
            else:
                assert in_features <= self.features, (in_features, self.features)
                x = x[:, ::self.strides, ::self.strides, :]
                extra = self.features - in_features
                # Symmetric padding, as the reference CIFAR implementations do.
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return y + x


class ResNet(nn.Module):
    """Post-activation basic-block ResNet for 32x32 inputs (see the module docstring).

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 3, 3)`` for resnet20.
      stage_widths: output channels per stage, e.g. ``(16, 32, 64)``.
      stem_width: channels of the 3x3 stem convolution.
      shortcut: ``"zero_pad"`` (He et al.'s option A, parameter-free) or ``"projection"``
        (1x1 conv + BN, option B), used where a block changes shape.
      num_classes: classifier outputs.
      dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    """

    stage_sizes: Sequence[int]
    stage_widths: Sequence[int]
    stem_width: int
    shortcut: Shortcut = "projection"
    num_classes: int = 10
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, *, train: bool,
                 return_features: bool = False):
        """Logits ``[B, num_classes]`` float32, or ``(logits, features)`` if ``return_features``.

        ``train=True`` normalises with batch statistics and updates ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``); ``train=False`` uses the running averages.
        """
        if self.shortcut not in ("zero_pad", "projection"):
            raise ValueError(f"shortcut must be 'zero_pad' or 'projection', got {self.shortcut!r}.")
        if len(self.stage_sizes) != len(self.stage_widths):
            raise ValueError(f"stage_sizes {self.stage_sizes} and stage_widths {self.stage_widths} "
                             "must have the same length.")
        if min(self.stage_sizes) < 1:
            raise ValueError(f"stage_sizes must be positive, got {self.stage_sizes}.")
        x = _layers.conv(self.stem_width, 3, dtype=self.dtype, name="stem_conv")(images_BxHxWxC)
        x = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="stem_bn")(x))
        features = {"stem": x}
        for s, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for b in range(size):
                strides = 2 if s > 0 and b == 0 else 1
                preact = _BasicBlock(width, strides, self.shortcut, self.dtype,
                                     name=f"stage{s + 1}_block{b}")(x, train)
                x = nn.relu(preact)
            features[f"stage{s + 1}"] = preact
        pooled = _layers.global_avg_pool(x)
        logits = _layers.classifier(pooled, self.num_classes)
        if not return_features:
            return logits
        features["pooled"] = pooled
        return logits, features


def cifar_resnet(depth: int, *, stem_width: int = 16, stage_widths: Sequence[int] = (16, 32, 64),
                 shortcut: Shortcut = "zero_pad", num_classes: int = 10,
                 dtype: DTypeLike = jnp.float32) -> ResNet:
    """Three-stage CIFAR ResNet of ``depth = 6n + 2`` layers (He et al. 2016, Sec. 4.2)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}.")
    n = (depth - 2) // 6
    return ResNet(stage_sizes=(n,) * len(stage_widths), stage_widths=tuple(stage_widths),
                  stem_width=stem_width, shortcut=shortcut, num_classes=num_classes, dtype=dtype)
