"""Logit losses: tempered softmax, soft-target KL and cross-entropy, Hinton KD, DKD, DIST,
LS-KD.

They take logits of shape ``[..., C]`` and return shape ``[...]``, except DIST, which
relates examples and returns a scalar.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kd_jax.losses._checks import (
    _as_float,
    _check_finite_weight,
    _check_labels,
    _check_positive,
    _check_unit,
    _kl,
    _nonfinite_propagates,
    _one_hot_mask,
    _safe_norm,
    _validated,
)


def tempered_softmax(logits: ArrayLike, temperature: float = 1.0) -> jax.Array:
    r"""Softmax of logits divided by a temperature, over the last axis.

    .. math::
      p_c = \frac{\exp(z_c / T)}{\sum_k \exp(z_k / T)}

    Args:
      logits: logits of shape ``[..., C]``.
      temperature: :math:`T > 0`; larger values give softer distributions.

    Returns:
      Probabilities of shape ``[..., C]``, float32 or wider.

    References:
      Hinton et al., `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015
    """
    z = _as_float("logits", logits)
    _check_positive("temperature", temperature)
    return jax.nn.softmax(z / temperature, axis=-1)


def tempered_log_softmax(logits: ArrayLike, temperature: float = 1.0) -> jax.Array:
    r"""Log-softmax of logits divided by a temperature, over the last axis.

    .. math::
      \log p_c = z_c / T - \log \sum_k \exp(z_k / T)

    Args:
      logits: logits of shape ``[..., C]``.
      temperature: :math:`T > 0`.

    Returns:
      Log-probabilities of shape ``[..., C]``, float32 or wider.

    References:
      Hinton et al., `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015
    """
    z = _as_float("logits", logits)
    _check_positive("temperature", temperature)
    return jax.nn.log_softmax(z / temperature, axis=-1)


@_nonfinite_propagates
def soft_target_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float,
) -> jax.Array:
    r"""Temperature-scaled KL divergence from the teacher to the student.

    .. math::
      \ell = T^2 \, \mathrm{KL}(p^t \,\|\, p^s)
           = T^2 \sum_c p^t_c \left(\log p^t_c - \log p^s_c\right),
      \qquad p = \mathrm{softmax}(z / T)

    The teacher distribution is the target. The :math:`T^2` factor keeps the
    gradient scale roughly independent of :math:`T`: as :math:`T \to \infty` the
    gradient w.r.t. zero-mean student logits tends to
    :math:`(z^s - z^t) / C`.

    Args:
      student_logits: student logits of shape ``[..., C]``.
      teacher_logits: teacher logits of the same shape.
      temperature: :math:`T > 0` (keyword-only, no default).

    Returns:
      Per-example loss of shape ``[...]``; no reduction.

    References:
      Hinton et al., `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015
    """
    s, t = _validated(
        student_logits, teacher_logits, ("student_logits", "teacher_logits"),
        match="shape")
    _check_positive("temperature", temperature)
    log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
    return temperature**2 * _kl(log_p_t, log_p_s)


@_nonfinite_propagates
def soft_target_cross_entropy(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float,
) -> jax.Array:
    r"""Temperature-scaled cross-entropy of the student against teacher soft targets.

    .. math::
      \ell = -T^2 \sum_c p^t_c \log p^s_c, \qquad p = \mathrm{softmax}(z / T)

    Equals :func:`soft_target_kl` plus :math:`T^2 H(p^t)`, a term that does not
    depend on the student, so both give the same student gradient.

    Args:
      student_logits: student logits of shape ``[..., C]``.
      teacher_logits: teacher logits of the same shape.
      temperature: :math:`T > 0` (keyword-only, no default).

    Returns:
      Per-example loss of shape ``[...]``; no reduction.

    References:
      Hinton et al., `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015
    """
    s, t = _validated(
        student_logits, teacher_logits, ("student_logits", "teacher_logits"),
        match="shape")
    _check_positive("temperature", temperature)
    log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
    p_t = jax.nn.softmax(t / temperature, axis=-1)
    return -(temperature**2) * jnp.sum(p_t * log_p_s, axis=-1)


@_nonfinite_propagates
def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> jax.Array:
    r"""Hinton's KD objective: hard-label cross-entropy plus soft-target KL.

    .. math::
      \ell = (1 - \alpha)\, \mathrm{CE}(y, \mathrm{softmax}(z^s))
           + \alpha\, T^2\, \mathrm{KL}(p^t \,\|\, p^s)

    Here :math:`\alpha` weights the *distillation* term. Libraries disagree on
    this convention (some weight the cross-entropy by :math:`\alpha` instead);
    check before porting hyperparameters. The cross-entropy uses temperature 1;
    the KL term is :func:`soft_target_kl`.

    Args:
      student_logits: student logits of shape ``[..., C]``.
      teacher_logits: teacher logits of the same shape.
      labels: integer class ids of shape ``[...]`` in ``[0, C)``; examples with
        ids outside that range get NaN.
      temperature: :math:`T > 0` for the KL term.
      alpha: weight :math:`\alpha \in [0, 1]` of the KL term.

    Returns:
      Per-example loss of shape ``[...]``; no reduction.

    References:
      Hinton et al., `Distilling the Knowledge in a Neural Network
      <https://arxiv.org/abs/1503.02531>`_, 2015
    """
    s, t = _validated(
        student_logits, teacher_logits, ("student_logits", "teacher_logits"),
        match="shape")
    labels = _check_labels(labels, s)
    _check_positive("temperature", temperature)
    _check_unit("alpha", alpha, "it is the weight of the distillation term and (1 - alpha) "
                "that of the cross-entropy.")
    target, valid = _one_hot_mask(labels, s.shape[-1])
    log_p = jax.nn.log_softmax(s, axis=-1)
    ce = -jnp.sum(jnp.where(target, log_p, 0.0), axis=-1)
    ce = jnp.where(valid, ce, jnp.nan)
    kd = soft_target_kl(s, t, temperature=temperature)
    return (1.0 - alpha) * ce + alpha * kd


@_nonfinite_propagates
def dkd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> jax.Array:
    r"""Decoupled knowledge distillation: target-class plus non-target-class KD.

    With :math:`p = \mathrm{softmax}(z / T)` and target class :math:`y`:

    .. math::
      \mathrm{TCKD} = \mathrm{KL}(b^t \,\|\, b^s), \quad
      b = [p_y,\ 1 - p_y], \\
      \mathrm{NCKD} = \mathrm{KL}(\hat p^t \,\|\, \hat p^s), \quad
      \hat p_c = \frac{\exp(z_c / T)}{\sum_{k \ne y} \exp(z_k / T)},\ c \ne y, \\
      \ell = T^2 (\alpha\, \mathrm{TCKD} + \beta\, \mathrm{NCKD})

    Classic KD decomposes as :math:`\mathrm{KL}(p^t\|p^s) = \mathrm{TCKD} +
    (1 - p^t_y)\,\mathrm{NCKD}`; DKD decouples the two weights. Definitions
    follow mdistiller's ``dkd_loss``; here everything is computed in log space
    and the target class is removed exactly by masking rather than by
    subtracting 1000 from its logit. mdistiller's linear warm-up of the loss
    weight over the first epochs belongs to the training loop, not here.

    Args:
      student_logits: student logits of shape ``[..., C]``, ``C >= 2``.
      teacher_logits: teacher logits of the same shape.
      labels: integer class ids of shape ``[...]`` in ``[0, C)``; examples with
        ids outside that range get NaN.
      alpha: weight of TCKD.
      beta: weight of NCKD.
      temperature: :math:`T > 0`.

    Returns:
      Per-example loss of shape ``[...]``; no reduction.

    References:
      Zhao et al., `Decoupled Knowledge Distillation
      <https://arxiv.org/abs/2203.08679>`_, CVPR 2022
    """
    s, t = _validated(
        student_logits, teacher_logits, ("student_logits", "teacher_logits"),
        match="shape")
    labels = _check_labels(labels, s)
    _check_positive("temperature", temperature)
    for name, value in (("alpha", alpha), ("beta", beta)):
        _check_finite_weight(name, value)
    num_classes = s.shape[-1]
    if num_classes < 2:
        raise ValueError(
            f"`student_logits` must have at least 2 classes for DKD, got shape "
            f"{s.shape}; NCKD is undefined without non-target classes.")
    target, valid = _one_hot_mask(labels, num_classes)
    # A finite mask value keeps every intermediate finite; exp() of it is 0.
    mask_value = 0.5 * jnp.finfo(s.dtype).min

    def decompose(z):
        z = z / temperature
        lse_all = jax.nn.logsumexp(z, axis=-1)
        z_other = jnp.where(target, mask_value, z)
        lse_other = jax.nn.logsumexp(z_other, axis=-1)
        log_p_target = jnp.sum(jnp.where(target, z, 0.0), axis=-1) - lse_all
        log_p_other = lse_other - lse_all  # log(1 - p_y), without cancellation
        log_binary = jnp.stack([log_p_target, log_p_other], axis=-1)
        log_p_hat = z_other - lse_other[..., None]
        return log_binary, log_p_hat

    log_b_s, log_hat_s = decompose(s)
    log_b_t, log_hat_t = decompose(t)
    tckd = _kl(log_b_t, log_b_s)
    nckd = _kl(log_hat_t, log_hat_s, where=~target)
    loss = temperature**2 * (alpha * tckd + beta * nckd)
    return jnp.where(valid, loss, jnp.nan)


def _pearson(x: jax.Array, y: jax.Array, axis: int, eps: float = 1e-8) -> jax.Array:
    """Pearson correlation along `axis`, with `eps` added to the norm product."""
    a = x - jnp.mean(x, axis=axis, keepdims=True)
    b = y - jnp.mean(y, axis=axis, keepdims=True)
    num = jnp.sum(a * b, axis=axis)
    return num / (_safe_norm(a, axis) * _safe_norm(b, axis) + eps)


@_nonfinite_propagates
def dist_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> jax.Array:
    r"""DIST: match inter-class and intra-class Pearson correlations.

    With :math:`P = \mathrm{softmax}(z / T)` of shape ``[B, C]`` and
    :math:`\rho(u, v) = \frac{\langle u - \bar u, v - \bar v\rangle}
    {\|u - \bar u\|\,\|v - \bar v\| + 10^{-8}}`:

    .. math::
      \mathrm{inter} = \frac{1}{B} \sum_b \left(1 - \rho(P^s_{b,:}, P^t_{b,:})\right),
      \quad
      \mathrm{intra} = \frac{1}{C} \sum_c \left(1 - \rho(P^s_{:,c}, P^t_{:,c})\right), \\
      \ell = T^2 (\beta\, \mathrm{inter} + \gamma\, \mathrm{intra})

    The :math:`10^{-8}` follows the official implementation. The intra term
    relates examples, so the loss is a scalar over the batch.

    Args:
      student_logits: student logits of shape ``[B, C]`` (flatten dense
        predictions to ``[N, C]`` first).
      teacher_logits: teacher logits of the same shape.
      beta: weight of the inter-class (per-example) term.
      gamma: weight of the intra-class (per-class, across the batch) term.
      temperature: :math:`T > 0`.

    Returns:
      Scalar loss (already averaged over the batch).

    References:
      Huang et al., `Knowledge Distillation from A Stronger Teacher
      <https://arxiv.org/abs/2205.10536>`_, NeurIPS 2022
    """
    s, t = _validated(
        student_logits, teacher_logits, ("student_logits", "teacher_logits"),
        match="shape", ndim=2)
    _check_positive("temperature", temperature)
    for name, value in (("beta", beta), ("gamma", gamma)):
        _check_finite_weight(name, value)
    p_s = jax.nn.softmax(s / temperature, axis=-1)
    p_t = jax.nn.softmax(t / temperature, axis=-1)
    inter = jnp.mean(1.0 - _pearson(p_s, p_t, axis=1))
    intra = jnp.mean(1.0 - _pearson(p_s, p_t, axis=0))
    return temperature**2 * (beta * inter + gamma * intra)


def _standardize(z: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Z-score over the last axis with the unbiased std, as in the LS-KD code."""
    centered = z - jnp.mean(z, axis=-1, keepdims=True)
    # Via _safe_norm so constant logits (e.g. a zero-initialised head) give a
    # zero gradient instead of NaN.
    std = _safe_norm(centered, axis=-1, keepdims=True) / jnp.sqrt(z.shape[-1] - 1.0)
    return centered / (std + eps)


