"""Contrastive representation distillation: negative sampling, normalisers, the NCE loss
and the memory update.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kd_jax.losses._checks import (
    _as_float,
    _check_count,
    _check_index_range,
    _check_positive,
    _check_unit,
    _concrete_array,
    _int_array,
    _l2_normalize,
    _validated,
)


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
