"""Optimisers and learning-rate schedules: the run's (:class:`OptimConfig`), DOT's, and an
objective's stage and frozen parameter groups.

:func:`make_optimizer` builds the optax transformation a student trains with. For an
objective with a first stage (:class:`kd_jax.objectives.Stage`) it is :func:`staged`: the
stage's own optimiser (constant rate, only the stage's parameter groups) for the stage's
steps, then the run's, from fresh state, with its schedule over the remaining steps. Frozen
groups (``Objective.frozen``) get zero updates from the run's optimiser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kd_jax import dot


def _field(default, help: str, **meta):
    """A dataclass field with its documentation (``help``, ``choices``) as metadata."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule.

    The peak learning rate is ``lr * batch_size / lr_batch_size`` when ``scale_lr`` (the
    linear scaling rule, Goyal et al. 2017), else ``lr``. The defaults are the CRD benchmark
    recipe (Tian et al. 2020; RepDistiller): SGD, momentum 0.9, lr 0.05 at batch 64, weight
    decay 5e-4, the rate ×0.1 at epochs 150, 180 and 210 of 240 (``milestones`` are
    fractions of the run: 150/240, 180/240, 210/240).

    Schedules: ``"step"`` (piecewise constant at ``milestones``), ``"cosine"`` (decay to 0),
    ``"onecycle"`` (optax's one-cycle: warm-up to the peak over 30% of the run, then cosine
    annealing), ``"constant"``. ``warmup_epochs`` prepends a linear warm-up from 0 to the
    ``step``, ``cosine`` and ``constant`` schedules. Weight decay is L2 added to the gradient
    before momentum (as ``torch.optim.SGD``) for SGD, decoupled (AdamW) for Adam.
    """

    # Each field's metadata is its flag's help (and choices) in kd_jax.experiment's CLI.
    optimizer: str = _field("sgd", "optimiser", choices=("sgd", "adam"))
    lr: float = _field(0.05, "learning rate at --lr-batch-size images, scaled linearly with "
                             "the batch size")
    lr_batch_size: int = _field(64, "the batch size --lr refers to")
    scale_lr: bool = _field(True, "scale --lr linearly with the batch size (Goyal et al. 2017)")
    momentum: float = _field(0.9, "SGD momentum")
    nesterov: bool = _field(False, "Nesterov momentum")
    weight_decay: float = _field(5e-4, "weight decay (L2 before momentum for SGD, as "
                                       "torch.optim.SGD; decoupled for Adam)")
    schedule: str = _field("step", "learning-rate schedule (step: x--decay-factor at "
                                   "--milestones, fractions of the run)",
                           choices=("step", "cosine", "onecycle", "constant"))
    milestones: tuple[float, ...] = _field((150 / 240, 180 / 240, 210 / 240),
                                           "step schedule: comma list of fractions of the run")
    decay_factor: float = _field(0.1, "step schedule: the rate's factor at each milestone")
    warmup_epochs: float = _field(0.0, "linear warm-up epochs")


def learning_rate(config: OptimConfig, batch_size: int) -> float:
    """The peak learning rate for ``batch_size`` (linear scaling, see :class:`OptimConfig`)."""
    if config.scale_lr:
        return config.lr * batch_size / config.lr_batch_size
    return config.lr


def make_schedule(config: OptimConfig, *, batch_size: int, steps_per_epoch: int,
                  epochs: int, skip_steps: int = 0) -> optax.Schedule:
    """The learning rate as a function of the step, for a run of ``epochs`` epochs (less
    ``skip_steps``, a first stage's, after which the schedule starts)."""
    peak = learning_rate(config, batch_size)
    total = max(1, epochs * steps_per_epoch - skip_steps)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total, peak)
    if config.schedule == "step":
        boundaries = {int(round(m * total)) - warmup: config.decay_factor
                      for m in config.milestones}
        main = optax.piecewise_constant_schedule(peak, boundaries)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(1, total - warmup))
    elif config.schedule == "constant":
        main = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; choose one of "
                         "'step', 'cosine', 'onecycle', 'constant'.")
    if warmup <= 0:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _stage_peak(config: OptimConfig, batch_size: int, stage) -> float:
    return learning_rate(config, batch_size) * stage.lr_factor


def objective_schedule(config: OptimConfig, *, batch_size: int, steps_per_epoch: int,
                       epochs: int, objective=None) -> optax.Schedule:
    """The learning rate a student of ``objective`` trains with at each step, as
    :func:`make_optimizer` applies it: :func:`make_schedule` for most; for an objective with
    a first stage, the stage's constant rate (``lr_factor`` × the peak) for its steps, then
    the schedule over the remaining ones."""
    stage = getattr(objective, "stage", None)
    if stage is None:
        return make_schedule(config, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                             epochs=epochs)
    skip = stage.steps(steps_per_epoch)
    main = make_schedule(config, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                         epochs=epochs, skip_steps=skip)
    peak = _stage_peak(config, batch_size, stage)
    return lambda step: jnp.where(step < skip, peak, main(jnp.maximum(step - skip, 0)))


