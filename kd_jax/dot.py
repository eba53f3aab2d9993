"""DOT, the distillation-oriented trainer: SGD with one momentum for the task gradient and a
larger one for the distillation gradient.

:func:`dot` is an ``optax.GradientTransformation`` whose ``updates`` are the *pair*
``(task_grads, distill_grads)``: the gradients of the task loss (the cross-entropy) and of
the distillation loss, taken separately. Its output is one update tree, so
``flax.training.train_state.TrainState.apply_gradients(grads=(task, distill))`` works as
with any optimiser. The step has to compute the two gradients apart (two cotangents of one
``jax.vjp``), which is what a training step that uses DOT adds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["DotState", "dot"]

_PARTS = ("both", "task", "distill")


class DotState(NamedTuple):
    """The step count (for the schedule) and the two momentum buffers, shaped as the
    parameters."""

    count: jax.Array
    task_trace: Any
    distill_trace: Any


def dot(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    delta: float = 0.075,
    weight_decay: float = 5e-4,
    parts: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    r"""DOT: SGD with momentum :math:`\mu - \Delta` for the task gradient and
    :math:`\mu + \Delta` for the distillation gradient.

    For a parameter :math:`w` reached by both losses, with task gradient :math:`g`,
    distillation gradient :math:`h`, weight decay :math:`\lambda` and learning rate
    :math:`\eta_k`:

    .. math::
      b \leftarrow (\mu - \Delta)\, b + g + \lambda w, \qquad
      c \leftarrow (\mu + \Delta)\, c + h, \qquad
      w \leftarrow w - \eta_k (b + c)

    from zero buffers (the first step is then plain SGD, as ``torch.optim.SGD``'s). The
    weight decay goes with the task part. A parameter reached by one loss only (``parts``
    says which) gets plain momentum :math:`\mu` on that gradient plus the weight decay, as
    mdistiller does for a parameter without the other gradient (mdistiller leaves the
    weight decay out of the first step of a distillation-only parameter; here it is in every
    step). With :math:`\Delta = 0` this is SGD with momentum :math:`\mu` on :math:`g + h`.
    Defaults: mdistiller's CIFAR-100 DOT (``configs/cifar100/dot``: KD, lr 0.05 at batch
    64, :math:`\mu = 0.9`, :math:`\Delta = 0.075`, weight decay 5e-4).

    Args:
      learning_rate: :math:`\eta`, a number or an optax schedule of the step.
      momentum: :math:`\mu`.
      delta: :math:`\Delta`, with :math:`0 \le \mu \pm \Delta < 1`.
      weight_decay: :math:`\lambda \ge 0` (L2 added to the gradient, as torch's SGD).
      parts: ``None`` (every parameter is reached by both losses), or a pytree shaped as
        the parameters (or a function of the parameters returning one) holding ``"both"``,
        ``"task"`` or ``"distill"`` per leaf; e.g. ``"distill"`` for a head that only the
        distillation loss uses.

    Returns:
      An ``optax.GradientTransformation``; its ``update(updates, state, params)`` takes
      ``updates = (task_grads, distill_grads)`` and needs ``params`` (for the weight decay).

    References:
      Zhao et al., `DOT: A Distillation-Oriented Trainer
      <https://arxiv.org/abs/2307.08436>`_, ICCV 2023
    """
    for name, value in (("momentum", momentum), ("delta", delta),
                        ("weight_decay", weight_decay)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    if not momentum + delta < 1 or momentum - delta < 0:
        raise ValueError(f"the momenta momentum - delta = {momentum - delta} and momentum + "
                         f"delta = {momentum + delta} must lie in [0, 1); reduce `delta`.")
    task_momentum, distill_momentum = momentum - delta, momentum + delta

    def labels(params):
        tree = parts(params) if callable(parts) else parts
        if tree is None:
            return jax.tree.map(lambda _: "both", params)
        bad = [p for p in jax.tree.leaves(tree) if p not in _PARTS]
        if bad:
            raise ValueError(f"`parts` must hold 'both', 'task' or 'distill' per parameter, "
                             f"got {bad[0]!r}.")
        return tree

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return DotState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("dot needs `params` (for the weight decay): call "
                             "`tx.update((task_grads, distill_grads), state, params)`.")
        if not (isinstance(updates, tuple | list) and len(updates) == 2):
            raise ValueError("dot's `updates` must be the pair (task_grads, distill_grads): "
                             "the gradients of the task and the distillation loss, apart.")
        task, distill = updates
        part = labels(params)
        rate = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def task_trace(label, w, g, b):
            if label == "distill":
                return b
            mu = task_momentum if label == "both" else momentum
            return mu * b + g + weight_decay * w

        def distill_trace(label, w, h, c):
            if label == "task":
                return c
            if label == "both":
                return distill_momentum * c + h
            return momentum * c + h + weight_decay * w

        # `part` leads: its leaves are the strings, the other trees are matched to it.
        b = jax.tree.map(task_trace, part, params, task, state.task_trace)
        c = jax.tree.map(distill_trace, part, params, distill, state.distill_trace)
        step = jax.tree.map(lambda w, x, y: (-rate * (x + y)).astype(w.dtype), params, b, c)
        return step, DotState(optax.safe_increment(state.count), b, c)

    return optax.GradientTransformation(init, update)
