"""Losses on products and factorisations of feature maps: FSP matrices between layers,
KDSVD's singular vectors, and factor transfer.

FSP and KDSVD take lists of NHWC maps (one per stage) and relate consecutive ones; factor
transfer takes one pair of factors. Each returns shape ``[B]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kd_jax.losses._checks import (
    _check_count,
    _check_positive,
    _concrete_scalar,
    _flatten,
    _l2_normalize,
    _nonfinite_propagates,
    _validated,
)
from kd_jax.losses._feature import _adaptive_pool_matrix


def _validated_maps(student_features, teacher_features, *, minimum: int):
    """The pairs of a student/teacher list of NHWC maps: one batch size, each pair's channels
    equal (spatial sizes may differ)."""
    for name, maps in (("student_features", student_features),
                       ("teacher_features", teacher_features)):
        if not isinstance(maps, (list, tuple)) or len(maps) < minimum:
            raise ValueError(
                f"`{name}` must be a list of at least {minimum} NHWC maps (one per stage, "
                f"shallow to deep), got {type(maps).__name__}"
                + (f" of length {len(maps)}" if isinstance(maps, (list, tuple)) else "") + ".")
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"`student_features` and `teacher_features` must have the same number of maps, "
            f"got {len(student_features)} and {len(teacher_features)}.")
    pairs = []
    for i, (fs, ft) in enumerate(zip(student_features, teacher_features)):
        names = (f"student_features[{i}]", f"teacher_features[{i}]")
        s, t = _validated(fs, ft, names, match="batch", ndim=4)
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"`{names[0]}` and `{names[1]}` must have the same number of channels (the "
                f"last axis), got shapes {s.shape} and {t.shape}; distil stages whose widths "
                "agree (or map the student's to the teacher's first).")
        if pairs and s.shape[0] != pairs[0][0].shape[0]:
            raise ValueError(
                f"`student_features[{i}]` must have the batch size {pairs[0][0].shape[0]} of "
                f"the first map, got shape {s.shape}.")
        pairs.append((s, t))
    return pairs


def _nan_where_not_finite(out: jax.Array, pairs) -> jax.Array:
    """NaN for each example with a non-finite entry in any of its maps (the promise of
    ``_nonfinite_propagates``, for losses that take lists)."""
    bad = jnp.zeros(out.shape, bool)
    for s, t in pairs:
        for x in (s, t):
            bad = bad | ~jnp.all(jnp.isfinite(x), axis=(1, 2, 3))
    return jnp.where(bad, jnp.nan, out)


def _pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Adaptive average pooling of an NHWC map to ``size`` (PyTorch's bins)."""
    if x.shape[1:3] == tuple(size):
        return x
    rows = jnp.asarray(_adaptive_pool_matrix(x.shape[1], size[0]), x.dtype)
    cols = jnp.asarray(_adaptive_pool_matrix(x.shape[2], size[1]), x.dtype)
    return jnp.einsum("ih,jw,bhwc->bijc", rows, cols, x)


def _fsp_matrix(bottom: jax.Array, top: jax.Array) -> jax.Array:
    """``G[b, j, i] = mean_hw top[b, h, w, j] * bottom[b, h, w, i]``, the larger map pooled
    to the smaller one's size first."""
    size = min(bottom.shape[1:3], top.shape[1:3])
    bottom, top = _pool(bottom, size), _pool(top, size)
    return jnp.einsum("bhwj,bhwi->bji", top, bottom) / (size[0] * size[1])


