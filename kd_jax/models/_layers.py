"""Layers shared by the model families: PyTorch-equivalent conv, BatchNorm, classifier, pooling.

Conventions every family follows, so that parameter counts, initialisation and BatchNorm
behaviour match the reference PyTorch models:

* Convolutions have no bias, explicit PyTorch padding (``k // 2`` on each side, also at
  stride 2) and Kaiming-normal fan-out initialisation, ``N(0, 2 / (k * k * out_channels))``.
* BatchNorm uses ``momentum=0.9`` (PyTorch's 0.1), ``epsilon=1e-5``, scale 1, bias 0, and
  float32 statistics even when computing in bfloat16. Unlike PyTorch, the running variance
  is updated with the biased batch variance (PyTorch multiplies it by ``n / (n - 1)``).
* The classifier runs in float32 on the float32 pooled embedding. Its initialisation is
  PyTorch's ``nn.Linear`` default, weight and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``,
  unless a family's reference re-initialises it (stated in that family's docstring).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

# Kaiming-normal, fan-out mode: N(0, 2 / (k * k * out_channels)), untruncated as in PyTorch.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(features: int, kernel_size: int, *, strides: int = 1, groups: int = 1,
         dtype: DTypeLike, name: str,
         kernel_init: nn.initializers.Initializer = conv_kernel_init) -> nn.Conv:
    """Bias-free ``kernel_size``x``kernel_size`` conv with PyTorch padding ``kernel_size // 2``."""
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                   padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                   use_bias=False, kernel_init=kernel_init, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def batch_norm(*, train: bool, dtype: DTypeLike, name: str) -> nn.BatchNorm:
    """BatchNorm matching ``torch.nn.BatchNorm2d`` defaults; batch statistics iff ``train``."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, param_dtype=jnp.float32, name=name)


def _torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def classifier(pooled_BxD: jax.Array, num_classes: int, *,
               kernel_init: nn.initializers.Initializer | None = None,
               bias_init: nn.initializers.Initializer | None = None) -> jax.Array:
    """Float32 linear layer named ``classifier``; ``[B, D] -> [B, num_classes]``.

    Defaults to PyTorch's ``nn.Linear`` init, weight and bias ``U(+-1/sqrt(D))``; families whose
    reference re-initialises the classifier pass their own. Call only inside ``@nn.compact``.
    """
    if kernel_init is None:
        kernel_init = torch_default_kernel_init
    if bias_init is None:
        bias_init = _torch_linear_bias_init(pooled_BxD.shape[-1])
    return nn.Dense(num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=bias_init, name="classifier")(pooled_BxD)


def global_avg_pool(x_BxHxWxC: jax.Array) -> jax.Array:
    """Spatial mean, accumulated and returned in float32; ``[B, H, W, C] -> [B, C]``."""
    return jnp.mean(x_BxHxWxC, axis=(1, 2), dtype=jnp.float32)
