"""CRD's negative sampling: uniform with replacement, or an exact uniform sample without
replacement from the other classes that never sorts the training set per anchor.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kd_jax.losses._checks import _check_count, _check_index_range, _concrete_array, _int_array


def crd_sample_negatives(
    key: jax.Array,
    indices: ArrayLike,
    *,
    num_examples: int,
    num_negatives: int = 16384,
    dataset_labels: ArrayLike | None = None,
    class_order: ArrayLike | None = None,
) -> jax.Array:
    r"""Contrast indices for CRD: each example's own index, then its negatives.

    Row ``b`` is ``[indices[b], n_1, ..., n_K]`` with :math:`K` = `num_negatives`. Both
    of RepDistiller's samplers are provided:

    * ``dataset_labels`` given — RepDistiller's default (``CIFAR100InstanceSample``,
      ``mode='exact'``): the negatives are a uniform sample *without replacement* from
      the examples of other classes, :math:`\{j : y_j \ne y_{\mathrm{indices}[b]}\}`:
      every set of :math:`K` such examples is equally likely, and they come in a uniformly
      random order. No row repeats a negative, and neither the positive nor any example
      of its class is a negative. RepDistiller falls back to sampling with replacement
      when :math:`K` exceeds that set; here this raises ``ValueError`` if
      `dataset_labels` is concrete (checked against the largest class), and repeats
      negatives if it is traced.
    * ``dataset_labels=None`` — ``ContrastMemory``'s own sampler (used there when no
      contrast indices are passed): negatives uniform *with replacement* over all
      `num_examples` examples, so a negative may repeat or equal the positive.

    RepDistiller's ``mode='relax'`` (a random positive of the same class) is not
    provided. The rows depend on `key` only: the same key gives the same draws.

    *How the exclusive sampler draws.* With the examples sorted by class, the other
    classes of an anchor of class :math:`c` are the sorted positions outside :math:`c`'s
    block, :math:`M = N - n_c` of them. Each row draws i.i.d. uniform positions in
    :math:`[0, M)` (in blocks, until it has :math:`K` distinct ones) and keeps the first
    :math:`K` distinct values in order of first appearance; the law of that sequence is
    unchanged by any permutation of :math:`[0, M)`, so the kept values are an exactly
    uniform ordered sample without replacement. A position :math:`p` then maps to the
    sorted example :math:`p` before :math:`c`'s block and :math:`p + n_c` after it. This
    costs :math:`O(B N)` memory (one mark per example and anchor) and about
    :math:`-M \ln(1 - K/M)` draws per row (20,000 for CIFAR-100's :math:`M` = 49,500 and
    :math:`K` = 16,384), no sort.

    Args:
      key: a ``jax.random`` key.
      indices: positions ``[B]`` of the batch's examples in the training set, in
        ``[0, num_examples)``.
      num_examples: :math:`N`, the training-set size (rows of the CRD memories).
      num_negatives: :math:`K \ge 1`; the paper and RepDistiller use 16384.
      dataset_labels: integer class of every training example, ``[N]``; selects the
        class-exclusive sampler.
      class_order: optional, ``np.argsort(dataset_labels, kind="stable")`` computed once
        (it saves a sort of :math:`N` labels per call when `dataset_labels` is traced);
        a wrong order gives wrong negatives.

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
        if class_order is not None:
            raise ValueError("`class_order` is the class-sorted order of `dataset_labels`; "
                             "pass `dataset_labels` too, or neither.")
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
        if class_order is None:
            class_order = (jnp.argsort(labels, stable=True) if concrete is None
                           else np.argsort(concrete, kind="stable"))
        order = _int_array("class_order", class_order, 1, "example indices")
        if order.shape != labels.shape:
            raise ValueError(f"`class_order` must have shape {labels.shape} (one position per "
                             f"example), got {order.shape}.")
        negatives = _other_class_negatives(key, indices, labels, order, num_negatives)
    return jnp.concatenate(
        [indices.astype(jnp.int32)[:, None], negatives.astype(jnp.int32)], axis=1)


def _other_class_negatives(key, indices, labels, order, k):
    """``[B, k]`` examples drawn without replacement from outside each anchor's class."""
    n = labels.shape[0]
    order = order.astype(jnp.int32)
    sorted_labels = labels[order]
    anchor_class = labels[indices]
    start = jnp.searchsorted(sorted_labels, anchor_class, side="left").astype(jnp.int32)
    size = jnp.searchsorted(sorted_labels, anchor_class, side="right").astype(jnp.int32) - start
    positions = _distinct_below(key, n - size, k, n)
    # Skip the anchor's block: positions [0, M) onto the sorted examples outside it.
    positions = positions + jnp.where(positions >= start[:, None], size[:, None], 0)
    return order[jnp.clip(positions, 0, n - 1)]


