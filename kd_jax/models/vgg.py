"""VGG with BatchNorm for 32x32 inputs, as in the CRD benchmark (RepDistiller ``vgg.py``).

Registered names ``vgg8`` (one conv per block) and ``vgg13`` (two per block): five blocks of
3x3 conv-BN-ReLU layers with 64/128/256/512/512 channels, a 2x2 max-pool after blocks 1-3
(none after block 4, as the reference does for 32x32 inputs), global average pooling and one
linear classifier (no fully connected hidden layers).

Unlike the reference, convolutions have no bias (each is followed by BatchNorm, which makes a
bias redundant): ``vgg8`` has 1,472 and ``vgg13`` 2,944 fewer parameters than RepDistiller's.

Initialisation as the reference: convolutions Kaiming-normal fan-out, BN scale 1 bias 0,
classifier weight ``N(0, 0.01^2)`` and bias 0.

Features (``return_features=True``), for an ``[B, H, W, 3]`` input:

* ``"stem"``: ``[B, H, W, 64]``, block 0's output after its ReLU.
* ``"stage1"`` ... ``"stage4"``: ``[B, H/2, W/2, 128]``, ``[B, H/4, W/4, 256]``,
  ``[B, H/8, W/8, 512]``, ``[B, H/8, W/8, 512]``, blocks 1-4 before their final ReLU.
* ``"pooled"``: ``[B, 512]`` float32.

Reference:
  Simonyan, Zisserman. Very Deep Convolutional Networks for Large-Scale Image Recognition.
  ICLR 2015.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from kd_jax.models import _layers

__all__ = ["VGG"]

class VGG(nn.Module):
    """VGG-BN with ``convs_per_block[i]`` 3x3 convolutions in block ``i`` (module docstring).

    Attributes:
      convs_per_block: five ints; ``(1,) * 5`` is vgg8, ``(2,) * 5`` vgg13.
      widths: channels of the five blocks.
      num_classes: classifier outputs.
      dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    """

    convs_per_block: Sequence[int]
    widths: Sequence[int] = (64, 128, 256, 512, 512)
    num_classes: int = 10
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, *, train: bool,
                 return_features: bool = False):
        """Logits ``[B, num_classes]`` float32, or ``(logits, features)`` if ``return_features``.

        ``train=True`` normalises with batch statistics and updates ``batch_stats`` (apply with
        ``mutable=["batch_stats"]``); ``train=False`` uses the running averages.
        """
        if len(self.convs_per_block) != 5 or len(self.widths) != 5:
            raise ValueError(f"convs_per_block and widths need 5 entries each, got "
                             f"{self.convs_per_block} and {self.widths}.")
        x = images_BxHxWxC
        features = {}
        for blk, (n, width) in enumerate(zip(self.convs_per_block, self.widths)):
            if 1 <= blk <= 3:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for i in range(n):
                if i > 0:
                    x = nn.relu(x)
                x = _layers.conv(width, 3, dtype=self.dtype, name=f"block{blk}_conv{i}")(x)
                x = _layers.batch_norm(train=train, dtype=self.dtype, name=f"block{blk}_bn{i}")(x)
            if blk > 0:
                features[f"stage{blk}"] = x
            x = nn.relu(x)
            if blk == 0:
                features["stem"] = x
        pooled = _layers.global_avg_pool(x)
        logits = _layers.classifier(pooled, self.num_classes,
                                    kernel_init=nn.initializers.normal(0.01),
                                    bias_init=nn.initializers.zeros)
        if not return_features:
            return logits
        features["pooled"] = pooled
        return logits, features
