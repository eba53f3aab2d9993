"""Contrastive representation distillation: negative sampling, normalisers, the NCE loss
and the memory update.
"""

from __future__ import annotations

import functools
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


# A draw nobody made: the initial entry of the first-draw table.
_NEVER = np.iinfo(np.int32).max


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
      the examples of other classes, :math:`\{j : y_j \ne y_{\mathrm{indices}[b]}\}`, in
      uniformly random order (``np.random.choice(..., replace=False)``'s distribution).
      No row repeats a negative, and neither the positive nor any example of its class
      is a negative. RepDistiller falls back to sampling with replacement when
      :math:`K` exceeds that set; here this raises ``ValueError`` if `dataset_labels` is
      concrete (checked against the largest class); if it is traced, such a row holds
      all of its allowed examples and then draws from the whole training set.
    * ``dataset_labels=None`` — ``ContrastMemory``'s own sampler (used there when no
      contrast indices are passed): negatives uniform *with replacement* over all
      `num_examples` examples, so a negative may repeat or equal the positive.

    RepDistiller's ``mode='relax'`` (a random positive of the same class) is not
    provided. The rows depend on `key` only: the same key gives the same draws.

    The without-replacement sampler is exact and sorts nothing: each row draws i.i.d.
    uniform examples (Lemire's multiply-shift with its rejection step, so exactly
    uniform), rejects those of the anchor's class, and keeps each example's first draw,
    in draw order, until it has :math:`K` (a uniform sequence with repeats removed is a
    sample without replacement). It takes about :math:`N \ln(M / (M - K))` draws per row
    for :math:`M` allowed examples (20,100 for CIFAR-100's :math:`N` = 50,000, :math:`K`
    = 16,384), drawn in rounds until every row is full, and a first-draw table of
    :math:`B \times N` int32.

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

      Lemire, `Fast Random Integer Generation in an Interval
      <https://arxiv.org/abs/1805.10941>`_, ACM TOMACS 2019
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
        negatives = _class_exclusive_negatives(
            key, labels, labels[jnp.clip(indices, 0, num_examples - 1)], num_negatives)
    return jnp.concatenate(
        [indices.astype(jnp.int32)[:, None], negatives.astype(jnp.int32)], axis=1)


def _draws_for_distinct(n: int, k: int) -> int:
    """Uniform draws from ``[0, n)`` that give ``k`` distinct values, on average plus four
    standard deviations (the ``i``-th new value takes a geometric number of draws, success
    probability ``(n - i) / n``)."""
    p = (n - np.arange(k, dtype=np.float64)) / n
    mean, var = np.sum(1.0 / p), np.sum((1.0 - p) / p**2)
    return int(math.ceil(mean + 4.0 * math.sqrt(var))) + 16


def _mul_hi_u32(x: jax.Array, c: int) -> jax.Array:
    """``(x * c) >> 32`` for uint32 ``x`` and a constant ``0 <= c < 2**32``, exactly, without
    64-bit integers (JAX's default has none): the product of 16-bit halves."""
    x0, x1 = x & 0xFFFF, x >> 16
    c0, c1 = jnp.uint32(c & 0xFFFF), jnp.uint32(c >> 16)
    p00, p01, p10 = x0 * c0, x0 * c1, x1 * c0
    middle = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
    return x1 * c1 + (p01 >> 16) + (p10 >> 16) + (middle >> 16)


