"""ShuffleNet V1 and V2 for 32x32 inputs, as in the CRD benchmark (RepDistiller
``ShuffleNetv1.py`` / ``ShuffleNetv2.py``).

Both start with a 1x1 conv-BN-ReLU stem of 24 channels at full resolution, have three stages
that each halve the resolution, and end with global average pooling and a linear classifier.

* ``shufflenetv1`` (groups g = 3): stages of 4/8/4 bottleneck units with 240/480/960 output
  channels. Unit: grouped 1x1 conv-BN-ReLU to a quarter of the unit's output channels (not
  grouped in the very first unit, whose input has 24 channels), channel shuffle, 3x3
  depthwise conv-BN-ReLU, grouped 1x1 conv-BN; then ``ReLU(y + x)``, or at a stride-2 unit
  ``ReLU(concat(y, avgpool3x3_s2(x)))``.
* ``shufflenetv2`` (1x): stages of one down-sampling unit plus 3/7/3 basic units with
  116/232/464 channels, then a 1x1 conv-BN-ReLU to 1024 channels. Basic unit: split the
  channels in halves ``(x1, x2)``; ``y = ReLU(BN(conv1x1(BN(dw3x3(ReLU(BN(conv1x1(x2))))))))``;
  output ``shuffle(concat(x1, y))``. Down-sampling unit: ``shuffle(concat(left, right))`` of a
  dw3x3(s2)-BN-1x1-BN-ReLU branch and a 1x1-BN-ReLU-dw3x3(s2)-BN-1x1-BN-ReLU branch.

Initialisation as the reference, which keeps PyTorch's defaults: convolution and classifier
weights ``U(+-1/sqrt(fan_in))`` (``fan_in`` per group), classifier bias ``U(+-1/sqrt(fan_in))``,
BN scale 1 bias 0.

Features (``return_features=True``), for an ``[B, H, W, 3]`` input:

* ``"stem"``: ``[B, H, W, 24]``, after the stem's ReLU.
* ``"stage{s}"``, s = 1, 2, 3: ``[B, H / 2**s, W / 2**s, C_s]`` with ``C = (240, 480, 960)``
  (V1) or ``(116, 232, 464)`` (V2): the stage's last unit before its final ReLU, so that
  ``ReLU(stage{s})`` is the stage output. (For V2 this is ``shuffle(concat(x1, BN(...)))``;
  RepDistiller returns the same values unshuffled.)
* ``"pooled"``: ``[B, 960]`` (V1) or ``[B, 1024]`` (V2) float32.

References:
  Zhang, Zhou, Lin, Sun. ShuffleNet: An Extremely Efficient Convolutional Neural Network for
  Mobile Devices. CVPR 2018.
  Ma, Zhang, Zheng, Sun. ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
  Design. ECCV 2018.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from kd_jax.models import _layers

__all__ = ["ShuffleNetV1", "ShuffleNetV2"]

_conv = partial(_layers.conv, kernel_init=_layers.torch_default_kernel_init)


def _channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """Channel ``j * (C/g) + i`` moves to ``i * g + j``; ``[B, H, W, C] -> [B, H, W, C]``."""
    *lead, c = x.shape
    return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


def _check_stages(stage_sizes: Sequence[int], stage_widths: Sequence[int]) -> None:
    if len(stage_sizes) != len(stage_widths) or min(stage_sizes) < 1:
        raise ValueError(f"stage_sizes {stage_sizes} must be positive and as many as "
                         f"stage_widths {stage_widths}.")


def _stem(images: jax.Array, train: bool, dtype: DTypeLike) -> jax.Array:
    x = _conv(24, 1, dtype=dtype, name="stem_conv")(images)
    return nn.relu(_layers.batch_norm(train=train, dtype=dtype, name="stem_bn")(x))


class _V1Unit(nn.Module):
    """ShuffleNet V1 bottleneck unit; returns the output before its final ReLU."""

    features: int  # channels of the residual branch (at stride 2, output minus input)
    strides: int
    groups: int
    pointwise_groups: int  # groups of the first 1x1 conv
    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        mid = self.features // 4
        y = _conv(mid, 1, groups=self.pointwise_groups, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="bn1")(y))
        if self.pointwise_groups > 1:
            y = _channel_shuffle(y, self.pointwise_groups)
        y = _conv(mid, 3, strides=self.strides, groups=mid, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="bn2")(y))
        y = _conv(self.features, 1, groups=self.groups, dtype=self.dtype, name="conv3")(y)
        y = _layers.batch_norm(train=train, dtype=self.dtype, name="bn3")(y)
        if self.strides == 1:
            return y + x
        # PyTorch's AvgPool2d(3, 2, padding=1) divides by 9 also at the border.
        shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                               count_include_pad=True)
        return jnp.concatenate([y, shortcut], axis=-1)


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1 (see the module docstring); defaults are ``shufflenetv1``.

    Attributes:
      stage_widths: output channels of the three stages.
      stage_sizes: units per stage.
      groups: groups of the 1x1 convolutions.
      num_classes: classifier outputs.
      dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    """

    stage_widths: Sequence[int] = (240, 480, 960)
    stage_sizes: Sequence[int] = (4, 8, 4)
    groups: int = 3
    num_classes: int = 10
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, *, train: bool,
                 return_features: bool = False):
        """Logits ``[B, num_classes]`` float32, or ``(logits, features)`` if ``return_features``.

        ``train=True`` normalises with batch statistics and updates ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``); ``train=False`` uses the running averages.
        """
        _check_stages(self.stage_sizes, self.stage_widths)
        x = _stem(images_BxHxWxC, train, self.dtype)
        features = {"stem": x}
        for s, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for b in range(size):
                first = b == 0
                preact = _V1Unit(width - x.shape[-1] if first else width, 2 if first else 1,
                                 self.groups, 1 if s == 0 and first else self.groups,
                                 self.dtype, name=f"stage{s + 1}_unit{b}")(x, train)
                x = nn.relu(preact)
            features[f"stage{s + 1}"] = preact
        pooled = _layers.global_avg_pool(x)
        logits = _layers.classifier(pooled, self.num_classes)
        if not return_features:
            return logits
        features["pooled"] = pooled
        return logits, features