@_nonfinite_propagates
def lskd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float,
) -> jax.Array:
    r"""KD on standardised logits (logit standardisation, LS-KD).

    .. math::
      \tilde z = \frac{z - \mathrm{mean}(z)}{\mathrm{std}(z) + 10^{-7}}, \qquad
      \ell = T^2\, \mathrm{KL}\left(\mathrm{softmax}(\tilde z^t / T) \,\|\,
      \mathrm{softmax}(\tilde z^s / T)\right)

    Mean and standard deviation run over the class axis; the standard deviation
    is the unbiased one (divides by :math:`C - 1`), as in the authors' code. The
    loss is invariant to shifting and positively scaling either set of logits.
    For (near-)constant logits, e.g. from a zero-initialised head, the gradient
    is of order :math:`1/10^{-7}` since the standard deviation vanishes.

    Args:
      student_logits: student logits of shape ``[..., C]``, ``C >= 2``.
      teacher_logits: teacher logits of the same shape.
      temperature: base temperature :math:`T > 0` (keyword-only, no default).

    Returns:
      Per-example loss of shape ``[...]``; no reduction.

    References:
      Sun et al., `Logit Standardization in Knowledge Distillation
      <https://arxiv.org/abs/2403.01427>`_, CVPR 2024
    """
    s, t = _validated(
        student_logits, teacher_logits, ("student_logits", "teacher_logits"),
        match="shape")
    if s.shape[-1] < 2:
        raise ValueError(
            f"`student_logits` must have at least 2 classes to standardise, got "
            f"shape {s.shape}.")
    return soft_target_kl(_standardize(s), _standardize(t), temperature=temperature)