@functools.partial(jax.jit, static_argnums=3)  # one program, also when called eagerly
def _class_exclusive_negatives(key: jax.Array, labels: jax.Array, anchor_class: jax.Array,
                               k: int) -> jax.Array:
    """``[B, k]`` examples of other classes than ``anchor_class[b]``, uniform without
    replacement, in random order: first draws of i.i.d. uniform examples, in rounds."""
    n, batch = labels.shape[0], anchor_class.shape[0]
    first_round = _draws_for_distinct(n, k)
    later_rounds = max(64, first_round // 16)
    threshold = jnp.uint32((1 << 32) % n)  # Lemire: reject x * n mod 2**32 below 2**32 mod n
    allowed = jnp.sum(labels[None, :] != anchor_class[:, None], axis=1, dtype=jnp.int32)
    target = jnp.minimum(allowed, k)  # < k only for a traced set too small (see the caller)

    def draw(round_, offset, size, first_draw, out, count):
        bits = jax.random.bits(jax.random.fold_in(key, round_), (batch, size), jnp.uint32)
        values = _mul_hi_u32(bits, n).astype(jnp.int32)  # uniform on [0, n) where accepted
        accepted = (bits * jnp.uint32(n) >= threshold) & (labels[values] != anchor_class[:, None])
        if out is None:  # Slots left unfilled (a too small allowed set) keep these draws.
            out = values[:, :k]
        # A draw's number, counted over all rounds; an example's entry in `first_draw` is the
        # smallest number of an accepted draw of it, so a draw is new iff it holds that entry.
        number = jnp.where(accepted, offset + jnp.arange(size, dtype=jnp.int32), _NEVER)
        first_draw = _scatter_min_rows(first_draw, values, number)
        new = accepted & (jnp.take_along_axis(first_draw, values, axis=1) == number)
        slot = count[:, None] + jnp.cumsum(new, axis=1, dtype=jnp.int32) - 1
        slot = jnp.where(new & (slot < k), slot, k)  # slot k does not exist: dropped
        out = jax.vmap(lambda row, s, v: row.at[s].set(v, mode="drop"))(out, slot, values)
        count = jnp.minimum(count + jnp.sum(new, axis=1, dtype=jnp.int32), k)
        return first_draw, out, count

    first_draw = jnp.full((batch, n), _NEVER, jnp.int32)
    state = draw(0, 0, first_round, first_draw, None, jnp.zeros((batch,), jnp.int32))

    def more(carry):
        return jnp.any(carry[3] < target)

    def another_round(carry):
        round_, *state = carry
        offset = first_round + (round_ - 1) * later_rounds
        return (round_ + 1, *draw(round_, offset, later_rounds, *state))

    _, _, out, _ = jax.lax.while_loop(more, another_round, (jnp.int32(1), *state))
    return out


def _scatter_min_rows(table: jax.Array, columns: jax.Array, values: jax.Array) -> jax.Array:
    """``table[b, columns[b, i]] = min(table[b, columns[b, i]], values[b, i])``, per row."""
    return jax.vmap(lambda row, c, v: row.at[c].min(v))(table, columns, values)


# Scores by one dense product against the whole bank (B N D multiply-adds, and as many for the
# gradient) and a gather of the B (K + 1) sampled scalars, while the bank has at most this many
# rows per sampled index; beyond it (a bank far larger than the sample), gathering the sampled
# rows (B (K + 1) D floats) is cheaper. Measured by benchmarks/crd_scores.py.
_DENSE_MAX_ROWS_PER_SAMPLE = 16


def _crd_scores(anchor: jax.Array, memory: jax.Array, idx: jax.Array,
                replaced: tuple[jax.Array, jax.Array] | None = None,
                dense: bool | None = None) -> jax.Array:
    """``<memory[idx[b, k]], anchor[b]>``, ``[B, K + 1]``, for `idx` in range.

    ``replaced = (rows_at, rows)``: score as if ``memory[rows_at[p]]`` were ``rows[p]``
    (``rows_at`` out of range: ignored; repeated entries must carry equal rows). `dense`
    forces the dense product (True) or the gather of rows (False); ``None`` chooses by size.
    """
    n = memory.shape[0]
    if dense is None:
        dense = n <= _DENSE_MAX_ROWS_PER_SAMPLE * idx.shape[1]
    highest = jax.lax.Precision.HIGHEST  # float32 products on GPU/TPU too, as on CPU
    if replaced is not None:
        rows_at, rows = replaced
        rows_at = jnp.where((rows_at >= 0) & (rows_at < n), rows_at, n)  # n: dropped
        own = jnp.dot(anchor, rows.T, precision=highest)  # [B, P]
    if dense:
        scores = jnp.dot(anchor, memory.T, precision=highest)  # [B, N]
        if replaced is not None:
            scores = scores.at[:, rows_at].set(own, mode="drop")
        return jnp.take_along_axis(scores, idx, axis=1)
    scores = jnp.einsum("bkd,bd->bk", memory[idx], anchor, precision=highest)
    if replaced is not None:
        which = jnp.full((n,), -1, jnp.int32).at[rows_at].max(
            jnp.arange(rows_at.shape[0], dtype=jnp.int32), mode="drop")[idx]
        scores = jnp.where(which >= 0,
                           jnp.take_along_axis(own, jnp.maximum(which, 0), axis=1), scores)
    return scores


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
    w_t = jax.lax.stop_gradient(m_t.astype(dtype))
    w_s = jax.lax.stop_gradient(m_s.astype(dtype))
    student_scores = _crd_scores(s.astype(dtype), w_t, safe) / temperature
    teacher_scores = _crd_scores(t.astype(dtype), w_s, safe) / temperature
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
    loss = _crd_nce(scores_s, log_z_s, n) + _crd_nce(scores_t, log_z_t, n)
    return jnp.where(valid, loss, jnp.nan)


def _crd_nce(scores: jax.Array, log_z: jax.Array, num_examples: int) -> jax.Array:
    """One direction's per-example NCE loss from its ``[B, K + 1]`` scores (column 0 the
    positive) and ``log Z``."""
    k = scores.shape[1] - 1
    log_noise = math.log(k / num_examples)  # log(K P_n)
    log_c = math.log(k / num_examples + 1e-7)
    log_p = scores - log_z
    log_d1 = log_p[:, 0] - jnp.logaddexp(log_p[:, 0], log_c)
    log_d0 = log_noise - jnp.logaddexp(log_p[:, 1:], log_c)
    return -(log_d1 + jnp.sum(log_d0, axis=1))


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
    _check_index_range("indices", idx, m.shape[0])
    return _crd_memory_update(m, e, idx, momentum)[0].astype(out_dtype)


def _crd_memory_update(memory: jax.Array, embedding: jax.Array, idx: jax.Array,
                       momentum: float) -> tuple[jax.Array, jax.Array]:
    """The updated memory (in the compute dtype) and the batch's old rows ``[B, D]``."""
    n = memory.shape[0]
    dtype = jnp.promote_types(memory.dtype, embedding.dtype)
    m, e = memory.astype(dtype), embedding.astype(dtype)
    old = m[jnp.clip(idx, 0, n - 1)]
    rows = _l2_normalize(momentum * old + (1.0 - momentum) * e, axis=1)
    position = jnp.arange(idx.shape[0])
    repeated_later = (idx[:, None] == idx[None, :]) & (position[None, :] > position[:, None])
    keep = ~jnp.any(repeated_later, axis=1) & (idx >= 0) & (idx < n)
    # Row n does not exist: writes sent there are dropped, so each row is written once.
    target = jnp.where(keep, idx, n)
    return m.at[target].set(rows, mode="drop"), old


def _crd_step(
    student_embedding: jax.Array,
    teacher_embedding: jax.Array,
    student_memory: jax.Array,
    teacher_memory: jax.Array,
    sample_idx: jax.Array,
    indices: jax.Array,
    normalizers: jax.Array,
    *,
    temperature: float,
    momentum: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """CRD's training step on one batch, as RepDistiller runs it: the loss against the old
    memories (with ``normalizers`` ``[2]``, or, where an entry is 0, its batch estimate from
    :func:`crd_normalizers`), then :func:`crd_memory_update` of both memories.

    Returns ``(loss [B], normalizers [2], student_memory, teacher_memory)``, the same
    numbers as those public functions give. Computed in the other order: the memories are
    updated first and the loss scores the batch's own rows from their old values. Reading
    the memories only after their update lets XLA update them in place; read before it,
    they are copied (twice each on XLA:CPU when the state is donated, 4 x 25.6 MB a step
    for CIFAR's).
    """
    n = student_memory.shape[0]
    dtype = jnp.promote_types(student_embedding.dtype, student_memory.dtype)
    s, t = student_embedding.astype(dtype), teacher_embedding.astype(dtype)
    new_s, old_s = _crd_memory_update(student_memory, jax.lax.stop_gradient(s), indices,
                                      momentum)
    new_t, old_t = _crd_memory_update(teacher_memory, jax.lax.stop_gradient(t), indices,
                                      momentum)
    valid = jnp.all((sample_idx >= 0) & (sample_idx < n), axis=1)
    safe = jnp.clip(sample_idx, 0, n - 1)
    sg = jax.lax.stop_gradient
    scores_s = _crd_scores(s, sg(new_t), safe, (indices, sg(old_t))) / temperature
    scores_t = _crd_scores(t, sg(new_s), safe, (indices, sg(old_s))) / temperature
    estimate = jnp.stack([_crd_log_normalizer(scores_s, n), _crd_log_normalizer(scores_t, n)])
    z = jnp.where(normalizers > 0, normalizers, jnp.exp(estimate).astype(normalizers.dtype))
    log_z = jax.lax.stop_gradient(jnp.log(z.astype(dtype)))
    loss = _crd_nce(scores_s, log_z[0], n) + _crd_nce(scores_t, log_z[1], n)
    return (jnp.where(valid, loss, jnp.nan), sg(z), new_s.astype(student_memory.dtype),
            new_t.astype(teacher_memory.dtype))
