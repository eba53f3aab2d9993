"""Relational losses: similarity-preserving KD, RKD, PKT and correlation congruence.

They relate the examples of a batch to each other, so each returns a scalar.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kd_jax.losses._checks import (
    _check_count,
    _check_positive,
    _flatten,
    _l2_normalize,
    _nonfinite_propagates,
    _safe_norm,
    _smooth_l1,
    _validated,
)


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