@_nonfinite_propagates
def mlkd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperatures: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0),
    instance_weight: float = 1.0,
    batch_weight: float = 1.0,
    class_weight: float = 1.0,
) -> jax.Array:
    r"""Multi-level logit distillation on one view: instance-, batch- and class-level
    alignment of the predictions at several temperatures.

    With :math:`P_T = \mathrm{softmax}(z / T)` of shape ``[B, C]`` for each temperature
    :math:`T` of the set :math:`\mathcal{T}` (prediction augmentation):

    .. math::
      \mathcal{L}_{ins} = \frac{1}{B} \sum_b T^2\, \mathrm{KL}(P^t_{T,b} \,\|\, P^s_{T,b}),
      \quad
      \mathcal{L}_{batch} = \frac{1}{B} \|P^t_T P^{t\top}_T - P^s_T P^{s\top}_T\|_F^2,
      \quad
      \mathcal{L}_{class} = \frac{1}{C} \|P^{t\top}_T P^t_T - P^{s\top}_T P^s_T\|_F^2, \\
      \ell = \sum_{T \in \mathcal{T}} w_i \mathcal{L}_{ins} + w_b \mathcal{L}_{batch}
             + w_c \mathcal{L}_{class}

    The ``[B, B]`` batch-level matrices relate examples (the paper's input correlation), the
    ``[C, C]`` class-level ones relate classes, so the loss is a scalar over the batch. The
    definitions and :math:`\mathcal{T} = \{2, 3, 4, 5, 6\}` (the config's :math:`T = 4` plus
    2, 3, 5, 6) follow the authors' ``KD_ours``. Their CIFAR-100 objective (``configs/
    cifar100/ours``: lr 0.025, batch 64) is over a weak and a strong augmentation of each
    image, which this function does not see: the cross-entropy (weight 0.1) on both views,
    and, with weight 0.9 each, the weak view's instance, batch and class terms and the
    strong view's instance term. In that code the weak view's terms are multiplied by the
    fraction of examples (classes, for the class term) whose teacher confidence is at most
    its median (1/2 for an even count of distinct values), because the mask multiplies an
    already-reduced loss; the strong view's
    :math:`T = 2, 6` instance terms use the weak view's logits, and its batch and class terms
    are computed but not added; reproduce that with the weights and two calls.

    Args:
      student_logits: student logits ``[B, C]``.
      teacher_logits: teacher logits of the same shape.
      temperatures: the temperatures :math:`T > 0` (a non-empty tuple of numbers).
      instance_weight: :math:`w_i`.
      batch_weight: :math:`w_b`.
      class_weight: :math:`w_c`.

    Returns:
      Scalar loss.

    References:
      Jin et al., `Multi-Level Logit Distillation
      <https://openaccess.thecvf.com/content/CVPR2023/html/Jin_Multi-Level_Logit_Distillation_CVPR_2023_paper.html>`_,
      CVPR 2023
    """
    s, t = _validated(
        student_logits, teacher_logits, ("student_logits", "teacher_logits"),
        match="shape", ndim=2)
    if not isinstance(temperatures, (tuple, list)) or not temperatures:
        raise ValueError(f"`temperatures` must be a non-empty tuple of numbers, got "
                         f"{temperatures!r}; e.g. (2.0, 3.0, 4.0, 5.0, 6.0).")
    for i, temperature in enumerate(temperatures):
        _check_positive(f"temperatures[{i}]", temperature)
    for name, value in (("instance_weight", instance_weight), ("batch_weight", batch_weight),
                        ("class_weight", class_weight)):
        _check_finite_weight(name, value)
    batch, num_classes = s.shape
    total = 0.0
    for temperature in temperatures:
        log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
        log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
        p_s, p_t = jnp.exp(log_p_s), jnp.exp(log_p_t)
        instance = temperature**2 * jnp.mean(_kl(log_p_t, log_p_s))
        between_examples = jnp.sum(jnp.square(p_t @ p_t.T - p_s @ p_s.T)) / batch
        between_classes = jnp.sum(jnp.square(p_t.T @ p_t - p_s.T @ p_s)) / num_classes
        total = total + (instance_weight * instance + batch_weight * between_examples
                         + class_weight * between_classes)
    return total
