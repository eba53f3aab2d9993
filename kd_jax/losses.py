"""Knowledge-distillation losses.

Pure, jittable functions in the style of ``optax.losses``: arrays in, a
``jax.Array`` out, hyperparameters keyword-only, no reduction over examples
unless the loss itself relates examples to each other.

* Logit losses take logits of shape ``[..., C]`` and return shape ``[...]``.
* Per-example feature losses take ``[B, ...]`` and return shape ``[B]``.
* Relational losses (DIST, SP, RKD, PKT) return a scalar.

All arithmetic runs in float32 or wider: bfloat16/float16 inputs are upcast to
float32 first, float64 inputs stay float64. Shapes and dtypes are validated at trace
time and raise ``ValueError``.

Three promises hold for every loss (tested):

* **Non-finite in, non-finite out.** A NaN or infinite value in the student or teacher
  input makes the output NaN for the examples it belongs to (the whole value of a
  relational loss), so a run's non-finite-loss check fires; it is never masked into a
  plausible number.
* **Out-of-range labels** (outside ``[0, C)``, e.g. -1) give NaN for that example, here
  and in the train/eval steps (:func:`kd_jax.objectives.cross_entropy`).
* **Hyperparameters are checked whatever their type**: a temperature must be a finite
  scalar > 0, ``alpha`` a scalar in [0, 1], weights finite scalars, whether given as a
  Python number, a NumPy scalar or 0-d array, or a concrete JAX array. A non-scalar
  (e.g. a ``[B, 1]`` temperature, which would broadcast the loss to ``[B, B]``) is
  rejected even when traced; the value of a traced scalar cannot be checked.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "attention_transfer_loss",
    "cc_loss",
    "crd_memory_update",
    "crd_nce_loss",
    "crd_normalizers",
    "crd_sample_negatives",
    "distillation_loss",
    "dist_loss",
    "dkd_loss",
    "hcl_loss",
    "hint_loss",
    "lskd_loss",
    "nst_loss",
    "pkt_loss",
    "rkd_loss",
    "similarity_preserving_loss",
    "soft_target_cross_entropy",
    "soft_target_kl",
    "tempered_log_softmax",
    "tempered_softmax",
    "vid_loss",
]


# ----------------------------------------------------------------------------
# Validation and numerics helpers.
# ----------------------------------------------------------------------------


def _as_float(name: str, x: ArrayLike) -> jax.Array:
    """Checks that `x` is floating point and casts it to at least float32."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must be a floating-point array, got dtype {x.dtype}; "
            f"cast it first, e.g. `{name}.astype(jnp.float32)`."
        )
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _validated(
    student: ArrayLike,
    teacher: ArrayLike,
    names: tuple[str, str],
    *,
    match: Literal["shape", "batch"],
    ndim: int | None = None,
    min_ndim: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Validates a student/teacher pair and casts both to one compute dtype.

    Args:
      student: student array.
      teacher: teacher array.
      names: argument names used in error messages.
      match: ``"shape"`` requires identical shapes, ``"batch"`` only the same
        leading (batch) axis.
      ndim: exact rank required, if any.
      min_ndim: minimum rank required.

    Returns:
      ``(student, teacher)`` cast to a common dtype of at least float32.
    """
    s = _as_float(names[0], student)
    t = _as_float(names[1], teacher)
    for name, x in zip(names, (s, t)):
        if ndim is not None and x.ndim != ndim:
            raise ValueError(
                f"`{name}` must have rank {ndim}, got shape {x.shape}; reshape it "
                "to the documented layout."
            )
        if x.ndim < min_ndim:
            raise ValueError(
                f"`{name}` must have rank >= {min_ndim}, got shape {x.shape}; add "
                "the missing axes (a batch axis first, a class/feature axis last)."
            )
    if match == "shape" and s.shape != t.shape:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have the same shape, got "
            f"{s.shape} and {t.shape}; project or reshape the student output to "
            "the teacher's shape."
        )
    if match == "batch" and s.shape[0] != t.shape[0]:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have the same batch size (axis "
            f"0), got shapes {s.shape} and {t.shape}; pass features of the same "
            "examples."
        )
    dtype = jnp.promote_types(s.dtype, t.dtype)
    return s.astype(dtype), t.astype(dtype)


def _concrete_scalar(name: str, value: float | ArrayLike) -> float | None:
    """A hyperparameter's value if it is concrete (a Python or NumPy number, or a concrete
    NumPy/JAX array), ``None`` if traced. Any non-scalar shape is rejected, traced or not:
    a ``[B, 1]`` temperature would silently broadcast the loss to ``[B, B]``."""
    shape = jnp.shape(value)
    if shape != ():
        raise ValueError(
            f"`{name}` must be a scalar, got shape {shape}; per-example values are not "
            f"supported: compute the loss per group of examples sharing one `{name}`.")
    if isinstance(value, jax.core.Tracer):
        return None
    return float(np.asarray(value))


def _check_positive(name: str, value: float | ArrayLike) -> None:
    """Rejects a non-scalar, non-finite or non-positive hyperparameter (any concrete type)."""
    v = _concrete_scalar(name, value)
    if v is not None and not (math.isfinite(v) and v > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {v}; pass a positive "
                         "number.")


def _check_unit(name: str, value: float | ArrayLike, meaning: str) -> None:
    """Rejects a non-scalar or a concrete value outside ``[0, 1]`` (NaN included)."""
    v = _concrete_scalar(name, value)
    if v is not None and not 0.0 <= v <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {v}; {meaning}")


def _check_finite_weight(name: str, value: float | ArrayLike) -> None:
    v = _concrete_scalar(name, value)
    if v is not None and not math.isfinite(v):
        raise ValueError(f"`{name}` must be a finite number, got {v}.")


def _nonfinite_propagates(loss):
    """Makes ``loss(student, teacher, ...)`` NaN wherever its inputs are not finite.

    Each output element is NaN when any value of the student or teacher array that it is
    computed from (the same leading example axes; all of them for a scalar loss) is NaN or
    infinite. Without this, masks such as ``p > 0`` (False for NaN) would turn a NaN teacher
    into a plausible finite loss and hide a broken run.
    """

    @functools.wraps(loss)
    def wrapped(student, teacher, *args, **kwargs):
        out = loss(student, teacher, *args, **kwargs)
        bad = jnp.zeros(out.shape, bool)
        for x in (student, teacher):
            x = jnp.asarray(x)
            bad = bad | ~jnp.all(jnp.isfinite(x), axis=tuple(range(out.ndim, x.ndim)))
        return jnp.where(bad, jnp.nan, out)

    return wrapped


def _check_labels(labels: ArrayLike, logits: jax.Array) -> jax.Array:
    """Checks integer class ids of shape ``logits.shape[:-1]``."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"`labels` must hold integer class ids, got dtype {labels.dtype}; "
            "convert one-hot labels with `labels.argmax(-1)` or cast with "
            "`.astype(jnp.int32)`."
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape logits.shape[:-1] = {logits.shape[:-1]}, "
            f"got {labels.shape}; pass one class id per example."
        )
    return labels


