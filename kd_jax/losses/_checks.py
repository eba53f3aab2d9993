"""Argument checks, dtype casting, the non-finite promise and shared numerics.

Private to :mod:`kd_jax.losses`; every loss module imports its checks from here so that
all losses validate, cast and propagate non-finite values the same way.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


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
    """Makes a loss NaN wherever its student or teacher input is not finite.

    The student and teacher arrays are the loss's first two parameters. They are found by
    name in the call's bound arguments, so the wrapped loss takes every argument
    positionally or by keyword, as its signature (kept by ``functools.wraps``) says.

    Each output element is NaN when any value of the student or teacher array that it is
    computed from (the same leading example axes; all of them for a scalar loss) is NaN or
    infinite. Without this, masks such as ``p > 0`` (False for NaN) would turn a NaN teacher
    into a plausible finite loss and hide a broken run.
    """
    signature = inspect.signature(loss)
    arrays = tuple(signature.parameters)[:2]
    assert len(arrays) == 2 and all(
        signature.parameters[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        for name in arrays), (loss, signature)

    @functools.wraps(loss)
    def wrapped(*args, **kwargs):
        out = loss(*args, **kwargs)  # a call that does not fit raises Python's TypeError here
        bound = signature.bind(*args, **kwargs).arguments
        bad = jnp.zeros(out.shape, bool)
        for name in arrays:
            x = jnp.asarray(bound[name])
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
