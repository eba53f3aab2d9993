"""A learned distillation temperature (CTKD): gradient reversal, its curriculum, the loss.

The temperature is a trainable scalar that *ascends* the distillation loss while the student
descends it: its gradient passes through :func:`gradient_reversal`, scaled by
:math:`-\\lambda` with :math:`\\lambda` rising over the first epochs (:func:`ctkd_lambda`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kd_jax.losses._checks import (
    _as_float,
    _check_finite_weight,
    _check_positive,
    _nonfinite_propagates,
    _validated,
)
from kd_jax.losses._logit import soft_target_kl


@jax.custom_vjp
def _reverse(x, scale):
    return x


def _reverse_fwd(x, scale):
    return x, scale


def _reverse_bwd(scale, g):
    return (-scale * g).astype(g.dtype), jnp.zeros_like(scale)


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def gradient_reversal(x: ArrayLike, *, scale: float | ArrayLike = 1.0) -> jax.Array:
    r"""The identity forward; the incoming gradient times :math:`-\lambda` backward.

    .. math::
      R_\lambda(x) = x, \qquad \frac{\partial R_\lambda(x)}{\partial x} = -\lambda I

    so whatever is upstream of ``x`` ascends the loss that is descended downstream (for
    :math:`\lambda > 0`). ``scale`` may be traced (e.g. a schedule of the step); no gradient
    flows into it. CTKD applies it to its temperature parameter with :math:`\lambda` from
    :func:`ctkd_lambda`; the authors' ``GradientReversal`` multiplies by their
    ``decay_value``, which is :math:`-\lambda`.

    Args:
      x: a floating-point array, any shape; returned as it is (same dtype).
      scale: :math:`\lambda`, a scalar.

    Returns:
      ``x``.

    References:
      Ganin & Lempitsky, `Unsupervised Domain Adaptation by Backpropagation
      <https://arxiv.org/abs/1409.7495>`_, ICML 2015
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"`x` must be a floating-point array, got dtype {x.dtype}; cast it "
                         "first, e.g. `x.astype(jnp.float32)`.")
    _check_finite_weight("scale", scale)
    return _reverse(x, jnp.asarray(scale, x.dtype))


def ctkd_lambda(
    epoch: float | ArrayLike,
    *,
    lambda_min: float = 0.0,
    lambda_max: float = 1.0,
    num_epochs: float = 10.0,
) -> jax.Array:
    r"""CTKD's curriculum: the gradient-reversal strength :math:`\lambda` at ``epoch``.

    .. math::
      \lambda(e) = \lambda_{min} + \frac{1}{2} (\lambda_{max} - \lambda_{min})
                   \left(1 + \cos\left(\left(1 + \frac{\min(\max(e, 0), E)}{E}\right)
                   \pi\right)\right)

    a cosine rise from :math:`\lambda_{min}` at :math:`e = 0` to :math:`\lambda_{max}` at
    :math:`e \ge E`. The authors' CIFAR-100 script (``--cosine_decay 1 --decay_max 0
    --decay_min -1 --decay_loops 10``) is :math:`\lambda_{min} = 0`, :math:`\lambda_{max} = 1`,
    :math:`E = 10`, evaluated at the 1-based epoch number (constant within an epoch).

    Args:
      epoch: :math:`e`, a scalar (traced or not).
      lambda_min: :math:`\lambda_{min}`.
      lambda_max: :math:`\lambda_{max}`.
      num_epochs: :math:`E > 0`, the length of the rise.

    Returns:
      :math:`\lambda(e)`, a float32 (or wider) scalar.

    References:
      Li et al., `Curriculum Temperature for Knowledge Distillation
      <https://arxiv.org/abs/2211.16231>`_, AAAI 2023
    """
    e = _as_float("epoch", epoch)
    if e.shape != ():
        raise ValueError(f"`epoch` must be a scalar, got shape {e.shape}.")
    for name, value in (("lambda_min", lambda_min), ("lambda_max", lambda_max)):
        _check_finite_weight(name, value)
    _check_positive("num_epochs", num_epochs)
    progress = jnp.clip(e, 0.0, num_epochs) / num_epochs
    return lambda_min + 0.5 * (lambda_max - lambda_min) * (1.0 + jnp.cos((1.0 + progress)
                                                                          * math.pi))


@_nonfinite_propagates
def ctkd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature_logit: ArrayLike,
    *,
    reversal: float | ArrayLike = 1.0,
    temperature_min: float = 1.0,
    temperature_range: float = 20.0,
) -> jax.Array:
    r"""KD at a learned temperature whose gradient is reversed (curriculum temperature).

    .. math::
      T = T_{min} + T_{range}\, \mathrm{sigmoid}(R_\lambda(\theta)), \qquad
      \ell = T^2\, \mathrm{KL}(\mathrm{softmax}(z^t / T) \,\|\, \mathrm{softmax}(z^s / T))

    with :math:`R_\lambda` the gradient reversal (:func:`gradient_reversal`): the student's
    gradient is that of :func:`soft_target_kl` at :math:`T`, the parameter :math:`\theta`
    receives :math:`-\lambda` times its gradient, so :math:`T` moves to make distillation
    harder. CIFAR-100 setting of the authors' ``Global_T`` and script: :math:`\theta` one
    scalar initialised to 1 and trained with the student's SGD (lr 0.05, momentum 0.9, weight
    decay 5e-4), :math:`T_{min} = 1`, :math:`T_{range} = 20` (``--t_start 1 --t_end 20``:
    :math:`T \in (1, 21)`), :math:`\lambda` by :func:`ctkd_lambda`, the loss weighted 0.9
    beside the cross-entropy's 0.1.

    Args:
      student_logits: student logits ``[..., C]``.
      teacher_logits: teacher logits of the same shape.
      temperature_logit: :math:`\theta`, a scalar (the trainable parameter).
      reversal: :math:`\lambda`, a scalar (traced or not).
      temperature_min: :math:`T_{min} > 0`.
      temperature_range: :math:`T_{range} > 0`.

    Returns:
      Per-example loss of shape ``[...]``; no reduction.

    References:
      Li et al., `Curriculum Temperature for Knowledge Distillation
      <https://arxiv.org/abs/2211.16231>`_, AAAI 2023
    """
    s, t = _validated(
        student_logits, teacher_logits, ("student_logits", "teacher_logits"),
        match="shape")
    theta = _as_float("temperature_logit", temperature_logit)
    if theta.shape != ():
        raise ValueError(f"`temperature_logit` must be a scalar (one learned temperature), "
                         f"got shape {theta.shape}.")
    _check_positive("temperature_min", temperature_min)
    _check_positive("temperature_range", temperature_range)
    theta = gradient_reversal(theta, scale=reversal)
    temperature = temperature_min + temperature_range * jax.nn.sigmoid(theta)
    return soft_target_kl(s, t, temperature=temperature.astype(s.dtype))