def _block_sizes(k: int, width: int) -> tuple[int, int]:
    """Draws in the first block and in each later one.

    The first is 10% above the expected number of draws for ``k`` distinct values among
    ``width`` (about ``-width ln(1 - k / width)``), so rows over a set a little smaller than
    ``width`` (the other classes of a balanced training set) usually finish in it; later
    blocks are an eighth of it.
    """
    expected = -width * math.log1p(-k / width) if k < width else width * math.log(width)
    first = max(64, int(math.ceil(1.1 * expected)))
    return first, max(64, first // 8)


def _distinct_below(key, limit, k, width):
    """``[B, k]`` int32: row b is a uniform random ordered sample without replacement from
    ``[0, limit[b])``, ``limit <= width``; a row with ``limit[b] < k`` holds its
    ``limit[b]`` values, repeated.

    The first ``k`` distinct values, in order of first appearance, of i.i.d. uniform draws,
    taken in blocks until every row has ``k`` (or ``limit[b]``) of them. ``first[b, v]`` is
    the number of the first draw of ``v`` in row ``b``, so draw ``j`` is new iff
    ``first[b, draw_j] == j``.
    """
    batch = limit.shape[0]
    first_block, later_block = _block_sizes(k, width)
    limit = limit.astype(jnp.int32)
    need = jnp.minimum(limit, k)
    row = jnp.arange(batch, dtype=jnp.int32)[:, None]

    def draw_block(carry, block):
        i, start, first, count, out = carry
        draws, accepted = _uniform_below(jax.random.fold_in(key, i), limit, block)
        # Computed once: fused into each consumer (the scatters run serially on XLA:CPU), the
        # random bits would be recomputed inside every one of them.
        draws, accepted = jax.lax.optimization_barrier((draws, accepted))
        number = jnp.broadcast_to(start + jnp.arange(block, dtype=jnp.int32), draws.shape)
        # Flat 1-D scatters: measured faster on XLA:CPU than [B, .] ones. A rejected draw
        # goes to cell B * width, which does not exist (dropped), and is never new.
        cell = jnp.where(accepted, row * width + draws, batch * width).reshape(-1)
        first = first.at[cell].min(number.reshape(-1), mode="drop")
        seen = first.at[cell].get(mode="fill", fill_value=-1)
        new = (seen == number.reshape(-1)).reshape(draws.shape)
        rank = count[:, None] + jnp.cumsum(new, axis=1, dtype=jnp.int32) - 1
        # Slot k of each row does not exist: the draws sent there are dropped.
        slot = row * (k + 1) + jnp.where(new & (rank < k), rank, k)
        out = out.at[slot.reshape(-1)].set(draws.reshape(-1), mode="drop")
        return i + 1, start + block, first, count + jnp.sum(new, axis=1, dtype=jnp.int32), out

    init = (jnp.int32(0), jnp.int32(0),
            jnp.full((batch * width,), jnp.iinfo(jnp.int32).max, jnp.int32),
            jnp.zeros((batch,), jnp.int32), jnp.zeros((batch * (k + 1),), jnp.int32))
    carry = draw_block(init, first_block)
    _, _, _, count, out = jax.lax.while_loop(
        lambda c: jnp.any(c[3] < need), lambda c: draw_block(c, later_block), carry)
    out = out.reshape(batch, k + 1)[:, :k]
    slot = jnp.arange(k, dtype=jnp.int32)[None, :]
    repeat = jnp.take_along_axis(out, slot % jnp.maximum(count, 1)[:, None], axis=1)
    return jnp.where(slot < count[:, None], out, repeat)


def _uniform_below(key, limit, size):
    """``([B, size] int32 draws, [B, size] accepted)``: each accepted draw of row ``b`` is
    exactly uniform on ``[0, limit[b])`` (``limit`` >= 1), independently of the others.

    Lemire's multiply-and-reject on 32 random bits: the high word of ``bits * limit`` is the
    draw, rejected when the low word falls below ``2^32 mod limit`` (probability below
    ``limit / 2^32``, 1e-5 for CIFAR). One word per draw and no division, where
    ``jax.random.randint`` takes two words and a remainder (measured 4x slower on XLA:CPU).
    """
    bits = jax.random.bits(key, (limit.shape[0], size), jnp.uint32)
    span = jnp.maximum(limit, 1).astype(jnp.uint32)[:, None]
    high, low = _multiply_32x32(bits, span)
    return high.astype(jnp.int32), low >= (jnp.uint32(0) - span) % span


def _multiply_32x32(a, b):
    """The 64-bit product of uint32 arrays as ``(high word, low word)``, in uint32 only."""
    half = jnp.uint32(0xFFFF)
    a_lo, a_hi, b_lo, b_hi = a & half, a >> 16, b & half, b >> 16
    p0, p1, p2, p3 = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    middle = (p0 >> 16) + (p1 & half) + (p2 & half)  # < 3 * 2^16
    return p3 + (p1 >> 16) + (p2 >> 16) + (middle >> 16), ((middle & half) << 16) | (p0 & half)