def fsp_loss(
    student_features: list[ArrayLike] | tuple[ArrayLike, ...],
    teacher_features: list[ArrayLike] | tuple[ArrayLike, ...],
) -> jax.Array:
    r"""FSP: match the "flow of solution procedure" matrices between consecutive layers.

    For consecutive NHWC maps :math:`F^{(l)}` (``[B, H, W, C_l]``) and :math:`F^{(l+1)}`,
    the larger one is average-pooled to the smaller one's size :math:`h \times w` (PyTorch's
    adaptive bins), and

    .. math::
      G^{(l)}_{b,ji} = \frac{1}{hw} \sum_{h,w} F^{(l+1)}_{b,hwj} F^{(l)}_{b,hwi}, \qquad
      \ell_b = \sum_l \frac{1}{C_{l+1} C_l} \sum_{j,i}
               \left(G^{s,(l)}_{b,ji} - G^{t,(l)}_{b,ji}\right)^2

    The batch mean of :math:`\ell` is RepDistiller's ``FSP`` summed over its pairs. Student
    and teacher maps must have equal channels, stage by stage (the FSP matrices are compared);
    their spatial sizes may differ. RepDistiller's CIFAR-100 use, on the stem
    and stage maps after their ReLU: a first stage of ``init_epochs`` = 30 epochs training the
    student's feature layers on this loss alone (weight 1), then the cross-entropy alone.

    Args:
      student_features: NHWC maps ``[B, H_l, W_l, C_l]``, shallow to deep (at least 2).
      teacher_features: the teacher's maps; map ``l`` must have the student's channels.

    Returns:
      Per-example loss of shape ``[B]``.

    References:
      Yim et al., `A Gift from Knowledge Distillation: Fast Optimization, Network
      Minimization and Transfer Learning
      <https://openaccess.thecvf.com/content_cvpr_2017/html/Yim_A_Gift_From_CVPR_2017_paper.html>`_,
      CVPR 2017
    """
    pairs = _validated_maps(student_features, teacher_features, minimum=2)
    total = 0.0
    for (s0, t0), (s1, t1) in zip(pairs[:-1], pairs[1:]):
        diff = _fsp_matrix(s0, s1) - _fsp_matrix(t0, t1)
        total = total + jnp.mean(jnp.square(diff), axis=(1, 2))
    return _nan_where_not_finite(total, pairs)


