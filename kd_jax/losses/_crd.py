"""Contrastive representation distillation: the scores, normalisers, NCE loss and memory
update (the negative sampling is in ``_crd_sampler``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kd_jax.losses._checks import (
    _as_float,
    _check_index_range,
    _check_positive,
    _check_unit,
    _concrete_scalar,
    _int_array,
    _l2_normalize,
    _validated,
)


def _crd_inputs(
    student_embedding: ArrayLike,
    teacher_embedding: ArrayLike,
    student_memory: ArrayLike,
    teacher_memory: ArrayLike,
    sample_idx: ArrayLike,
    temperature: float,
    method: str,
) -> tuple:
    """Validated CRD inputs: ``(s, t, m_s, m_t, safe_idx, valid, dense)``.

    The arrays in their common float dtype, the memories without gradient (RepDistiller
    detaches them), the indices clipped into range, whether each row's indices were in
    range, and whether to score by the dense product.
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
    dense = _scores_by_matmul(method, num_examples, idx.shape[1])
    dtype = jnp.promote_types(s.dtype, m_s.dtype)
    valid = jnp.all((idx >= 0) & (idx < num_examples), axis=1)
    safe = jnp.clip(idx, 0, num_examples - 1)
    m_s, m_t = (jax.lax.stop_gradient(m.astype(dtype)) for m in (m_s, m_t))
    return s.astype(dtype), t.astype(dtype), m_s, m_t, safe, valid, dense


def _scores(anchor, memory, safe, temperature, dense):
    """``<memory[safe[b, k]], anchor[b]> / T``, ``[B, K + 1]``."""
    if dense:  # every row's score, then B (K + 1) of them: no [B, K + 1, D] gather
        every = jnp.matmul(anchor, memory.T, precision=_HIGHEST)  # [B, N]
        return jnp.take_along_axis(every, safe, axis=1) / temperature
    return jnp.einsum("bkd,bd->bk", memory[safe], anchor, precision=_HIGHEST) / temperature


# Both paths at full float32 precision: a TF32 or bfloat16 dot would move a score / 0.07 by
# about 1e-2.
_HIGHEST = jax.lax.Precision.HIGHEST

# The dense product scores all N memory rows per anchor, the gather only K + 1 of them but
# reads B (K + 1) scattered rows of D floats. benchmarks/crd_scores.py (2-core x86 CPU, B = 64,
# D = 128, K = 16384, loss and gradients): dense 66 ms against gather 517 ms at N = 50,000
# (N / (K + 1) = 3.1), 250 against 1,108 at 200,000 (12.2), 871 against 561 at 800,000 (48.8).
# "auto" switches between the last two, at N = 24 (K + 1); the crossing was not bisected.
_DENSE_MAX_RATIO = 24


def _scores_by_matmul(method: str, num_examples: int, row: int) -> bool:
    """Whether to score by the dense product (a static choice on the shapes)."""
    if method not in ("auto", "dense", "gather"):
        raise ValueError(f"`method` must be 'auto', 'dense' or 'gather', got {method!r}.")
    if method == "auto":
        return num_examples <= _DENSE_MAX_RATIO * row
    return method == "dense"


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
    method: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    r"""RepDistiller's estimate of the CRD partition functions from one batch.

    .. math::
      Z^s = N \cdot \mathrm{mean}_{b,k} \exp(\langle m^t_{j_{bk}}, f^s_b\rangle / T), \qquad
      Z^t = N \cdot \mathrm{mean}_{b,k} \exp(\langle m^s_{j_{bk}}, f^t_b\rangle / T)

    with :math:`j = ` `sample_idx` and the means over all :math:`B (K + 1)` entries.
    RepDistiller computes these once, on the first batch, and keeps them fixed; do the
    same by calling this at the first step and passing the result as ``normalizers`` to
    :func:`crd_nce_loss`, or in one call with :func:`crd_nce_loss_and_normalizers` (which
    takes the estimate from the loss's own scores). Arguments (``method`` included) are those
    of :func:`crd_nce_loss`.

    Returns:
      ``(Z_s, Z_t)``, two scalars (no gradient flows through them).

    References:
      Tian et al., `Contrastive Representation Distillation
      <https://arxiv.org/abs/1910.10699>`_, ICLR 2020
    """
    s, t, m_s, m_t, safe, _, dense = _crd_inputs(
        student_embedding, teacher_embedding, student_memory, teacher_memory, sample_idx,
        temperature, method)
    n = m_s.shape[0]
    return (jnp.exp(_crd_log_normalizer(_scores(s, m_t, safe, temperature, dense), n)),
            jnp.exp(_crd_log_normalizer(_scores(t, m_s, safe, temperature, dense), n)))