class _V2DownUnit(nn.Module):
    features: int
    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        mid = self.features // 2
        bn = partial(_layers.batch_norm, train=train, dtype=self.dtype)
        c = x.shape[-1]
        left = bn(name="left_bn1")(_conv(c, 3, strides=2, groups=c, dtype=self.dtype,
                                         name="left_conv1")(x))
        left = nn.relu(bn(name="left_bn2")(_conv(mid, 1, dtype=self.dtype,
                                                 name="left_conv2")(left)))
        right = nn.relu(bn(name="right_bn1")(_conv(mid, 1, dtype=self.dtype,
                                                   name="right_conv1")(x)))
        right = bn(name="right_bn2")(_conv(mid, 3, strides=2, groups=mid, dtype=self.dtype,
                                           name="right_conv2")(right))
        right = nn.relu(bn(name="right_bn3")(_conv(mid, 1, dtype=self.dtype,
                                                   name="right_conv3")(right)))
        return _channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class _V2Unit(nn.Module):
    """ShuffleNet V2 basic unit; returns ``(output, output before the final ReLU or None)``."""

    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, return_preact: bool):
        bn = partial(_layers.batch_norm, train=train, dtype=self.dtype)
        c = x.shape[-1] // 2
        x1, x2 = x[..., :c], x[..., c:]
        y = nn.relu(bn(name="bn1")(_conv(c, 1, dtype=self.dtype, name="conv1")(x2)))
        y = bn(name="bn2")(_conv(c, 3, groups=c, dtype=self.dtype, name="conv2")(y))
        y = bn(name="bn3")(_conv(c, 1, dtype=self.dtype, name="conv3")(y))
        out = _channel_shuffle(jnp.concatenate([x1, nn.relu(y)], axis=-1), 2)
        # x1 >= 0 (it comes out of a ReLU), so ReLU(preact) == out.
        preact = (_channel_shuffle(jnp.concatenate([x1, y], axis=-1), 2)
                  if return_preact else None)
        return out, preact


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 (see the module docstring); defaults are ``shufflenetv2`` (1x).

    Attributes:
      stage_widths: output channels of the three stages.
      stage_sizes: basic units per stage (after each stage's down-sampling unit).
      head_width: channels of the final 1x1 conv.
      num_classes: classifier outputs.
      dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    """

    stage_widths: Sequence[int] = (116, 232, 464)
    stage_sizes: Sequence[int] = (3, 7, 3)
    head_width: int = 1024
    num_classes: int = 10
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, *, train: bool,
                 return_features: bool = False):
        """Logits ``[B, num_classes]`` float32, or ``(logits, features)`` if ``return_features``.

        ``train=True`` normalises with batch statistics and updates ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``); ``train=False`` uses the running averages.
        """
        _check_stages(self.stage_sizes, self.stage_widths)
        x = _stem(images_BxHxWxC, train, self.dtype)
        features = {"stem": x}
        for s, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            x = _V2DownUnit(width, self.dtype, name=f"stage{s + 1}_down")(x, train)
            for b in range(size):
                x, preact = _V2Unit(self.dtype, name=f"stage{s + 1}_unit{b}")(
                    x, train, return_features and b == size - 1)
            features[f"stage{s + 1}"] = preact
        x = _conv(self.head_width, 1, dtype=self.dtype, name="head_conv")(x)
        x = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="head_bn")(x))
        pooled = _layers.global_avg_pool(x)
        logits = _layers.classifier(pooled, self.num_classes)
        if not return_features:
            return logits
        features["pooled"] = pooled
        return logits, features
