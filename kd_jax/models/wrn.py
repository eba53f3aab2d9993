"""Wide residual networks WRN-d-k for 32x32 inputs (Zagoruyko & Komodakis 2016).

Registered names ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` (depth ``d``, widening
``k``), as RepDistiller ``wrn.py`` without dropout: a 3x3 stem conv of 16 channels (no BN),
three stages of ``n = (d - 4) / 6`` pre-activation blocks with 16k/32k/64k channels (stride 2
at the start of stages 2 and 3), then BN-ReLU, global average pool and a linear classifier.

Block: ``a = ReLU(BN(x))``; ``y = conv3x3(ReLU(BN(conv3x3(a))))``; output ``y + x``, or
``y + conv1x1(a)`` where the channels or resolution change.

Initialisation: convolutions Kaiming-normal fan-out, BN scale 1 bias 0; the classifier weight
``U(+-1/sqrt(64k))`` (PyTorch default) and bias 0, as the reference.

Features (``return_features=True``), for an ``[B, H, W, 3]`` input:

* ``"stem"``: ``[B, H, W, 16]``, the stem conv output.
* ``"stage1"``, ``"stage2"``, ``"stage3"``: ``[B, H, W, 16k]``, ``[B, H/2, W/2, 32k]``,
  ``[B, H/4, W/4, 64k]``, each stage's output (a pre-activation block ends without ReLU).
* ``"pooled"``: ``[B, 64k]`` float32, after the final BN-ReLU and global average pooling.

Reference:
  Zagoruyko, Komodakis. Wide Residual Networks. BMVC 2016.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from kd_jax.models import _layers

__all__ = ["WideResNet"]


class _PreActBlock(nn.Module):
    """Pre-activation basic block with a 1x1 projection shortcut where the shape changes."""

    features: int
    strides: int
    dtype: DTypeLike

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        a = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="bn1")(x))
        y = _layers.conv(self.features, 3, strides=self.strides, dtype=self.dtype, name="conv1")(a)
        y = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="bn2")(y))
        y = _layers.conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = _layers.conv(self.features, 1, strides=self.strides, dtype=self.dtype,
                             name="shortcut_conv")(a)
        return y + x


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` (see the module docstring).

    Attributes:
      depth: ``6n + 4`` total layers, e.g. 16, 28 or 40.
      widen_factor: channel multiplier ``k`` of the three stages.
      num_classes: classifier outputs.
      dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    """

    depth: int
    widen_factor: int
    num_classes: int = 10
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, *, train: bool,
                 return_features: bool = False):
        """Logits ``[B, num_classes]`` float32, or ``(logits, features)`` if ``return_features``.

        ``train=True`` normalises with batch statistics and updates ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``); ``train=False`` uses the running averages.
        """
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 28, 40, ...), "
                             f"got {self.depth}.")
        if self.widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {self.widen_factor}.")
        n = (self.depth - 4) // 6
        x = _layers.conv(16, 3, dtype=self.dtype, name="stem_conv")(images_BxHxWxC)
        features = {"stem": x}
        for s, width in enumerate((16, 32, 64)):
            for b in range(n):
                strides = 2 if s > 0 and b == 0 else 1
                x = _PreActBlock(width * self.widen_factor, strides, self.dtype,
                                 name=f"stage{s + 1}_block{b}")(x, train)
            features[f"stage{s + 1}"] = x
        x = nn.relu(_layers.batch_norm(train=train, dtype=self.dtype, name="final_bn")(x))
        pooled = _layers.global_avg_pool(x)
        logits = _layers.classifier(pooled, self.num_classes, bias_init=nn.initializers.zeros)
        if not return_features:
            return logits
        features["pooled"] = pooled
        return logits, features