def crd_nce_loss(
    student_embedding: ArrayLike,
    teacher_embedding: ArrayLike,
    student_memory: ArrayLike,
    teacher_memory: ArrayLike,
    sample_idx: ArrayLike,
    *,
    temperature: float = 0.07,
    normalizers: tuple[ArrayLike, ArrayLike] | None = None,
    method: str = "auto",
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
      method: how the scores are computed, the same values either way: ``"dense"``, one
        product ``[B, D] x [D, N]`` per memory and a gather of the :math:`B (K + 1)`
        scores; ``"gather"``, the :math:`B (K + 1)` memory rows gathered; ``"auto"``,
        dense when :math:`N \le 24 (K + 1)` (measured on CPU: dense wins by 8x at CIFAR's
        :math:`N` = 50,000, gather at ImageNet-like :math:`N`; ``benchmarks/crd_scores.py``).

    Gradients are reverse-mode only (``jax.grad``/``jax.vjp``; not ``jax.jvp``): each
    example's gradient rows are computed with the loss, so the backward pass reads no memory.

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
    loss, _ = _crd_nce(student_embedding, teacher_embedding, student_memory, teacher_memory,
                       sample_idx, temperature, normalizers, method, "batch" if normalizers
                       is None else "given")
    return loss


def crd_nce_loss_and_normalizers(
    student_embedding: ArrayLike,
    teacher_embedding: ArrayLike,
    student_memory: ArrayLike,
    teacher_memory: ArrayLike,
    sample_idx: ArrayLike,
    *,
    normalizers: tuple[ArrayLike, ArrayLike] = (0.0, 0.0),
    temperature: float = 0.07,
    method: str = "auto",
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    r""":func:`crd_nce_loss` with RepDistiller's fixed normalisers, set at the first call.

    A normaliser that is 0 (not yet set) is replaced by this batch's estimate
    (:func:`crd_normalizers`); one > 0 is used as given. Returns the per-example loss
    ``[B]`` and the normalisers used, ``(Z_s, Z_t)``, to pass back at the next step: one
    call does what ``crd_normalizers`` at the first step and ``crd_nce_loss`` at every step
    do, scoring the memories once (the estimate comes from the loss's own scores).

    The loss is :func:`crd_nce_loss`'s formula (per example, shape ``[B]``) with
    :math:`Z = N \cdot \mathrm{mean}_{b,k} \exp(\cdot / T)` wherever the given :math:`Z`
    is 0. Arguments are those of :func:`crd_nce_loss`, `normalizers` ``(0, 0)`` by default
    (the first step). Nothing flows back through the normalisers.

    References:
      Tian et al., `Contrastive Representation Distillation
      <https://arxiv.org/abs/1910.10699>`_, ICLR 2020
    """
    if len(normalizers) != 2:
        raise ValueError(
            f"`normalizers` must be a pair (Z_s, Z_t), got {len(normalizers)} values.")
    for i, z in enumerate(normalizers):
        v = _concrete_scalar(f"normalizers[{i}]", z)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"`normalizers[{i}]` must be a finite number >= 0 (0: estimate "
                             f"it from this batch), got {v}.")
    loss, log_z = _crd_nce(student_embedding, teacher_embedding, student_memory,
                           teacher_memory, sample_idx, temperature, normalizers, method,
                           "first")
    z = jax.lax.stop_gradient(jnp.exp(log_z))
    return loss, (z[0], z[1])


def _crd_nce(student_embedding, teacher_embedding, student_memory, teacher_memory,
             sample_idx, temperature, normalizers, method, mode):
    """``(per-example loss, log normalisers used)``; `mode` is "given", "batch" or "first"."""
    s, t, m_s, m_t, safe, valid, dense = _crd_inputs(
        student_embedding, teacher_embedding, student_memory, teacher_memory, sample_idx,
        temperature, method)
    if mode == "batch":
        log_z = jnp.zeros(2, s.dtype)
    else:  # log 0 = -inf marks a normaliser still to be estimated ("first")
        log_z = jnp.stack([jnp.log(jnp.asarray(z, s.dtype)) for z in normalizers])
    loss, log_z = _nce_with_gradients(dense, mode)(
        s, t, m_s, m_t, safe, log_z, jnp.asarray(temperature, s.dtype))
    return jnp.where(valid, loss, jnp.nan), log_z


def _nce_forward(s, t, m_s, m_t, safe, log_z, temperature, *, dense, mode):
    """Per-example loss, the log normalisers used, and the loss's gradients in ``s``, ``t``
    (``[B, D]``) and ``T`` (``[B]``).

    Example ``b``'s loss depends on row ``b`` of the embeddings only (the normalisers are
    constants), so its gradient rows come from one pullback of ones, here in the forward
    pass: the backward pass then reads no memory, so a memory update ordered after the loss
    (see ``kd_jax.objectives.library._crd``) writes the bank in place; otherwise XLA:CPU
    copied each 25 MB bank twice per step.
    """
    n = m_s.shape[0]
    scores_s, pull_s = jax.vjp(lambda a: _scores(a, m_t, safe, temperature, dense), s)
    scores_t, pull_t = jax.vjp(lambda a: _scores(a, m_s, safe, temperature, dense), t)
    if mode != "given":
        estimate = jnp.stack([_crd_log_normalizer(scores_s, n), _crd_log_normalizer(scores_t, n)])
        log_z = estimate if mode == "batch" else jnp.where(log_z > -jnp.inf, log_z, estimate)
    k = scores_s.shape[1] - 1
    log_noise = math.log(k / n)  # log(K P_n)
    log_c = math.log(k / n + 1e-7)

    def nce(scores, log_z):
        log_p = scores - log_z
        log_d1 = log_p[:, 0] - jnp.logaddexp(log_p[:, 0], log_c)
        log_d0 = log_noise - jnp.logaddexp(log_p[:, 1:], log_c)
        return -(log_d1 + jnp.sum(log_d0, axis=1))

    log_z = jax.lax.stop_gradient(log_z)
    loss, pull = jax.vjp(lambda a, b: nce(a, log_z[0]) + nce(b, log_z[1]), scores_s, scores_t)
    d_s, d_t = pull(jnp.ones_like(loss))
    (g_s,), (g_t,) = pull_s(d_s), pull_t(d_t)
    g_temperature = -(jnp.sum(d_s * scores_s, axis=1) + jnp.sum(d_t * scores_t, axis=1))
    # The loss made to depend on the gradient rows (never true, NaN included), so that a
    # write to the memories ordered after the loss is also after the gradients' reads.
    loss = jnp.where((g_s[:, 0] > jnp.inf) | (g_t[:, 0] > jnp.inf), jnp.nan, loss)
    return (loss, log_z), (g_s, g_t, g_temperature / temperature)


@functools.lru_cache(maxsize=None)
def _nce_with_gradients(dense: bool, mode: str):
    """``(loss, log_z)`` as a ``custom_vjp`` of :func:`_nce_forward` (reverse mode)."""
    forward = functools.partial(_nce_forward, dense=dense, mode=mode)

    @jax.custom_vjp
    def nce_loss(s, t, m_s, m_t, safe, log_z, temperature):
        return forward(s, t, m_s, m_t, safe, log_z, temperature)[0]

    def backward(grads, cotangents):
        g_s, g_t, g_temperature = grads
        cotangent = cotangents[0]  # the normalisers used are constants
        # No gradient reaches the memories, the indices or the normalisers.
        return (cotangent[:, None] * g_s, cotangent[:, None] * g_t, None, None, None, None,
                jnp.sum(cotangent * g_temperature))

    nce_loss.defvjp(forward, backward)
    return nce_loss


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
