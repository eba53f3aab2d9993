"""Feature losses: FitNets hints, attention transfer, NST, VID and ReviewKD's HCL.

Each takes features ``[B, ...]`` (NHWC maps where stated) and returns shape ``[B]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kd_jax.losses._checks import (
    _as_float,
    _check_positive,
    _flatten,
    _l2_normalize,
    _nonfinite_propagates,
    _validated,
)


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


@_nonfinite_propagates
def simkd_loss(student_feature: ArrayLike, teacher_feature: ArrayLike) -> jax.Array:
    r"""SimKD's feature loss: mean squared error between the projected student feature and
    the teacher's final feature map.

    .. math::
      \ell_b = \frac{1}{D} \sum_i (P(f^s)_{b,i} - f^t_{b,i})^2

    over the :math:`D` non-batch entries, where :math:`P` is the projector (the authors' CIFAR
    setting: 1×1 conv to :math:`C_t / 2` channels, BN, ReLU, 3×3 conv, BN, ReLU, 1×1 conv to
    :math:`C_t`, BN, ReLU, with the larger map first average-pooled to the smaller one's
    size). The value is the FitNets hint loss; what makes SimKD is the rest of the method:
    this is the *only* loss (weight 1, no cross-entropy, no KD: ``-c 0 -d 0 -b 1`` in the
    authors' ``run_distill.sh``), and the deployed student predicts with the teacher's
    classifier applied to the pooled projected feature, so the projector and that classifier
    are part of the student as exported. The batch mean of :math:`\ell` is the authors'
    ``nn.MSELoss()``.

    Args:
      student_feature: the projector's output ``[B, ...]`` (NHWC maps).
      teacher_feature: the teacher's final feature map (after its ReLU), the same shape.

    Returns:
      Per-example loss of shape ``[B]``.

    References:
      Chen et al., `Knowledge Distillation with the Reused Teacher Classifier
      <https://arxiv.org/abs/2203.14001>`_, CVPR 2022
    """
    s, t = _validated(
        student_feature, teacher_feature, ("student_feature", "teacher_feature"),
        match="shape", min_ndim=2)
    diff = _flatten(s) - _flatten(t)
    return jnp.sum(jnp.square(diff), axis=-1) / diff.shape[-1]