def _one_hot_mask(labels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Returns a boolean target mask ``[..., C]`` and a validity mask ``[...]``.

    Labels outside ``[0, C)`` cannot be checked at trace time; they are marked
    invalid so the losses return NaN for those examples rather than a plausible
    but wrong number.
    """
    mask = labels[..., None] == jnp.arange(num_classes)
    valid = (labels >= 0) & (labels < num_classes)
    return mask, valid


def _kl(log_p: jax.Array, log_q: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """``sum_c p_c (log p_c - log q_c)`` over the last axis, from log-probabilities.

    Terms with ``p_c == 0`` (or outside `where`) contribute exactly 0, so the
    result stays finite when ``log p_c`` underflows or is masked.
    """
    p = jnp.exp(log_p)
    keep = p > 0
    if where is not None:
        keep = keep & where
    terms = jnp.where(keep, p * (log_p - log_q), 0.0)
    return jnp.sum(terms, axis=-1)


def _safe_norm(x: jax.Array, axis: int | tuple[int, ...], keepdims: bool = False) -> jax.Array:
    """Euclidean norm whose gradient is 0 (not NaN) at the zero vector."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _l2_normalize(x: jax.Array, axis: int, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` along `axis` (PyTorch ``F.normalize`` semantics)."""
    return x / jnp.maximum(_safe_norm(x, axis, keepdims=True), eps)


def _smooth_l1(x: jax.Array, y: jax.Array) -> jax.Array:
    """Elementwise Huber loss with delta 1 (PyTorch ``smooth_l1_loss``, beta 1)."""
    d = jnp.abs(x - y)
    return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------
# Logit losses.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Feature losses.
# ----------------------------------------------------------------------------


@_nonfinite_propagates
def hint_loss(student_feature: ArrayLike, teacher_feature: ArrayLike) -> jax.Array:
    r"""FitNets hint loss: mean squared error between features.

    .. math::
      \ell_b = \frac{1}{D} \sum_{i} (f^s_{b,i} - f^t_{b,i})^2

    where :math:`i` runs over all :math:`D` non-batch entries.

    Args:
      student_feature: student feature ``[B, ...]``, already mapped to the
        teacher's shape by its regressor.
      teacher_feature: teacher feature of the same shape.

    Returns:
      Per-example loss of shape ``[B]``.

    References:
      Romero et al., `FitNets: Hints for Thin Deep Nets
      <https://arxiv.org/abs/1412.6550>`_, ICLR 2015
    """
    s, t = _validated(
        student_feature, teacher_feature, ("student_feature", "teacher_feature"),
        match="shape", min_ndim=2)
    return jnp.mean(jnp.square(_flatten(s) - _flatten(t)), axis=-1)


def _attention_map(f: jax.Array, p: float) -> jax.Array:
    a = jnp.mean(jnp.abs(f) ** p, axis=-1)  # [B, H, W]
    return _l2_normalize(_flatten(a), axis=-1)


def _check_same_spatial(s: jax.Array, t: jax.Array) -> None:
    if s.shape[1:3] != t.shape[1:3]:
        raise ValueError(
            "`student_feature` and `teacher_feature` must have the same spatial "
            f"size (axes 1, 2 of NHWC), got {s.shape} and {t.shape}; resize or "
            "pool one map to the other's H x W first.")


@_nonfinite_propagates
def attention_transfer_loss(
    student_feature: ArrayLike,
    teacher_feature: ArrayLike,
    *,
    p: float = 2,
) -> jax.Array:
    r"""Attention transfer between spatial attention maps.

    .. math::
      a = \frac{q}{\max(\|q\|_2, 10^{-12})}, \quad
      q_{hw} = \frac{1}{C} \sum_c |f_{hwc}|^p, \qquad
      \ell = \frac{1}{HW} \sum_{hw} (a^s_{hw} - a^t_{hw})^2

    Channel counts may differ. The paper uses :math:`|f|^p`; RepDistiller uses
    :math:`f^p`, which agrees for even :math:`p`.

    Args:
      student_feature: NHWC map ``[B, H, W, C_s]``.
      teacher_feature: NHWC map ``[B, H, W, C_t]``.
      p: exponent :math:`p > 0`.

    Returns:
      Per-example loss of shape ``[B]``.

    References:
      Zagoruyko & Komodakis, `Paying More Attention to Attention
      <https://arxiv.org/abs/1612.03928>`_, ICLR 2017
    """
    s, t = _validated(
        student_feature, teacher_feature, ("student_feature", "teacher_feature"),
        match="batch", ndim=4)
    _check_same_spatial(s, t)
    _check_positive("p", p)
    return jnp.mean(jnp.square(_attention_map(s, p) - _attention_map(t, p)), axis=-1)


@_nonfinite_propagates
def nst_loss(student_feature: ArrayLike, teacher_feature: ArrayLike) -> jax.Array:
    r"""Neuron selectivity transfer: squared MMD with a degree-2 polynomial kernel.

    Each channel's map is flattened over space and L2-normalised (``eps``
    :math:`10^{-12}`), giving :math:`C` vectors :math:`u_i \in \mathbb{R}^{HW}`:

    .. math::
      \ell = \mathrm{mean}_{i,j} \langle u^t_i, u^t_j\rangle^2
           + \mathrm{mean}_{i,j} \langle u^s_i, u^s_j\rangle^2
           - 2\, \mathrm{mean}_{i,j} \langle u^s_i, u^t_j\rangle^2

    Channel counts may differ. Includes the teacher-only term, as RepDistiller's
    ``full_loss``.

    Args:
      student_feature: NHWC map ``[B, H, W, C_s]``.
      teacher_feature: NHWC map ``[B, H, W, C_t]``.

    Returns:
      Per-example loss of shape ``[B]``.

    References:
      Huang & Wang, `Like What You Like: Knowledge Distill via Neuron
      Selectivity Transfer <https://arxiv.org/abs/1707.01219>`_, 2017
    """
    s, t = _validated(
        student_feature, teacher_feature, ("student_feature", "teacher_feature"),
        match="batch", ndim=4)
    _check_same_spatial(s, t)

    def channels(f):  # [B, H, W, C] -> [B, C, HW], unit norm over space
        f = f.reshape(f.shape[0], -1, f.shape[-1]).transpose(0, 2, 1)
        return _l2_normalize(f, axis=-1)

    u_s, u_t = channels(s), channels(t)

    def poly_mean(a, b):
        return jnp.mean(jnp.square(jnp.einsum("bik,bjk->bij", a, b)), axis=(1, 2))

    return poly_mean(u_t, u_t) + poly_mean(u_s, u_s) - 2.0 * poly_mean(u_s, u_t)


@_nonfinite_propagates
def similarity_preserving_loss(
    student_feature: ArrayLike, teacher_feature: ArrayLike
) -> jax.Array:
    r"""Similarity-preserving KD: match row-normalised batch Gram matrices.

    .. math::
      G = F F^\top, \quad \tilde G_{i,:} = \frac{G_{i,:}}{\max(\|G_{i,:}\|_2, 10^{-12})},
      \qquad \ell = \frac{1}{B^2} \|\tilde G^s - \tilde G^t\|_F^2

    where :math:`F` is the feature flattened to ``[B, D]``; the feature sizes of
    student and teacher may differ.

    Args:
      student_feature: student feature ``[B, ...]``.
      teacher_feature: teacher feature ``[B, ...]``.

    Returns:
      Scalar loss.

    References:
      Tung & Mori, `Similarity-Preserving Knowledge Distillation
      <https://arxiv.org/abs/1907.09682>`_, ICCV 2019
    """
    s, t = _validated(
        student_feature, teacher_feature, ("student_feature", "teacher_feature"),
        match="batch", min_ndim=2)
    batch = s.shape[0]

    def gram(f):
        f = _flatten(f)
        return _l2_normalize(f @ f.T, axis=1)

    return jnp.sum(jnp.square(gram(s) - gram(t))) / batch**2


def _rkd_terms(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean-normalised distance matrix ``[B, B]`` and angle tensor ``[B, B, B]``."""
    batch = x.shape[0]
    diff = x[None, :, :] - x[:, None, :]  # diff[i, j] = x_j - x_i
    # Differences (not |x|^2 + |y|^2 - 2xy) avoid cancellation in float32.
    sq = jnp.sum(jnp.square(diff), axis=-1)
    off_diag = ~jnp.eye(batch, dtype=bool)
    dist = jnp.where(off_diag, jnp.sqrt(jnp.maximum(sq, 1e-12)), 0.0)
    dist = dist / (jnp.sum(dist) / (batch * (batch - 1)))
    # The diagonal e_ii is 0 either way; masking it keeps the 1/eps slope of the
    # normalisation at the zero vector out of the gradient.
    e = jnp.where(off_diag[..., None], _l2_normalize(diff, axis=-1), 0.0)
    angle = jnp.einsum("ijd,ikd->ijk", e, e)
    return dist, angle


@_nonfinite_propagates
def rkd_loss(
    student_embedding: ArrayLike,
    teacher_embedding: ArrayLike,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> jax.Array:
    r"""Relational KD: match pairwise distances and triplet angles.

    With :math:`d_{ij} = \|x_i - x_j\|` (squared distance clamped at
    :math:`10^{-12}`, diagonal 0), :math:`\mu = \mathrm{mean}_{i \ne j} d_{ij}`,
    :math:`e_{ij} = (x_j - x_i) / \max(\|x_j - x_i\|, 10^{-12})` and
    :math:`\mathrm{sl1}` the Huber loss with :math:`\delta = 1`:

    .. math::
      \mathcal{L}_D = \frac{1}{B^2} \sum_{i,j}
          \mathrm{sl1}\left(\frac{d^s_{ij}}{\mu^s} - \frac{d^t_{ij}}{\mu^t}\right),
      \quad
      \mathcal{L}_A = \frac{1}{B^3} \sum_{i,j,k}
          \mathrm{sl1}\left(\langle e^s_{ij}, e^s_{ik}\rangle
          - \langle e^t_{ij}, e^t_{ik}\rangle\right), \\
      \ell = w_D \mathcal{L}_D + w_A \mathcal{L}_A

    Means run over all :math:`B^2` / :math:`B^3` entries, as in RepDistiller.
    RepDistiller computes the teacher side under ``no_grad``; this function is
    pure and differentiates both sides, so stop gradients on the teacher at the
    call site if it is ever differentiated. Memory is :math:`O(B^2 D + B^3)`.

    Args:
      student_embedding: student embedding ``[B, D_s]`` (extra axes are
        flattened), ``B >= 2``.
      teacher_embedding: teacher embedding ``[B, D_t]``.
      distance_weight: :math:`w_D`.
      angle_weight: :math:`w_A`.

    Returns:
      Scalar loss.

    References:
      Park et al., `Relational Knowledge Distillation
      <https://arxiv.org/abs/1904.05068>`_, CVPR 2019
    """
    s, t = _validated(
        student_embedding, teacher_embedding,
        ("student_embedding", "teacher_embedding"), match="batch", min_ndim=2)
    if s.shape[0] < 2:
        raise ValueError(
            f"`student_embedding` needs a batch of at least 2 examples for RKD, "
            f"got shape {s.shape}; distances need pairs.")
    d_s, a_s = _rkd_terms(_flatten(s))
    d_t, a_t = _rkd_terms(_flatten(t))
    dist_term = jnp.mean(_smooth_l1(d_s, d_t))
    angle_term = jnp.mean(_smooth_l1(a_s, a_t))
    return distance_weight * dist_term + angle_weight * angle_term


@_nonfinite_propagates
def pkt_loss(student_embedding: ArrayLike, teacher_embedding: ArrayLike) -> jax.Array:
    r"""Probabilistic knowledge transfer: match cosine-kernel conditional densities.

    With rows normalised as :math:`\hat x = x / (\|x\| + \epsilon)` (NaN set to
    0) and :math:`\epsilon = 10^{-7}`:

    .. math::
      K_{ij} = \frac{1 + \langle \hat x_i, \hat x_j\rangle}{2}, \quad
      P_{ij} = \frac{K_{ij}}{\sum_k K_{ik}}, \qquad
      \ell = \frac{1}{B^2} \sum_{i,j} P^t_{ij}
          \log \frac{P^t_{ij} + \epsilon}{P^s_{ij} + \epsilon}

    Embedding sizes of student and teacher may differ.

    Args:
      student_embedding: student embedding ``[B, D_s]`` (extra axes are
        flattened).
      teacher_embedding: teacher embedding ``[B, D_t]``.

    Returns:
      Scalar loss.

    References:
      Passalis & Tefas, `Learning Deep Representations with Probabilistic
      Knowledge Transfer <https://arxiv.org/abs/1803.10837>`_, ECCV 2018
    """
    s, t = _validated(
        student_embedding, teacher_embedding,
        ("student_embedding", "teacher_embedding"), match="batch", min_ndim=2)
    eps = 1e-7

    def conditional(x):
        x = _flatten(x)
        x = x / (_safe_norm(x, axis=1, keepdims=True) + eps)
        x = jnp.where(jnp.isnan(x), 0.0, x)
        k = (x @ x.T + 1.0) / 2.0
        return k / jnp.sum(k, axis=1, keepdims=True)

    p_s, p_t = conditional(s), conditional(t)
    return jnp.mean(p_t * (jnp.log(p_t + eps) - jnp.log(p_s + eps)))


# ----------------------------------------------------------------------------
# CRD, VID, CC and ReviewKD's hierarchical context loss.
# ----------------------------------------------------------------------------


def _concrete_array(x: ArrayLike) -> np.ndarray | None:
    """`x` as a NumPy array if its value is known at trace time, ``None`` if traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _int_array(name: str, x: ArrayLike, ndim: int, holds: str) -> jax.Array:
    """Checks an integer array of rank `ndim`; `holds` says what its values mean."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(
            f"`{name}` must hold integer {holds}, got dtype {x.dtype}; cast it with "
            "`.astype(jnp.int32)`.")
    if x.ndim != ndim:
        raise ValueError(f"`{name}` must have rank {ndim}, got shape {x.shape}.")
    return x


def _check_count(name: str, value: int, minimum: int = 1) -> int:
    """A static integer hyperparameter (it sets a shape or a loop), ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be a Python integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_index_range(name: str, indices: jax.Array, size: int) -> None:
    """Rejects concrete indices outside ``[0, size)``; traced ones are handled by the caller."""
    v = _concrete_array(indices)
    if v is not None and v.size and (v.min() < 0 or v.max() >= size):
        raise ValueError(
            f"`{name}` must lie in [0, {size}), got values in [{v.min()}, {v.max()}]; pass "
            "positions in the training set (the rows of the memory).")


def crd_sample_negatives(
    key: jax.Array,
    indices: ArrayLike,
    *,
    num_examples: int,
    num_negatives: int = 16384,
    dataset_labels: ArrayLike | None = None,
) -> jax.Array:
    r"""Contrast indices for CRD: each example's own index, then its negatives.

    Row ``b`` is ``[indices[b], n_1, ..., n_K]`` with :math:`K` = `num_negatives`. Both
    of RepDistiller's samplers are provided:

    * ``dataset_labels`` given — RepDistiller's default (``CIFAR100InstanceSample``,
      ``mode='exact'``): the negatives are a uniform sample *without replacement* from
      the examples of other classes, :math:`\{j : y_j \ne y_{\mathrm{indices}[b]}\}`.
      No row repeats a negative, and neither the positive nor any example of its class
      is a negative. RepDistiller falls back to sampling with replacement when
      :math:`K` exceeds that set; here this raises ``ValueError`` if `dataset_labels` is
      concrete (checked against the largest class), and gives same-class negatives if it
      is traced.
    * ``dataset_labels=None`` — ``ContrastMemory``'s own sampler (used there when no
      contrast indices are passed): negatives uniform *with replacement* over all
      `num_examples` examples, so a negative may repeat or equal the positive.

    RepDistiller's ``mode='relax'`` (a random positive of the same class) is not
    provided. The rows depend on `key` only: the same key gives the same draws. The
    without-replacement sampler takes the top :math:`K` of i.i.d. Gumbel keys over the
    allowed examples, so it costs :math:`O(B N)` memory and a top-k over :math:`N`.

    Args:
      key: a ``jax.random`` key.
      indices: positions ``[B]`` of the batch's examples in the training set, in
        ``[0, num_examples)``.
      num_examples: :math:`N`, the training-set size (rows of the CRD memories).
      num_negatives: :math:`K \ge 1`; the paper and RepDistiller use 16384.
      dataset_labels: integer class of every training example, ``[N]``; selects the
        class-exclusive sampler.

    Returns:
      int32 indices of shape ``[B, K + 1]``; column 0 is `indices`.

    References:
      Tian et al., `Contrastive Representation Distillation
      <https://arxiv.org/abs/1910.10699>`_, ICLR 2020
    """
    num_examples = _check_count("num_examples", num_examples)
    num_negatives = _check_count("num_negatives", num_negatives)
    indices = _int_array("indices", indices, 1, "example indices")
    _check_index_range("indices", indices, num_examples)
    batch = indices.shape[0]
    if dataset_labels is None:
        negatives = jax.random.randint(
            key, (batch, num_negatives), 0, num_examples, dtype=jnp.int32)
    else:
        labels = _int_array("dataset_labels", dataset_labels, 1, "class ids")
        if labels.shape[0] != num_examples:
            raise ValueError(
                f"`dataset_labels` must have one class per training example, shape "
                f"({num_examples},), got {labels.shape}.")
        concrete = _concrete_array(labels)
        if concrete is not None:
            largest = int(np.unique(concrete, return_counts=True)[1].max())
            if num_negatives > num_examples - largest:
                raise ValueError(
                    f"`num_negatives` = {num_negatives} exceeds the {num_examples - largest} "
                    "examples outside the largest class, so negatives cannot be drawn without "
                    "replacement; use fewer negatives.")
        other_class = labels[None, :] != labels[indices][:, None]  # [B, N]
        gumbel = jax.random.gumbel(key, (batch, num_examples), jnp.float32)
        _, negatives = jax.lax.top_k(jnp.where(other_class, gumbel, -jnp.inf), num_negatives)
    return jnp.concatenate(
        [indices.astype(jnp.int32)[:, None], negatives.astype(jnp.int32)], axis=1)


def _crd_log_scores(
    student_embedding: ArrayLike,
    teacher_embedding: ArrayLike,
    student_memory: ArrayLike,
    teacher_memory: ArrayLike,
    sample_idx: ArrayLike,
    temperature: float,
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Validated CRD scores ``<memory row, anchor> / T``, two ``[B, K + 1]`` arrays.

    Returns ``(student_scores, teacher_scores, valid, N)``: the student anchors scored
    against the teacher memory, the teacher anchors against the student memory, and
    whether each row's indices are in range.
    """
    s, t = _validated(
        student_embedding, teacher_embedding, ("student_embedding", "teacher_embedding"),
        match="shape", ndim=2)
    m_s, m_t = _validated(
        student_memory, teacher_memory, ("student_memory", "teacher_memory"),
        match="shape", ndim=2)
    if m_s.shape[1] != s.shape[1]:
        raise ValueError(
            f"`student_memory` rows must have the embedding size {s.shape[1]} of "
            f"`student_embedding`, got memory shape {m_s.shape}.")
    idx = _int_array("sample_idx", sample_idx, 2, "example indices")
    if idx.shape[0] != s.shape[0] or idx.shape[1] < 2:
        raise ValueError(
            f"`sample_idx` must have shape [B, K + 1] = [{s.shape[0]}, >= 2] (the positive "
            f"then K >= 1 negatives), got {idx.shape}; see `crd_sample_negatives`.")
    _check_positive("temperature", temperature)
    num_examples = m_s.shape[0]
    _check_index_range("sample_idx", idx, num_examples)
    dtype = jnp.promote_types(s.dtype, m_s.dtype)
    valid = jnp.all((idx >= 0) & (idx < num_examples), axis=1)
    safe = jnp.clip(idx, 0, num_examples - 1)
    # The memories are buffers, not parameters (RepDistiller detaches them).
    w_t = jax.lax.stop_gradient(m_t.astype(dtype))[safe]  # [B, K + 1, D]
    w_s = jax.lax.stop_gradient(m_s.astype(dtype))[safe]
    student_scores = jnp.einsum("bkd,bd->bk", w_t, s.astype(dtype)) / temperature
    teacher_scores = jnp.einsum("bkd,bd->bk", w_s, t.astype(dtype)) / temperature
    return student_scores, teacher_scores, valid, num_examples


def _crd_log_normalizer(scores: jax.Array, num_examples: int) -> jax.Array:
    """``log(N * mean(exp(scores)))``, a constant for differentiation."""
    log_mean = jax.nn.logsumexp(scores) - math.log(scores.size)
    return jax.lax.stop_gradient(math.log(num_examples) + log_mean)


def crd_normalizers(
    student_embedding: ArrayLike,
    teacher_embedding: ArrayLike,
    student_memory: ArrayLike,
    teacher_memory: ArrayLike,
    sample_idx: ArrayLike,
    *,
    temperature: float = 0.07,
) -> tuple[jax.Array, jax.Array]:
    r"""RepDistiller's estimate of the CRD partition functions from one batch.

    .. math::
      Z^s = N \cdot \mathrm{mean}_{b,k} \exp(\langle m^t_{j_{bk}}, f^s_b\rangle / T), \qquad
      Z^t = N \cdot \mathrm{mean}_{b,k} \exp(\langle m^s_{j_{bk}}, f^t_b\rangle / T)

    with :math:`j = ` `sample_idx` and the means over all :math:`B (K + 1)` entries.
    RepDistiller computes these once, on the first batch, and keeps them fixed; do the
    same by calling this at the first step and passing the result as ``normalizers`` to
    :func:`crd_nce_loss`. Arguments are those of :func:`crd_nce_loss`.

    Returns:
      ``(Z_s, Z_t)``, two scalars (no gradient flows through them).

    References:
      Tian et al., `Contrastive Representation Distillation
      <https://arxiv.org/abs/1910.10699>`_, ICLR 2020
    """
    scores_s, scores_t, _, n = _crd_log_scores(
        student_embedding, teacher_embedding, student_memory, teacher_memory, sample_idx,
        temperature)
    return (jnp.exp(_crd_log_normalizer(scores_s, n)),
            jnp.exp(_crd_log_normalizer(scores_t, n)))


def crd_nce_loss(
    student_embedding: ArrayLike,
    teacher_embedding: ArrayLike,
    student_memory: ArrayLike,
    teacher_memory: ArrayLike,
    sample_idx: ArrayLike,
    *,
    temperature: float = 0.07,
    normalizers: tuple[ArrayLike, ArrayLike] | None = None,
) -> jax.Array:
    r"""CRD's NCE loss, both directions, with memory-bank negatives.

    For the student anchor :math:`f^s_b` scored against the teacher memory :math:`m^t`
    at the indices :math:`j_{b0}` (the positive, the example itself) and
    :math:`j_{b1..bK}` (negatives):

    .. math::
      P_{bk} = \frac{\exp(\langle m^t_{j_{bk}}, f^s_b\rangle / T)}{Z^s}, \qquad
      c = \frac{K}{N} + 10^{-7}, \\
      \ell^s_b = -\log \frac{P_{b0}}{P_{b0} + c}
                 - \sum_{k=1}^{K} \log \frac{K / N}{P_{bk} + c}

    i.e. the NCE posterior that a sample came from the data rather than the uniform noise
    distribution :math:`P_n = 1/N` with :math:`K` noise samples per positive (the paper's
    eq. 18; :math:`10^{-7}` is RepDistiller's ``eps``). :math:`\ell^t_b` is the same
    with the teacher anchor :math:`f^t_b` against the student memory :math:`m^s`, and
    :math:`\ell_b = \ell^s_b + \ell^t_b`; its batch mean is RepDistiller's ``CRDLoss``.
    Computed in log space, so large scores do not overflow.

    *Normaliser.* RepDistiller sets :math:`Z = N \cdot \mathrm{mean}(\exp(\cdot / T))`
    from the first batch and then keeps it fixed. This pure function takes
    ``normalizers=(Z_s, Z_t)`` for that (see :func:`crd_normalizers`); with ``None``
    it estimates both from the current batch, which couples the examples (a non-finite
    input then makes every output NaN). Either way :math:`Z` is a constant for
    differentiation, as in RepDistiller.

    The memories are buffers (update them with :func:`crd_memory_update` after the
    loss); no gradient flows into them. Gradients flow into both embeddings, as both
    embedding heads are trained in CRD. The embeddings are used as given: CRD's heads
    L2-normalise them (RepDistiller's ``Embed``). Out-of-range indices in `sample_idx`
    raise if concrete and give NaN for their example if traced.

    Args:
      student_embedding: student embedding ``[B, D]`` (the projection head's output).
      teacher_embedding: teacher embedding ``[B, D]``.
      student_memory: memory of student embeddings ``[N, D]``, one row per training
        example.
      teacher_memory: memory of teacher embeddings ``[N, D]``.
      sample_idx: int ``[B, K + 1]``, column 0 the positive (see
        :func:`crd_sample_negatives`).
      temperature: :math:`T > 0`; 0.07 in the paper.
      normalizers: ``(Z_s, Z_t)`` scalars > 0, or ``None`` for the batch estimate.

    Returns:
      Per-example loss of shape ``[B]``.

    References:
      Tian et al., `Contrastive Representation Distillation
      <https://arxiv.org/abs/1910.10699>`_, ICLR 2020
    """
    if normalizers is not None:
        if len(normalizers) != 2:
            raise ValueError(
                f"`normalizers` must be a pair (Z_s, Z_t), got {len(normalizers)} values.")
        for i, z in enumerate(normalizers):
            _check_positive(f"normalizers[{i}]", z)
    scores_s, scores_t, valid, n = _crd_log_scores(
        student_embedding, teacher_embedding, student_memory, teacher_memory, sample_idx,
        temperature)
    if normalizers is None:
        log_z_s = _crd_log_normalizer(scores_s, n)
        log_z_t = _crd_log_normalizer(scores_t, n)
    else:
        log_z_s, log_z_t = (
            jax.lax.stop_gradient(jnp.log(jnp.asarray(z, scores_s.dtype)))
            for z in normalizers)
    k = scores_s.shape[1] - 1
    log_noise = math.log(k / n)  # log(K P_n)
    log_c = math.log(k / n + 1e-7)

    def nce(scores, log_z):
        log_p = scores - log_z
        log_d1 = log_p[:, 0] - jnp.logaddexp(log_p[:, 0], log_c)
        log_d0 = log_noise - jnp.logaddexp(log_p[:, 1:], log_c)
        return -(log_d1 + jnp.sum(log_d0, axis=1))

    loss = nce(scores_s, log_z_s) + nce(scores_t, log_z_t)
    return jnp.where(valid, loss, jnp.nan)


def crd_memory_update(
    memory: ArrayLike,
    embedding: ArrayLike,
    indices: ArrayLike,
    *,
    momentum: float = 0.5,
) -> jax.Array:
    r"""CRD memory update: momentum average of the batch rows, renormalised.

    .. math::
      m_{i_b} \leftarrow \frac{\mu\, m_{i_b} + (1 - \mu) f_b}
                              {\max(\|\mu\, m_{i_b} + (1 - \mu) f_b\|_2, 10^{-12})}

    for each example :math:`b` at training-set position :math:`i_b`; every other row is
    unchanged. As in RepDistiller's ``ContrastMemory``, each new row is computed from
    the *old* row. If an index appears more than once in the batch, the last occurrence
    wins (RepDistiller's ``index_copy_`` leaves this unspecified); occurrences are not
    accumulated. Out-of-range indices raise if concrete and are skipped if traced
    (:func:`crd_nce_loss` then returns NaN for them).

    Call it after the loss, once per memory: the student memory with the student
    embedding, the teacher memory with the teacher embedding.

    Args:
      memory: ``[N, D]`` memory (rows unit-norm, apart from the initial random ones).
      embedding: ``[B, D]`` embeddings of the batch.
      indices: int ``[B]`` positions of the batch's examples in the training set.
      momentum: :math:`\mu \in [0, 1]`, the weight of the old row; 0.5 in RepDistiller.

    Returns:
      The new memory, ``[N, D]``, in `memory`'s dtype (computed in float32 or wider).

    References:
      Tian et al., `Contrastive Representation Distillation
      <https://arxiv.org/abs/1910.10699>`_, ICLR 2020
    """
    out_dtype = jnp.asarray(memory).dtype
    m = _as_float("memory", memory)
    e = _as_float("embedding", embedding)
    if m.ndim != 2 or e.ndim != 2 or m.shape[1] != e.shape[1]:
        raise ValueError(
            f"`memory` must be [N, D] and `embedding` [B, D] with the same D, got shapes "
            f"{m.shape} and {e.shape}.")
    idx = _int_array("indices", indices, 1, "example indices")
    if idx.shape[0] != e.shape[0]:
        raise ValueError(
            f"`indices` must have one entry per row of `embedding`, shape ({e.shape[0]},), "
            f"got {idx.shape}.")
    _check_unit("momentum", momentum, "it is the weight of the old memory row.")
    n = m.shape[0]
    _check_index_range("indices", idx, n)
    dtype = jnp.promote_types(m.dtype, e.dtype)
    m, e = m.astype(dtype), e.astype(dtype)
    old = m[jnp.clip(idx, 0, n - 1)]
    rows = _l2_normalize(momentum * old + (1.0 - momentum) * e, axis=1)
    position = jnp.arange(idx.shape[0])
    repeated_later = (idx[:, None] == idx[None, :]) & (position[None, :] > position[:, None])
    keep = ~jnp.any(repeated_later, axis=1) & (idx >= 0) & (idx < n)
    # Row n does not exist: writes sent there are dropped, so each row is written once.
    target = jnp.where(keep, idx, n)
    return m.at[target].set(rows, mode="drop").astype(out_dtype)


@_nonfinite_propagates
def vid_loss(
    student_mean: ArrayLike,
    teacher_feature: ArrayLike,
    log_scale: ArrayLike,
    *,
    eps: float = 1e-5,
) -> jax.Array:
    r"""VID: Gaussian negative log-likelihood of the teacher feature.

    The student's regressor predicts the mean :math:`\mu`; the variance is one learned
    value per channel, :math:`\sigma^2_c = \mathrm{softplus}(\alpha_c) + \epsilon`:

    .. math::
      \ell_b = \frac{1}{D} \sum_{i} \frac{1}{2} \left(
          \frac{(\mu_{b,i} - t_{b,i})^2}{\sigma^2_{c(i)}} + \log \sigma^2_{c(i)} \right)

    where :math:`i` runs over all :math:`D` non-batch entries and :math:`c(i)` is the
    channel (last axis) of entry :math:`i`. As in RepDistiller's ``VIDLoss`` the
    constant :math:`\frac{1}{2}\log 2\pi` is dropped and the sum over entries is a mean;
    the batch mean of :math:`\ell` equals RepDistiller's loss. RepDistiller initialises
    :math:`\alpha_c = \log(e^{\sigma^2_0 - \epsilon} - 1)` so that
    :math:`\sigma^2_c = \sigma^2_0 = 5` at the start. Its spatial pooling of the larger
    map to the smaller one happens before the regressor, so at the call site.

    Args:
      student_mean: the regressor's output ``[B, ..., C]`` (NHWC maps or ``[B, C]``).
      teacher_feature: teacher feature of the same shape.
      log_scale: :math:`\alpha`, the unconstrained variance parameter, shape ``[C]``.
      eps: :math:`\epsilon > 0`, the variance floor.

    Returns:
      Per-example loss of shape ``[B]``.

    References:
      Ahn et al., `Variational Information Distillation for Knowledge Transfer
      <https://arxiv.org/abs/1904.05835>`_, CVPR 2019
    """
    mu, t = _validated(
        student_mean, teacher_feature, ("student_mean", "teacher_feature"),
        match="shape", min_ndim=2)
    alpha = _as_float("log_scale", log_scale)
    if alpha.shape != t.shape[-1:]:
        raise ValueError(
            f"`log_scale` must have shape [C] = {t.shape[-1:]} (one value per channel, the "
            f"last axis of `teacher_feature`), got {alpha.shape}.")
    _check_positive("eps", eps)
    dtype = jnp.promote_types(mu.dtype, alpha.dtype)
    var = jax.nn.softplus(alpha.astype(dtype)) + eps
    nll = 0.5 * (jnp.square(mu.astype(dtype) - t.astype(dtype)) / var + jnp.log(var))
    return jnp.mean(_flatten(nll), axis=-1)


@_nonfinite_propagates
def cc_loss(
    student_embedding: ArrayLike,
    teacher_embedding: ArrayLike,
    *,
    gamma: float = 0.4,
    order: int = 2,
) -> jax.Array:
    r"""Correlation congruence: match batch correlation matrices under an RBF kernel.

    Rows are L2-normalised, :math:`\hat x = x / \max(\|x\|, 10^{-12})`. For unit vectors
    the Gaussian RBF kernel is :math:`\exp(-\gamma \|\hat x_i - \hat x_j\|^2) =
    e^{-2\gamma} e^{2\gamma \langle \hat x_i, \hat x_j \rangle}`; the paper replaces the
    second factor by its Taylor series of order :math:`P`:

    .. math::
      C_{ij} = \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!}
               \langle \hat x_i, \hat x_j \rangle^p, \qquad
      \ell = \frac{1}{B^2} \|C^s - C^t\|_F^2

    The reduction, a mean over the :math:`B^2` entries, is the paper's :math:`1/n^2`;
    the loss relates examples, so it is a scalar. Defaults :math:`\gamma = 0.4`,
    :math:`P = 2` follow the widely used Knowledge-Distillation-Zoo implementation.
    RepDistiller's ``Correlation`` loss is a different, simpler variant (from the
    authors' code): :math:`\frac{1}{B-1} \sum_{b} \langle |f^s_b - f^t_b|,
    |f^s_{b+1} - f^t_{b+1}| \rangle` over consecutive examples, with no kernel; it is
    not this function.

    Args:
      student_embedding: student embedding ``[B, D_s]`` (extra axes are flattened).
      teacher_embedding: teacher embedding ``[B, D_t]``; sizes may differ.
      gamma: :math:`\gamma > 0`, the kernel's inverse width.
      order: :math:`P \ge 0`, the Taylor order (a Python integer).

    Returns:
      Scalar loss.

    References:
      Peng et al., `Correlation Congruence for Knowledge Distillation
      <https://arxiv.org/abs/1904.01802>`_, ICCV 2019
    """
    s, t = _validated(
        student_embedding, teacher_embedding, ("student_embedding", "teacher_embedding"),
        match="batch", min_ndim=2)
    _check_positive("gamma", gamma)
    order = _check_count("order", order, minimum=0)
    batch = s.shape[0]

    def correlation(x):
        x = _l2_normalize(_flatten(x), axis=1)
        sim = x @ x.T
        # Horner's rule over the truncated series of exp(2 gamma sim).
        out = jnp.zeros_like(sim)
        for p in range(order, -1, -1):
            out = out * sim + (2.0 * gamma) ** p / math.factorial(p)
        return jnp.exp(-2.0 * gamma) * out

    return jnp.sum(jnp.square(correlation(s) - correlation(t))) / batch**2


def _adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` averaging weights of PyTorch's adaptive average pooling:
    bin ``i`` covers ``[floor(i n / m), ceil((i + 1) n / m))`` (bins overlap if m does not
    divide n)."""
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def hcl_loss(
    student_features: list[ArrayLike] | tuple[ArrayLike, ...],
    teacher_features: list[ArrayLike] | tuple[ArrayLike, ...],
) -> jax.Array:
    r"""ReviewKD's hierarchical context loss, summed over pairs of feature maps.

    For one pair of NHWC maps of height :math:`H`, with :math:`\mathrm{pool}_l` adaptive
    average pooling to :math:`l \times l` (PyTorch's bins) and the levels
    :math:`l_1 > l_2 > \dots` those of 4, 2, 1 smaller than :math:`H`:

    .. math::
      \ell_b = \frac{\mathrm{mse}_b(f^s, f^t) + \sum_{k \ge 1} 2^{-k}\,
               \mathrm{mse}_b(\mathrm{pool}_{l_k} f^s, \mathrm{pool}_{l_k} f^t)}
               {1 + \sum_{k \ge 1} 2^{-k}}

    where :math:`\mathrm{mse}_b` is the mean squared difference over example :math:`b`'s
    entries; the result is the sum of :math:`\ell_b` over pairs. For an 8×8 map the
    weights are 1, 1/2, 1/4, 1/8 over sizes 8, 4, 2, 1; a 1×1 map has no pooled levels.
    Levels depend on :math:`H` only, as in mdistiller's ``hcl_loss`` (maps are square
    there); the batch mean equals mdistiller's loss. The attention-based fusion that
    produces the student maps is a separate module.

    Args:
      student_features: NHWC maps ``[B, H_i, W_i, C_i]``, one per stage, already fused
        and mapped to the teacher's shapes.
      teacher_features: teacher maps; pair ``i`` must have the student's shape.

    Returns:
      Per-example loss of shape ``[B]``.

    References:
      Chen et al., `Distilling Knowledge via Knowledge Review
      <https://arxiv.org/abs/2104.09044>`_, CVPR 2021
    """
    for name, maps in (("student_features", student_features),
                       ("teacher_features", teacher_features)):
        if not isinstance(maps, (list, tuple)) or not maps:
            raise ValueError(
                f"`{name}` must be a non-empty list of NHWC maps, got {type(maps).__name__}; "
                "wrap a single map as `[feature]`.")
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"`student_features` and `teacher_features` must have the same number of maps, "
            f"got {len(student_features)} and {len(teacher_features)}.")
    pairs = []
    for i, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        s, t = _validated(
            fs, ft, (f"student_features[{i}]", f"teacher_features[{i}]"),
            match="shape", ndim=4)
        if pairs and s.shape[0] != pairs[0][0].shape[0]:
            raise ValueError(
                f"`student_features[{i}]` must have the batch size {pairs[0][0].shape[0]} of "
                f"the first map, got shape {s.shape}.")
        pairs.append((s, t))
    total = None
    for s, t in pairs:
        diff = s - t  # pooling is linear: pool(s) - pool(t) == pool(s - t)
        height, width = s.shape[1:3]
        loss = jnp.mean(jnp.square(diff), axis=(1, 2, 3))
        weight, weight_sum = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= height:
                continue
            weight /= 2.0
            rows = jnp.asarray(_adaptive_pool_matrix(height, size), diff.dtype)
            cols = jnp.asarray(_adaptive_pool_matrix(width, size), diff.dtype)
            pooled = jnp.einsum("ih,jw,bhwc->bijc", rows, cols, diff)
            loss = loss + weight * jnp.mean(jnp.square(pooled), axis=(1, 2, 3))
            weight_sum += weight
        loss = loss / weight_sum
        total = loss if total is None else total + loss
    return total
