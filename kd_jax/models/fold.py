"""Inference with BatchNorm folded into the preceding convolution, for frozen teachers.

In inference mode BatchNorm is a per-channel affine map, ``y = x·γ/√(σ²+ε) + (β − μ·γ/√(σ²+ε))``.
When ``x`` is a convolution's output, the map folds into that convolution's kernel and bias,
which saves one pass over every activation map. :func:`folded_apply` does this for any Flax
model by intercepting its ``nn.Conv`` and ``nn.BatchNorm`` calls while tracing: a BatchNorm
(running averages) whose input is exactly a convolution's output is replaced by the folded
convolution, and XLA drops the unused original. Other BatchNorms are left as they are.

The result equals ``model.apply(variables, x, train=False)`` up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["folded_apply"]


def folded_apply(model: nn.Module) -> Callable[..., Any]:
    """``apply(variables, x, train=False, **kwargs)`` of ``model`` with BatchNorm folded.

    Only inference is supported (``train=True`` raises ``ValueError``); the variables are the
    model's own (``params`` and ``batch_stats``), nothing is precomputed, so the function can
    be jitted with the variables as arguments.
    """

    def apply(variables, x, train: bool = False, **kwargs):
        if train:
            raise ValueError("folded_apply is for inference only; call it with train=False.")
        convs: dict[int, tuple[nn.Conv, jax.Array, jax.Array]] = {}

        def interceptor(next_fun, args, kw, context):
            module = context.module
            if context.method_name != "__call__":
                return next_fun(*args, **kw)
            if isinstance(module, nn.Conv):
                y = next_fun(*args, **kw)
                convs[id(y)] = (module, args[0], y)
                return y
            if isinstance(module, nn.BatchNorm) and args:
                record = convs.get(id(args[0]))
                if (record is not None and record[2] is args[0]
                        and _uses_running_average(module, kw) and module.axis in (-1,)):
                    return _fold(module, *record[:2])
            return next_fun(*args, **kw)

        with nn.intercept_methods(interceptor):
            return model.apply(variables, x, train=False, **kwargs)

    return apply


def _uses_running_average(bn: nn.BatchNorm, kwargs) -> bool:
    flag = kwargs.get("use_running_average", bn.use_running_average)
    return bool(flag)


def _fold(bn: nn.BatchNorm, conv: nn.Conv, conv_input: jax.Array) -> jax.Array:
    mean = bn.get_variable("batch_stats", "mean")
    var = bn.get_variable("batch_stats", "var")
    channels = mean.shape[-1]
    scale = bn.get_variable("params", "scale") if bn.use_scale else jnp.ones(channels)
    offset = bn.get_variable("params", "bias") if bn.use_bias else jnp.zeros(channels)
    factor = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + bn.epsilon)
    kernel = conv.get_variable("params", "kernel").astype(jnp.float32) * factor
    bias = offset - mean * factor
    if conv.use_bias:
        bias = bias + conv.get_variable("params", "bias") * factor
    folded = conv.clone(parent=None, name=None, use_bias=True)
    y = folded.apply({"params": {"kernel": kernel, "bias": bias}}, conv_input)
    return y.astype(bn.dtype or y.dtype)
