"""ImageNet ResNet-18/34/50 in torchvision's layout (v1.5: the stride on the 3x3 convolution).

``imagenet_resnet18`` / ``imagenet_resnet34`` / ``imagenet_resnet50`` are torchvision's
``resnet18`` / ``resnet34`` / ``resnet50``, layer for layer, so that a converted torchvision
state dict (:mod:`kd_jax.convert`) gives its logits: a 7x7 stride-2 stem convolution of 64
channels (padding 3), BatchNorm, ReLU, a 3x3 stride-2 max-pool (padding 1, padded with
``-inf`` as PyTorch does); four stages of 64/128/256/512 channels with [2, 2, 2, 2] /
[3, 4, 6, 3] / [3, 4, 6, 3] blocks; global average pooling; a linear classifier. Parameters
for 1000 classes: 11,689,512 / 21,797,672 / 25,557,032, torchvision's counts.

* Basic block (18, 34): conv3x3(stride)-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.
* Bottleneck (50): conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN, plus shortcut,
  then ReLU. The stride sits on the 3x3 convolution (torchvision's "ResNet v1.5"), not on
  the first 1x1 as in He et al. 2016.
* Shortcut: identity, or a 1x1 convolution (with the block's stride) + BatchNorm wherever
  the block changes the shape (torchvision's ``downsample``).

Stages after the first halve the resolution in their first block. Convolutions are bias-free
with explicit PyTorch padding, Kaiming-normal fan-out initialised; BatchNorm and the
classifier as in ``_layers`` (torchvision does not re-initialise ``fc`` either, and its
``zero_init_residual`` defaults to off).

Features (``return_features=True``), for an ``[B, H, W, 3]`` input with ``H, W`` divisible by
32 (e.g. 224: stem 112, stages 56/28/14/7):

* ``"stem"``: ``[B, H / 2, W / 2, 64]``, after the stem's conv-BN-ReLU, before the max-pool
  (mdistiller's ImageNet ResNets take it there too).
* ``"stage{s}"`` (``s = 1..4``): ``[B, H / 2**(s+1), W / 2**(s+1), C_s]`` with ``C_s`` =
  64/128/256/512 (basic) or 256/512/1024/2048 (bottleneck), the last block's residual sum
  *before* its final ReLU, as the CIFAR ResNets' ``stageN``.
* ``"pooled"``: ``[B, 512]`` (basic) or ``[B, 2048]`` (bottleneck) float32, the globally
  averaged embedding fed to the classifier.

References:
  He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
  torchvision ``models/resnet.py`` (v0.28), whose ``ResNet`` this module mirrors.
"""

from __future__ import annotations

from typing import Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from kd_jax.models import _layers

__all__ = ["ImageNetResNet", "STAGE_WIDTHS"]

Block = Literal["basic", "bottleneck"]
STAGE_WIDTHS = (64, 128, 256, 512)  # bottleneck widths; outputs are 4x these
_EXPANSION = {"basic": 1, "bottleneck": 4}


class _Block(nn.Module):
    """A torchvision ``BasicBlock`` or ``Bottleneck``; returns the sum before the final ReLU."""

    width: int
    strides: int
    block: Block
    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def conv_bn(y, features, kernel, strides, i):
            y = _layers.conv(features, kernel, strides=strides, dtype=self.dtype,
                             name=f"conv{i}")(y)
            return _layers.batch_norm(train=train, dtype=self.dtype, name=f"bn{i}")(y)

        out_features = self.width * _EXPANSION[self.block]
        if self.block == "basic":
            y = nn.relu(conv_bn(x, self.width, 3, self.strides, 1))
            y = conv_bn(y, self.width, 3, 1, 2)
        else:
            y = nn.relu(conv_bn(x, self.width, 1, 1, 1))
            y = nn.relu(conv_bn(y, self.width, 3, self.strides, 2))
            y = conv_bn(y, out_features, 1, 1, 3)
        if self.strides != 1 or x.shape[-1] != out_features:
            x = _layers.conv(out_features, 1, strides=self.strides, dtype=self.dtype,
                             name="shortcut_conv")(x)
            x = _layers.batch_norm(train=train, dtype=self.dtype, name="shortcut_bn")(x)
        return y + x


class ImageNetResNet(nn.Module):
    """torchvision's ResNet (see the module docstring).

    Attributes:
      stage_sizes: blocks per stage, ``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for 34/50.
      block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50).
      num_classes: classifier outputs.
      dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    """

    stage_sizes: Sequence[int]
    block: Block = "basic"
    num_classes: int = 1000
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, *, train: bool,
                 return_features: bool = False):
        """Logits ``[B, num_classes]`` float32, or ``(logits, features)`` if ``return_features``.

        ``train=True`` normalises with batch statistics and updates ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``); ``train=False`` uses the running averages.
        """
        if self.block not in _EXPANSION:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}.")
        if len(self.stage_sizes) != len(STAGE_WIDTHS) or min(self.stage_sizes) < 1:
            raise ValueError(f"stage_sizes must be 4 positive block counts, got "
                             f"{self.stage_sizes}.")
        x = _layers.conv(64, 7, strides=2, dtype=self.dtype, name="stem_conv")(images_BxHxWxC)
        x = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="stem_bn")(x))
        features = {"stem": x}
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, (size, width) in enumerate(zip(self.stage_sizes, STAGE_WIDTHS)):
            for b in range(size):
                strides = 2 if s > 0 and b == 0 else 1
                preact = _Block(width, strides, self.block, self.dtype,
                                name=f"stage{s + 1}_block{b}")(x, train)
                x = nn.relu(preact)
            features[f"stage{s + 1}"] = preact
        pooled = _layers.global_avg_pool(x)
        logits = _layers.classifier(pooled, self.num_classes)
        if not return_features:
            return logits
        features["pooled"] = pooled
        return logits, features