def _base(config: OptimConfig, schedule) -> optax.GradientTransformation:
    if config.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    if config.optimizer == "adam":
        return optax.adamw(schedule, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose 'sgd' or 'adam'.")


def make_optimizer(config: OptimConfig, *, batch_size: int, steps_per_epoch: int,
                   epochs: int, objective=None) -> optax.GradientTransformation:
    """The optax optimiser of ``config`` with its schedule (see :class:`OptimConfig`).

    An ``objective`` with ``optimizer="dot"`` gets DOT (:func:`kd_jax.dot.dot`) with
    ``config``'s schedule, momentum and weight decay and the objective's ``delta``; its
    updates are the pair (task, distill) that :func:`kd_jax.train.distill_step_many`
    computes for it. One with ``frozen`` groups gets zero updates for them; one with a
    ``stage`` gets :func:`staged` (see the module docstring).
    """
    skip = 0
    if objective is not None and objective.stage is not None:
        skip = objective.stage.steps(steps_per_epoch)
        if skip >= epochs * steps_per_epoch:
            raise ValueError(f"the first stage ({skip} steps) must be shorter than the run "
                             f"({epochs * steps_per_epoch} steps); train more epochs.")
    schedule = make_schedule(config, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                             epochs=epochs, skip_steps=skip)
    if objective is not None and objective.optimizer == "dot":
        if config.optimizer != "sgd" or config.nesterov:
            raise ValueError(f"the DOT objective needs --optimizer sgd without --nesterov (DOT "
                             f"is SGD with two momenta), got {config.optimizer}"
                             f"{' with nesterov' if config.nesterov else ''}.")
        return dot.dot(schedule, momentum=config.momentum, weight_decay=config.weight_decay,
                       **dict(objective.optimizer_args))
    tx = _base(config, schedule)
    if objective is None:
        return tx
    if objective.frozen:
        tx = only(tx, objective.frozen, exclude=True)
    if objective.stage is not None:
        stage = objective.stage
        peak = _stage_peak(config, batch_size, stage)
        stage_tx = only(_base(config, optax.constant_schedule(peak)), stage.trains,
                        exclude=False, classifier=False)
        tx = staged(stage_tx, tx, skip)
    return tx


# ------------------------------------------------------------------ parameter groups

def in_groups(path: Sequence[Any], groups: Sequence[str], *, classifier: bool = True) -> bool:
    """Whether the parameter at ``path`` (a key path into a
    :class:`~kd_jax.objectives.Student`'s tree) lies in one of ``groups`` (``"backbone"``,
    ``"head_<term>"``, ``"head_<term>/<module>"``); ``classifier=False`` leaves the
    backbone's ``classifier`` out (a stage trains the feature layers)."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if not classifier and names[:2] == ["backbone", "classifier"]:
        return False
    for group in groups:
        parts = group.split("/")
        if names[:len(parts)] == parts:
            return True
    return False


def only(tx: optax.GradientTransformation, groups: Sequence[str], *, exclude: bool,
         classifier: bool = True) -> optax.GradientTransformation:
    """``tx`` on the parameters in ``groups`` (``exclude=False``) or on all the others
    (``exclude=True``); zero updates for the rest."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "on" if in_groups(path, groups, classifier=classifier) != exclude
            else "off", params)
    return optax.multi_transform({"on": tx, "off": optax.set_to_zero()}, labels)


class StagedState(NamedTuple):
    count: jax.Array
    stage: Any
    main: Any


def staged(stage_tx: optax.GradientTransformation, main_tx: optax.GradientTransformation,
           stage_steps: int) -> optax.GradientTransformation:
    """``stage_tx`` for the first ``stage_steps`` updates, then ``main_tx`` from its initial
    state (each keeps its own state, which only its own steps change)."""

    def init(params):
        return StagedState(jnp.zeros((), jnp.int32), stage_tx.init(params), main_tx.init(params))

    def update(updates, state, params=None):
        # Both computed, one kept (elementwise work; a lax.cond is slow on XLA:CPU).
        in_stage = state.count < stage_steps
        stage_updates, stage_state = stage_tx.update(updates, state.stage, params)
        main_updates, main_state = main_tx.update(updates, state.main, params)
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(in_stage, x, y), a, b)  # noqa: E731
        return pick(stage_updates, main_updates), StagedState(
            state.count + 1, pick(stage_state, state.stage), pick(state.main, main_state))

    return optax.GradientTransformation(init, update)