def _eigh_each(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh`` of each ``[C, C]`` matrix of ``gram`` ``[N, C, C]``, one at a time.

    jaxlib's CPU eigh of a batch (LAPACK, 0.10.2) splits the batch over XLA's thread pool and
    blocks a pool thread while it waits for the parts; on a CPU running several devices'
    programs at once (``--xla_force_host_platform_device_count``) every thread could end up
    waiting and the step never finished. One matrix per call has nothing to wait for, and
    costs about the same (KDSVD's value and gradient, 3 stages, batch 64, 2-core CPU: 123-126
    ms against 114-132 ms batched).
    """
    return jax.lax.map(jnp.linalg.eigh, gram)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _top_eigh(gram: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The ``n`` largest eigenvalues ``[N, n]`` and their unit eigenvectors ``[N, C, n]``
    of symmetric ``gram`` ``[N, C, C]``, largest first."""
    w, v = _eigh_each(gram)
    return w[..., ::-1][..., :n], v[..., :, ::-1][..., :, :n]


@_top_eigh.defjvp
def _top_eigh_jvp(n, primals, tangents):
    # First-order perturbation of the n leading eigenpairs only. The whole basis enters the
    # sum, but only through gaps w_i - w_j with i among the leading n: repeated eigenvalues
    # elsewhere (a rank-deficient map's zeros) leave the derivative finite, where the full
    # eigh/svd derivatives divide by every pair's gap.
    (gram,), (dgram,) = primals, tangents
    w_all, v_all = _eigh_each(gram)
    w_all, v_all = w_all[..., ::-1], v_all[..., :, ::-1]
    w, v = w_all[..., :n], v_all[..., :, :n]
    coupling = jnp.swapaxes(v_all, -1, -2) @ dgram @ v  # [..., C, n]: v_j^T dM v_i
    gap = w[..., None, :] - w_all[..., :, None]  # [..., C, n]: w_i - w_j
    inverse = jnp.where(gap == 0, 0.0, 1.0 / jnp.where(gap == 0, 1.0, gap))
    dv = v_all @ (inverse * coupling)
    dw = jnp.diagonal(coupling[..., :n, :], axis1=-2, axis2=-1)
    return (w, v), (dw, dv)


def _gram(x: jax.Array) -> tuple[jax.Array, int]:
    """Each example's map as the ``[HW, C]`` matrix :math:`X`: :math:`X^\\top X`
    ``[B, C, C]`` and the rank bound ``min(HW, C)``."""
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    # Full float32 products: the singular vectors inherit the Gram matrix's rounding.
    gram = jnp.einsum("bkc,bkd->bcd", rows, rows, precision=jax.lax.Precision.HIGHEST)
    return gram, min(rows.shape[1:])


def _singular_values(w: jax.Array) -> jax.Array:
    w = jnp.maximum(w, 0.0)
    return jnp.where(w > 0, jnp.sqrt(jnp.where(w > 0, w, 1.0)), 0.0)


def kdsvd_loss(
    student_features: list[ArrayLike] | tuple[ArrayLike, ...],
    teacher_features: list[ArrayLike] | tuple[ArrayLike, ...],
    *,
    k: int = 1,
) -> jax.Array:
    r"""KDSVD: match the RBF affinities between consecutive layers' leading singular vectors.

    Each example's NHWC map is the ``[HW, C]`` matrix :math:`X`. The teacher keeps its
    :math:`k` leading right singular vectors :math:`v^t_j \in \mathbb{R}^{C}` and singular
    values, normalised to :math:`\hat\sigma = \sigma_{1..k} / \|\sigma_{1..k}\|`; the student
    keeps :math:`k + 3` and, for each teacher vector :math:`j`, uses the one with the largest
    :math:`|\cos|` to it, its sign flipped to a positive cosine (RepDistiller's
    ``align_rsv``), :math:`v^s_j`. Both are scaled by the *teacher's* :math:`\hat\sigma_j`.
    For consecutive layers :math:`l-1, l` and :math:`r(a, b) = \exp(-(a - b)^2 / 8)`:

    .. math::
      \ell_b = \sum_{l \ge 1} \sum_{c, c', j}
               \left(r(\hat\sigma_j v^{s,(l)}_{cj}, \hat\sigma_j v^{s,(l-1)}_{c'j})
                   - r(\hat\sigma_j v^{t,(l)}_{cj}, \hat\sigma_j v^{t,(l-1)}_{c'j})\right)^2

    (:math:`\hat\sigma` of the layer each vector comes from). A singular vector's sign is
    arbitrary, and the loss depends on the *relative* sign of consecutive layers' vectors
    (the RBF compares their signed entries); the paper and RepDistiller leave it to the SVD
    routine. Here each teacher vector is oriented to a non-negative entry sum, so the loss is
    a function of the maps alone (negating a map leaves it unchanged). RepDistiller's value
    depends on the signs ``torch.svd`` returns, which vary with the layer and the example
    (for post-ReLU maps it returned leading vectors of negative sum for some layers, and a
    value 8x this one); with its SVD's teacher vectors oriented the same way, RepDistiller's
    ``KDSVD`` equals this loss's batch mean to 2e-16 in value and gradient (float64, measured
    on post-ReLU maps). Its batch mean is RepDistiller's
    ``KDSVD`` summed over pairs (mdistiller's ``kdsvd_loss`` reshapes NCHW maps to ``[C·H, W]``
    matrices instead, a layout slip; this follows RepDistiller and the paper, rows are
    positions). The singular pairs come from :math:`X^\top X` with a derivative that only
    involves the leading pairs' gaps, so rank-deficient maps (dead channels) keep a finite
    gradient; it is large where a leading singular value is nearly repeated, as for any SVD
    loss. RepDistiller zeroes non-finite entries of the loss; here finite inputs give a
    finite loss and a non-finite input gives NaN for its example. Student and teacher maps
    must have equal channels, stage by stage (the cosines compare them); their spatial sizes
    may differ. CIFAR-100 setting (mdistiller ``cfg.KDSVD``): :math:`k = 1`, weight 1 beside the
    cross-entropy (weight 1), on the stage maps after their ReLU.

    Args:
      student_features: NHWC maps ``[B, H_l, W_l, C_l]``, shallow to deep (at least 2).
      teacher_features: the teacher's maps; map ``l`` must have the student's channels.
      k: the number :math:`k \ge 1` of teacher singular vectors (a Python integer).

    Returns:
      Per-example loss of shape ``[B]``.

    References:
      Lee et al., `Self-supervised Knowledge Distillation Using Singular Value Decomposition
      <https://arxiv.org/abs/1807.06819>`_, ECCV 2018
    """
    k = _check_count("k", k)
    pairs = _validated_maps(student_features, teacher_features, minimum=2)
    total, previous = 0.0, None
    for s, t in pairs:
        (gram_t, rank_t), (gram_s, rank_s) = _gram(t), _gram(s)
        # At most min(HW, C) pairs, as a thin SVD has: beyond the rank they are arbitrary.
        n_t, n_s = min(k, rank_t), min(k + 3, rank_s)
        # The teacher's and the student's matrices of a stage in one eigh loop.
        gram = jnp.concatenate([gram_t, gram_s])
        w, v = _top_eigh(gram, max(n_t, n_s))
        b = t.shape[0]
        sigma_t, v_t = _singular_values(w[:b, :n_t]), v[:b, :, :n_t]
        v_s = v[b:, :, :n_s]
        # A canonical sign: each teacher vector with a non-negative entry sum (see above).
        v_t = v_t * jax.lax.stop_gradient(
            jnp.where(jnp.sum(v_t, axis=1, keepdims=True) < 0, -1.0, 1.0))
        cosine = jnp.einsum("bci,bcj->bij", v_s, v_t)  # [B, k + 3, k]
        best = jnp.max(jnp.abs(cosine), axis=1, keepdims=True)
        # Which student vector and which sign: a selection, no gradient (as in torch).
        pick = jax.lax.stop_gradient(jnp.where(jnp.abs(cosine) == best, jnp.sign(cosine), 0.0))
        v_s = jnp.einsum("bci,bij->bcj", v_s, pick)
        scale = _l2_normalize(sigma_t, axis=-1)[:, None, :]  # [B, 1, k]
        current = (v_s * scale, v_t * scale)
        if previous is not None:
            def rbf(a, b):  # [B, C_l, k], [B, C_{l-1}, k] -> [B, C_l, C_{l-1}, k]
                return jnp.exp(-jnp.square(a[:, :, None, :] - b[:, None, :, :]) / 8.0)

            diff = rbf(current[0], previous[0]) - rbf(current[1], previous[1])
            total = total + jnp.sum(jnp.square(diff), axis=(1, 2, 3))
        previous = current
    return _nan_where_not_finite(total, pairs)


@_nonfinite_propagates
def factor_transfer_loss(
    student_factor: ArrayLike,
    teacher_factor: ArrayLike,
    *,
    p: float = 1.0,
    channel_power: float | None = None,
) -> jax.Array:
    r"""Factor transfer: the :math:`L_p` distance between L2-normalised factors.

    The teacher's factor is its paraphraser's encoding of a teacher map, the student's its
    translator's encoding of a student map. With :math:`a = \mathrm{vec}(F) / \max(\|
    \mathrm{vec}(F)\|_2, 10^{-12})` over all :math:`D` non-batch entries:

    .. math::
      \ell_b = \frac{1}{D} \sum_i |a^s_{b,i} - a^t_{b,i}|^p

    For :math:`p = 1` this is the paper's :math:`\|a^s - a^t\|_1` divided by :math:`D`, the
    authors' ``F.l1_loss``. ``channel_power=q`` gives RepDistiller's ``FactorTransfer``
    variant instead (its CIFAR-100 benchmark uses :math:`q = 2`): each factor is first
    reduced to the spatial map :math:`\frac{1}{C} \sum_c |F_{hwc}|^q` (an attention map, as
    :func:`attention_transfer_loss`) and :math:`D = HW`; factors may then differ in channels.
    RepDistiller raises :math:`F` itself to the power :math:`q` (``f.pow(p1)``): the same for
    an even :math:`q` such as its 2, signed for an odd one, and NaN for a fractional one on
    negative entries; the absolute value here makes every :math:`q > 0` a magnitude.
    RepDistiller's CIFAR-100 setting: the paraphraser (factor rate 0.5) is trained for
    ``init_epochs`` = 30 epochs to reconstruct the teacher's last stage map (MSE, lr 0.01 for
    the ResNets and WRNs), then frozen; the student trains with the cross-entropy
    (weight 1) plus 200 × this loss through its translator.

    Args:
      student_factor: the translator's output ``[B, ...]`` (NHWC maps for ``channel_power``).
      teacher_factor: the paraphraser's encoding, the same shape (the same batch and spatial
        size with ``channel_power``).
      p: :math:`p \ge 1` (below 1 the gradient at equal entries is infinite).
      channel_power: ``None`` (the paper), or :math:`q > 0` for RepDistiller's variant.

    Returns:
      Per-example loss of shape ``[B]``.

    References:
      Kim et al., `Paraphrasing Complex Network: Network Compression via Factor Transfer
      <https://arxiv.org/abs/1802.04977>`_, NeurIPS 2018
    """
    v = _concrete_scalar("p", p)
    if v is not None and not (math.isfinite(v) and v >= 1):
        raise ValueError(f"`p` must be a finite number >= 1, got {v}; the paper uses 1 (or 2).")
    if channel_power is None:
        s, t = _validated(student_factor, teacher_factor, ("student_factor", "teacher_factor"),
                          match="shape", min_ndim=2)
        a_s, a_t = _flatten(s), _flatten(t)
    else:
        _check_positive("channel_power", channel_power)
        s, t = _validated(student_factor, teacher_factor, ("student_factor", "teacher_factor"),
                          match="batch", ndim=4)
        if s.shape[1:3] != t.shape[1:3]:
            raise ValueError(
                "`student_factor` and `teacher_factor` must have the same spatial size (axes "
                f"1, 2 of NHWC), got {s.shape} and {t.shape}; pool one to the other's H x W.")
        a_s = _flatten(jnp.mean(jnp.abs(s) ** channel_power, axis=-1))
        a_t = _flatten(jnp.mean(jnp.abs(t) ** channel_power, axis=-1))
    diff = jnp.abs(_l2_normalize(a_s, axis=-1) - _l2_normalize(a_t, axis=-1))
    return jnp.mean(diff**p, axis=-1)
