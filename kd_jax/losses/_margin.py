"""Margin losses on pre-activation features: activation boundaries (AB) and OFD's partial L2
with its margin from the teacher's BatchNorm.

Both take features taken *before* the ReLU (the models' ``stageN`` maps as they are) and
return shape ``[B]``, the sum over each example's entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm
from jax.typing import ArrayLike

from kd_jax.losses._checks import (
    _as_float,
    _check_positive,
    _flatten,
    _nonfinite_propagates,
    _validated,
)


@_nonfinite_propagates
def ab_loss(
    student_feature: ArrayLike,
    teacher_feature: ArrayLike,
    *,
    margin: float = 1.0,
) -> jax.Array:
    r"""Activation-boundary loss: a squared hinge that puts each student pre-activation on
    the teacher's side of the ReLU boundary, at least :math:`\mu` beyond it.

    With :math:`\rho(t) = 1[t > 0]`, the teacher's activation pattern:

    .. math::
      \ell_b = \sum_i \rho(t_{b,i})\, \max(\mu - s_{b,i}, 0)^2
             + (1 - \rho(t_{b,i}))\, \max(\mu + s_{b,i}, 0)^2

    where :math:`i` runs over all non-batch entries. It is 0 exactly when every student
    entry is :math:`\ge \mu` where the teacher's is positive and :math:`\le -\mu` where it
    is not; only the sign of the teacher's entries matters. RepDistiller's ``ABLoss``
    (CIFAR-100: :math:`\mu = 1`) is, per stage :math:`i` of :math:`n` (0-based), the batch
    mean of :math:`\ell` times :math:`2^{i-n+1} \cdot 3/1000`; those weights and the
    connector (a conv + BN mapping the student's map to the teacher's shape) belong to the
    call site, as does RepDistiller's schedule: AB is its first stage (``init_epochs`` 30,
    training the connector and the student's feature layers on this loss alone), followed
    by training on the cross-entropy only.

    Args:
      student_feature: the student's pre-ReLU feature ``[B, ...]`` mapped to the teacher's
        shape (by the connector).
      teacher_feature: the teacher's pre-ReLU feature of the same shape.
      margin: :math:`\mu > 0`.

    Returns:
      Per-example loss of shape ``[B]`` (a sum over entries).

    References:
      Heo et al., `Knowledge Transfer via Distillation of Activation Boundaries Formed by
      Hidden Neurons <https://arxiv.org/abs/1811.03233>`_, AAAI 2019
    """
    s, t = _validated(
        student_feature, teacher_feature, ("student_feature", "teacher_feature"),
        match="shape", min_ndim=2)
    _check_positive("margin", margin)
    active = t > 0
    hinge = jnp.where(active, jax.nn.relu(margin - s), jax.nn.relu(margin + s))
    return jnp.sum(_flatten(jnp.square(hinge)), axis=-1)


def ofd_margin(bn_scale: ArrayLike, bn_bias: ArrayLike) -> jax.Array:
    r"""OFD's per-channel margin: the expected negative response of a BatchNorm channel.

    A channel after BatchNorm with scale :math:`\gamma` and shift :math:`\beta` is taken as
    :math:`x \sim \mathcal{N}(\beta, \gamma^2)`; with :math:`\sigma = |\gamma|`, the margin
    is :math:`E[x \mid x < 0]`:

    .. math::
      m = \beta - \sigma\, \frac{\phi(\beta / \sigma)}{\Phi(-\beta / \sigma)}
      \quad \text{if } \Phi(-\beta / \sigma) > 10^{-3}, \qquad m = -3\sigma
      \text{ otherwise}

    (:math:`\phi`, :math:`\Phi` the standard normal density and distribution), as in the
    authors' and mdistiller's ``OFD``; :math:`m < 0` always (0 for a channel with
    :math:`\gamma = 0 \le \beta`, :math:`\beta` for :math:`\gamma = 0 > \beta`). The ratio is
    computed in log space, so it stays finite for large :math:`|\beta / \sigma|`. Pass the
    BatchNorm that precedes the ReLU after the teacher's feature (for the post-activation
    ResNets, the last block's second BatchNorm of each stage).

    Args:
      bn_scale: :math:`\gamma`, shape ``[C]``.
      bn_bias: :math:`\beta`, shape ``[C]``.

    Returns:
      The margin, shape ``[C]``, float32 or wider.

    References:
      Heo et al., `A Comprehensive Overhaul of Feature Distillation
      <https://arxiv.org/abs/1904.01866>`_, ICCV 2019
    """
    gamma, beta = _validated(bn_scale, bn_bias, ("bn_scale", "bn_bias"), match="shape",
                             ndim=1)
    sigma = jnp.abs(gamma)
    positive = sigma > 0
    z = beta / jnp.where(positive, sigma, 1.0)
    tail = norm.cdf(-z)
    # phi(z) / Phi(-z) from logs: both underflow together when z is large.
    ratio = jnp.exp(norm.logpdf(z) - norm.logcdf(-z))
    truncated = jnp.where(tail > 1e-3, beta - sigma * ratio, -3.0 * sigma)
    margin = jnp.where(positive, truncated, jnp.minimum(beta, 0.0))
    bad = ~(jnp.isfinite(gamma) & jnp.isfinite(beta))
    return jnp.where(bad, jnp.nan, margin)


@_nonfinite_propagates
def ofd_loss(
    student_feature: ArrayLike,
    teacher_feature: ArrayLike,
    margin: ArrayLike,
) -> jax.Array:
    r"""OFD's partial L2 between the student's (connected) and the teacher's pre-ReLU maps.

    The teacher's map is raised to its margin, :math:`\tau = \max(t, m)` (per channel
    :math:`m`, :func:`ofd_margin`), and the student is not penalised where both are on the
    negative side with the student below the target:

    .. math::
      \ell_b = \sum_i \begin{cases} 0 & \text{if } s_{b,i} \le \tau_{b,i} \le 0 \\
                                    (s_{b,i} - \tau_{b,i})^2 & \text{otherwise}
                      \end{cases}

    where :math:`i` runs over all non-batch entries (:math:`m` broadcast over the channel
    axis, the last). Where the teacher is positive this is the plain squared error; below
    zero only a student response above the target costs. The batch mean of :math:`\ell`
    is mdistiller's ``feat_loss``; its CIFAR-100 setting (``cfg.OFD``) sums the stages with
    weights :math:`2^{-(n-1-i)}` (the last stage 1), the teacher's map average-pooled to
    the student's size, and weights the sum by :math:`10^{-3}` beside the cross-entropy
    (weight 1); the connector (1×1 conv without bias + BN) maps the student's pre-ReLU map
    to the teacher's channels. These belong to the call site.

    Args:
      student_feature: the connector's output ``[B, ..., C]`` (NHWC maps).
      teacher_feature: the teacher's pre-ReLU map of the same shape.
      margin: :math:`m`, shape ``[C]``.

    Returns:
      Per-example loss of shape ``[B]`` (a sum over entries).

    References:
      Heo et al., `A Comprehensive Overhaul of Feature Distillation
      <https://arxiv.org/abs/1904.01866>`_, ICCV 2019
    """
    s, t = _validated(
        student_feature, teacher_feature, ("student_feature", "teacher_feature"),
        match="shape", min_ndim=2)
    m = _as_float("margin", margin)
    if m.shape != t.shape[-1:]:
        raise ValueError(
            f"`margin` must have shape [C] = {t.shape[-1:]} (one value per channel, the last "
            f"axis of `teacher_feature`), got {m.shape}; compute it with `ofd_margin`.")
    dtype = jnp.promote_types(s.dtype, m.dtype)
    s, t, m = s.astype(dtype), t.astype(dtype), m.astype(dtype)
    target = jnp.maximum(t, m)
    skip = (s <= target) & (target <= 0)
    sq = jnp.where(skip, 0.0, jnp.square(s - target))
    return jnp.sum(_flatten(sq), axis=-1)
