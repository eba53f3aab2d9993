"""MobileNetV2 for 32x32 inputs, as in the CRD benchmark (RepDistiller ``mobilenetv2.py``).

Registered name ``mobilenetv2`` is RepDistiller's ``mobile_half``: width multiplier 0.5,
expansion 6. A stride-2 3x3 conv-BN-ReLU stem of 16 channels; seven groups of inverted
residual blocks (expansion t, channels c, blocks n, first stride s) ``(1, 8, 1, 1)``,
``(6, 12, 2, 1)``, ``(6, 16, 3, 2)``, ``(6, 32, 4, 2)``, ``(6, 48, 3, 1)``, ``(6, 80, 3, 2)``,
``(6, 160, 1, 1)``; a 1x1 conv-BN-ReLU to 1280 channels; global average pooling; a linear
classifier. As the reference, every block has its 1x1 expansion conv, also when t = 1.

Block: 1x1 conv-BN-ReLU to ``t * c_in``, 3x3 depthwise conv (stride s)-BN-ReLU, 1x1 conv-BN to
``c`` (linear bottleneck), plus the input when ``s == 1`` and ``c_in == c``.

Initialisation as the reference: convolutions Kaiming-normal fan-out, BN scale 1 bias 0,
classifier weight ``N(0, 0.01^2)`` and bias 0.

Features (``return_features=True``), for an ``[B, H, W, 3]`` input, at the points RepDistiller
returns (block outputs end in BN, so they are pre-activation):

* ``"stem"``: ``[B, H/2, W/2, 16]``, after the stem's ReLU.
* ``"stage1"``: ``[B, H/2, W/2, 12]``, after group 2.
* ``"stage2"``: ``[B, H/4, W/4, 16]``, after group 3.
* ``"stage3"``: ``[B, H/8, W/8, 48]``, after group 5.
* ``"stage4"``: ``[B, H/16, W/16, 160]``, after group 7.
* ``"pooled"``: ``[B, 1280]`` float32.

Reference:
  Sandler, Howard, Zhu, Zhmoginov, Chen. MobileNetV2: Inverted Residuals and Linear
  Bottlenecks. CVPR 2018.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from kd_jax.models import _layers

__all__ = ["MobileNetV2"]

# (expansion t or None for the model's, channels c at width 1, first stride s) of each group:
# the paper's Table 2 except group 1's stride, 1 instead of 2 (the reference's 32x32 layout).
_SETTINGS = ((1, 16, 1), (None, 24, 1), (None, 32, 2), (None, 64, 2), (None, 96, 1),
             (None, 160, 2), (None, 320, 1))
# Feature name after each group (0-based group index), as RepDistiller's f1..f4.
_FEATURE_AFTER_GROUP = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}


class _InvertedResidual(nn.Module):
    features: int
    strides: int
    expansion: int
    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        hidden = x.shape[-1] * self.expansion
        y = _layers.conv(hidden, 1, dtype=self.dtype, name="expand_conv")(x)
        y = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="expand_bn")(y))
        y = _layers.conv(hidden, 3, strides=self.strides, groups=hidden, dtype=self.dtype,
                         name="depthwise_conv")(y)
        y = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="depthwise_bn")(y))
        y = _layers.conv(self.features, 1, dtype=self.dtype, name="project_conv")(y)
        y = _layers.batch_norm(train=train, dtype=self.dtype, name="project_bn")(y)
        if self.strides == 1 and x.shape[-1] == self.features:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 with ``width_mult`` and ``expansion`` (see the module docstring).

    Attributes:
      width_mult: channel multiplier of the stem and the blocks (0.5 for ``mobilenetv2``).
      expansion: expansion ratio t of all groups but the first.
      group_sizes: blocks in each of the seven groups (the paper's n).
      num_classes: classifier outputs.
      dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    """

    width_mult: float = 0.5
    expansion: int = 6
    group_sizes: Sequence[int] = (1, 2, 3, 4, 3, 3, 1)
    num_classes: int = 10
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, *, train: bool,
                 return_features: bool = False):
        """Logits ``[B, num_classes]`` float32, or ``(logits, features)`` if ``return_features``.

        ``train=True`` normalises with batch statistics and updates ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``); ``train=False`` uses the running averages.
        """
        if len(self.group_sizes) != len(_SETTINGS) or min(self.group_sizes) < 1:
            raise ValueError(f"group_sizes needs {len(_SETTINGS)} positive ints, "
                             f"got {self.group_sizes}.")
        x = _layers.conv(int(32 * self.width_mult), 3, strides=2, dtype=self.dtype,
                         name="stem_conv")(images_BxHxWxC)
        x = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="stem_bn")(x))
        features = {"stem": x}
        for g, ((t, c, s), n) in enumerate(zip(_SETTINGS, self.group_sizes)):
            for b in range(n):
                x = _InvertedResidual(int(c * self.width_mult), s if b == 0 else 1,
                                      t or self.expansion, self.dtype,
                                      name=f"group{g}_block{b}")(x, train)
            if g in _FEATURE_AFTER_GROUP:
                features[_FEATURE_AFTER_GROUP[g]] = x
        last = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        x = _layers.conv(last, 1, dtype=self.dtype, name="head_conv")(x)
        x = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="head_bn")(x))
        pooled = _layers.global_avg_pool(x)
        logits = _layers.classifier(pooled, self.num_classes,
                                    kernel_init=nn.initializers.normal(0.01),
                                    bias_init=nn.initializers.zeros)
        if not return_features:
            return logits
        features["pooled"] = pooled
        return logits, features
